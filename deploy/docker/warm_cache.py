"""Build-time step of deploy/docker/Dockerfile: convert the packaged SmolLM2 GGUF once into the model cache.

inhouse converts a GGUF file to safetensors the first time it serves it, into ``$INHOUSE_CACHE_DIR``.  Running
that conversion while the image is built puts the result in the image, so a container's first start loads in
seconds and needs no write access to the cache.  The embedding model needs nothing: its package carries a
ready checkpoint.  The attention kernels are built too when the building machine's CPU can run them (their
file then sits in the image's temporary directory, which a container reuses; elsewhere it is built at first
start, in under a second).
"""

from __future__ import annotations

from inhouse.config import BUILTIN_CHAT_MODEL, DEFAULT_MODEL_NAME, default_cache_dir, model_spec
from inhouse.engine.checkpoint import resolve_checkpoint
from inhouse.engine.local.attention_kernel import AttentionKernel


def main() -> None:
    spec = model_spec(name=DEFAULT_MODEL_NAME, path=BUILTIN_CHAT_MODEL, engine="transformers")
    print(f"{DEFAULT_MODEL_NAME}: {resolve_checkpoint(spec, default_cache_dir())}")  # type: ignore[arg-type]
    print(f"attention kernels: {AttentionKernel.load()[1]}")


if __name__ == "__main__":
    main()
