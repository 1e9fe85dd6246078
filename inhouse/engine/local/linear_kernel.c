/* bf16 linear layers on CPUs with AVX512-BF16 and no AMX (linear_kernel.py builds, loads and calls this file):
 * ``linear_pack`` lays a weight out once, ``linear_forward`` computes ``x @ W^T + bias`` with it.
 *
 * Layout.  A weight ``[n][k]`` (n a multiple of 32, k even) is stored as blocks of 16 output columns,
 * ``[n/16][k/2][16][2]``: for each pair of inputs, the 16 columns' two weights side by side, which is what
 * ``vdpbf16ps`` reads (it multiplies bf16 pairs and adds both products to a float32 lane).
 *
 * Forward.  Output columns are taken 32 at a time (two blocks), input rows 8 at a time: 16 float32 accumulators,
 * one broadcast of a row's input pair and two loads of weights per input pair.  A decode step's few rows thus
 * read each weight once, straight from memory to the dot products (oneDNN's brgemm took 1.2-1.6x as long for
 * 1-16 rows of SmolLM2's shapes here).  From ``MANY_ROWS`` rows on (a prompt), where the dot products bound the
 * time, 64 columns by 6 rows: fewer loads per product, the same sums in the same order.
 * Each output is one float32 sum over the inputs in order, plus the bias, rounded to bf16 once (round to
 * nearest even), so a row's result does not depend on which or how many rows share the call, nor on the threads.
 *
 * Column blocks are split over ``threads`` OpenMP threads; loaded into a process that has PyTorch, this library
 * binds to PyTorch's own OpenMP runtime (``libgomp.so.1``), so its threads are PyTorch's.  No allocation.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define ROWS 8   /* input rows computed together */
#define COLS 32  /* output columns computed together: two blocks of 16 */
#define MANY_ROWS 48 /* from this many rows on, six rows by 64 columns (below) */

void linear_pack(const uint16_t *w, long n, long k, uint16_t *packed) {
    #pragma omp parallel for schedule(static)
    for (long block = 0; block < n / 16; block++)
        for (long pair = 0; pair < k / 2; pair++)
            for (int lane = 0; lane < 16; lane++) {
                const uint16_t *from = w + (block * 16 + lane) * k + 2 * pair;
                uint16_t *to = packed + ((block * (k / 2) + pair) * 16 + lane) * 2;
                to[0] = from[0];
                to[1] = from[1];
            }
}

static inline uint32_t pair_at(const uint16_t *x) {
    uint32_t pair;
    memcpy(&pair, x, sizeof pair);
    return pair;
}

/* ``rows`` (a constant once inlined) rows of x against 32 columns: ``w`` is the first block, the second follows */
static inline __attribute__((always_inline)) void rows_by_cols(const uint16_t *x, long x_row, const int rows,
                                                               const __m512bh *w, long pairs, const float *bias,
                                                               uint16_t *out, long out_row) {
    __m512 first[ROWS], second[ROWS];
    for (int r = 0; r < rows; r++) {
        first[r] = _mm512_setzero_ps();
        second[r] = _mm512_setzero_ps();
    }
    const __m512bh *w2 = w + pairs;
    for (long p = 0; p < pairs; p++) {
        __m512bh a = w[p], b = w2[p];
        for (int r = 0; r < rows; r++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair_at(x + r * x_row + 2 * p));
            first[r] = _mm512_dpbf16_ps(first[r], xv, a);
            second[r] = _mm512_dpbf16_ps(second[r], xv, b);
        }
    }
    for (int r = 0; r < rows; r++) {
        __m512 s1 = first[r], s2 = second[r];
        if (bias) {
            s1 = _mm512_add_ps(s1, _mm512_loadu_ps(bias));
            s2 = _mm512_add_ps(s2, _mm512_loadu_ps(bias + 16));
        }
        _mm256_storeu_si256((__m256i *)(out + r * out_row), (__m256i)_mm512_cvtneps_pbh(s1));
        _mm256_storeu_si256((__m256i *)(out + r * out_row + 16), (__m256i)_mm512_cvtneps_pbh(s2));
    }
}

static void some_rows(const uint16_t *x, long x_row, int rows, const __m512bh *w, long pairs, const float *bias,
                      uint16_t *out, long out_row) {
    switch (rows) {
    case 1: rows_by_cols(x, x_row, 1, w, pairs, bias, out, out_row); break;
    case 2: rows_by_cols(x, x_row, 2, w, pairs, bias, out, out_row); break;
    case 3: rows_by_cols(x, x_row, 3, w, pairs, bias, out, out_row); break;
    case 4: rows_by_cols(x, x_row, 4, w, pairs, bias, out, out_row); break;
    case 5: rows_by_cols(x, x_row, 5, w, pairs, bias, out, out_row); break;
    case 6: rows_by_cols(x, x_row, 6, w, pairs, bias, out, out_row); break;
    case 7: rows_by_cols(x, x_row, 7, w, pairs, bias, out, out_row); break;
    default: rows_by_cols(x, x_row, 8, w, pairs, bias, out, out_row); break;
    }
}

/* a prompt's rows: 6 rows against 64 columns (four blocks), 24 accumulators, four loads of weights and six
 * broadcasts per input pair: fewer loads per product than 8 x 32 where the products, not memory, bound the time;
 * each output is the same sum in the same order as there, so the same bits */
static void six_rows_by_64(const uint16_t *x, long x_row, const __m512bh *w, long pairs, const float *bias,
                           uint16_t *out, long out_row) {
    __m512 acc[6][4];
    for (int r = 0; r < 6; r++)
        for (int b = 0; b < 4; b++) acc[r][b] = _mm512_setzero_ps();
    for (long p = 0; p < pairs; p++) {
        __m512bh w0 = w[p], w1 = w[pairs + p], w2 = w[2 * pairs + p], w3 = w[3 * pairs + p];
        for (int r = 0; r < 6; r++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair_at(x + r * x_row + 2 * p));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xv, w2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xv, w3);
        }
    }
    for (int r = 0; r < 6; r++)
        for (int b = 0; b < 4; b++) {
            __m512 sum = acc[r][b];
            if (bias) sum = _mm512_add_ps(sum, _mm512_loadu_ps(bias + 16 * b));
            _mm256_storeu_si256((__m256i *)(out + r * out_row + 16 * b), (__m256i)_mm512_cvtneps_pbh(sum));
        }
}

/* x ``[m][k]`` (rows ``x_row`` elements apart), the packed weight of ``[n][k]``, bias ``[n]`` float32 or NULL, into
 * out ``[m][n]`` (rows ``out_row`` apart).  Returns 1 (nothing computed) for a shape it does not take. */
int linear_forward(const uint16_t *x, long x_row, long m, long k, const uint16_t *packed, long n, const float *bias,
                   uint16_t *out, long out_row, int threads) {
    if (n % COLS || k % 2 || m < 1 || threads < 1)
        return 1;
    long pairs = k / 2;
    long wide = m >= MANY_ROWS && n % (2 * COLS) == 0 ? m / 6 * 6 : 0; /* rows taken six by 64 columns */
    if (wide) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (long cols = 0; cols < n / (2 * COLS); cols++) {
            const __m512bh *w = (const __m512bh *)(packed + cols * 2 * COLS * k);
            for (long row = 0; row < wide; row += 6)
                six_rows_by_64(x + row * x_row, x_row, w, pairs, bias ? bias + cols * 2 * COLS : NULL,
                               out + row * out_row + cols * 2 * COLS, out_row);
        }
    }
    if (wide == m)
        return 0;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long cols = 0; cols < n / COLS; cols++) {
        const __m512bh *w = (const __m512bh *)(packed + cols * COLS * k);
        for (long row = wide; row < m; row += ROWS) {
            int rows = m - row < ROWS ? (int)(m - row) : ROWS;
            some_rows(x + row * x_row, x_row, rows, w, pairs, bias ? bias + cols * COLS : NULL,
                      out + row * out_row + cols * COLS, out_row);
        }
    }
    return 0;
}
