"""Adapters: LoRA adapter models registered and unregistered at runtime (``/admin/adapters``).

Owns turning a request to load an adapter into a model of the registry (an AdapterEngine over its base's
transformers, vLLM or auto engine, started and checked before it serves: a bad adapter is refused and nothing
changes; over an upstream base, an upstream engine asking for the adapter's name there), the unload (new
requests get 404 at once, those in flight finish first: the registry drains), and the list.  Holds no state of
its own: the registry's models are the truth, and adapters declared in the config are among them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inhouse.config import AdapterSpec, ModelSpec, UpstreamSpec
from inhouse.engine.adapter import AdapterEngine, LoraHost
from inhouse.engine.base import Engine
from inhouse.engine.factory import upstream_adapter_spec
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.registry import Deployment, ModelRegistry

__all__ = ["Adapters"]


class Adapters:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def list(self) -> list[dict[str, Any]]:
        out = []
        for deployment in self.registry.all():
            spec, engine = deployment.spec, deployment.engine
            if not isinstance(spec, AdapterSpec):
                continue
            where = {"path": spec.adapter} if spec.adapter is not None else {"upstream_model": spec.upstream_model}
            out.append({"object": "adapter", "name": spec.name, "base": spec.base, **where,
                        "state": engine.state.value,
                        "resident": engine.resident if isinstance(engine, AdapterEngine) else None})
        return out

    async def load(self, name: str, base: str, path: str | None, upstream_model: str | None) -> dict[str, Any]:
        """Register adapter ``name`` over model ``base``, from the PEFT dir ``path`` (or, over an upstream base, as
        the upstream's model ``upstream_model``); 400 saying what is wrong."""
        if self.registry.find(name):
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"a model named {name!r} is already served", param="name")
        bases = self.registry.find(base)
        if not bases:
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"base {base!r} is not a served model", param="base")
        if len(bases) > 1:
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"base {base!r} has several deployments; adapters need a "
                               "base with one (docs/lora.md)", param="base")
        deployment = self._deployment(name, bases[0].spec, bases[0].engine, path, upstream_model)
        error = await self.registry.prepare([deployment])
        if error is not None:
            await self.registry.discard([deployment], 0)
            raise InhouseError(ErrorCode.INVALID_REQUEST, error, param="path")
        if self.registry.find(name):  # a concurrent load of the same name won
            await self.registry.discard([deployment], 0)
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"a model named {name!r} is already served", param="name")
        await self.registry.add(deployment)
        return next(a for a in self.list() if a["name"] == name)

    @staticmethod
    def _deployment(name: str, base_spec: ModelSpec, base: Engine, path: str | None,
                    upstream_model: str | None) -> Deployment:
        if isinstance(base_spec, UpstreamSpec):
            if upstream_model is None or path is not None:
                raise InhouseError(ErrorCode.INVALID_REQUEST, f"base {base_spec.name!r} is an upstream: give the "
                                   "adapter's name there as upstream_model (not a path)", param="upstream_model")
            from inhouse.engine.upstream import UpstreamEngine

            spec = AdapterSpec(name=name, base=base_spec.name, upstream_model=upstream_model)
            return Deployment.new(spec, UpstreamEngine(upstream_adapter_spec(spec, base_spec)))
        if not isinstance(base, LoraHost):
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"base {base_spec.name!r} does not serve LoRA adapters "
                               "(a transformers, vllm, auto or upstream model does; docs/lora.md)", param="base")
        if path is None or upstream_model is not None:
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"base {base_spec.name!r} is served here: give the adapter's "
                               "PEFT directory as path (upstream_model is for upstream bases)", param="path")
        spec = AdapterSpec(name=name, base=base_spec.name, adapter=str(Path(path).expanduser().resolve()))
        return Deployment.new(spec, AdapterEngine(spec, base))

    async def unload(self, name: str) -> dict[str, Any]:
        """Stop serving adapter ``name``: 404 for new requests now; returns once its requests in flight ended."""
        found = self.registry.deployments(name)  # 404 for an unknown name
        if not all(isinstance(d.spec, AdapterSpec) for d in found):
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"model {name!r} is not an adapter", param="name")
        await self.registry.remove(name)
        return {"object": "adapter", "name": name, "deleted": True}
