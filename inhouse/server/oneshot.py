"""Runs a one-shot operation (embeddings, rerank) for one HTTP request: checks the model serves it, notes the
key's call, routes it, and stops it if the client leaves.

The answer is complete when the attempt returns (nothing streams), so the router may retry the whole
operation elsewhere, and the deployment's in-flight count ends right here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from starlette.requests import Request

from inhouse.engine.base import Capability, Usage
from inhouse.gateway.router import Attempt, Routed
from inhouse.server.call import call_of
from inhouse.server.context import context_of
from inhouse.server.disconnect import or_disconnect
from inhouse.server.operations import require

__all__ = ["account", "run_once"]

T = TypeVar("T")


async def run_once(request: Request, model: str, request_id: str, capability: Capability,
                   attempt: Attempt[T]) -> Routed[T]:
    """404 unknown model, 400 a model of another kind, 403 a model the key may not use; then the routed answer
    (already released: its work is over)."""
    ctx = context_of(request)
    require(ctx.registry, model, frozenset({capability}))
    call = call_of(request)
    if call is not None:
        call.asked(request_id, model, False)
    routed = await or_disconnect(request, ctx.router.call(model, attempt))
    routed.release()
    if call is not None:
        call.served(routed.model, routed.deployment.label, routed.deployment.version)
    return routed


async def account(request: Request, text: Callable[[], str], prompt_tokens: int) -> None:
    """What the call used, for the audit log and the key's limits (429 when its token budget cannot hold it:
    the tokens are only known once the model has counted them).  ``text`` is rendered only when the audit log
    keeps text."""
    call = call_of(request)
    if call is None:
        return
    call.prompt(text() if call.keep_text else None, prompt_tokens)
    await call.reserve(prompt_tokens)
    call.used(Usage(prompt_tokens, 0), None)
