"""``/v1/embeddings`` and ``/v1/rerank``: the request models and the response builders.

Embeddings follow OpenAI (``input`` as a string, strings, token ids or lists of token ids; ``float`` unless
``base64`` is asked for, because Dify reads only floats).  Rerank follows Jina and Cohere (what Dify's
plugins send): ``documents`` as strings or ``{text}`` objects, ``top_n`` possibly null, scores in [0, 1].
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from inhouse.protocol.common import TokenId, WireModel

__all__ = ["MAX_INPUTS", "EmbeddingRequest", "RerankDocument", "RerankRequest", "embedding_list", "rerank_result"]

MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request; rerank documents share it


class EmbeddingRequest(WireModel):
    model: str = Field(min_length=1)
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] | None = None  # None: float
    dimensions: Annotated[int, Field(ge=1, le=65536)] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _some_text(cls, value: object) -> object:
        """No empty list, no empty text: an all-zero vector for an empty chunk is silently dropped by Dify."""
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be an empty string")
            return value
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("input must not be an empty list")
        if len(value) > MAX_INPUTS:
            raise ValueError(f"input has {len(value)} items; at most {MAX_INPUTS} per request")
        for i, item in enumerate(value):
            if isinstance(item, str | list) and not item:
                raise ValueError(f"input[{i}] is empty; every input needs some text")
        return value

    def inputs(self) -> tuple[str | tuple[int, ...], ...]:
        value = self.input
        if isinstance(value, str):
            return (value,)
        if all(isinstance(x, int) for x in value):
            return (tuple(x for x in value if isinstance(x, int)),)
        return tuple(x if isinstance(x, str) else tuple(x) for x in value if isinstance(x, str | list))


def embedding_list(vectors: npt.NDArray[np.float32], model: str, prompt_tokens: int,
                   encoding: Literal["float", "base64"] | None) -> dict[str, Any]:
    """The OpenAI body.  Float rows stay numpy arrays: the renderer writes them as float32, shortest form."""
    if encoding == "base64":
        rows: list[Any] = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    else:
        rows = list(vectors)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


class RerankDocument(WireModel):
    text: str


class RerankRequest(WireModel):
    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    documents: Annotated[list[str | RerankDocument], Field(min_length=1, max_length=MAX_INPUTS)]
    top_n: Annotated[int, Field(ge=0)] | None = None  # None or 0: every document
    return_documents: bool = True  # Jina's and vLLM's default; Dify's SDK asks for them, its plugin ignores them

    def texts(self) -> tuple[str, ...]:
        return tuple(d if isinstance(d, str) else d.text for d in self.documents)


def rerank_result(request_id: str, model: str, texts: tuple[str, ...], scores: tuple[float, ...],
                  top_n: int | None, return_documents: bool, prompt_tokens: int) -> dict[str, Any]:
    """Results by descending score (ties: input order), cut to ``top_n``."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if top_n:
        order = order[:top_n]
    results: list[dict[str, Any]] = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if return_documents:
            result["document"] = {"text": texts[i]}
        results.append(result)
    return {"id": request_id, "model": model, "results": results,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
