"""PEFT LoRA adapters on disk: reading ``adapter_config.json`` + ``adapter_model.safetensors`` and checking them
against the linear modules of a base model, whichever engine serves it.

Owns what an adapter is made of (module path → A, B, scale) and every refusal worded for the operator (missing
files, another PEFT type, DoRA, embeddings or biases, a module the base does not have, shapes that do not fit,
a rank above what the engine was started for).  Holds no adapter and no model: the transformers engine keeps
the weights it reads here (``inhouse.engine.local.lora``), the vLLM engine only the verdict
(``inhouse.engine.vllm_lora``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inhouse.config import ADAPTER_FILES

__all__ = ["AdapterError", "PeftAdapter", "adapter_rank", "linear_shapes", "read_peft"]

_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that cannot serve over this base: missing files, other base, wrong shapes (the message says)."""


@dataclass(frozen=True)
class PeftAdapter:
    """An adapter as read from disk: module path in the base → (A ``[r, in]``, B ``[out, r]``, scale)."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Module path → (in_features, out_features) of every linear-like module of ``model`` (a wrapper with a
    ``base`` linear counts as its base)."""
    shapes = {}
    for path, module in model.named_modules():
        base = getattr(module, "base", None)
        inner = base if isinstance(base, torch.nn.Module) else module
        inp, outp = getattr(inner, "in_features", None), getattr(inner, "out_features", None)
        if isinstance(inp, int) and isinstance(outp, int):
            shapes[path] = (inp, outp)
    return shapes


def _pattern_value(patterns: dict[str, Any], path: str, default: float) -> float:
    """PEFT's rank/alpha_pattern: the first key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(value)
    return default


def adapter_rank(directory: Path) -> int:
    """The largest rank ``adapter_config.json`` declares (``r`` and ``rank_pattern``); AdapterError if unreadable."""
    try:
        config = json.loads((directory / ADAPTER_FILES[0]).read_text(encoding="utf-8"))
        return int(max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()]))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise AdapterError(f"cannot read {directory / ADAPTER_FILES[0]}: {exc}") from exc


def read_peft(name: str, directory: Path, shapes: Mapping[str, tuple[int, int]]) -> PeftAdapter:
    """The adapter in ``directory``, checked against the base's linear modules ``shapes``; AdapterError says
    what does not fit."""
    from safetensors.torch import load_file

    for file in ADAPTER_FILES:
        if not (directory / file).is_file():
            raise AdapterError(f"adapter {name!r}: {directory / file} does not exist")
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / "adapter_model.safetensors"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: cannot read {directory}: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters (use_dora) are not supported")
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key.removeprefix(_PREFIX))
        if match is None:
            raise AdapterError(f"adapter {name!r}: weight {key!r} is not a LoRA A/B matrix of a linear module "
                               "(embedding LoRA, modules_to_save and biases are not supported)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {directory / ADAPTER_FILES[1]} holds no LoRA weights")
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: module {path} has lora_{''.join(ab)} without its pair")
        shape = shapes.get(path)
        if shape is None:
            raise AdapterError(f"adapter {name!r}: module {path} is not a linear module of the base model "
                               "(an adapter trained on another base?)")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != shape[0] or b.shape != (shape[1], rank):
            raise AdapterError(
                f"adapter {name!r}: module {path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                f"the base's {shape[0]} → {shape[1]} linear (expected lora_A (r, {shape[0]}), lora_B ({shape[1]}, r))")
        module_alpha = _pattern_value(alpha_pattern, path, alpha)
        out[path] = (a, b, module_alpha / (rank ** 0.5 if rslora else rank))
    return PeftAdapter(name, out)
