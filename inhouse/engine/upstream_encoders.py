"""The embeddings and rerank wire formats of upstreams: the request bodies, and their answers read defensively.

Owns what an ``engine: upstream`` deployment sends to ``{base_url}/embeddings`` and ``{base_url}/rerank`` and
how it reads what comes back; the HTTP exchange itself (session, timeouts, statuses) is ``upstream.py``'s.
Pure functions, no I/O.  An answer of the wrong shape raises ``MalformedAnswerError`` whose ``reason`` is
written for the client ("sent 2 vectors for 3 inputs"), never an exception that escapes.

Embeddings: ``data[i].embedding`` as a float list or as base64 little-endian float32 (some servers send
base64 whatever ``encoding_format`` asked), put in input order by ``data[i].index`` when every item has one.
There must be one vector per input, all of one length (the ``dimensions`` asked for, when asked), all finite.

Rerank, two request shapes (``rerank_api``): ``jina`` (Jina, Cohere, vLLM, Xinference, llama.cpp, another
inhouse: ``query`` + ``documents`` → ``results: [{index, relevance_score}]``) and ``tei`` (Hugging Face
text-embeddings-inference: ``query`` + ``texts`` → ``[{index, score}]``); either answer shape is read, with
``relevance_score`` or ``score``.  Every document must be scored exactly once.  Scores are relevance
probabilities in [0, 1] for the route; an upstream that sends raw logits instead (llama.cpp does) is noticed
by any score outside [0, 1], and then every score goes through the logistic sigmoid, which keeps the order.
Logits that all happen to fall inside [0, 1] cannot be told from probabilities and are passed on as they are.

Usage: the upstream's ``usage.prompt_tokens`` (else ``usage.total_tokens``) when it is a positive whole
number; otherwise an estimate (``estimate_tokens``).  Cohere's ``meta.billed_units.search_units`` are
searches, not tokens, and are ignored.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson

from inhouse.engine.base import Embeddings, EmbedRequest, RerankRequest, RerankScores

__all__ = [
    "MalformedAnswerError",
    "embeddings_body",
    "estimate_tokens",
    "read_embeddings",
    "read_rerank",
    "rerank_body",
]


class MalformedAnswerError(Exception):
    """The upstream answered 200 with something that is not the answer asked for; ``reason`` is for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def estimate_tokens(text: str) -> int:
    """Used only when the upstream reports no usage: one token per CJK character, one per 4 other characters
    (at least one)."""
    cjk = sum(1 for ch in text if "\u3000" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af")
    return cjk + max(1, (len(text) - cjk + 3) // 4)


def embeddings_body(request: EmbedRequest, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "encoding_format": "float",
                            "input": [list(x) if isinstance(x, tuple) else x for x in request.inputs]}
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    return body


def rerank_body(request: RerankRequest, model: str, api: Literal["jina", "tei"]) -> dict[str, Any]:
    if api == "tei":
        return {"query": request.query, "texts": list(request.documents), "raw_scores": False, "return_text": False}
    return {"model": model, "query": request.query, "documents": list(request.documents),
            "top_n": len(request.documents), "return_documents": False}


def read_embeddings(data: bytes, request: EmbedRequest) -> Embeddings:
    """An embeddings answer as one float32 row per input, in input order; raises MalformedAnswerError."""
    payload = _json(data, "an embeddings answer")
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise MalformedAnswerError("sent an embeddings answer without a data list")
    items: list[Any] = payload["data"]
    if len(items) != len(request.inputs):
        raise MalformedAnswerError(f"sent {len(items)} vectors for {len(request.inputs)} inputs")
    if not all(isinstance(item, dict) for item in items):
        raise MalformedAnswerError("sent an embeddings answer whose data items are not objects")
    rows = [_vector(item.get("embedding")) for item in _in_order(items, "vector")]
    if len({row.shape[0] for row in rows}) > 1:
        raise MalformedAnswerError("sent vectors of different lengths")
    vectors = np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)
    if request.dimensions is not None and rows and vectors.shape[1] != request.dimensions:
        raise MalformedAnswerError(f"sent {vectors.shape[1]}-dimensional vectors when {request.dimensions} "
                                   f"dimensions were asked for")
    if not np.isfinite(vectors).all():
        raise MalformedAnswerError("sent vectors with numbers that are not finite")
    tokens = _reported_tokens(payload.get("usage"))
    if tokens is None:
        tokens = sum(len(x) if isinstance(x, tuple) else estimate_tokens(x) for x in request.inputs)
    return Embeddings(vectors=vectors, prompt_tokens=tokens)


def read_rerank(data: bytes, request: RerankRequest) -> RerankScores:
    """A rerank answer (either shape) as one score in [0, 1] per document, in input order; raises
    MalformedAnswerError."""
    payload = _json(data, "a rerank answer")
    results = payload.get("results") if isinstance(payload, dict) else payload
    if not isinstance(results, list):
        raise MalformedAnswerError("sent a rerank answer without a results list")
    count = len(request.documents)
    if len(results) != count:
        raise MalformedAnswerError(f"sent {len(results)} scores for {count} documents")
    if not all(isinstance(item, dict) for item in results):
        raise MalformedAnswerError("sent a rerank answer whose results are not objects")
    scores = [_score(item) for item in _in_order(results, "score", need_index=True)]
    if any(not 0.0 <= s <= 1.0 for s in scores):  # logits, not probabilities: see the module docstring
        scores = [_sigmoid(s) for s in scores]
    tokens = _reported_tokens(payload.get("usage")) if isinstance(payload, dict) else None
    if tokens is None:  # a cross-encoder reads the query once with every document
        query = estimate_tokens(request.query)
        tokens = sum(query + estimate_tokens(document) for document in request.documents)
    return RerankScores(scores=tuple(scores), prompt_tokens=tokens)


def _json(data: bytes, what: str) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise MalformedAnswerError(f"sent {what} that is not JSON") from None


def _in_order(items: list[dict[str, Any]], what: str, need_index: bool = False) -> list[dict[str, Any]]:
    """``items`` by their ``index`` (each of 0..n-1 exactly once); in the order sent when none has one and
    ``need_index`` is false."""
    indices = [item.get("index") for item in items]
    if not need_index and all(index is None for index in indices):
        return items
    ordered: list[dict[str, Any] | None] = [None] * len(items)
    for index, item in zip(indices, items, strict=True):
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(items):
            raise MalformedAnswerError(f"sent a {what} whose index is missing or out of range")
        if ordered[index] is not None:
            raise MalformedAnswerError(f"sent two of the {what}s for index {index}")
        ordered[index] = item
    return [item for item in ordered if item is not None]


def _vector(embedding: object) -> npt.NDArray[np.float32]:
    if isinstance(embedding, str):
        try:
            raw = base64.b64decode(embedding, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedAnswerError("sent a vector that is neither a number list nor base64") from None
        if not raw or len(raw) % 4:
            raise MalformedAnswerError("sent a base64 vector that is not a whole number of float32s")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not isinstance(embedding, list) or not embedding:
        raise MalformedAnswerError("sent an embeddings answer with a missing or empty vector")
    try:
        row = np.array(embedding)  # no dtype: a string, a null or a nested list shows in the dtype or shape
    except (ValueError, TypeError, OverflowError):
        raise MalformedAnswerError("sent a vector that is not a list of numbers") from None
    if row.ndim != 1 or row.dtype.kind not in "iuf":
        raise MalformedAnswerError("sent a vector that is not a list of numbers")
    with np.errstate(over="ignore"):  # a number too big for float32 becomes inf, refused as not finite
        return row.astype(np.float32)


def _score(item: dict[str, Any]) -> float:
    score = item.get("relevance_score", item.get("score"))
    if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
        raise MalformedAnswerError("sent a rerank result whose score is not a number")
    return float(score)


def _sigmoid(x: float) -> float:
    """The logistic function, without overflow at either end."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _reported_tokens(usage: object) -> int | None:
    """The upstream's own count, when it sent a believable one (a positive whole number)."""
    if not isinstance(usage, dict):
        return None
    for key in ("prompt_tokens", "total_tokens"):
        count = usage.get(key)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            return count
    return None
