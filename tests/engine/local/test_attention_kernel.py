"""The compiled attention (``attention_kernel.py`` and its C source) on random bf16 tensors.  Prefill: against a
float32 reference, the same bits for a token whatever prefix came before it and however many threads ran, and the
engine's layout using it.  Decode rows: against a float64 reference over each row's own positions, none past them
read, the same bits for a row whatever rows share its step, and the engine's layout using it.  A failed build turns it
off (how it is built: test_compiled.py).

The tests that run the kernel need a CPU with AVX512-BF16 (this project's machines and CI have it) and are skipped
elsewhere; those of its build and of when it is used run on any x86-64 Linux machine with a C compiler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from inhouse.engine.local import compiled
from inhouse.engine.local.attention import BatchLayout, DecodeGroup, Placement, _prefill, register, slot_attention
from inhouse.engine.local.attention_kernel import AttentionKernel, PackedPrompt
from inhouse.engine.local.kv_cache import SlotKVCache
from inhouse.engine.local.kv_tiers import KVTiers
from inhouse.engine.local.runner import ModelRunner
from tests.engine.local.test_scheduler import seq


@pytest.fixture(scope="module")
def kernel() -> AttentionKernel:
    if not compiled.cpu_has("avx512_bf16"):
        pytest.skip("the prefill kernel runs only on a CPU with AVX512-BF16")
    built, why = AttentionKernel.load()
    assert built is not None, why
    return built


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def tensors(heads: int, kv_heads: int, total: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Queries ``[heads, total, dim]`` and keys, values ``[kv_heads, total + 40, dim]`` (a slot with spare room)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, heads, dim, generator=g).to(torch.bfloat16).transpose(0, 1)  # the model's strides
    k, v = (torch.randn(kv_heads, total + 40, dim, generator=g).to(torch.bfloat16) for _ in range(2))
    return q, k, v


def run(kernel: AttentionKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int,
        scale: float) -> torch.Tensor:
    """Positions ``offset..`` of ``q`` → ``[length, heads, dim]``."""
    out = torch.empty(q.shape[1] - offset, q.shape[0], q.shape[2], dtype=torch.bfloat16)
    kernel.prefill(q[:, offset:], k, v, offset, scale, out)
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float) -> torch.Tensor:
    total = q.shape[1]
    group = q.shape[0] // k.shape[0]
    keys = k[:, :total].float().repeat_interleave(group, 0)
    values = v[:, :total].float().repeat_interleave(group, 0)
    scores = q[:, offset:].float() @ keys.transpose(1, 2) * scale
    seen = torch.ones(total - offset, total, dtype=torch.bool).tril(offset)
    return (scores.masked_fill(~seen, float("-inf")).softmax(-1) @ values).transpose(0, 1)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (8, 2, 128), (4, 4, 64), (12, 2, 256)])
@pytest.mark.parametrize(("total", "offset"), [(1, 0), (77, 0), (300, 0), (1000, 0), (700, 512), (700, 333)])
def test_it_computes_causal_attention(kernel: AttentionKernel, heads: int, kv_heads: int, dim: int, total: int,
                                      offset: int) -> None:
    q, k, v = tensors(heads, kv_heads, total, dim, seed=total + dim)
    got = run(kernel, q, k, v, offset, dim**-0.5).float()
    want = reference(q, k, v, offset, dim**-0.5)
    assert (got - want).abs().max() < 0.02  # bf16 probabilities and output; float32 scores and sums
    assert (got - want).abs().mean() < 5e-4


@pytest.mark.parametrize("offset", [1, 64, 100, 511])
def test_a_token_gets_the_same_bits_whatever_came_before(kernel: AttentionKernel, offset: int) -> None:
    """The prefix cache's property: a prefill from a cached offset equals the whole prefill's rows there."""
    q, k, v = tensors(9, 3, 900, 64, seed=offset)
    whole = run(kernel, q, k, v, 0, 0.125)
    assert torch.equal(run(kernel, q, k, v, offset, 0.125), whole[offset:])


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (8, 2, 128)])
def test_chunks_that_keep_their_packed_keys_give_the_whole_prefills_bits(kernel: AttentionKernel, heads: int,
                                                                          kv_heads: int, dim: int) -> None:
    """A prompt in chunks of 1-200 tokens, ending inside groups of 16 and of 64 keys, each packing only its own
    keys into the kept layout: every token as the whole prefill computes it."""
    q, k, v = tensors(heads, kv_heads, 900, dim, seed=dim)
    whole = run(kernel, q, k, v, 0, dim**-0.5)
    kept = PackedPrompt(900, kv_heads, dim).layer(0)
    kept.keys.fill_(float("nan"))  # nothing it has not packed may be read
    kept.values.fill_(float("nan"))
    offset, parts = 0, []
    for chunk in [1, 15, 16, 50, 64, 3, 200, 151, 400]:
        out = torch.empty(chunk, heads, dim, dtype=torch.bfloat16)
        kernel.prefill(q[:, offset : offset + chunk], k, v, offset, dim**-0.5, out, kept)
        parts.append(out)
        offset += chunk
        assert kept.done == offset
    assert offset == 900 and torch.equal(torch.cat(parts), whole)
    assert not kept.keys.view(kv_heads, -1)[:, : 900 * dim].isnan().any()


def test_a_chunk_reads_the_earlier_keys_from_the_kept_packing_not_the_cache(kernel: AttentionKernel) -> None:
    q, k, v = tensors(9, 3, 600, 64, seed=8)
    whole = run(kernel, q, k, v, 0, 0.125)
    kept = PackedPrompt(600, 3, 64).layer(0)
    kernel.prefill(q[:, :500], k, v, 0, 0.125, torch.empty(500, 9, 64, dtype=torch.bfloat16), kept)
    k[:, :496], v[:, :496] = 0.0, 0.0  # what a chunk that packed every key again would read
    out = torch.empty(100, 9, 64, dtype=torch.bfloat16)
    kernel.prefill(q[:, 500:], k, v, 500, 0.125, out, kept)
    assert torch.equal(out, whole[500:])


def test_a_chunk_run_again_packs_its_own_keys_again(kernel: AttentionKernel) -> None:
    """A step that failed and runs again (in parts) finds its chunk's keys packed already: they are packed anew
    from the cache, whose values for them the second run writes."""
    q, k, v = tensors(9, 3, 300, 64, seed=5)
    whole = run(kernel, q, k, v, 0, 0.125)
    kept = PackedPrompt(300, 3, 64).layer(0)
    first = torch.empty(200, 9, 64, dtype=torch.bfloat16)
    kernel.prefill(q[:, :200], k, v, 0, 0.125, first, kept)
    stale = k.clone()
    k[:, 200:260] = 0.0  # the first try's keys for the chunk (its step failed after packing them)
    out = torch.empty(60, 9, 64, dtype=torch.bfloat16)
    kernel.prefill(q[:, 200:260], k, v, 200, 0.125, out, kept)
    assert kept.done == 260
    k.copy_(stale)  # the second try writes the right ones
    kernel.prefill(q[:, 200:260], k, v, 200, 0.125, out, kept)
    assert torch.equal(out, whole[200:260])


def test_kept_packing_too_small_for_the_keys_is_refused(kernel: AttentionKernel) -> None:
    q, k, v = tensors(9, 3, 300, 64, seed=6)
    kept = PackedPrompt(100, 3, 64).layer(0)  # room for 128 keys
    with pytest.raises(ValueError, match="refused"):
        kernel.prefill(q[:, 100:200], k, v, 100, 0.125, torch.empty(100, 9, 64, dtype=torch.bfloat16), kept)


def test_the_thread_count_changes_no_bit(kernel: AttentionKernel, threads: None) -> None:
    q, k, v = tensors(9, 3, 600, 64, seed=7)
    torch.set_num_threads(2)
    two = run(kernel, q, k, v, 0, 0.1)
    torch.set_num_threads(1)
    assert torch.equal(run(kernel, q, k, v, 0, 0.1), two)


def test_its_threads_are_pytorchs(kernel: AttentionKernel) -> None:
    """The library binds to the OpenMP runtime PyTorch loaded: no second ``libgomp.so.1`` is in the process."""
    loaded = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
              if line.split()[-1].endswith("libgomp.so.1")}
    assert len(loaded) == 1 and Path(torch.__file__).parent in Path(loaded.pop()).parents


def test_the_engine_layout_runs_it_for_long_bf16_prompts(kernel: AttentionKernel) -> None:
    """``attention._prefill`` with the kernel in the layout writes the kernel's result into the pass's output."""
    kv = SlotKVCache(1, 3, 64, bound=1024, dtype=torch.bfloat16, device=torch.device("cpu"))
    kv.reserve(2, 400)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, heads, 400, 64, generator=g).to(torch.bfloat16) for heads in (9, 3, 3))
    outs = []
    for with_kernel in (kernel, None):
        out = q.new_empty((1, 400, 9, 64))
        with torch.inference_mode():
            _prefill(BatchLayout(placements=(Placement(kv, 1, 0, 400, 0),), kernel=with_kernel), 0, q, k, v, 0.125,
                     out)
        outs.append(out[0])
    alone = run(kernel, q[0], kv.keys[0][1], kv.values[0][1], 0, 0.125)
    assert torch.equal(outs[0], alone)
    assert not torch.equal(outs[0], outs[1])  # PyTorch's blocks round differently: the kernel did run
    assert (outs[0].float() - outs[1].float()).abs().max() < 0.05


def test_the_runner_keeps_a_chunked_prompts_packing_until_it_is_whole(kernel: AttentionKernel) -> None:
    """A bf16 prompt in chunks: the runner keeps its packed keys between them and forgets them once it is whole
    (or taken out), and its last chunk's logits are the whole prefill's, bit for bit."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    config._attn_implementation = register()
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    chunked, whole = (ModelRunner(model, KVTiers(num_layers=2, kv_heads=2, head_dim=64, max_length=1024,
                                                 dtype=torch.bfloat16, device=torch.device("cpu")),
                                  torch.device("cpu"), kernel=kernel) for _ in range(2))
    prompt, dropped, same = seq("p", 700), seq("dropped", 500), seq("p", 700)
    whole.tiers.place(same, 701)
    want = whole.prefill([same])
    assert whole._kept == {}  # a prompt in whole keeps nothing
    for s in (prompt, dropped):
        chunked.tiers.place(s, len(s.prompt_ids) + 1)
    chunked.prefill([dropped], [300])
    dropped.cached = 300
    for chunk in (300, 100, 16):
        chunked.prefill([prompt], [chunk])
        prompt.cached += chunk
    assert set(chunked._kept) == {id(prompt), id(dropped)}
    chunked.tiers.remove(dropped)  # aborted mid-chunks
    got = chunked.prefill([prompt], [284])
    assert set(chunked._kept) == {id(prompt)}
    prompt.cached = 700
    assert torch.equal(got, want)
    late = seq("late", 20)
    chunked.tiers.place(late, 21)
    chunked.prefill([late])  # the next step: the whole prompt's packing is let go
    assert chunked._kept == {}


def test_it_takes_bf16_on_cpu_with_whole_head_groups() -> None:
    takes = AttentionKernel.takes
    assert takes(torch.empty(9, 5, 64, dtype=torch.bfloat16), torch.empty(3, 8, 64, dtype=torch.bfloat16))
    assert not takes(torch.empty(9, 5, 64), torch.empty(3, 8, 64))  # float32
    assert not takes(torch.empty(9, 5, 96, dtype=torch.bfloat16), torch.empty(3, 8, 96, dtype=torch.bfloat16))
    assert not takes(torch.empty(8, 5, 64, dtype=torch.bfloat16), torch.empty(3, 8, 64, dtype=torch.bfloat16))


def test_a_strided_output_is_refused(kernel: AttentionKernel) -> None:
    q, k, v = tensors(9, 3, 10, 64, seed=1)
    out = torch.empty(10, 9, 128, dtype=torch.bfloat16)[..., ::2]
    with pytest.raises(ValueError, match="layout"):
        kernel.prefill(q, k, v, 0, 0.125, out)


def test_a_failed_build_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(compiled.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(compiled, "cpu_has", lambda flag: True)
    built, why = AttentionKernel.load(compiler=str(tmp_path / "no-such-compiler"))
    assert built is None and "build failed" in why


def test_a_cpu_without_avx512_bf16_gets_no_kernel_and_is_told_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "cpu_has", lambda flag: False)
    monkeypatch.setattr(compiled.platform, "machine", lambda: "x86_64")
    built, why = AttentionKernel.load()
    assert built is None and why == "the CPU has no AVX512-BF16"


# ---- decode rows


def decode_case(rows: int, heads: int, kv_heads: int, dim: int, capacity: int, seed: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries ``[rows, heads, 1, dim]`` (the model's strides), a tier's keys and values ``[rows + 2, kv_heads,
    capacity, dim]`` and lengths in ``1..capacity`` (the first row's is 1, the last's the whole capacity)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, 1, heads, dim, generator=g).to(torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(rows + 2, kv_heads, capacity, dim, generator=g).to(torch.bfloat16) for _ in range(2))
    lengths = torch.randint(1, capacity + 1, (rows,), generator=g, dtype=torch.int32)
    lengths[0], lengths[-1] = 1, capacity
    return q, k, v, lengths


def decode(kernel: AttentionKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
           scale: float) -> torch.Tensor:
    out = torch.empty(q.shape[0], 1, q.shape[1], q.shape[3], dtype=torch.bfloat16)
    kernel.decode(q, k, v, lengths, scale, out)
    return out


def decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """float64, row by row over exactly its own positions → ``[rows, 1, heads, dim]``."""
    rows, heads = q.shape[:2]
    group = heads // k.shape[1]
    outs = []
    for r in range(rows):
        n = int(lengths[r])
        keys = k[r, :, :n].double().repeat_interleave(group, 0)
        values = v[r, :, :n].double().repeat_interleave(group, 0)
        scores = (q[r].double() @ keys.transpose(1, 2)) * scale  # [heads, 1, n]
        outs.append((scores.softmax(-1) @ values).transpose(0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize(("rows", "heads", "kv_heads", "dim", "capacity"),
                         [(32, 9, 3, 64, 256), (5, 8, 8, 64, 384), (3, 16, 1, 128, 129), (1, 4, 2, 256, 40)])
def test_decode_computes_each_rows_attention_over_its_own_positions(kernel: AttentionKernel, rows: int, heads: int,
                                                                    kv_heads: int, dim: int, capacity: int) -> None:
    q, k, v, lengths = decode_case(rows, heads, kv_heads, dim, capacity, seed=rows)
    got = decode(kernel, q, k, v, lengths, dim ** -0.5)
    expected = decode_reference(q, k, v, lengths, dim ** -0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 1, heads, dim)
    assert (got.double() - expected).abs().max() < 0.01  # bf16's rounding of the result, no more


def test_decode_reads_no_position_past_a_rows_length(kernel: AttentionKernel) -> None:
    q, k, v, lengths = decode_case(6, 9, 3, 64, 300, seed=7)
    before = decode(kernel, q, k, v, lengths, 0.125)
    for r, n in enumerate(lengths.tolist()):
        k[r, :, n:] = float("nan")
        v[r, :, n:] = float("nan")
    k[6:], v[6:] = float("nan"), float("nan")  # the tier's rows past the step's
    assert torch.equal(decode(kernel, q, k, v, lengths, 0.125), before)


def test_a_decode_row_gets_the_same_bits_whatever_rows_share_its_step(kernel: AttentionKernel,
                                                                      threads: None) -> None:
    q, k, v, lengths = decode_case(12, 9, 3, 64, 200, seed=8)
    together = decode(kernel, q, k, v, lengths, 0.125)
    torch.set_num_threads(1)
    assert torch.equal(decode(kernel, q, k, v, lengths, 0.125), together)
    for r in (0, 5, 11):
        alone = decode(kernel, q[r : r + 1], k[r : r + 1], v[r : r + 1], lengths[r : r + 1], 0.125)
        assert torch.equal(alone[0], together[r])


def test_decode_refuses_what_it_does_not_take(kernel: AttentionKernel) -> None:
    q, k, v, lengths = decode_case(4, 9, 3, 64, 100, seed=9)
    with pytest.raises(ValueError, match="layout"):
        decode(kernel, q, k, v, lengths.long(), 0.125)  # int64 lengths
    lengths[1] = 101
    with pytest.raises(ValueError, match="refused"):
        decode(kernel, q, k, v, lengths, 0.125)  # past the capacity
    takes = AttentionKernel.takes_decode
    assert takes(q, k) and not takes(q.float(), k.float())
    assert not takes(torch.empty(1, 34, 1, 64, dtype=torch.bfloat16), torch.empty(1, 2, 8, 64, dtype=torch.bfloat16))


def test_the_engine_layout_runs_it_for_decode_rows(kernel: AttentionKernel) -> None:
    """``slot_attention`` on a decode step with the kernel in the layout: the kernel's result over each row's own
    positions, close to PyTorch's masked matmuls (which round the scores to bf16) but not their bits."""
    cache = SlotKVCache(1, 3, 64, bound=256, dtype=torch.bfloat16, device=torch.device("cpu"))
    cache.reserve(4, 200)
    g = torch.Generator().manual_seed(10)
    with torch.inference_mode():  # the cache's tensors are inference tensors
        for t in (cache.keys[0], cache.values[0]):
            t.copy_(torch.randn(t.shape, generator=g).to(torch.bfloat16))
    positions = torch.tensor([10, 199, 57, 120])
    q = torch.randn(4, 1, 9, 64, generator=g).to(torch.bfloat16).transpose(1, 2)
    key, value = (torch.randn(4, 1, 3, 64, generator=g).to(torch.bfloat16).transpose(1, 2) for _ in range(2))
    hidden = torch.arange(cache.capacity).view(1, 1, 1, -1) > positions.view(-1, 1, 1, 1)
    mask = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))
    outs = []
    for with_kernel in (kernel, None):
        group = DecodeGroup(cache=cache, start=0, end=4, cache_rows=cache.rows_at(torch.arange(4), positions),
                            mask=mask, kv_length=200, lengths=(positions + 1).to(torch.int32))
        module = SimpleNamespace(layer_idx=0)
        with torch.inference_mode():
            out, _ = slot_attention(module, q, key, value, None, scaling=0.125,  # type: ignore[arg-type]
                                    inhouse_batch=BatchLayout(groups=(group,), kernel=with_kernel))
        outs.append(out)
    expected = decode(kernel, q, cache.keys[0][:4], cache.values[0][:4], (positions + 1).to(torch.int32), 0.125)
    assert torch.equal(outs[0], expected)
    assert not torch.equal(outs[0], outs[1])
    assert (outs[0].float() - outs[1].float()).abs().max() < 0.05
