"""UpstreamEngine: any OpenAI-compatible server (vLLM, TGI, SGLang, Ollama, llama.cpp, another inhouse).

Owns one pooled aiohttp session per upstream, turning a GenerateRequest back into an OpenAI body,
and the upstream's SSE chunks into Deltas as they arrive.  Always streams from the upstream (so a
blocking client and a streaming one cost the same and usage is seen), asks for usage, and counts it
itself when the upstream sends none.  ``submit`` returns only after the upstream's first chunk, so
everything that fails before the first byte (connect errors, 429/5xx, a stall past the first-token
timeout) raises ``UpstreamUnavailable`` and the router may try elsewhere; a failure after it ends the
stream with an error.  Aborting cancels the reading task, which closes the upstream connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import aiohttp
import orjson

from inhouse.config import ModelSpec
from inhouse.engine.base import Delta, EngineInfo, EngineState, EngineStats, GenerateRequest, Generation
from inhouse.engine.collector import OutputCollector
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["UpstreamEngine", "UpstreamUnavailableError"]

log = logging.getLogger("inhouse.upstream")


class UpstreamUnavailableError(InhouseError):
    """The upstream failed before its first byte: worth trying another deployment or model."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UPSTREAM_UNAVAILABLE, message, retry_after=1)


class UpstreamEngine:
    def __init__(self, spec: ModelSpec) -> None:
        assert spec.base_url is not None
        self.spec = spec
        self._base = spec.base_url.rstrip("/")
        self._state = EngineState.LOADING
        self._session: aiohttp.ClientSession | None = None
        self._running = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(kind="upstream", context_length=self.spec.context_length or 0,
                          max_num_seqs=self.spec.max_num_seqs)

    @property
    def state(self) -> EngineState:
        return self._state

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.spec.max_num_seqs + self.spec.max_waiting, keepalive_timeout=60)
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        self._session = aiohttp.ClientSession(connector=connector, headers=headers, auto_decompress=True)
        self._state = EngineState.READY

    def stats(self) -> EngineStats:
        return EngineStats(state=self._state, running=self._running, waiting=0)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
        self._state = EngineState.CLOSED

    async def probe(self, timeout: float, kind: str = "models") -> bool:
        """Health check: ``GET /models`` answers 200, or (``completion``) a 1-token chat completion does."""
        if self._session is None:
            return False
        limit = aiohttp.ClientTimeout(total=timeout)
        try:
            if kind == "completion":
                body = {"model": self.spec.upstream_model or self.spec.name, "max_tokens": 1,
                        "messages": [{"role": "user", "content": "ping"}]}
                async with self._session.post(self._base + "/chat/completions", data=orjson.dumps(body),
                                              headers={"Content-Type": "application/json"}, timeout=limit) as r:
                    return r.status == 200
            async with self._session.get(self._base + "/models", timeout=limit) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def submit(self, request: GenerateRequest) -> Generation:
        if self._session is None or self._state is not EngineState.READY:
            raise UpstreamUnavailableError(f"upstream {self.spec.deployment_label} is not started")
        chat = request.messages is not None
        url = self._base + ("/chat/completions" if chat else "/completions")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.spec.connect_timeout,
                                        sock_read=self.spec.first_token_timeout)
        started = time.monotonic()
        try:
            response = await self._session.post(url, data=orjson.dumps(_body(request, self.spec)),
                                                headers={"Content-Type": "application/json"}, timeout=timeout)
        except TimeoutError:  # aiohttp's connect and read timeouts are TimeoutErrors too
            raise UpstreamUnavailableError(f"upstream {self.spec.deployment_label} did not answer within "
                                           f"{self.spec.first_token_timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailableError(f"upstream {self.spec.deployment_label} is unreachable "
                                           f"({type(exc).__name__})") from None
        try:
            if response.status != 200:
                raise await _status_error(response, self.spec.deployment_label)
            lines = _Events(response)
            try:
                first = await asyncio.wait_for(lines.next(), self.spec.first_token_timeout)
            except TimeoutError:
                raise UpstreamUnavailableError(f"upstream {self.spec.deployment_label} sent no first token within "
                                               f"{self.spec.first_token_timeout:g} s") from None
            except (aiohttp.ClientError, ValueError):
                raise UpstreamUnavailableError(f"upstream {self.spec.deployment_label} broke off before "
                                               "its first token") from None
        except BaseException:
            response.release()
            raise
        collector: OutputCollector[Delta] = OutputCollector(asyncio.get_running_loop())
        generation = Generation(request.request_id, _estimate_prompt_tokens(request), collector, self._abort)
        counter = _Usage(generation)
        self._running += 1
        task = asyncio.create_task(self._pump(request, response, lines, first, counter, collector, started))
        self._tasks[request.request_id] = task
        return generation

    def _abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def _pump(self, request: GenerateRequest, response: aiohttp.ClientResponse, lines: _Events,
                    first: dict[str, Any] | None, counter: _Usage, collector: OutputCollector[Delta],
                    started: float) -> None:
        total = self.spec.total_timeout
        try:
            finishing: Delta | None = None
            async with asyncio.timeout(max(0.001, total - (time.monotonic() - started))):
                payload = first
                while payload is not None:
                    delta = counter.delta(payload)
                    if delta is not None and delta.finish_reason is not None:
                        finishing = delta  # held: the usage may come after it
                    elif delta is not None:
                        collector.put(delta)
                    payload = await lines.next()
            if finishing is not None:
                collector.put(counter.settle(finishing))
            else:
                collector.fail(InhouseError(ErrorCode.UPSTREAM_ERROR, "the upstream ended the answer without "
                                            "finishing it; the answer is incomplete"))
        except asyncio.CancelledError:
            pass  # aborted: closing the response below closes the upstream connection
        except TimeoutError:
            collector.fail(InhouseError(ErrorCode.UPSTREAM_ERROR, f"the upstream took longer than {total:g} s; "
                                        "the answer is incomplete"))
        except (aiohttp.ClientError, ValueError, ConnectionError):
            log.warning("upstream %s failed mid-answer for %s", self.spec.deployment_label, request.request_id)
            collector.fail(InhouseError(ErrorCode.UPSTREAM_ERROR, "the upstream connection broke mid-answer; "
                                        "the answer is incomplete"))
        finally:
            response.close()
            self._running -= 1
            self._tasks.pop(request.request_id, None)


class _Usage:
    """Turns upstream chunks into Deltas and keeps the usage: the upstream's when sent, else counted.

    Upstreams report usage with the finishing chunk or in a ``choices: []`` chunk after it, so the
    finishing Delta is held until the stream ends; then the upstream's prompt tokens replace the estimate
    on the Generation and its completion tokens correct the count of chunks.
    """

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.counted = 0
        self.reported: int | None = None

    def delta(self, payload: dict[str, Any]) -> Delta | None:
        usage = payload.get("usage")
        if isinstance(usage, dict):
            if usage.get("prompt_tokens") is not None:
                self.generation.prompt_tokens = int(usage["prompt_tokens"])
            if usage.get("completion_tokens") is not None:
                self.reported = int(usage["completion_tokens"])
        choices = payload.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        text = ((choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")) or ""
        finish = choice.get("finish_reason")
        if not text and finish is None:
            return None
        tokens = 1 if text else 0
        self.counted += tokens
        reason = None if finish is None else (finish if finish in ("stop", "length") else "stop")
        return Delta(text=text, token_count=tokens, finish_reason=reason)

    def settle(self, finishing: Delta) -> Delta:
        if self.reported is not None:
            finishing.token_count += self.reported - self.counted
        return finishing


def _estimate_prompt_tokens(request: GenerateRequest) -> int:
    """Used only when the upstream reports no usage: one token per CJK character, one per 4 other characters."""
    if request.messages is not None:
        text = " ".join(str(m.get("content") or "") for m in request.messages)
    elif isinstance(request.prompt, tuple):
        return len(request.prompt)
    else:
        text = request.prompt or ""
    cjk = sum(1 for ch in text if "\u3000" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af")
    return cjk + max(1, (len(text) - cjk + 3) // 4) + 4 * len(request.messages or ())


def _body(request: GenerateRequest, spec: ModelSpec) -> dict[str, Any]:
    s = request.sampling
    body: dict[str, Any] = {"model": spec.upstream_model or spec.name, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": s.temperature,
                            "top_p": s.top_p}
    if request.messages is not None:
        body["messages"] = list(request.messages)
        if request.tools:
            body["tools"] = list(request.tools)
    else:
        body["prompt"] = list(request.prompt) if isinstance(request.prompt, tuple) else request.prompt
    optional = {"max_tokens": s.max_tokens, "seed": s.seed, "stop": list(s.stop) or None,
                "presence_penalty": s.presence_penalty or None, "frequency_penalty": s.frequency_penalty or None}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


async def _status_error(response: aiohttp.ClientResponse, label: str) -> InhouseError:
    """429 and 5xx are worth a retry elsewhere; a 4xx is the request's fault and is passed on."""
    if response.status == 429 or response.status >= 500:
        return UpstreamUnavailableError(f"upstream {label} answered {response.status}")
    message = f"the upstream refused the request ({response.status})"
    with contextlib.suppress(Exception):
        detail = orjson.loads(await response.read())["error"]["message"]
        message = f"{message}: {str(detail)[:500]}"
    code = ErrorCode.MODEL_NOT_FOUND if response.status == 404 else ErrorCode.INVALID_REQUEST
    return InhouseError(code, message)


class _Events:
    """The ``data:`` JSON objects of an SSE body, read in whatever pieces the socket gives (not line by line:
    aiohttp's readline costs more than the rest of the gateway per chunk)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._content = response.content
        self._buffer = b""
        self._lines: deque[bytes] = deque()

    async def next(self) -> dict[str, Any] | None:
        """The next object, or None at ``[DONE]`` or the end of the body."""
        while True:
            while self._lines:
                line = self._lines.popleft()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return None
                payload = orjson.loads(data)
                if isinstance(payload, dict) and "error" in payload:
                    raise ValueError("the upstream sent an error event")
                return payload if isinstance(payload, dict) else None
            piece = await self._content.readany()
            if not piece:
                if not self._buffer:
                    return None
                self._lines.append(self._buffer.strip())
                self._buffer = b""
                continue
            lines = (self._buffer + piece).split(b"\n")
            self._buffer = lines.pop()
            self._lines.extend(line.rstrip(b"\r") for line in lines)
