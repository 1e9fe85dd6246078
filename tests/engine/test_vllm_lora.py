"""The vLLM engine's adapter bookkeeping, without vLLM: the rank vLLM is started with, the checks an adapter
passes before vLLM sees it (against the base's shapes read off a weightless copy), and the zero adapter that
the base's own requests carry on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from inhouse.engine.peft import AdapterError, read_peft
from inhouse.engine.vllm_lora import ZERO, VllmLoras, base_shapes, lora_rank
from tests.tiny_lora import RECIPES, AdapterRecipe, build_adapter

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class Request(NamedTuple):  # stands in for vLLM's LoRARequest
    lora_name: str
    lora_int_id: int
    lora_path: str


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, cache_dir: Path) -> dict[str, Path]:
    big = AdapterRecipe("lora-r32", 32, 32, ("q_proj",), 5)
    return {r.name: build_adapter(tiny_model_dir, r, cache_dir / f"tiny-lora-{r.name}") for r in (*RECIPES, big)}


@pytest.fixture(scope="module")
def shapes(tiny_model_dir: Path) -> dict[str, tuple[int, int]]:
    found = base_shapes(tiny_model_dir)
    assert found is not None
    return found


def test_the_rank_vllm_starts_with_is_the_next_it_accepts() -> None:
    assert lora_rank([4, 8, 16], VLLM_RANKS) == 16
    assert lora_rank([2], VLLM_RANKS) == 8
    assert lora_rank([17], VLLM_RANKS) == 32
    assert lora_rank([], VLLM_RANKS) == 16
    with pytest.raises(ValueError, match="LoRA rank 600 is more than vLLM's largest max_lora_rank 512"):
        lora_rank([600], VLLM_RANKS)


def test_the_base_shapes_come_from_a_weightless_copy(shapes: dict[str, tuple[int, int]]) -> None:
    assert shapes["model.layers.0.self_attn.q_proj"] == (128, 128)
    assert shapes["model.layers.1.mlp.down_proj"] == (256, 128)
    assert shapes["model.layers.0.self_attn.k_proj"] == (128, 64)  # one KV head of 64


def test_register_checks_and_the_base_carries_a_zero_adapter(adapters: dict[str, Path],
                                                             shapes: dict[str, tuple[int, int]]) -> None:
    loras = VllmLoras("tiny", 16, shapes, True, Request)
    assert loras.request_for(None) is None  # nothing registered: the base's rows need nothing
    request, zero = loras.register("a", adapters["lora-mlp"])
    assert request == Request("a", 2, str(adapters["lora-mlp"]))
    assert zero is not None and zero.lora_name == ZERO and loras.request_for(None) == zero
    again, no_new_zero = loras.register("b", adapters["lora-qv"])
    assert no_new_zero is None and again.lora_int_id == 3 and loras.names() == ["a", "b"]
    read = read_peft("zero", Path(zero.lora_path), shapes)  # a valid adapter of the base, all of whose B is 0
    assert read.rank == 1 and all(torch.count_nonzero(b) == 0 for _, b, _ in read.modules.values())
    assert loras.unregister("a") == 2 and loras.unregister("a") is None
    assert loras.request_for("a") is None and loras.request_for("b") == again
    loras.close()
    assert not Path(zero.lora_path).exists()


def test_a_zero_adapter_vllm_refused_is_made_again(adapters: dict[str, Path],
                                                   shapes: dict[str, tuple[int, int]]) -> None:
    loras = VllmLoras("tiny", 16, shapes, True, Request)
    _, zero = loras.register("a", adapters["lora-qv"])
    loras.drop_zero()
    assert loras.request_for(None) is None and not Path(zero.lora_path).exists()
    _, again = loras.register("b", adapters["lora-o"])
    assert again is not None and loras.request_for(None) == again and Path(again.lora_path).is_dir()
    loras.close()


def test_on_gpu_the_base_carries_nothing(adapters: dict[str, Path], shapes: dict[str, tuple[int, int]]) -> None:
    loras = VllmLoras("tiny", 16, shapes, False, Request)
    assert loras.register("a", adapters["lora-qv"])[1] is None
    assert loras.request_for(None) is None


def test_refusals_name_the_problem(adapters: dict[str, Path], shapes: dict[str, tuple[int, int]],
                                  tmp_path: Path) -> None:
    loras = VllmLoras("tiny", 16, shapes, True, Request)
    with pytest.raises(AdapterError, match=r"rank 32 is more than the max_lora_rank 16 .* model 'tiny' "
                                           r"\(set max_lora_rank: 32"):
        loras.register("big", adapters["lora-r32"])
    with pytest.raises(AdapterError, match="is not a directory"):
        loras.register("gone", tmp_path / "gone")
    from safetensors.torch import load_file, save_file

    (tmp_path / "adapter_config.json").write_text((adapters["lora-qv"] / "adapter_config.json").read_text())
    tensors: dict[str, Any] = load_file(str(adapters["lora-qv"] / "adapter_model.safetensors"))
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_A" in k)
    tensors[key] = torch.zeros(4, 96)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.self_attn\.v_proj: lora_A \(4, 96\)"):
        loras.register("bad", tmp_path)
    assert loras.names() == [] and loras.request_for(None) is None  # nothing was recorded
