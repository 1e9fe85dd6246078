"""Adapters: LoRA adapter models registered and unregistered at runtime (``/admin/adapters``).

Owns turning a request to load an adapter into a model of the registry (an AdapterEngine over its base's
transformers engine, started and checked before it serves: a bad adapter is refused and nothing changes), the
unload (new requests get 404 at once, those in flight finish first: the registry drains), and the list.
Holds no state of its own: the registry's models are the truth, and adapters declared in the config are
among them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inhouse.config import AdapterSpec
from inhouse.engine.adapter import AdapterEngine
from inhouse.engine.local.engine import LocalEngine
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.registry import Deployment, ModelRegistry

__all__ = ["Adapters"]


class Adapters:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def list(self) -> list[dict[str, Any]]:
        out = []
        for deployment in self.registry.all():
            engine = deployment.engine
            if isinstance(engine, AdapterEngine):
                lora = engine.base.lora
                out.append({"object": "adapter", "name": engine.spec.name, "base": engine.spec.base,
                            "path": engine.spec.adapter, "state": engine.state.value,
                            "resident": lora is not None and engine.key in lora.resident()})
        return out

    async def load(self, name: str, base: str, path: str) -> dict[str, Any]:
        """Register adapter ``name`` over model ``base`` from the PEFT dir ``path``; 400 saying what is wrong."""
        if self.registry.find(name):
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"a model named {name!r} is already served", param="name")
        bases = self.registry.find(base)
        engines = [d.engine for d in bases if isinstance(d.engine, LocalEngine) and d.engine.spec.engine ==
                   "transformers"]
        if not bases:
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"base {base!r} is not a served model", param="base")
        if not engines or len(bases) > 1:
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"base {base!r} is not a single transformers-engine model; "
                               "adapters are served by the transformers engine only (docs/lora.md)", param="base")
        directory = Path(path).expanduser().resolve()
        spec = AdapterSpec(name=name, base=base, adapter=str(directory))
        deployment = Deployment.new(spec, AdapterEngine(spec, engines[0]))
        error = await self.registry.prepare([deployment])
        if error is not None:
            await self.registry.discard([deployment], 0)
            raise InhouseError(ErrorCode.INVALID_REQUEST, error, param="path")
        if self.registry.find(name):  # a concurrent load of the same name won
            await self.registry.discard([deployment], 0)
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"a model named {name!r} is already served", param="name")
        await self.registry.add(deployment)
        return next(a for a in self.list() if a["name"] == name)

    async def unload(self, name: str) -> dict[str, Any]:
        """Stop serving adapter ``name``: 404 for new requests now; returns once its requests in flight ended."""
        found = self.registry.deployments(name)  # 404 for an unknown name
        if not all(isinstance(d.engine, AdapterEngine) for d in found):
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"model {name!r} is not an adapter", param="name")
        await self.registry.remove(name)
        return {"object": "adapter", "name": name, "deleted": True}
