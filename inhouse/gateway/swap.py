"""Swapper: health-gated changes of a served model's version (swap, canary, rollback, reload).

Owns the per-model swap lock, the previous versions (for rollback), the last swap's outcome per model,
and the canary windows' tallies.  A swap builds the new version's engines beside the old ones, refuses it
when its weights would not fit in memory, waits until it loaded, runs the smoke check, and only then
switches new requests (all at once, or a share of them for a canary window, which ends early, rolled back,
as soon as the canary fails its error-rate test on enough requests); the old engines close once
their in-flight requests are done.  The LoRA adapter models over a swapped base move to the new version: each
is loaded on it before the switch (one that does not load refuses the swap), and switched first, so the old
base closes after their in-flight requests too.  Any refusal is an InhouseError ``swap_failed`` and the old version
keeps serving.  Knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from inhouse.audit.record import AuditRecord
from inhouse.config import AdapterSpec, ConfigError, ModelSpec, Settings, SwapSettings, UpstreamSpec, model_spec
from inhouse.engine.base import Engine
from inhouse.engine.factory import adapter_engine
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.canary import Tally, Verdict, failing, judge
from inhouse.gateway.memory import memory_refusal
from inhouse.gateway.registry import Deployment, ModelRegistry
from inhouse.gateway.smoke import smoke_check

__all__ = ["Swapper"]

log = logging.getLogger("inhouse.swap")


class _Window:
    """A running canary: the new versions, and what each side did since it began."""

    def __init__(self, new_versions: set[str]) -> None:
        self.new_versions = new_versions
        self.canary, self.baseline = Tally(), Tally()
        self.failed = asyncio.Event()  # set once the canary is failing: it is rolled back without waiting


class Swapper:
    def __init__(self, registry: ModelRegistry, rules: SwapSettings, build: Callable[[ModelSpec], Engine]) -> None:
        self._registry = registry
        self._rules = rules
        self._build = build
        self._locks: dict[str, asyncio.Lock] = {}
        self._previous: dict[str, list[list[ModelSpec]]] = {}  # name → older spec sets, newest last
        self._last: dict[str, dict[str, Any]] = {}  # name → the last swap's outcome
        self._windows: dict[str, _Window] = {}
        self._declared = set(registry.names())  # the config file's models (the last reload's); others came at runtime

    # -- what the admin API shows ------------------------------------------------------------------------
    def status(self, name: str) -> dict[str, Any]:
        deployments = self._registry.deployments(name)  # 404 for an unknown model
        window = self._windows.get(name)
        return {
            "name": name,
            "versions": sorted({d.version for d in deployments}),
            "deployments": [{"name": d.label, "version": d.version, "state": d.engine.state.value,
                             "in_flight": d.route.outstanding} for d in deployments],
            "canary": None if window is None else {"versions": sorted(window.new_versions),
                                                   "canary": window.canary.public(),
                                                   "baseline": window.baseline.public()},
            "previous_versions": len(self._previous.get(name, [])),
            "last_swap": self._last.get(name),
        }

    async def observe(self, record: AuditRecord) -> bool:
        """A call-end sink: tallies the calls of a model under canary, by which side answered."""
        window = self._windows.get(record.served_model or "")
        if window is not None and record.model_version is not None:
            side = window.canary if record.model_version in window.new_versions else window.baseline
            side.add(record.status, record.error_code, record.ttft_ms)
            if failing(window.canary, window.baseline, self._rules):
                window.failed.set()
        return True

    # -- operations --------------------------------------------------------------------------------------
    async def swap(self, name: str, changes: dict[str, Any], canary: float | None = None,
                   window_s: float | None = None) -> dict[str, Any]:
        """Change fields of every deployment of ``name`` (``path``, ``fake_reply``, ...) through the gate."""
        old = self._registry.deployments(name)
        specs = [_changed(d.spec, changes) for d in old]
        return await self._gated(name, specs, canary, window_s, "swap")

    async def rollback(self, name: str) -> dict[str, Any]:
        """Bring the version before the current one back, loaded again from its spec, through the gate."""
        self._registry.deployments(name)
        history = self._previous.get(name)
        if not history:
            raise InhouseError(ErrorCode.SWAP_FAILED, f"model {name!r} has no previous version to roll back to")
        specs = history[-1]
        for spec in specs:
            path = getattr(spec, "path", "")
            if path and not path.startswith("builtin:") and not isinstance(spec, UpstreamSpec) \
                    and not Path(path).exists():
                raise InhouseError(ErrorCode.SWAP_FAILED, f"the previous version of {name!r} is gone: {path} "
                                   "does not exist any more")
        result = await self._gated(name, specs, None, None, "rollback", remember=False)
        history.pop()
        return result

    async def reload(self, settings: Settings) -> dict[str, Any]:
        """Make the served models those of ``settings``: added ones load, removed ones drain and go, changed
        ones swap through the gate.  Returns what happened to each name."""
        wanted: dict[str, list[ModelSpec]] = {}
        for spec in settings.models:
            wanted.setdefault(spec.name, []).append(spec)
        current = {name: [d.spec for d in self._registry.find(name)] for name in self._registry.names()}
        report: dict[str, Any] = {"added": [], "removed": [], "swapped": [], "unchanged": [], "failed": {},
                                  "kept": []}
        for name in [n for n in current if n not in wanted]:
            if (base := self._runtime_adapter_base(name, current[name])) is not None and base in wanted:
                report["kept"].append(name)  # an adapter loaded at runtime over a base the file still serves
                continue
            await self._registry.remove(name)
            report["removed"].append(name)
        self._declared = set(wanted)
        for name, specs in wanted.items():
            if name not in current:
                for spec in specs:
                    await self._registry.add(Deployment.new(spec, self._build(spec)))
                report["added"].append(name)
            elif specs == current[name]:
                report["unchanged"].append(name)
            else:
                try:
                    await self._gated(name, specs, None, None, "reload")
                    report["swapped"].append(name)
                except InhouseError as exc:
                    report["failed"][name] = exc.message
        log.info("reload: %s", report)
        return report

    # -- the gate ----------------------------------------------------------------------------------------
    async def _gated(self, name: str, specs: list[ModelSpec], canary: float | None, window_s: float | None,
                     kind: str, remember: bool = True) -> dict[str, Any]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            raise InhouseError(ErrorCode.SWAP_FAILED, f"a swap of model {name!r} is already running")
        async with lock:
            old = self._registry.deployments(name)
            old_version = ",".join(sorted({d.version for d in old}))
            refusal = memory_refusal(specs)
            riders = self._adapters_over(name)
            if refusal is None and riders and canary is not None:
                refusal = "a canary of a base with LoRA adapters is not supported: swap it without canary"
            if refusal is not None:
                raise self._failed(name, kind, old_version, None, refusal)
            new = [Deployment.new(spec, self._build(spec)) for spec in specs]
            new_version = ",".join(sorted({d.version for d in new}))
            log.info("%s of %s: loading version %s beside %s", kind, name, new_version, old_version)
            reason = await self._ready(new)
            carried: list[Deployment] = []
            if reason is None and riders:
                carried, reason = await self._carry(riders, new)
            if reason is not None:
                await self._registry.discard([*carried, *new], 0)
                raise self._failed(name, kind, old_version, new_version, reason)
            result: dict[str, Any] = {"object": "model.swap", "model": name, "kind": kind, "from": old_version,
                                      "to": new_version, "at": time.time()}
            if canary is None:
                for adapter in carried:  # its old requests finish on the old base, which closes after them
                    await self._registry.replace(adapter.name, [adapter], self._rules.drain_s)
                await self._registry.replace(name, new, self._rules.drain_s)
                result.update(outcome="swapped")
            else:
                result.update(await self._canary(name, new, canary, window_s or self._rules.canary_window_s))
            if result["outcome"] != "rolled_back" and remember:
                self._previous.setdefault(name, []).append([d.spec for d in old])
            self._last[name] = result
            log.info("%s of %s: %s → %s: %s", kind, name, old_version, new_version, result["outcome"])
            return result

    def _runtime_adapter_base(self, name: str, specs: list[ModelSpec]) -> str | None:
        """The base of an adapter that ``/admin/adapters`` loaded (not one the config file declared), else None."""
        if name in self._declared or len(specs) != 1 or not isinstance(specs[0], AdapterSpec):
            return None
        return specs[0].base

    def _adapters_over(self, base: str) -> list[Deployment]:
        """The LoRA adapter models served over model ``base`` (declared or loaded at runtime)."""
        return [d for d in self._registry.all() if isinstance(d.spec, AdapterSpec) and d.spec.base == base]

    async def _carry(self, riders: list[Deployment], new: list[Deployment]) -> tuple[list[Deployment], str | None]:
        """The adapters ``riders`` rebuilt over the new version ``new`` of their base and loaded there, or why
        one does not load on it."""
        carried: list[Deployment] = []
        for rider in riders:
            assert isinstance(rider.spec, AdapterSpec)
            try:
                engine = adapter_engine(rider.spec, [(d.spec, d.engine) for d in new])
            except ConfigError as exc:
                return carried, f"adapter {rider.name!r} cannot be served by the new version: {exc}"
            carried.append(Deployment.new(rider.spec, engine))
        reason = await self._registry.prepare(carried)
        if reason is not None:
            return carried, f"an adapter of the model does not load on the new version: {reason}"
        return carried, None

    async def _ready(self, new: list[Deployment]) -> str | None:
        """None once the new deployments loaded and passed the smoke check within ``timeout_s``, else why not."""
        try:
            async with asyncio.timeout(self._rules.timeout_s):
                reason = await self._registry.prepare(new)
                if reason is not None:
                    return f"the new version failed to load: {reason}"
                for deployment in new:
                    reason = await smoke_check(deployment)
                    if reason is not None:
                        return reason
        except TimeoutError:
            return f"the new version was not loaded and checked within timeout_s={self._rules.timeout_s:g}"
        return None

    async def _canary(self, name: str, new: list[Deployment], share: float, window_s: float) -> dict[str, Any]:
        window = self._windows[name] = _Window({d.version for d in new})
        self._registry.start_canary(name, new, share)
        verdict = Verdict(False, "the canary window was interrupted")
        started = time.monotonic()
        try:
            with contextlib.suppress(TimeoutError):  # the window's end, or earlier once the canary is failing
                await asyncio.wait_for(window.failed.wait(), window_s)
            verdict = judge(window.canary, window.baseline, self._rules)
        finally:
            del self._windows[name]
            await self._registry.end_canary(name, verdict.promote, self._rules.drain_s)
        return {"outcome": "promoted" if verdict.promote else "rolled_back", "reason": verdict.reason, "share": share,
                "window_s": window_s, "ended_after_s": round(time.monotonic() - started, 3),
                "ended_early": window.failed.is_set(), "canary": window.canary.public(),
                "baseline": window.baseline.public()}

    def _failed(self, name: str, kind: str, old: str, new: str | None, reason: str) -> InhouseError:
        self._last[name] = {"object": "model.swap", "model": name, "kind": kind, "from": old, "to": new,
                            "outcome": "failed", "reason": reason, "at": time.time()}
        log.warning("%s of %s refused: %s (version %s keeps serving)", kind, name, reason, old)
        return InhouseError(ErrorCode.SWAP_FAILED, f"{kind} of model {name!r} refused: {reason}; "
                            f"version {old} keeps serving")


def _changed(spec: ModelSpec, changes: dict[str, Any]) -> ModelSpec:
    """``spec`` with ``changes`` applied (a new ``path`` resolved; the version label recomputed unless given).
    ``changes`` come from an admin body, so a boolean field takes only true or false (a config file's ``"yes"``
    is not coerced)."""
    for name, value in changes.items():
        field = type(spec).model_fields.get(name)
        if field is not None and field.annotation in (bool, bool | None) and not isinstance(value, bool | None):
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"{name} must be true or false, not {value!r:.50}",
                               param=name)
    fields = {**spec.model_dump(), "version": None, **changes}
    path = changes.get("path")
    if isinstance(path, str) and path and not path.startswith("builtin:"):
        fields["path"] = str(Path(path).expanduser().resolve())
    try:
        return model_spec(**fields)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                          for e in exc.errors())
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"invalid model fields: {where}") from None
