"""Build-time step of deploy/docker/Dockerfile: convert the packaged SmolLM2 GGUF once into the model cache.

inhouse converts a GGUF file to safetensors the first time it serves it, into ``$INHOUSE_CACHE_DIR``.  Running
that conversion while the image is built puts the result in the image, so a container's first start loads in
seconds and needs no write access to the cache.  The embedding model needs nothing: its package carries a
ready checkpoint.  The attention and linear kernels are built too when the building machine's CPU can run them
(their files then sit in the image's temporary directory, which a container reuses; elsewhere it is built at first
start, in under a second).
"""

from __future__ import annotations

from inhouse.config import BUILTIN_CHAT_MODEL, DEFAULT_MODEL_NAME, default_cache_dir, model_spec
from inhouse.engine.checkpoint import resolve_checkpoint
from inhouse.engine.local.attention_kernel import AttentionKernel
from inhouse.engine.local.linear_kernel import LinearKernel


def main() -> None:
    spec = model_spec(name=DEFAULT_MODEL_NAME, path=BUILTIN_CHAT_MODEL, engine="transformers")
    print(f"{DEFAULT_MODEL_NAME}: {resolve_checkpoint(spec, default_cache_dir())}")  # type: ignore[arg-type]
    print(f"attention kernels: {AttentionKernel.load()[1]}")
    print(f"linear kernel: {LinearKernel.load()[1]}")


if __name__ == "__main__":
    main()
