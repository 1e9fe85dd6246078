"""The compiled prefill attention (``prefill_kernel.py`` and its C source) on random bf16 tensors: against a float32
reference, the same bits for a token whatever prefix came before it and however many threads ran, and the
engine's layout using it; and how it is built (a private folder, reused; a failed build turns it off).

The tests that run the kernel need a CPU with AVX512-BF16 (this project's machines and CI have it) and are skipped
elsewhere; those of its build and of when it is used run on any x86-64 Linux machine with a C compiler."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from inhouse.engine.local import prefill_kernel
from inhouse.engine.local.attention import BatchLayout, Placement, _prefill
from inhouse.engine.local.kv_cache import SlotKVCache
from inhouse.engine.local.prefill_kernel import PrefillKernel


@pytest.fixture(scope="module")
def kernel() -> PrefillKernel:
    if not prefill_kernel._cpu_has("avx512_bf16"):
        pytest.skip("the prefill kernel runs only on a CPU with AVX512-BF16")
    built, why = PrefillKernel.load()
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


def run(kernel: PrefillKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int,
        scale: float) -> torch.Tensor:
    """Positions ``offset..`` of ``q`` → ``[length, heads, dim]``."""
    out = torch.empty(q.shape[1] - offset, q.shape[0], q.shape[2], dtype=torch.bfloat16)
    kernel(q[:, offset:], k, v, offset, scale, out)
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
def test_it_computes_causal_attention(kernel: PrefillKernel, heads: int, kv_heads: int, dim: int, total: int,
                                      offset: int) -> None:
    q, k, v = tensors(heads, kv_heads, total, dim, seed=total + dim)
    got = run(kernel, q, k, v, offset, dim**-0.5).float()
    want = reference(q, k, v, offset, dim**-0.5)
    assert (got - want).abs().max() < 0.02  # bf16 probabilities and output; float32 scores and sums
    assert (got - want).abs().mean() < 5e-4


@pytest.mark.parametrize("offset", [1, 64, 100, 511])
def test_a_token_gets_the_same_bits_whatever_came_before(kernel: PrefillKernel, offset: int) -> None:
    """The prefix cache's property: a prefill from a cached offset equals the whole prefill's rows there."""
    q, k, v = tensors(9, 3, 900, 64, seed=offset)
    whole = run(kernel, q, k, v, 0, 0.125)
    assert torch.equal(run(kernel, q, k, v, offset, 0.125), whole[offset:])


def test_the_thread_count_changes_no_bit(kernel: PrefillKernel, threads: None) -> None:
    q, k, v = tensors(9, 3, 600, 64, seed=7)
    torch.set_num_threads(2)
    two = run(kernel, q, k, v, 0, 0.1)
    torch.set_num_threads(1)
    assert torch.equal(run(kernel, q, k, v, 0, 0.1), two)


def test_its_threads_are_pytorchs(kernel: PrefillKernel) -> None:
    """The library binds to the OpenMP runtime PyTorch loaded: no second ``libgomp.so.1`` is in the process."""
    loaded = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
              if line.split()[-1].endswith("libgomp.so.1")}
    assert len(loaded) == 1 and Path(torch.__file__).parent in Path(loaded.pop()).parents


def test_the_engine_layout_runs_it_for_long_bf16_prompts(kernel: PrefillKernel) -> None:
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


def test_it_takes_bf16_on_cpu_with_whole_head_groups() -> None:
    takes = PrefillKernel.takes
    assert takes(torch.empty(9, 5, 64, dtype=torch.bfloat16), torch.empty(3, 8, 64, dtype=torch.bfloat16))
    assert not takes(torch.empty(9, 5, 64), torch.empty(3, 8, 64))  # float32
    assert not takes(torch.empty(9, 5, 96, dtype=torch.bfloat16), torch.empty(3, 8, 96, dtype=torch.bfloat16))
    assert not takes(torch.empty(8, 5, 64, dtype=torch.bfloat16), torch.empty(3, 8, 64, dtype=torch.bfloat16))


def test_a_strided_output_is_refused(kernel: PrefillKernel) -> None:
    q, k, v = tensors(9, 3, 10, 64, seed=1)
    out = torch.empty(10, 9, 128, dtype=torch.bfloat16)[..., ::2]
    with pytest.raises(ValueError, match="layout"):
        kernel(q, k, v, 0, 0.125, out)


def test_it_is_built_once_into_a_private_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(prefill_kernel.tempfile, "tempdir", str(tmp_path))
    compiler = "cc"
    first = prefill_kernel._build(compiler)
    assert first.parent == tmp_path / f"inhouse-kernels-{os.getuid()}"
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700
    built_at = first.stat().st_mtime_ns
    assert prefill_kernel._build(compiler) == first and first.stat().st_mtime_ns == built_at  # reused


def test_a_folder_others_can_write_is_not_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shared = tmp_path / f"inhouse-kernels-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    chosen = prefill_kernel._own_folder(shared)
    assert chosen != shared and stat.S_IMODE(chosen.stat().st_mode) == 0o700


def test_a_failed_build_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(prefill_kernel.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(prefill_kernel, "_cpu_has", lambda flag: True)
    built, why = PrefillKernel.load(compiler=str(tmp_path / "no-such-compiler"))
    assert built is None and "build failed" in why


def test_a_cpu_without_avx512_bf16_gets_no_kernel_and_is_told_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefill_kernel, "_cpu_has", lambda flag: False)
    monkeypatch.setattr(prefill_kernel.platform, "machine", lambda: "x86_64")
    built, why = PrefillKernel.load()
    assert built is None and why == "the CPU has no AVX512-BF16"
