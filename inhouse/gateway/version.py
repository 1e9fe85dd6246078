"""A deployment's version label and the size of its weights on disk.

Owns the cheap identity of a checkpoint: the configured ``version:``, else a short hash of what the spec
points at (a directory's config and weight files by name, size and mtime; an upstream's URL and model id).
Reads file metadata only, never the weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from inhouse.config import ModelSpec, UpstreamSpec

__all__ = ["checkpoint_files", "version_of", "weights_bytes"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def checkpoint_files(path: str) -> list[Path]:
    """The files that make a checkpoint's identity: its config and weights (a .gguf file is itself)."""
    if not path or path.startswith("builtin:"):
        return []
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and (p.name in _IDENTITY_FILES
                                                               or p.suffix in _WEIGHT_SUFFIXES))


def version_of(spec: ModelSpec) -> str:
    """``spec.version``, else ``v-`` and 10 hex digits of the checkpoint's identity."""
    if spec.version:
        return spec.version
    digest = hashlib.sha256()
    if isinstance(spec, UpstreamSpec):
        digest.update(f"{spec.base_url}\n{spec.upstream_model or spec.name}".encode())
    else:
        digest.update(f"{spec.engine}\n{spec.path}".encode())
        for file in checkpoint_files(spec.path):
            stat = file.stat()
            digest.update(f"\n{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        digest.update(spec.model_dump_json(exclude={"name", "deployment", "weight", "fallbacks", "smoke"}).encode())
    return "v-" + digest.hexdigest()[:10]


def weights_bytes(spec: ModelSpec) -> int:
    """Bytes of weight files the spec's checkpoint holds on disk (0: none, or not local)."""
    if isinstance(spec, UpstreamSpec):
        return 0
    return sum(f.stat().st_size for f in checkpoint_files(getattr(spec, "path", "")) if f.suffix in _WEIGHT_SUFFIXES)
