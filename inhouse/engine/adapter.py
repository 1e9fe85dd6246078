"""AdapterEngine: a LoRA adapter served under its own model name by its base model's engine.

Owns the adapter's life on that engine: ``start`` waits for the base to be ready and registers the adapter
there (its files are read and checked off the event loop), ``submit`` hands the base engine the requests
marked with the adapter's name (they batch with the base's own and other adapters' requests), ``close``
unregisters it (the base engine stays open).  There is no copy of the base model.  Any engine that has the
``LoraHost`` methods can be a base: the transformers engine, the vLLM engine, and ``auto`` (whichever of the two
it turned out to be).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from inhouse.config import AdapterSpec
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

__all__ = ["AdapterEngine", "LoraHost"]

log = logging.getLogger("inhouse.engine")

_BASE_POLL_SECONDS = 0.05


@runtime_checkable
class LoraHost(Generator, Protocol):
    """An engine that serves LoRA adapters over its model, each request marked with ``adapter``."""

    async def load_adapter(self, name: str, directory: Path) -> None:
        """Read, check and register the adapter in ``directory`` as ``name``; AdapterError says what is wrong."""

    def unload_adapter(self, name: str) -> None:
        """Forget ``name`` (the registry has drained its requests)."""

    def adapter_resident(self, name: str) -> bool | None:
        """Whether ``name``'s weights are in memory now (None: the engine does not say)."""


class AdapterEngine:
    def __init__(self, spec: AdapterSpec, base: LoraHost) -> None:
        assert spec.adapter is not None, "adapters over upstream bases are upstream engines"
        self.spec = spec
        self.base = base
        # its name on the base engine: its own, so a swapped-in version of the model never shares the old one's
        self.key = f"{spec.name}@{id(self):x}"
        self._state = EngineState.LOADING

    @property
    def info(self) -> EngineInfo:
        return replace(self.base.info, kind=f"{self.base.info.kind}+lora")

    @property
    def state(self) -> EngineState:
        if self._state is EngineState.READY:
            return self.base.state
        return self._state

    @property
    def resident(self) -> bool | None:
        return self.base.adapter_resident(self.key)

    async def start(self) -> None:
        while self.base.state is EngineState.LOADING:
            await asyncio.sleep(_BASE_POLL_SECONDS)
        if self.base.state is not EngineState.READY:
            self._state = EngineState.FAILED
            raise ModelLoadError(f"adapter {self.spec.name!r}: its base {self.spec.base!r} did not load")
        try:
            await self.base.load_adapter(self.key, Path(str(self.spec.adapter)))
        except AdapterError as exc:
            self._state = EngineState.FAILED
            raise ModelLoadError(str(exc)) from exc
        self._state = EngineState.READY
        log.info("adapter %s ready over %s (%s)", self.spec.name, self.spec.base, self.spec.adapter)

    async def submit(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        return await self.base.submit([replace(r, adapter=self.key) for r in requests])

    def stats(self) -> EngineStats:
        return self.base.stats()

    async def close(self) -> None:
        self.base.unload_adapter(self.key)
        self._state = EngineState.CLOSED
