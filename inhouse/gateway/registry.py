"""ModelRegistry: public model name → the deployment that serves it.

Owns the set of served models and their start/stop.  Knows nothing about HTTP.  Later issues grow
this into several deployments per name with routing, retries and fallbacks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from inhouse.config import ModelSpec
from inhouse.engine.base import Engine, EngineState, ModelLoadError
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["Deployment", "ModelRegistry"]

log = logging.getLogger("inhouse.registry")


@dataclass(frozen=True)
class Deployment:
    spec: ModelSpec
    engine: Engine
    created: int

    @property
    def name(self) -> str:
        return self.spec.name


class ModelRegistry:
    def __init__(self, deployments: Iterable[Deployment]) -> None:
        self._by_name = {d.name: d for d in deployments}
        self._loading: list[asyncio.Task[None]] = []
        self._load_errors: dict[str, str] = {}

    @classmethod
    def of(cls, pairs: Iterable[tuple[ModelSpec, Engine]]) -> ModelRegistry:
        now = int(time.time())
        return cls(Deployment(spec, engine, now) for spec, engine in pairs)

    def get(self, name: str) -> Deployment:
        deployment = self._by_name.get(name)
        if deployment is None:
            raise InhouseError(
                ErrorCode.MODEL_NOT_FOUND,
                f"The model '{name}' does not exist. Available models: {', '.join(sorted(self._by_name))}",
                param="model",
            )
        return deployment

    def all(self) -> list[Deployment]:
        return list(self._by_name.values())

    def ready(self) -> bool:
        return all(d.engine.state is EngineState.READY for d in self._by_name.values())

    def start_loading(self) -> None:
        """Load every model in the background; the server answers (503 for loading models) meanwhile."""
        for deployment in self._by_name.values():
            self._loading.append(asyncio.create_task(self._load(deployment)))

    async def _load(self, deployment: Deployment) -> None:
        started = time.monotonic()
        try:
            await deployment.engine.start()
        except ModelLoadError as exc:
            log.error("model %s failed to load: %s", deployment.name, exc)
            self._load_errors[deployment.name] = str(exc)
            return
        except Exception:
            log.exception("model %s failed to load", deployment.name)
            self._load_errors[deployment.name] = "the model failed to load; the reason is in the server log"
            return
        log.info("model %s loaded in %.1f s", deployment.name, time.monotonic() - started)

    def load_error(self, name: str) -> str | None:
        """Why a model failed to load, in words meant for the operator, or None."""
        return self._load_errors.get(name)

    async def wait_loaded(self) -> None:
        await asyncio.gather(*self._loading, return_exceptions=True)

    async def close(self) -> None:
        for task in self._loading:
            task.cancel()
        await asyncio.gather(*(d.engine.close() for d in self._by_name.values()), return_exceptions=True)
