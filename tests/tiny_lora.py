"""Builds PEFT LoRA adapters offline on a local base checkpoint, and PEFT's own greedy answers, for LoRA tests.

Random LoRA weights with a visible effect (``init_lora_weights=False``: B is not zero), each adapter with its
own rank, alpha and target modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AdapterRecipe:
    name: str
    rank: int
    alpha: int
    targets: tuple[str, ...]
    seed: int
    rslora: bool = False


RECIPES = (
    AdapterRecipe("lora-qv", 4, 8, ("q_proj", "v_proj"), 1),
    AdapterRecipe("lora-mlp", 8, 32, ("gate_proj", "up_proj", "down_proj"), 2),
    AdapterRecipe("lora-all", 16, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                  3, rslora=True),
    AdapterRecipe("lora-o", 2, 4, ("o_proj",), 4),
)


def _base(base_dir: Path, dtype: Any = None) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=dtype).eval()


def build_adapter(base_dir: Path, recipe: AdapterRecipe, target: Path) -> Path:
    """Write a PEFT adapter of ``recipe`` over the checkpoint in ``base_dir`` to ``target`` (kept once made)."""
    import torch
    from peft import LoraConfig, get_peft_model

    if (target / "adapter_model.safetensors").is_file():
        return target
    torch.manual_seed(recipe.seed)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.targets),
                        init_lora_weights=False, use_rslora=recipe.rslora, lora_dropout=0.0)
    model = get_peft_model(_base(base_dir), config)
    model.save_pretrained(str(target))
    return target


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int], max_new_tokens: int,
                dtype: Any = None) -> list[int]:
    """PEFT's own greedy continuation of ``prompt`` (the bare base when ``adapter_dir`` is None)."""
    import torch
    from peft import PeftModel

    model = _base(base_dir, dtype)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = torch.tensor([prompt])
    config = model.generation_config
    config.eos_token_id, config.pad_token_id = None, 0  # runs on through the stop token, as ignore_eos does
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, generation_config=config)
    return [int(t) for t in out[0, len(prompt):]]


def wrong_shape_copy(source: Path, target: Path) -> Path:
    """A copy of adapter ``source`` in ``target`` whose layer-0 q_proj lora_B is (77, 4): no base fits it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copy(source / "adapter_config.json", target / "adapter_config.json")
    tensors = load_file(str(source / "adapter_model.safetensors"))
    key = next(k for k in tensors if "layers.0.self_attn.q_proj.lora_B" in k)
    tensors[key] = torch.zeros(77, 4)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target
