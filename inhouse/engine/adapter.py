"""AdapterEngine: a LoRA adapter served under its own model name by its base model's engine.

Owns the adapter's life on that engine: ``start`` waits for the base to be ready and registers the adapter
there (its files are read and checked off the event loop), ``submit`` hands the base engine the requests
marked with the adapter's name (they batch with the base's own and other adapters' requests), ``close``
unregisters it (the base engine stays open).  There is no copy of the base model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from inhouse.config import AdapterSpec
from inhouse.engine.base import EngineInfo, EngineState, EngineStats, GenerateRequest, Generation, ModelLoadError
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.lora import AdapterError

__all__ = ["AdapterEngine"]

log = logging.getLogger("inhouse.engine")

_BASE_POLL_SECONDS = 0.05


class AdapterEngine:
    def __init__(self, spec: AdapterSpec, base: LocalEngine) -> None:
        self.spec = spec
        self.base = base
        # its name on the base engine: its own, so a swapped-in version of the model never shares the old one's
        self.key = f"{spec.name}@{id(self):x}"
        self._state = EngineState.LOADING

    @property
    def info(self) -> EngineInfo:
        return replace(self.base.info, kind="transformers+lora")

    @property
    def state(self) -> EngineState:
        if self._state is EngineState.READY:
            return self.base.state
        return self._state

    async def start(self) -> None:
        while self.base.state is EngineState.LOADING:
            await asyncio.sleep(_BASE_POLL_SECONDS)
        if self.base.state is not EngineState.READY:
            self._state = EngineState.FAILED
            raise ModelLoadError(f"adapter {self.spec.name!r}: its base {self.spec.base!r} did not load")
        try:
            await self.base.load_adapter(self.key, Path(self.spec.adapter))
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
