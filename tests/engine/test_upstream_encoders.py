"""UpstreamEngine.embed and .rerank against the fault upstream (tests/fault_upstream.py) served in a thread of
this process: request bodies, both answer shapes, order by index, base64 == floats, logits normalised by the
sigmoid, usage reported or estimated, and every way an answer can fail: the request's own 4xx passed on, any
other failure UpstreamUnavailable (so the router tries elsewhere), timeouts named, cancelling closes the call.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest

from inhouse.config import UpstreamSpec
from inhouse.engine.base import TEXT, Capability, EmbedRequest, RerankRequest
from inhouse.engine.upstream import UpstreamEngine, UpstreamUnavailableError
from inhouse.engine.upstream_encoders import MalformedAnswerError, read_embeddings, read_rerank
from inhouse.errors import ErrorCode, InhouseError
from tests.fault_upstream import _vector, running
from tests.process import free_port

LABEL = "enc-dep"
INPUTS: tuple[str | tuple[int, ...], ...] = ("alpha", "beta gamma", (1, 2, 3))
QUERY = "cat dog"
DOCS = ("a cat", "dog and cat", "nothing", "the dog")
PLAIN = (0.5, 1.0, 0.0, 0.5)  # the share of the query's words in each document, as the fake scores
# estimates (no usage sent): "cat dog" 2 + per document "a cat" 2, "dog and cat" 3, "nothing" 2, "the dog" 2
RERANK_ESTIMATE, RERANK_REPORTED = 17, 16  # the fake counts words: 2 per query + 2, 3, 1, 2


class _Fake:
    def __init__(self, url: str) -> None:
        self.url = url

    def script(self, *steps: dict[str, Any]) -> None:
        httpx.post(self.url + "/_script", json=list(steps), timeout=5).raise_for_status()

    def log(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = httpx.get(self.url + "/_log", timeout=5).json()
        return entries

    async def wait_for(self, seen: int, key: str, within: float = 5.0) -> dict[str, Any]:
        """The log entry after the first ``seen`` once it has ``key`` true (polling, without blocking the loop)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            entries = self.log()
            if len(entries) > seen and (key == "" or entries[seen][key]):
                return entries[seen]
            await asyncio.sleep(0.05)
        raise AssertionError(f"the upstream never logged {key or 'the request'}: {self.log()[seen:]}")


@pytest.fixture(scope="module")
def served() -> Iterator[_Fake]:
    with running("enc") as url:
        yield _Fake(url)


@pytest.fixture
def fake(served: _Fake) -> _Fake:
    served.script()  # nothing left over from a test that failed
    return served


@asynccontextmanager
async def _engine(fake: _Fake, **options: Any) -> AsyncIterator[UpstreamEngine]:
    settings: dict[str, Any] = {"name": "enc", "base_url": fake.url + "/v1", "deployment": LABEL,
                                "upstream_model": "up-enc", "capabilities": ("embeddings", "rerank"),
                                "first_token_timeout": 5, "total_timeout": 10} | options
    engine = UpstreamEngine(UpstreamSpec(**settings))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def _embed(dimensions: int | None = None) -> EmbedRequest:
    return EmbedRequest("e1", INPUTS, dimensions)


def _rerank() -> RerankRequest:
    return RerankRequest("r1", QUERY, DOCS)


def _expected(size: int = 8) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.array([_vector(list(x) if isinstance(x, tuple) else x, size) for x in INPUTS], dtype=np.float32)


async def _fails(call: Any, code: ErrorCode = ErrorCode.UPSTREAM_UNAVAILABLE) -> InhouseError:
    with pytest.raises(InhouseError) as raised:
        await asyncio.wait_for(call, 10)
    assert raised.value.code is code, raised.value.message
    if code is ErrorCode.UPSTREAM_UNAVAILABLE:
        assert isinstance(raised.value, UpstreamUnavailableError)
    return raised.value


def test_capabilities_come_from_the_spec() -> None:
    chat = UpstreamEngine(UpstreamSpec(name="c", base_url="http://127.0.0.1:1/v1"))
    assert chat.info.capabilities == TEXT and chat.info.rerank_method is None
    encoders = UpstreamEngine(UpstreamSpec(name="e", base_url="http://127.0.0.1:1/v1",
                                           capabilities=("embeddings", "rerank")))
    assert encoders.info.capabilities == {Capability.EMBEDDINGS, Capability.RERANK}
    assert encoders.info.rerank_method == "upstream"
    embed_only = UpstreamEngine(UpstreamSpec(name="e", base_url="http://127.0.0.1:1/v1", capabilities=("embeddings",)))
    assert embed_only.info.capabilities == {Capability.EMBEDDINGS} and embed_only.info.rerank_method is None


async def test_embeddings_come_in_input_order_with_the_upstreams_usage(fake: _Fake) -> None:
    async with _engine(fake) as engine:
        result = await engine.embed(_embed())
    assert result.vectors.dtype == np.float32 and np.array_equal(result.vectors, _expected())
    assert result.prompt_tokens == 6  # the fake's count (words, token ids), not an estimate
    body = fake.log()[-1]["body"]
    assert body == {"model": "up-enc", "encoding_format": "float", "input": ["alpha", "beta gamma", [1, 2, 3]]}


@pytest.mark.parametrize("step", [{"base64": True}, {"reverse": True}, {"base64": True, "reverse": True},
                                  {"no_index": True}], ids=["base64", "reversed", "base64-reversed", "no-index"])
async def test_every_answer_shape_gives_the_same_vectors(fake: _Fake, step: dict[str, Any]) -> None:
    fake.script(step)
    async with _engine(fake) as engine:
        result = await engine.embed(_embed())
    assert np.array_equal(result.vectors, _expected())


async def test_dimensions_are_asked_for_and_checked(fake: _Fake) -> None:
    fake.script({}, {"ignore_dimensions": True})
    async with _engine(fake) as engine:
        result = await engine.embed(_embed(dimensions=4))
        assert result.vectors.shape == (3, 4) and np.array_equal(result.vectors, _expected(4))
        assert fake.log()[-1]["body"]["dimensions"] == 4
        error = await _fails(engine.embed(_embed(dimensions=4)))
    assert "8-dimensional vectors when 4 dimensions were asked for" in error.message


@pytest.mark.parametrize(("step", "tokens"), [({"usage": False}, 8), ({"usage": "total"}, 6)],
                         ids=["estimated", "total_tokens"])
async def test_embedding_usage_is_the_upstreams_else_estimated(fake: _Fake, step: dict[str, Any], tokens: int) -> None:
    fake.script(step)
    async with _engine(fake) as engine:
        result = await engine.embed(_embed())
    assert result.prompt_tokens == tokens  # estimate: "alpha" 2 + "beta gamma" 3 + 3 token ids


async def test_nothing_to_embed_or_rerank_asks_nothing(fake: _Fake) -> None:
    seen = len(fake.log())
    async with _engine(fake) as engine:
        assert (await engine.embed(EmbedRequest("e0", ()))).vectors.shape[0] == 0
        assert (await engine.rerank(RerankRequest("r0", "q", ()))).scores == ()
    assert len(fake.log()) == seen


EMBED_FAULTS = ["count", "type", "nan", "dims", "index", "shape", "json"]
RAW_EMBEDDINGS = ['[]', '{"data": [1, 2, 3]}', '{"data": [{"embedding": []}, {"embedding": []}, {"embedding": []}]}',
                  '{"data": [{"embedding": "not base64!"}, {"embedding": [1]}, {"embedding": [1]}]}',
                  '{"data": [{"index": 0, "embedding": [1]}, {"embedding": [1]}, {"index": 2, "embedding": [1]}]}',
                  '{"data": [{"embedding": [1e300]}, {"embedding": [1]}, {"embedding": [1]}]}',
                  '{"data": [{"embedding": [[1]]}, {"embedding": [1]}, {"embedding": [1]}]}']


@pytest.mark.parametrize("step", [{"malformed": kind} for kind in EMBED_FAULTS]
                         + [{"raw_body": raw} for raw in RAW_EMBEDDINGS] + [{"html": True}],
                         ids=[*EMBED_FAULTS, *(f"raw{i}" for i in range(len(RAW_EMBEDDINGS))), "html"])
async def test_a_malformed_embeddings_answer_is_unavailable(fake: _Fake, step: dict[str, Any]) -> None:
    fake.script(step)
    async with _engine(fake) as engine:
        error = await _fails(engine.embed(_embed()))
        assert engine.stats().running == 0
    assert error.message.startswith(f"upstream {LABEL} sent ") and "Traceback" not in error.message


UNAVAILABLE, INVALID = ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(("status", "code"), [(500, UNAVAILABLE), (503, UNAVAILABLE), (429, UNAVAILABLE),
                                              (400, INVALID), (422, INVALID), (404, ErrorCode.MODEL_NOT_FOUND)])
@pytest.mark.parametrize("operation", ["embed", "rerank"])
async def test_statuses_are_unavailable_or_the_requests_own_error(fake: _Fake, status: int, code: ErrorCode,
                                                                  operation: str) -> None:
    fake.script({"status": status})
    async with _engine(fake) as engine:
        call = engine.embed(_embed()) if operation == "embed" else engine.rerank(_rerank())
        error = await _fails(call, code)
    if status in (400, 422, 404):
        assert error.message == f"the upstream refused the request ({status}): scripted {status}"
    else:
        assert error.message == f"upstream {LABEL} answered {status}"


@pytest.mark.parametrize(("step", "options", "setting"), [
    ({"stall": 5.0}, {"first_token_timeout": 0.3}, "0.3 s (first_token_timeout)"),
    ({"delay": 5.0}, {"first_token_timeout": 0.3}, "0.3 s (first_token_timeout)"),
    ({"stall": 5.0}, {"total_timeout": 0.3}, "0.3 s in total (total_timeout)"),
], ids=["stall-after-headers", "stall-before-headers", "total"])
async def test_a_stall_is_unavailable_and_names_the_timeout(fake: _Fake, step: dict[str, Any],
                                                            options: dict[str, Any], setting: str) -> None:
    fake.script(step)
    async with _engine(fake, **options) as engine:
        started = time.monotonic()
        error = await _fails(engine.rerank(_rerank()))
        assert time.monotonic() - started < 4  # well before the fake's 5 s
        assert engine.stats().running == 0
    assert error.message.startswith(f"upstream {LABEL} ") and error.message.endswith(setting)


async def test_an_unreachable_or_unstarted_upstream_is_unavailable() -> None:
    closed = UpstreamSpec(name="gone", base_url=f"http://127.0.0.1:{free_port()}/v1", deployment=LABEL,
                          capabilities=("embeddings",))
    engine = UpstreamEngine(closed)
    assert "is not started" in (await _fails(engine.embed(_embed()))).message
    await engine.start()
    try:
        assert "is unreachable" in (await _fails(engine.embed(_embed()))).message
    finally:
        await engine.close()


@pytest.mark.parametrize("step", [{"stall": 10.0}, {"delay": 10.0}], ids=["after-headers", "before-headers"])
async def test_cancelling_the_caller_closes_the_upstream_request(fake: _Fake, step: dict[str, Any]) -> None:
    fake.script(step)
    seen = len(fake.log())
    async with _engine(fake) as engine:
        call = asyncio.create_task(engine.embed(_embed()))
        await fake.wait_for(seen, "")  # the upstream has the request
        assert engine.stats().running == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert engine.stats().running == 0
        entry = await fake.wait_for(seen, "disconnected")
    assert not entry["finished"]


async def test_rerank_scores_come_in_input_order_with_the_upstreams_usage(fake: _Fake) -> None:
    async with _engine(fake) as engine:
        result = await engine.rerank(_rerank())
    assert result.scores == PLAIN and result.prompt_tokens == RERANK_REPORTED
    assert fake.log()[-1]["body"] == {"model": "up-enc", "query": QUERY, "documents": list(DOCS), "top_n": 4,
                                      "return_documents": False}


async def test_a_score_field_instead_of_relevance_score_is_read(fake: _Fake) -> None:
    fake.script({"score_key": "score"})
    async with _engine(fake) as engine:
        assert (await engine.rerank(_rerank())).scores == PLAIN


async def test_logits_go_through_the_sigmoid_and_keep_their_order(fake: _Fake) -> None:
    fake.script({"logits": True})
    async with _engine(fake) as engine:
        scores = (await engine.rerank(_rerank())).scores
    assert all(0 < s < 1 for s in scores)
    assert scores == pytest.approx([1 / (1 + math.exp(-(10 * p - 5))) for p in PLAIN])
    assert sorted(range(4), key=lambda i: scores[i]) == sorted(range(4), key=lambda i: PLAIN[i])


async def test_the_tei_shape_is_asked_and_read(fake: _Fake) -> None:
    async with _engine(fake, rerank_api="tei") as engine:
        result = await engine.rerank(_rerank())
    assert result.scores == PLAIN and result.prompt_tokens == RERANK_ESTIMATE  # TEI reports no usage
    assert fake.log()[-1]["body"] == {"query": QUERY, "texts": list(DOCS), "raw_scores": False, "return_text": False}


@pytest.mark.parametrize("step", [{"usage": False}, {"usage": "billed_units"}], ids=["none", "billed-units"])
async def test_rerank_usage_is_estimated_when_the_upstream_sends_no_tokens(fake: _Fake, step: dict[str, Any]) -> None:
    fake.script(step)
    async with _engine(fake) as engine:
        assert (await engine.rerank(_rerank())).prompt_tokens == RERANK_ESTIMATE


RERANK_FAULTS = ["missing_index", "index", "duplicate", "type", "shape", "json"]


@pytest.mark.parametrize("api", ["jina", "tei"])
@pytest.mark.parametrize("kind", RERANK_FAULTS)
async def test_a_malformed_rerank_answer_is_unavailable(fake: _Fake, kind: str, api: str) -> None:
    fake.script({"malformed": kind})
    async with _engine(fake, rerank_api=api) as engine:
        error = await _fails(engine.rerank(_rerank()))
    assert error.message.startswith(f"upstream {LABEL} sent ")


def test_parsers_refuse_what_is_not_an_answer() -> None:
    one = EmbedRequest("e", ("x",))
    for raw in (b'{"data": [{"embedding": "AAA="}]}', b'{"data": [{"embedding": [true]}]}',
                b'{"data": [{"embedding": [1, null]}]}', b'{"data": [{"index": true, "embedding": [1]}]}',
                b'{"data": [{"index": 1, "embedding": [1]}]}'):
        with pytest.raises(MalformedAnswerError):
            read_embeddings(raw, one)
    read = read_embeddings(b'{"data": [{"embedding": "AACAPw=="}], "usage": {"prompt_tokens": 0}}', one)
    assert read.vectors.tolist() == [[1.0]] and read.prompt_tokens == 1  # a 0 count is not believed
    pair = RerankRequest("r", "q", ("a", "b"))
    for raw in (b'{"results": [{"index": 0, "score": 0.5}, {"score": 0.5}]}', b'[{"index": 0, "score": 1e999}]',
                b'[{"index": 0, "score": true}, {"index": 1, "score": 0.1}]'):
        with pytest.raises(MalformedAnswerError):
            read_rerank(raw, pair)
    huge = read_rerank(b'[{"index": 0, "score": -1000}, {"index": 1, "score": 1000}]', pair)
    assert huge.scores == (0.0, 1.0)  # the sigmoid does not overflow at either end
