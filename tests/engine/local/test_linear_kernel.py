"""The compiled linear layer (``linear_kernel.py`` and its C source) on random bf16 tensors: each output is the
exact product rounded once to bf16 (within a bf16 step), with or without a bias, for 1 to hundreds of rows and
strided inputs; a row's bits do not depend on the rows beside it nor on the threads; it takes only the shapes its
layout holds, and stays off on a CPU with AMX; the engine runs a bf16 model's linear layers by it unless its config
says ``linear_kernel: false``.

The tests that run the kernel need a CPU with AVX512-BF16 and no AMX, and are skipped elsewhere (this session's
machine and CI have one; an AMX machine runs oneDNN, as ``test_linears.py`` checks there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inhouse.config import TransformersSpec
from inhouse.engine.base import GenerateRequest, SamplingParams
from inhouse.engine.local import compiled, linear_kernel
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.linear_kernel import LinearKernel


@pytest.fixture(scope="module")
def kernel() -> LinearKernel:
    built, why = LinearKernel.load()
    if built is None:
        pytest.skip(f"the linear kernel does not run here: {why}")
    return built


def _case(rows: int, out: int, inner: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inner, generator=g).to(torch.bfloat16)
    w = (torch.randn(out, inner, generator=g) / inner**0.5).to(torch.bfloat16)
    bias = torch.randn(out, generator=g).to(torch.bfloat16)
    return x, w, bias


def _within_a_bf16_step(got: torch.Tensor, exact: torch.Tensor) -> None:
    """``got`` is ``exact`` rounded to bf16: at most one bf16 step (8 bits of mantissa) away."""
    step = exact.abs().clamp_min(1e-30) * 2.0**-7
    assert bool(((got.double() - exact).abs() <= step).all()), float((got.double() - exact).abs().max())


@pytest.mark.parametrize("rows", [1, 5, 8, 9, 17, 53, 300])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("outputs", [96, 128])  # 128: from 48 rows on, six rows by 64 columns at a time
def test_each_output_is_the_exact_product_rounded_to_bf16(kernel: LinearKernel, rows: int, with_bias: bool,
                                                          outputs: int) -> None:
    x, w, bias = _case(rows, outputs, 130, seed=rows)
    got = kernel.forward(x, kernel.pack(w), bias.float() if with_bias else None)
    exact = x.double() @ w.double().T + (bias.double() if with_bias else 0)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, outputs)
    _within_a_bf16_step(got, exact)


def test_leading_dimensions_and_strided_rows_are_kept(kernel: LinearKernel) -> None:
    x, w, _ = _case(12, 64, 40, seed=3)
    wide = torch.zeros(12, 70, dtype=torch.bfloat16)
    wide[:, 10:50] = x
    strided = wide[:, 10:50].view(3, 4, 40)  # rows 70 elements apart
    got = kernel.forward(strided, kernel.pack(w), None)
    assert got.shape == (3, 4, 64)
    assert torch.equal(got.view(12, 64), kernel.forward(x, kernel.pack(w), None))


def test_a_row_has_the_same_bits_whatever_rows_share_the_call_and_however_many_threads(kernel: LinearKernel) -> None:
    x, w, bias = _case(53, 128, 576, seed=5)  # 48 rows six by 64 columns, the last 5 eight by 32: the same bits
    packed, b = kernel.pack(w), bias.float()
    together = kernel.forward(x, packed, b)
    for i in (0, 7, 8, 36, 47, 48, 52):
        assert torch.equal(kernel.forward(x[i : i + 1], packed, b)[0], together[i])
    assert torch.equal(kernel.forward(x[3:20], packed, b), together[3:20])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(kernel.forward(x, packed, b), together)
    finally:
        torch.set_num_threads(threads)


def test_it_takes_only_what_its_layout_holds(kernel: LinearKernel) -> None:
    assert LinearKernel.takes(torch.empty(64, 130, dtype=torch.bfloat16))
    assert not LinearKernel.takes(torch.empty(300, 128, dtype=torch.bfloat16))  # outputs: not a multiple of 32
    assert not LinearKernel.takes(torch.empty(64, 129, dtype=torch.bfloat16))  # odd inputs
    assert not LinearKernel.takes(torch.empty(64, 128))  # float32
    with pytest.raises(ValueError, match="does not take"):
        kernel.pack(torch.empty(300, 128, dtype=torch.bfloat16))
    packed = kernel.pack(torch.empty(64, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="input"):
        kernel.forward(torch.empty(2, 64, dtype=torch.bfloat16), packed, None)


def test_a_cpu_with_amx_keeps_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_kernel, "cpu_has", lambda flag: True)
    built, why = LinearKernel.load()
    assert built is None and "AMX" in why


def test_a_cpu_without_avx512_bf16_gets_no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_kernel, "cpu_has", lambda flag: False)
    monkeypatch.setattr(compiled, "cpu_has", lambda flag: False)
    monkeypatch.setattr(compiled.platform, "machine", lambda: "x86_64")
    built, why = LinearKernel.load()
    assert built is None and why == "the CPU has no AVX512-BF16"


@pytest.mark.parametrize("wanted", [True, False])
async def test_the_engine_multiplies_by_it_unless_its_config_says_not_to(kernel: LinearKernel, tiny_model_dir: Path,
                                                                         cache_dir: Path, wanted: bool) -> None:
    spec = TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="bfloat16", linear_kernel=wanted)
    engine = LocalEngine(spec, cache_dir)
    await engine.start()
    try:
        sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        [generation] = await engine.submit([GenerateRequest("k", sampling, prompt=(1, 2, 3, 4, 5))])
        deltas = [delta async for delta in generation]
        assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 4
        assert engine._loaded is not None
        mlp = engine._loaded.model.model.layers[0].mlp  # rewritten by the engine's runner (linears.py)
        assert (mlp.down_proj.matmul.kernel is not None) is wanted
        assert (mlp.gate_proj.group.matmul.kernel is not None) is wanted
    finally:
        await engine.close()
