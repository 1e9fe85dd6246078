"""AutoEngine: ``engine: auto`` when vLLM is installed: try vLLM, fall back to the transformers engine.

Owns only that choice.  Until ``start`` returns it is the vLLM engine; if vLLM refuses the model
(unsupported architecture or head size, not enough memory, any start-up failure) it logs a warning
naming the reason and becomes the transformers engine for the rest of its life.  Every other call is
passed to whichever engine it currently is, so ``info.kind`` (shown in ``/v1/models``) names the
engine that really serves; LoRA adapters load on that engine too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from pathlib import Path

from inhouse.config import AutoSpec
from inhouse.engine.adapter import LoraHost
from inhouse.engine.base import (
    EngineInfo,
    EngineState,
    EngineStats,
    GenerateRequest,
    Generation,
    Generator,
    ModelLoadError,
)
from inhouse.engine.peft import AdapterError

__all__ = ["AutoEngine"]

log = logging.getLogger("inhouse.engine")


class AutoEngine:
    def __init__(self, spec: AutoSpec, cache_dir: Path, adapters: Seq[Path] = ()) -> None:
        """``adapters``: the LoRA adapter directories the config declares over this model (vLLM starts with LoRA)."""
        from inhouse.engine.vllm import VllmEngine

        self.spec = spec
        self._cache_dir = cache_dir
        self._engine: Generator = VllmEngine(spec, cache_dir, adapters)

    @property
    def info(self) -> EngineInfo:
        return self._engine.info

    @property
    def state(self) -> EngineState:
        return self._engine.state

    async def start(self) -> None:
        try:
            await self._engine.start()
            return
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ModelLoadError) else f"({type(exc).__name__}; see the log above)"
            failed = self._engine
        log.warning("model %s: vLLM could not serve it, falling back to the transformers engine. %s",
                    self.spec.name, reason)
        await failed.close()
        from inhouse.engine.local.engine import LocalEngine

        self._engine = LocalEngine(self.spec, self._cache_dir)
        await self._engine.start()

    async def submit(self, requests: Seq[GenerateRequest]) -> list[Generation]:
        return await self._engine.submit(requests)

    def stats(self) -> EngineStats:
        return self._engine.stats()

    async def close(self) -> None:
        await self._engine.close()

    async def load_adapter(self, name: str, directory: Path) -> None:
        """On whichever engine serves (vLLM's multi-LoRA, or the transformers engine's)."""
        engine = self._engine
        if not isinstance(engine, LoraHost):
            raise AdapterError(f"model {self.spec.name!r} ({engine.info.kind}) does not serve LoRA adapters")
        await engine.load_adapter(name, directory)

    def unload_adapter(self, name: str) -> None:
        if isinstance(self._engine, LoraHost):
            self._engine.unload_adapter(name)

    def adapter_resident(self, name: str) -> bool | None:
        return self._engine.adapter_resident(name) if isinstance(self._engine, LoraHost) else None
