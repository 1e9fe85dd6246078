"""The probes' decisions: is the process alive, is it ready, and what state each model is in.

Owns the rules only (the routes in ``routes/health.py``, ``routes/models.py`` and ``routes/admin.py`` render
them).  Liveness fails when restarting the process is the fix: a local engine's loop died, or the audit
writer thread died or has held a row for longer than ``audit_stall_seconds``.  A model that failed to load
does not fail liveness (a restart would fail the same way; ``/health`` and ``/ready`` show it).  Readiness
fails while any model is still loading (or has no deployment that loaded) and while the server drains.
"""

from __future__ import annotations

from inhouse.audit.writer import AuditWriter
from inhouse.engine.base import EngineState
from inhouse.gateway.registry import Deployment, ModelRegistry

__all__ = ["DRAINING", "FAILED", "LOADING", "READY", "liveness_problems", "model_state"]

LOADING, READY, DRAINING, FAILED = "loading", "ready", "draining", "failed"


def liveness_problems(registry: ModelRegistry, audit: AuditWriter | None, audit_stall_seconds: float) -> list[str]:
    """Why the process is not alive (empty: it is), in words for the operator."""
    problems = [f"the engine loop of {d.name} ({d.label}) died" for d in registry.all() if not d.engine.stats().alive]
    if audit is not None:
        if not audit.alive:
            problems.append("the audit writer thread died")
        elif (stalled := audit.stalled_for()) > audit_stall_seconds:
            problems.append(f"the audit writer has held a row for {stalled:.0f} s (limit {audit_stall_seconds:g} s)")
    return problems


def model_state(deployments: list[Deployment], draining: bool) -> str:
    """One model's state: draining (the server is stopping), ready (a deployment answers), loading (one may
    still), else failed."""
    states = {d.engine.state for d in deployments}
    if draining:
        return DRAINING
    if EngineState.READY in states:
        return READY
    if EngineState.LOADING in states:
        return LOADING
    return FAILED
