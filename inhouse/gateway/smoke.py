"""The smoke check a new version passes before a swap sends it traffic.

Owns the golden-prompt check of one prepared deployment: each configured prompt (``smoke.prompts``) is
answered greedily within ``smoke.max_latency_s`` and contains every ``smoke.expect`` substring; an upstream
deployment answers its health check (a 1-token completion) instead; an embedding model embeds the prompts.
Returns None when the deployment passed, else the reason in words for the operator.
"""

from __future__ import annotations

import asyncio
import time

from inhouse.config import ModelSpec
from inhouse.engine.base import Capability, Embedder, EmbedRequest, GenerateRequest, Generator, SamplingParams
from inhouse.errors import InhouseError
from inhouse.gateway.health import HealthProbe
from inhouse.gateway.registry import Deployment

__all__ = ["smoke_check"]


async def smoke_check(deployment: Deployment) -> str | None:
    spec, engine = deployment.spec, deployment.engine
    budget = spec.smoke.max_latency_s
    try:
        if isinstance(engine, HealthProbe):
            reason = await engine.probe(budget, "completion")
            return None if reason is None else f"the health check failed: {reason}"
        for number, prompt in enumerate(spec.smoke.prompts, start=1):
            started = time.monotonic()
            try:
                answer = await asyncio.wait_for(_answer(spec, engine, prompt), budget)
            except TimeoutError:
                return f"smoke prompt {number} got no complete answer within max_latency_s={budget:g}"
            missing = [e for e in spec.smoke.expect if e not in answer]
            if missing:
                return f"smoke prompt {number}: the answer {answer[:200]!r} does not contain {missing[0]!r}"
            took = time.monotonic() - started
            if took > budget:
                return f"smoke prompt {number} took {took:.1f} s, over max_latency_s={budget:g}"
    except InhouseError as exc:
        return f"the smoke check failed: {exc.message}"
    except Exception as exc:  # an engine bug during the check: the new version is not fit to serve
        return f"the smoke check failed: {type(exc).__name__}: {exc}"
    return None


async def _answer(spec: ModelSpec, engine: object, prompt: str) -> str:
    """The engine's whole answer to one prompt (greedy, ``smoke.max_tokens``), or an embedding's size."""
    if isinstance(engine, Generator):
        sampling = SamplingParams(max_tokens=spec.smoke.max_tokens, temperature=0.0)
        chat = Capability.CHAT in engine.info.capabilities
        request = GenerateRequest(request_id=f"smoke-{time.monotonic_ns()}", sampling=sampling,
                                  messages=({"role": "user", "content": prompt},) if chat else None,
                                  prompt=None if chat else prompt)
        text = []
        for generation in await engine.submit([request]):
            async for delta in generation:
                text.append(delta.text)
        return "".join(text)
    if isinstance(engine, Embedder):
        vectors = await engine.embed(EmbedRequest(f"smoke-{time.monotonic_ns()}", (prompt,)))
        return f"{vectors.vectors.shape[-1]} dimensions"
    return ""
