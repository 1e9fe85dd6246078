/* bf16 attention over the KV cache's slots on CPUs with AVX512-BF16 (attention_kernel.py builds, loads and calls
 * this file): ``prefill_attention``, a long prompt's causal attention over its slot, and ``decode_attention``, a
 * decode step's rows of one tier (further down).
 *
 * Prefill.  Query rows are taken six at a time: the ``group`` query heads that share a kv head, position after
 * position.  For each six, the scores against every key up to the last row's position are one pass of
 * ``vdpbf16ps`` (bf16 pairs multiplied and summed into float32), kept in float32; the softmax runs over exactly
 * each row's visible keys (its own position and before) in float32; the probabilities are rounded to bf16 and
 * multiplied with the values by ``vdpbf16ps`` again, and the sum scaled by the softmax's 1/sum once at the end.
 * The scores stay in a row's scratch (its six rows × keys, in L2) instead of going to memory between three
 * separate operations.
 *
 * Each row's result depends only on its position and the keys and values up to it: keys past a row's position
 * contribute an exact 0 to its sums, and every sum runs over keys in the same order, so a token's output is the
 * same bit for bit whatever prefix was computed before it (the prefix cache's property) and whatever rows share
 * its six.  Keys and values are first repacked per kv head into the pair layout ``vdpbf16ps`` reads: keys as
 * [keys/16][head_dim/2][16][2], values as [keys/2][head_dim][2].  The caller may keep a prompt's packed keys and
 * values between its chunks (``packed_k``, ``packed_v``, the first ``packed`` keys already in them): then only the
 * keys from the last partial group of 16 on are packed again, not every key before the chunk.
 *
 * Work is split over ``threads`` OpenMP threads, six rows of one kv head at a time, interleaved so each thread gets
 * early (short) and late (long) rows alike.  Loaded into a process that has PyTorch, this library binds to PyTorch's
 * own OpenMP runtime (the same ``libgomp.so.1``), so its threads are PyTorch's: no second pool competes with
 * PyTorch's spinning workers for the cores.  No allocation: the caller passes the scratch,
 * ``prefill_scratch_bytes`` long.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define ROWS 6       /* query rows computed together */
#define MAX_THREADS 256

typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    long q_head, q_token, kv_head, kv_token, out_head, out_token; /* strides, in elements */
    int heads, kv_heads, length, offset, dim, padded;             /* padded: keys rounded up to 64 */
    float scale;
    uint16_t *packed_k, *packed_v;                                /* [kv_heads][packed_head] each */
    long packed_head;                                             /* elements per kv head, >= padded * dim */
    int packed;                                                   /* keys already packed (earlier chunks) */
    char *rows_scratch;                                           /* per thread: float scores, bf16 probs */
    int threads;
} Job;

static long rows_scratch_bytes(int padded) { return (long)ROWS * padded * (4 + 2); }

/* e^x for x <= 0, relative error under 2e-7 (a degree-6 polynomial on [-ln2/2, ln2/2], times 2^n) */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    return _mm512_scalef_ps(_mm512_add_ps(p, _mm512_set1_ps(1.0f)), n);
}

/* lanes key..key+15 that a row at position pos sees */
static inline __mmask16 visible(int key, int pos) {
    int seen = pos + 1 - key;
    return seen >= 16 ? (__mmask16)0xffff : (seen <= 0 ? (__mmask16)0 : (__mmask16)((1u << seen) - 1));
}

/* keys and values of kv head h from the group holding key ``packed`` on (0: all), zeros past the prompt's end */
static void repack(const Job *j, int h) {
    int dim = j->dim, pairs = dim / 2, total = j->offset + j->length;
    const uint16_t *k = j->k + h * j->kv_head, *v = j->v + h * j->kv_head;
    uint32_t *pk = (uint32_t *)(j->packed_k + (long)h * j->packed_head);
    uint16_t *pv = j->packed_v + (long)h * j->packed_head;
    for (int key = j->packed / 16 * 16; key < j->padded; key += 16)
        for (int d = 0; d < pairs; d++) {
            uint32_t *dst = pk + ((long)(key / 16) * pairs + d) * 16;
            for (int i = 0; i < 16; i++)
                dst[i] = key + i < total ? ((const uint32_t *)(k + (key + i) * j->kv_token))[d] : 0;
        }
    for (int key = j->packed / 2 * 2; key < j->padded; key += 2) {
        uint16_t *dst = pv + (long)key * dim;
        const uint16_t *a = v + key * j->kv_token, *b = a + j->kv_token;
        for (int d = 0; d < dim; d++) {
            dst[2 * d] = key < total ? a[d] : 0;
            dst[2 * d + 1] = key + 1 < total ? b[d] : 0;
        }
    }
}

/* rows first..first+count-1 of kv head h (row r: position offset + r / group, query head h * group + r % group) */
static void rows(const Job *j, int h, int first, int count, float *scores, uint16_t *probs) {
    int dim = j->dim, pairs = dim / 2, group = j->heads / j->kv_heads;
    const uint32_t *query[ROWS];
    int pos[ROWS], last = 0;
    for (int i = 0; i < ROWS; i++) {
        int r = first + (i < count ? i : count - 1); /* a short tail repeats its last row */
        query[i] = (const uint32_t *)(j->q + (h * group + r % group) * j->q_head + r / group * j->q_token);
        pos[i] = j->offset + r / group;
        last = pos[i] > last ? pos[i] : last;
    }
    int keys = (last + 1 + 15) / 16 * 16;
    const uint32_t *pk = (const uint32_t *)(j->packed_k + (long)h * j->packed_head);
    __m512 scale = _mm512_set1_ps(j->scale), top[ROWS];
    for (int i = 0; i < ROWS; i++) top[i] = _mm512_set1_ps(-INFINITY);

    /* scores = q k^T * scale, 64 keys at a time, then 16 */
    int key = 0;
    for (; key + 64 <= keys; key += 64) {
        __m512 acc[ROWS][4];
        for (int i = 0; i < ROWS; i++)
            for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_ps();
        const uint32_t *tile = pk + (long)(key / 16) * pairs * 16;
        for (int d = 0; d < pairs; d++) {
            __m512bh b[4];
            for (int c = 0; c < 4; c++) b[c] = (__m512bh)_mm512_loadu_si512(tile + ((long)c * pairs + d) * 16);
            for (int i = 0; i < ROWS; i++) {
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)query[i][d]);
                for (int c = 0; c < 4; c++) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], a, b[c]);
            }
        }
        for (int i = 0; i < ROWS; i++)
            for (int c = 0; c < 4; c++) {
                __m512 s = _mm512_mul_ps(acc[i][c], scale);
                top[i] = _mm512_mask_max_ps(top[i], visible(key + 16 * c, pos[i]), top[i], s);
                _mm512_storeu_ps(scores + (long)i * j->padded + key + 16 * c, s);
            }
    }
    for (; key < keys; key += 16) {
        __m512 acc[ROWS];
        for (int i = 0; i < ROWS; i++) acc[i] = _mm512_setzero_ps();
        const uint32_t *tile = pk + (long)(key / 16) * pairs * 16;
        for (int d = 0; d < pairs; d++) {
            __m512bh b = (__m512bh)_mm512_loadu_si512(tile + (long)d * 16);
            for (int i = 0; i < ROWS; i++)
                acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32((int)query[i][d]), b);
        }
        for (int i = 0; i < ROWS; i++) {
            __m512 s = _mm512_mul_ps(acc[i], scale);
            top[i] = _mm512_mask_max_ps(top[i], visible(key, pos[i]), top[i], s);
            _mm512_storeu_ps(scores + (long)i * j->padded + key, s);
        }
    }

    /* probabilities, unnormalised: e^(s - max) over visible keys (0 past them), rounded to bf16 */
    float inverse[ROWS];
    for (int i = 0; i < ROWS; i++) {
        const float *s = scores + (long)i * j->padded;
        uint16_t *p = probs + (long)i * j->padded;
        __m512 top_i = _mm512_set1_ps(_mm512_reduce_max_ps(top[i])), sum = _mm512_setzero_ps();
        for (int x = 0; x < keys; x += 16) {
            __m512 e = _mm512_maskz_mov_ps(visible(x, pos[i]), exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + x), top_i)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(p + x), (__m256i)_mm512_cvtneps_pbh(e));
        }
        inverse[i] = 1.0f / _mm512_reduce_add_ps(sum);
    }

    /* out = probs v / sum, 64 dims at a time */
    const uint16_t *pv = j->packed_v + (long)h * j->packed_head;
    for (int d0 = 0; d0 < dim; d0 += 64) {
        __m512 acc[ROWS][4];
        const uint32_t *p[ROWS];
        for (int i = 0; i < ROWS; i++) {
            p[i] = (const uint32_t *)(probs + (long)i * j->padded);
            for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_ps();
        }
        const uint16_t *v = pv + 2 * d0;
        for (int pair = 0; pair < keys / 2; pair++, v += 2 * dim) {
            __m512bh b0 = (__m512bh)_mm512_loadu_si512(v), b1 = (__m512bh)_mm512_loadu_si512(v + 32),
                     b2 = (__m512bh)_mm512_loadu_si512(v + 64), b3 = (__m512bh)_mm512_loadu_si512(v + 96);
            for (int i = 0; i < ROWS; i++) {
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)p[i][pair]);
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
                acc[i][2] = _mm512_dpbf16_ps(acc[i][2], a, b2);
                acc[i][3] = _mm512_dpbf16_ps(acc[i][3], a, b3);
            }
        }
        for (int i = 0; i < count; i++) {
            int r = first + i;
            uint16_t *o = j->out + (h * group + r % group) * j->out_head + r / group * j->out_token + d0;
            __m512 inv = _mm512_set1_ps(inverse[i]);
            for (int c = 0; c < 4; c++)
                _mm256_storeu_si256((__m256i *)(o + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][c], inv)));
        }
    }
}

static void attend(const Job *j, int index) {
    int rows_per_head = j->length * (j->heads / j->kv_heads);
    long blocks = (rows_per_head + ROWS - 1) / ROWS;
    char *mine = j->rows_scratch + index * rows_scratch_bytes(j->padded);
    float *scores = (float *)mine;
    uint16_t *probs = (uint16_t *)(mine + (long)ROWS * j->padded * 4);
    for (long item = index; item < blocks * j->kv_heads; item += j->threads) {
        int first = (int)(item / j->kv_heads) * ROWS;
        int count = rows_per_head - first < ROWS ? rows_per_head - first : ROWS;
        rows(j, (int)(item % j->kv_heads), first, count, scores, probs);
    }
}

long prefill_scratch_bytes(int kv_heads, int total, int dim, int threads) {
    long padded = (total + 63) / 64 * 64;
    return 2 * (long)kv_heads * padded * dim * 2 + threads * rows_scratch_bytes((int)padded) + 64;
}

/* 0, or -1 for arguments this kernel does not take (the caller checks them first).  ``packed_k`` and ``packed_v``
 * NULL: keys and values are packed into the scratch; else into them (``packed_head`` elements per kv head, room
 * for the keys up to offset + length rounded up to 64), whose first ``packed`` keys an earlier call packed. */
int prefill_attention(const uint16_t *q, long q_head, long q_token, const uint16_t *k, const uint16_t *v, long kv_head,
                      long kv_token, uint16_t *out, long out_head, long out_token, int heads, int kv_heads, int length,
                      int offset, int dim, float scale, int threads, char *scratch, long scratch_bytes,
                      uint16_t *packed_k, uint16_t *packed_v, long packed_head, int packed) {
    int padded = (offset + length + 63) / 64 * 64;
    if (dim % 64 || dim > 256 || kv_heads < 1 || heads % kv_heads || length < 1 || offset < 0 || threads < 1 ||
        threads > MAX_THREADS || scratch_bytes < prefill_scratch_bytes(kv_heads, offset + length, dim, threads) ||
        (packed_k != NULL && (packed_v == NULL || packed_head < (long)padded * dim || packed < 0 || packed > offset)))
        return -1;
    Job j = {q, k, v, out, q_head, q_token, kv_head, kv_token, out_head, out_token, heads, kv_heads, length, offset,
             dim, padded, scale, packed_k, packed_v, packed_head, packed, NULL, threads};
    char *at = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    if (packed_k == NULL) {
        j.packed_k = (uint16_t *)at;
        j.packed_v = j.packed_k + (long)kv_heads * padded * dim;
        j.packed_head = (long)padded * dim;
        j.packed = 0;
    }
    j.rows_scratch = (char *)((uint16_t *)at + 2 * (long)kv_heads * padded * dim);
#pragma omp parallel num_threads(threads)
    {
        int index = omp_get_thread_num(), team = omp_get_num_threads();
        for (int h = index; h < kv_heads; h += team) repack(&j, h);
#pragma omp barrier
#pragma omp single
        j.threads = team; /* the team may be smaller than asked */
        attend(&j, index);
    }
    return 0;
}

/* ---- decode rows: one new query token per sequence, each over its own slot's first lengths[row] positions ----
 *
 * A decode step's rows of one tier, each (row, kv head) one item: the ``group`` query heads that share the kv
 * head are scored against the row's keys 0..lengths[row]-1 only (not the tier's whole capacity, which PyTorch's
 * batched matmuls must read), in float32 (bf16 widened exactly, fused multiply-adds), with q pre-scaled; a float32
 * softmax; the values summed with float32 probabilities; one rounding to bf16 at the end.  Keys and values are
 * read in place, once per item, for all of its query heads. */

#define MAX_GROUP 16
#define MAX_CHUNKS 16 /* head_dim / 16 */

static inline __m512 widen(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    const int32_t *lengths;
    long q_row, q_head, kv_row, kv_head, kv_token, out_row, out_head; /* strides, in elements */
    int rows, heads, kv_heads, dim, stride; /* stride: floats of scratch per query head */
    float scale;
    float *scratch;                          /* per thread: group * stride floats */
} DecodeJob;

static void decode_item(const DecodeJob *j, int row, int h, float *scores) {
    int group = j->heads / j->kv_heads, chunks = j->dim / 16, length = j->lengths[row];
    const uint16_t *k = j->k + row * j->kv_row + h * j->kv_head, *v = j->v + row * j->kv_row + h * j->kv_head;
    __m512 q[MAX_GROUP][MAX_CHUNKS], scale = _mm512_set1_ps(j->scale);
    for (int g = 0; g < group; g++)
        for (int c = 0; c < chunks; c++)
            q[g][c] = _mm512_mul_ps(widen(j->q + row * j->q_row + (h * group + g) * j->q_head + 16 * c), scale);
    float top[MAX_GROUP];
    for (int g = 0; g < group; g++) top[g] = -INFINITY;
    for (int t = 0; t < length; t++) {
        const uint16_t *kt = k + t * j->kv_token;
        __m512 key[MAX_CHUNKS];
        for (int c = 0; c < chunks; c++) key[c] = widen(kt + 16 * c);
        for (int g = 0; g < group; g++) {
            __m512 acc = _mm512_mul_ps(q[g][0], key[0]);
            for (int c = 1; c < chunks; c++) acc = _mm512_fmadd_ps(q[g][c], key[c], acc);
            float s = _mm512_reduce_add_ps(acc);
            scores[g * j->stride + t] = s;
            top[g] = s > top[g] ? s : top[g];
        }
    }
    float inverse[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        float *s = scores + g * j->stride;
        __m512 top_g = _mm512_set1_ps(top[g]), sum = _mm512_setzero_ps();
        for (int t = 0; t < length; t += 16) {
            __mmask16 in = length - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (length - t)) - 1);
            __m512 e = _mm512_maskz_mov_ps(in, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, s + t), top_g)));
            sum = _mm512_add_ps(sum, e);
            _mm512_mask_storeu_ps(s + t, in, e);
        }
        inverse[g] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    __m512 acc[MAX_GROUP][MAX_CHUNKS];
    for (int g = 0; g < group; g++)
        for (int c = 0; c < chunks; c++) acc[g][c] = _mm512_setzero_ps();
    for (int t = 0; t < length; t++) {
        const uint16_t *vt = v + t * j->kv_token;
        __m512 value[MAX_CHUNKS];
        for (int c = 0; c < chunks; c++) value[c] = widen(vt + 16 * c);
        for (int g = 0; g < group; g++) {
            __m512 p = _mm512_set1_ps(scores[g * j->stride + t]);
            for (int c = 0; c < chunks; c++) acc[g][c] = _mm512_fmadd_ps(p, value[c], acc[g][c]);
        }
    }
    for (int g = 0; g < group; g++) {
        uint16_t *o = j->out + row * j->out_row + (h * group + g) * j->out_head;
        __m512 inv = _mm512_set1_ps(inverse[g]);
        for (int c = 0; c < chunks; c++)
            _mm256_storeu_si256((__m256i *)(o + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][c], inv)));
    }
}

long decode_scratch_bytes(int heads, int kv_heads, int capacity, int threads) {
    return (long)threads * (heads / kv_heads) * ((capacity + 15) / 16 * 16) * 4 + 64;
}

/* 0, or -1 for arguments this kernel does not take (the caller checks them first) */
int decode_attention(const uint16_t *q, long q_row, long q_head, const uint16_t *k, const uint16_t *v, long kv_row,
                     long kv_head, long kv_token, uint16_t *out, long out_row, long out_head, const int32_t *lengths,
                     int rows, int heads, int kv_heads, int dim, int capacity, float scale, int threads,
                     char *scratch, long scratch_bytes) {
    if (dim % 16 || dim / 16 > MAX_CHUNKS || kv_heads < 1 || heads % kv_heads || heads / kv_heads > MAX_GROUP ||
        rows < 1 || threads < 1 || threads > MAX_THREADS ||
        scratch_bytes < decode_scratch_bytes(heads, kv_heads, capacity, threads))
        return -1;
    for (int r = 0; r < rows; r++)
        if (lengths[r] < 1 || lengths[r] > capacity) return -1;
    int stride = (capacity + 15) / 16 * 16;
    DecodeJob j = {q, k, v, out, lengths, q_row, q_head, kv_row, kv_head, kv_token, out_row, out_head, rows, heads,
                   kv_heads, dim, stride, scale, (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63)};
    long items = (long)rows * kv_heads;
#pragma omp parallel num_threads(threads)
    {
        int index = omp_get_thread_num(), team = omp_get_num_threads();
        float *mine = j.scratch + (long)index * (heads / kv_heads) * stride;
        for (long item = index; item < items; item += team)
            decode_item(&j, (int)(item / kv_heads), (int)(item % kv_heads), mine);
    }
    return 0;
}
