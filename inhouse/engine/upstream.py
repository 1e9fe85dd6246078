"""UpstreamEngine: any OpenAI-compatible server (vLLM, TGI, SGLang, Ollama, llama.cpp, another inhouse).

Owns one pooled aiohttp session per upstream, turning a GenerateRequest back into an OpenAI body,
and the upstream's SSE chunks into Deltas as they arrive.  Always streams from the upstream (so a
blocking client and a streaming one cost the same and usage is seen), asks for usage, and counts it
itself when the upstream sends none.

``submit`` returns only after the upstream's first token, so everything that fails before anything
reached the client raises ``UpstreamUnavailable`` and the router may try elsewhere: connect errors,
429/5xx, a 200 that is not an event stream, a malformed or error chunk, an answer that ends, or a stall
past ``first_token_timeout``.  After it one reader task forwards the rest; whatever ends that task (the
upstream's last chunk, a malformed chunk, a broken connection, a timeout, a bug, a cancel) settles the
request's collector in the task's done callback, so a client is never left waiting.  ``total_timeout``
is one deadline over both.  Aborting cancels the reading task, which closes the upstream connection.

Chunks are parsed defensively (``upstream_chunks.py``: text, reasoning, tool calls, finish, usage): a chunk of
the wrong shape is the upstream's error, never an exception that escapes.  Tools, tool_choice,
parallel_tool_calls, response_format and messages with image parts or tool calls are forwarded as given.

``embed`` and ``rerank`` (when ``capabilities`` lists them) are one blocking JSON exchange each, with the
bodies and answers of ``upstream_encoders.py``.  Nothing reaches the client before the whole answer is read
and checked, so every failure is ``UpstreamUnavailable`` except the request's own 4xx: the same
connect_timeout, first_token_timeout (here: no byte for that long) and total_timeout apply.  Cancelling the
caller closes the upstream connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import aiohttp
import numpy as np
import orjson

from inhouse.config import UpstreamSpec
from inhouse.engine.base import (
    Capability,
    Delta,
    Embeddings,
    EmbedRequest,
    EngineInfo,
    EngineState,
    EngineStats,
    GenerateRequest,
    Generation,
    RerankRequest,
    RerankScores,
)
from inhouse.engine.collector import OutputCollector
from inhouse.engine.upstream_chunks import BadChunkError, Relay, parse_chunk
from inhouse.engine.upstream_encoders import (
    MalformedAnswerError,
    embeddings_body,
    estimate_tokens,
    read_embeddings,
    read_rerank,
    rerank_body,
)
from inhouse.engine.upstream_tls import tls_hint, upstream_ssl_context
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["UpstreamEngine", "UpstreamUnavailableError"]

log = logging.getLogger("inhouse.upstream")

_INCOMPLETE = "; the answer is incomplete"
_CAPABILITIES = {"chat": Capability.CHAT, "completion": Capability.COMPLETION, "embeddings": Capability.EMBEDDINGS,
                 "rerank": Capability.RERANK, "tools": Capability.TOOLS, "vision": Capability.VISION,
                 "json_schema": Capability.JSON_SCHEMA}


class UpstreamUnavailableError(InhouseError):
    """The upstream failed before its first byte: worth trying another deployment or model."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UPSTREAM_UNAVAILABLE, message, retry_after=1)


class UpstreamEngine:
    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self._base = spec.base_url.rstrip("/")
        self._state = EngineState.LOADING
        self._session: aiohttp.ClientSession | None = None
        self._running = 0
        self._tasks: dict[str, asyncio.Task[Delta | InhouseError]] = {}
        self._capabilities = frozenset(_CAPABILITIES[name] for name in spec.capabilities)
        self._ssl = upstream_ssl_context(spec)  # once: every connection and health check of this upstream shares it

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(kind="upstream", context_length=self.spec.context_length or 0,
                          max_num_seqs=self.spec.max_num_seqs, capabilities=self._capabilities,
                          rerank_method="upstream" if Capability.RERANK in self._capabilities else None)

    @property
    def state(self) -> EngineState:
        return self._state

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.spec.max_num_seqs + self.spec.max_waiting, keepalive_timeout=60,
                                         ssl=self._ssl if self._ssl is not None else True)
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

    async def probe(self, timeout: float, kind: str = "models") -> str | None:
        """Health check (the gateway's ``HealthProbe``): None when healthy, else the reason.

        ``models``: ``GET /models`` answers 200 with a model list that has the model id this engine asks for;
        ``completion``: a 1-token chat completion of that model answers 200."""
        if self._session is None:
            return "the upstream client is not started"
        model = self.spec.upstream_model or self.spec.name
        limit = aiohttp.ClientTimeout(total=timeout)
        try:
            if kind == "completion":
                body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
                async with self._session.post(self._base + "/chat/completions", data=orjson.dumps(body),
                                              headers={"Content-Type": "application/json"}, timeout=limit) as r:
                    return None if r.status == 200 else f"a 1-token completion of '{model}' answered {r.status}"
            async with self._session.get(self._base + "/models", timeout=limit) as r:
                if r.status != 200:
                    return f"GET /models answered {r.status}"
                return _serves(await r.read(), model)
        except TimeoutError:
            return f"no answer within {timeout:g} s (health_timeout_seconds)"
        except (aiohttp.ClientError, OSError) as exc:
            return f"the upstream is unreachable ({type(exc).__name__}){tls_hint(self.spec, exc)}"

    async def submit(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        """Each choice is its own upstream request, sent in turn; all are admitted or none (the admitted ones
        are aborted)."""
        if self._session is None or self._state is not EngineState.READY:
            raise UpstreamUnavailableError(f"upstream {self.spec.deployment_label} is not started")
        generations: list[Generation] = []
        try:
            for request in requests:
                generations.append(await self._submit_one(self._session, request))
        except BaseException:
            for generation in generations:
                generation.abort()
            raise
        return generations

    async def embed(self, request: EmbedRequest) -> Embeddings:
        """POST ``/embeddings``: the vectors in input order, or UpstreamUnavailable (any failure before a
        complete, well-formed answer) or the upstream's refusal (its 4xx, passed on)."""
        if not request.inputs:
            return Embeddings(vectors=np.zeros((0, 0), dtype=np.float32), prompt_tokens=0)
        data = await self._exchange("/embeddings", embeddings_body(request, self._model))
        try:
            return read_embeddings(data, request)
        except MalformedAnswerError as exc:
            raise self._malformed(exc) from None

    async def rerank(self, request: RerankRequest) -> RerankScores:
        """POST ``/rerank`` in the ``rerank_api`` shape: one score in [0, 1] per document, in input order; fails
        as ``embed``."""
        if not request.documents:
            return RerankScores(scores=(), prompt_tokens=0)
        data = await self._exchange("/rerank", rerank_body(request, self._model, self.spec.rerank_api))
        try:
            return read_rerank(data, request)
        except MalformedAnswerError as exc:
            raise self._malformed(exc) from None

    @property
    def _model(self) -> str:
        return self.spec.upstream_model or self.spec.name

    def _malformed(self, exc: MalformedAnswerError) -> UpstreamUnavailableError:
        return UpstreamUnavailableError(f"upstream {self.spec.deployment_label} {exc.reason}")

    async def _exchange(self, path: str, body: dict[str, Any]) -> bytes:
        """One blocking JSON POST: the body of a 200, or UpstreamUnavailable, or the request's own 4xx error."""
        if self._session is None or self._state is not EngineState.READY:
            raise UpstreamUnavailableError(f"upstream {self.spec.deployment_label} is not started")
        spec, label = self.spec, self.spec.deployment_label
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=spec.connect_timeout,
                                        sock_read=spec.first_token_timeout)
        whole = asyncio.timeout(spec.total_timeout)
        self._running += 1
        try:
            async with whole, self._session.post(self._base + path, data=orjson.dumps(body), timeout=timeout,
                                                 headers={"Content-Type": "application/json"}) as response:
                if response.status != 200:
                    raise await _status_error(response, label)
                return await response.read()
        except InhouseError:
            raise
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamUnavailableError(f"upstream {label} did not accept a connection within "
                                           f"{spec.connect_timeout:g} s (connect_timeout)") from None
        except TimeoutError:  # whole's deadline, or aiohttp's sock_read (headers or body)
            what = (f"took longer than {self._total_text()}" if whole.expired() else
                    f"sent nothing for {self._first_token_text()}")
            raise UpstreamUnavailableError(f"upstream {label} {what}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailableError(f"upstream {label} is unreachable or broke off "
                                           f"({type(exc).__name__}){tls_hint(spec, exc)}") from None
        except Exception as exc:  # anything else the upstream made us trip on: still only this attempt failed
            log.error("upstream %s: POST %s failed: %s: %.200s", label, path, type(exc).__name__, exc)
            raise UpstreamUnavailableError(f"upstream {label} sent an answer that could not be read") from None
        finally:
            self._running -= 1

    async def _submit_one(self, session: aiohttp.ClientSession, request: GenerateRequest) -> Generation:
        """Returns once the first token arrived, with a task reading the rest."""
        deadline = asyncio.get_running_loop().time() + self.spec.total_timeout
        relay = Relay()
        whole = asyncio.timeout_at(deadline)
        try:
            async with whole:
                response = await self._post(session, request)
                try:
                    lines, first = await self._first_token(response, relay)
                except BaseException:
                    response.close()
                    raise
        except TimeoutError:  # only the total deadline gets here: _post and _first_token name their own
            raise UpstreamUnavailableError(f"upstream {self.spec.deployment_label} took longer than "
                                           f"{self._total_text()} before its first token") from None
        collector: OutputCollector[Delta] = OutputCollector(asyncio.get_running_loop())
        prompt_tokens = _estimate_prompt_tokens(request)
        generation = Generation(request.request_id, prompt_tokens, collector, self._abort,
                                self._most_tokens(request, prompt_tokens))
        self._running += 1
        task = asyncio.create_task(self._rest(request.request_id, lines, first, relay, collector, deadline))
        task.add_done_callback(functools.partial(self._settle, request.request_id, response, collector, generation,
                                                 relay))
        self._tasks[request.request_id] = task
        return generation

    async def _post(self, session: aiohttp.ClientSession, request: GenerateRequest) -> aiohttp.ClientResponse:
        """The upstream's response headers; connect and header-wait failures are UpstreamUnavailable."""
        spec, label = self.spec, self.spec.deployment_label
        url = self._base + ("/chat/completions" if request.messages is not None else "/completions")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=spec.connect_timeout,
                                        sock_read=spec.first_token_timeout)
        try:
            return await session.post(url, data=orjson.dumps(_body(request, spec)),
                                      headers={"Content-Type": "application/json"}, timeout=timeout)
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamUnavailableError(f"upstream {label} did not accept a connection within "
                                           f"{spec.connect_timeout:g} s (connect_timeout)") from None
        except TimeoutError:  # aiohttp's sock_read, while waiting for the headers
            raise UpstreamUnavailableError(f"upstream {label} did not answer within "
                                           f"{self._first_token_text()}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailableError(f"upstream {label} is unreachable ({type(exc).__name__})"
                                           f"{tls_hint(spec, exc)}") from None

    async def _first_token(self, response: aiohttp.ClientResponse, relay: Relay) -> tuple[_Events, Delta]:
        """Reads up to the first Delta: nothing has reached the client yet, so any failure is UpstreamUnavailable."""
        label = self.spec.deployment_label
        if response.status != 200:
            raise await _status_error(response, label)
        if response.content_type != "text/event-stream":
            raise UpstreamUnavailableError(f"upstream {label} answered 200 without an event stream "
                                           f"(Content-Type {response.content_type[:60]})")
        lines = _Events(response)
        try:
            async with asyncio.timeout(self.spec.first_token_timeout):
                while (data := await lines.next()) is not None:
                    delta = relay.add(parse_chunk(data))
                    if delta is not None:
                        return lines, delta
        except BadChunkError as exc:
            raise UpstreamUnavailableError(f"upstream {label} {exc.reason} before its first token") from None
        except TimeoutError:  # asyncio's or aiohttp's sock_read: both are first_token_timeout here
            raise UpstreamUnavailableError(f"upstream {label} sent no first token within "
                                           f"{self._first_token_text()}") from None
        except (aiohttp.ClientError, ConnectionError):
            raise UpstreamUnavailableError(f"upstream {label} broke off before its first token") from None
        except Exception as exc:  # anything else the upstream made us trip on: still only this attempt failed
            log.error("upstream %s: reading its first token failed: %s: %.200s", label, type(exc).__name__, exc)
            raise UpstreamUnavailableError(f"upstream {label} sent an answer that could not be read") from None
        raise UpstreamUnavailableError(f"upstream {label} ended its answer before its first token")

    async def _rest(self, request_id: str, lines: _Events, delta: Delta, relay: Relay,
                    collector: OutputCollector[Delta], deadline: float) -> Delta | InhouseError:
        """Forwards the Deltas after the first; returns the finishing one (held: usage may follow it) or
        the error that ended the answer.  Anything raised instead is settled as an error by ``_settle``."""
        finishing: Delta | None = None
        whole = asyncio.timeout_at(deadline)
        try:
            async with whole:
                while True:
                    if delta.finish_reason is not None:
                        finishing = delta
                    elif delta.text or delta.reasoning or delta.tool_calls:
                        collector.put(delta)
                    data = await lines.next()
                    if data is None:
                        break
                    delta = relay.add(parse_chunk(data)) or Delta()
        except TimeoutError:  # whole's deadline, or aiohttp's sock_read (an aiohttp.ServerTimeoutError)
            return self._timed_out(whole.expired())
        except BadChunkError as exc:
            log.warning("upstream %s %s mid-answer for %s", self.spec.deployment_label, exc.reason, request_id)
            return InhouseError(ErrorCode.UPSTREAM_ERROR, f"the upstream {exc.reason} mid-answer{_INCOMPLETE}")
        except (aiohttp.ClientError, ConnectionError):
            log.warning("upstream %s failed mid-answer for %s", self.spec.deployment_label, request_id)
            return InhouseError(ErrorCode.UPSTREAM_ERROR, f"the upstream connection broke mid-answer{_INCOMPLETE}")
        if finishing is None:
            return InhouseError(ErrorCode.UPSTREAM_ERROR, f"the upstream ended the answer without finishing "
                                f"it{_INCOMPLETE}")
        return finishing

    def _settle(self, request_id: str, response: aiohttp.ClientResponse, collector: OutputCollector[Delta],
                generation: Generation, relay: Relay, task: asyncio.Task[Delta | InhouseError]) -> None:
        """The reader task ended, however it ended (even cancelled before it started): close the upstream
        response and resolve the collector, so no client waits on a task that is gone."""
        response.close()
        self._running -= 1
        self._tasks.pop(request_id, None)
        if task.cancelled():  # aborted (nobody is listening) or closed (whoever is gets an error)
            collector.fail(InhouseError(ErrorCode.UPSTREAM_ERROR, f"the upstream request was cancelled{_INCOMPLETE}"))
            return
        exc = task.exception()
        if exc is not None:
            log.error("upstream %s: reading the answer for %s failed: %s: %.200s", self.spec.deployment_label,
                      request_id, type(exc).__name__, exc)
            collector.fail(InhouseError(ErrorCode.UPSTREAM_ERROR, f"the upstream's answer could not be "
                                        f"read{_INCOMPLETE}"))
            return
        outcome = task.result()
        if isinstance(outcome, InhouseError):
            collector.fail(outcome)
        else:
            collector.put(relay.settle(outcome, generation))

    def _most_tokens(self, request: GenerateRequest, prompt_tokens: int) -> int:
        """The most the answer may use (reserved against the key's token budget): max_tokens, the request's or
        this deployment's default (both forwarded), else what the configured window leaves; 0 when unknown."""
        asked = request.sampling.max_tokens or self.spec.defaults.max_tokens
        if asked:
            return asked
        window = self.spec.context_length
        return max(window - prompt_tokens, 0) if window else 0

    def _abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def _timed_out(self, total: bool) -> InhouseError:
        """Names the timeout that fired, with its configured value."""
        what = (f"took longer than {self._total_text()}" if total else
                f"sent nothing for {self._first_token_text()}")
        return InhouseError(ErrorCode.UPSTREAM_ERROR, f"the upstream {what}{_INCOMPLETE}")

    def _first_token_text(self) -> str:
        return f"{self.spec.first_token_timeout:g} s (first_token_timeout)"

    def _total_text(self) -> str:
        return f"{self.spec.total_timeout:g} s in total (total_timeout)"


def _estimate_prompt_tokens(request: GenerateRequest) -> int:
    """Used only when the upstream reports no usage: ``estimate_tokens`` of the text, 4 more per message."""
    if request.messages is not None:
        text = " ".join(_message_text(m) for m in request.messages)
    elif isinstance(request.prompt, tuple):
        return len(request.prompt)
    else:
        text = request.prompt or ""
    return estimate_tokens(text) + 4 * len(request.messages or ())


def _message_text(message: dict[str, Any]) -> str:
    """A message's text parts and tool-call arguments (an image's data URL is not text)."""
    content = message.get("content") or ""
    if isinstance(content, list):
        content = " ".join(str(part.get("text") or "") for part in content if isinstance(part, dict))
    calls = message.get("tool_calls") or []
    return " ".join([str(content)] + [str((call.get("function") or {}).get("arguments") or "") for call in calls
                                      if isinstance(call, dict)])


def _body(request: GenerateRequest, spec: UpstreamSpec) -> dict[str, Any]:
    s = request.sampling.with_defaults(spec.defaults)
    body: dict[str, Any] = {"model": spec.upstream_model or spec.name, "stream": True,
                            "stream_options": {"include_usage": True}}
    # what the client left out and this deployment has no default for: the upstream's own default applies
    body.update({name: getattr(s, name) for name in ("temperature", "top_p") if name not in s.unset})
    if request.messages is not None:
        body["messages"] = list(request.messages)
        if request.tools:  # a tool_choice without tools is refused by OpenAI and vLLM: it means nothing
            tooling = {"tools": list(request.tools), "tool_choice": request.tool_choice,
                       "parallel_tool_calls": request.parallel_tool_calls}
            body.update({k: v for k, v in tooling.items() if v is not None})
        if request.response_format is not None:
            body["response_format"] = request.response_format
    else:
        body["prompt"] = list(request.prompt) if isinstance(request.prompt, tuple) else request.prompt
    optional = {"max_tokens": s.max_tokens or spec.defaults.max_tokens, "seed": _int64(s.seed),
                "stop": list(s.stop) or None, "presence_penalty": s.presence_penalty or None,
                "frequency_penalty": s.frequency_penalty or None}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _int64(seed: int | None) -> int | None:
    """A seed as upstreams take it: OpenAI's and vLLM's seeds are int64 (and JSON encoders stop at 64 bits), while
    the edge takes any int64 or uint64 and a call's second choice adds 1; one that does not fit is folded in, as
    the vLLM engine does."""
    if seed is None or -(2**63) <= seed < 2**63:
        return seed
    return seed % 2**63


def _serves(body: bytes, model: str) -> str | None:
    """None when an OpenAI model list (``{"data": [{"id": ...}, ...]}``) has ``model``, else the reason."""
    try:
        data = orjson.loads(body).get("data")
        ids = [str(entry["id"]) for entry in data]
    except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
        return "GET /models answered 200 without a model list"
    if model in ids or f"{model}:latest" in ids:  # Ollama lists "llama3" as "llama3:latest"
        return None
    listed = ", ".join(ids[:20]) + (f" (and {len(ids) - 20} more)" if len(ids) > 20 else "")
    return f"the upstream does not serve model '{model}'; it lists: {listed or 'nothing'}"


async def _status_error(response: aiohttp.ClientResponse, label: str) -> InhouseError:
    """429 and 5xx are worth a retry elsewhere; a 4xx is the request's fault and is passed on."""
    if response.status == 429 or response.status >= 500:
        return UpstreamUnavailableError(f"upstream {label} answered {response.status}")
    message = f"the upstream refused the request ({response.status})"
    with contextlib.suppress(Exception):
        detail = _error_detail(orjson.loads(await response.read()))
        if detail:
            message = f"{message}: {detail[:500]}"
    code = ErrorCode.MODEL_NOT_FOUND if response.status == 404 else ErrorCode.INVALID_REQUEST
    return InhouseError(code, message)


def _error_detail(payload: object) -> str | None:
    """The message of an error body: OpenAI's ``{"error": {"message"}}``, TEI's ``{"error": "..."}``, vLLM's
    older ``{"message"}`` or FastAPI's ``{"detail": "..."}``."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    for detail in (error.get("message") if isinstance(error, dict) else error, payload.get("message"),
                   payload.get("detail")):
        if isinstance(detail, str) and detail:
            return detail
    return None


class _Events:
    """The ``data:`` payloads of an SSE body, read in whatever pieces the socket gives (not line by line:
    aiohttp's readline costs more than the rest of the gateway per chunk)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._content = response.content
        self._buffer = b""
        self._lines: deque[bytes] = deque()

    async def next(self) -> bytes | None:
        """The next payload (unparsed), or None at ``[DONE]`` or the end of the body."""
        while True:
            while self._lines:
                line = self._lines.popleft()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data:  # an empty data line carries nothing
                    return None if data == b"[DONE]" else data
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
