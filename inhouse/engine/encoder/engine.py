"""EncoderEngine: sentence-transformers embeddings and rerank behind the Engine protocol (``engine:
sentence-transformers``), batched across requests.

Owns the engine's lifecycle (LOADING → READY or FAILED → CLOSED), what it tells the server before and after
loading (capabilities first, from the model's files), the checks a request passes before it is queued (empty,
out-of-vocabulary or too long inputs, ``dimensions``), Matryoshka truncation, and turning rows into answers.
An embedding model serves embeddings and reranks by embedding cosine (not a cross-encoder); a cross-encoder
serves rerank only.  Batching is the ``Batcher``'s, tokenizing and forward passes the runners'.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from inhouse.config import SentenceTransformersSpec
from inhouse.engine.admission import check_ready
from inhouse.engine.base import (
    Capability,
    Embeddings,
    EmbedRequest,
    EngineInfo,
    EngineState,
    EngineStats,
    ModelLoadError,
    RerankRequest,
    RerankScores,
)
from inhouse.engine.encoder.batcher import Batcher, BatchLimits, BatchStats
from inhouse.engine.encoder.loader import LoadedEncoder, Task, detect_task, load_encoder
from inhouse.engine.encoder.runner import EmbedInput, Encoded, PairInput, PairRunner, TextRunner, too_long
from inhouse.engine.threads import in_passing_thread
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["KIND", "EncoderEngine"]

log = logging.getLogger("inhouse.engine")

KIND = "sentence-transformers"
Vector = npt.NDArray[np.float32]


class EncoderEngine:
    def __init__(self, spec: SentenceTransformersSpec, cache_dir: Path) -> None:
        self.spec = spec
        self._cache_dir = cache_dir  # unused: encoders load from their directory as they are
        self._task: Task = detect_task(spec)
        embeds = self._task == "embed"
        self._info = EngineInfo(
            kind=KIND,
            context_length=spec.context_length or 0,
            max_num_seqs=spec.max_num_seqs,
            capabilities=frozenset({Capability.EMBEDDINGS, Capability.RERANK} if embeds else {Capability.RERANK}),
            matryoshka_dimensions=spec.matryoshka_dimensions if embeds else None,
            rerank_method="embedding-cosine" if embeds else "cross-encoder",
        )
        self._state = EngineState.LOADING
        self._closing = False
        self._model: LoadedEncoder | None = None
        self._texts: Batcher[EmbedInput, Encoded, Vector] | None = None
        self._pairs: Batcher[PairInput, Encoded, float] | None = None

    # ---- Engine protocol -------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def state(self) -> EngineState:
        return self._state

    async def start(self) -> None:
        try:
            model = await in_passing_thread(self._load)
        except BaseException:
            self._state = EngineState.FAILED
            raise
        self._model = model
        limits = BatchLimits(max_batch=self.spec.max_num_seqs, max_batch_tokens=self.spec.max_batch_tokens,
                             batch_wait=self.spec.batch_wait_ms / 1000, max_waiting=self.spec.max_waiting)
        if model.task == "embed":
            self._texts = Batcher(TextRunner(model), limits, self.spec.name)
            self._texts.start()
        else:
            self._pairs = Batcher(PairRunner(model), limits, self.spec.name)
            self._pairs.start()
        self._info = replace(
            self._info,
            context_length=model.window,
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            embedding_dimensions=model.dimensions,
            matryoshka_dimensions=model.matryoshka,
        )
        self._state = EngineState.READY
        log.info("model %s ready: %s, window %d tokens, up to %d inputs per forward pass", self.spec.name,
                 f"{model.dimensions}-dimensional embeddings" if model.task == "embed" else "cross-encoder rerank",
                 model.window, self.spec.max_num_seqs)

    def _load(self) -> LoadedEncoder:
        """Load, then run one input through the model (warms it up; a model that cannot run fails here)."""
        model = load_encoder(self.spec, self._task)
        try:
            if model.task == "embed":
                texts = TextRunner(model)
                texts.run([p for p in texts.prepare([EmbedInput(0, "warm up", True)]) if isinstance(p, Encoded)])
            else:
                pairs = PairRunner(model)
                pairs.run([p for p in pairs.prepare([PairInput("warm up", "warm up")]) if isinstance(p, Encoded)])
        except Exception as exc:
            raise ModelLoadError(f"model {self.spec.name!r} loaded from {self.spec.path}, but a test input failed "
                                 f"in it: {exc}; check the model's files and dtype") from exc
        return model

    def stats(self) -> EngineStats:
        batcher = self._texts or self._pairs
        counts = batcher.stats() if batcher is not None else BatchStats(0, 0, 0, 0, 0)
        return EngineStats(state=self._state, running=counts.running, waiting=counts.waiting,
                           batches=counts.batches, batched_inputs=counts.batched_inputs, max_batch=counts.max_batch)

    async def close(self) -> None:
        self._closing = True
        for batcher in (self._texts, self._pairs):
            if batcher is not None:
                await batcher.close()
        self._state = EngineState.CLOSED

    # ---- embeddings --------------------------------------------------------------------------

    async def embed(self, request: EmbedRequest) -> Embeddings:
        """Vectors in input order.  Inputs longer than the window are cut to it (``truncate``) or refused; token
        ids run exactly as given (no special tokens added: a BERT-style model wants its [CLS] … [SEP] in them)."""
        check_ready(self.spec.name, self._visible_state())
        model, texts = self._model, self._texts
        if texts is None or model is None:
            raise InhouseError(ErrorCode.WRONG_MODEL_KIND,
                               f"model {self.spec.name!r} is a cross-encoder: it serves rerank, not embeddings")
        size = self._dimensions(request.dimensions, model)
        batched = await texts.submit(self._embed_inputs(request.inputs, model), param="input")
        vectors = np.stack(batched.rows)
        if size < model.dimensions:
            vectors = vectors[:, :size]
            if model.normalizes:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return Embeddings(np.ascontiguousarray(vectors, dtype=np.float32), batched.tokens)

    def _embed_inputs(self, inputs: Sequence[str | tuple[int, ...]], model: LoadedEncoder) -> list[EmbedInput]:
        self._check_count(len(inputs), "input")
        truncate, window = self.spec.truncate, model.window
        items = []
        for index, content in enumerate(inputs):
            if isinstance(content, str):
                if not content:
                    raise _invalid(f"input {index} is an empty string; there is nothing to embed", "input")
            else:
                if not content:
                    raise _invalid(f"input {index} is an empty list of token ids; there is nothing to embed", "input")
                if min(content) < 0 or max(content) >= model.vocab_size:
                    raise _invalid(f"input {index} has token ids outside this model's vocabulary "
                                   f"(0 to {model.vocab_size - 1})", "input")
                if len(content) > window:
                    if not truncate:
                        raise too_long(index, len(content), window)
                    content = content[:window]
            items.append(EmbedInput(index, content, truncate))
        return items

    def _dimensions(self, asked: int | None, model: LoadedEncoder) -> int:
        """The vector size to return: the model's own, or a Matryoshka model's shorter prefix."""
        native, allowed = model.dimensions, model.matryoshka
        if asked is None or asked == native:
            return native
        if allowed is None:
            raise _invalid(f"model {self.spec.name!r} does not support shortening its embeddings (it was not trained "
                           f"for Matryoshka truncation): its vectors have {native} dimensions; leave dimensions out "
                           f"or set it to {native}", "dimensions")
        if not 1 <= asked <= native or (allowed and asked not in allowed):
            sizes = ", ".join(map(str, sorted({*allowed, native}))) if allowed else f"1 to {native}"
            raise _invalid(f"dimensions {asked} is not available for model {self.spec.name!r}; its vectors can "
                           f"have {sizes} dimensions", "dimensions")
        return asked

    # ---- rerank ------------------------------------------------------------------------------

    async def rerank(self, request: RerankRequest) -> RerankScores:
        """Relevance in [0, 1] per document, in input order; documents longer than the window are cut to it.
        A cross-encoder scores each (query, document) pair.  An embedding model scores by embedding cosine, not
        a cross-encoder: max(0, cosine of the query's and the document's vectors) — coarser relevance."""
        check_ready(self.spec.name, self._visible_state())
        if not request.query.strip():
            raise _invalid("query is empty; there is nothing to rank the documents against", "query")
        if not request.documents:
            raise _invalid("documents is empty; send at least one document to rank", "documents")
        self._check_count(len(request.documents), "documents")
        for index, document in enumerate(request.documents):
            if not document:
                raise _invalid(f"document {index} is an empty string; there is nothing to rank", "documents")
        if self._pairs is not None:
            pairs = [PairInput(request.query, document) for document in request.documents]
            scored = await self._pairs.submit(pairs, param="documents")
            return RerankScores(tuple(scored.rows), scored.tokens)
        assert self._texts is not None
        texts = [EmbedInput(0, request.query, True)]
        texts += [EmbedInput(index + 1, document, True) for index, document in enumerate(request.documents)]
        embedded = await self._texts.submit(texts, param="documents")
        return RerankScores(_cosine_scores(np.stack(embedded.rows)), embedded.tokens)

    # ---- helpers -----------------------------------------------------------------------------

    def _visible_state(self) -> EngineState:
        return EngineState.CLOSED if self._closing else self._state

    def _check_count(self, count: int, param: str) -> None:
        if count == 0:
            raise _invalid(f"{param} is empty; send at least one", param)
        if count > self.spec.max_inputs:
            raise _invalid(f"this request has {count} {param} items, but model {self.spec.name!r} takes at most "
                           f"{self.spec.max_inputs} per request; split it", param)


def _cosine_scores(vectors: Vector) -> tuple[float, ...]:
    """Row 0 is the query; each other row's cosine with it, clipped to [0, 1]."""
    norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    cosine = (vectors[1:] @ vectors[0]) / (norms[1:] * norms[0])
    return tuple(float(score) for score in np.clip(cosine, 0.0, 1.0))


def _invalid(message: str, param: str) -> InhouseError:
    return InhouseError(ErrorCode.INVALID_REQUEST, message, param=param)

