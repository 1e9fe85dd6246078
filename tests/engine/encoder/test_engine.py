"""The sentence-transformers engine in-process on the tiny random models (fp32): what it answers, what it
refuses, and that its batched vectors and scores are the ones sentence-transformers computes itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sentence_transformers import CrossEncoder, SentenceTransformer

from inhouse.config import SentenceTransformersSpec
from inhouse.engine.base import (
    Capability,
    Embedder,
    EmbedRequest,
    EngineState,
    ModelLoadError,
    Reranker,
    RerankRequest,
)
from inhouse.engine.encoder.engine import EncoderEngine
from inhouse.engine.encoder.loader import CPU_CHUNK_TOKENS
from inhouse.errors import ErrorCode, InhouseError
from tests.tiny_encoder import HIDDEN, WINDOW

TEXTS = ("hello world", "the weather in paris is sunny today and the cats love it", "你好世界", "dogs")
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)  # ~180 tokens: past the 64-token window


def spec(path: Path | str, **overrides: Any) -> SentenceTransformersSpec:
    return SentenceTransformersSpec(name="tiny", path=str(path), dtype="float32", **overrides)


async def started(path: Path, cache_dir: Path, **overrides: Any) -> EncoderEngine:
    engine = EncoderEngine(spec(path, **overrides), cache_dir)
    await engine.start()
    return engine


@pytest.fixture(scope="module")
async def embedder(tiny_embedder_dir: Path, cache_dir: Path) -> AsyncIterator[EncoderEngine]:
    engine = await started(tiny_embedder_dir, cache_dir, max_inputs=8)
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
async def cross(tiny_cross_encoder_dir: Path, cache_dir: Path) -> AsyncIterator[EncoderEngine]:
    engine = await started(tiny_cross_encoder_dir, cache_dir)
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
def reference(tiny_embedder_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(tiny_embedder_dir), device="cpu", local_files_only=True)


def tokens(model: SentenceTransformer, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


async def refused(call: Any) -> InhouseError:
    with pytest.raises(InhouseError) as caught:
        await call
    return caught.value


# ---- before and around loading -----------------------------------------------------------------


async def test_capabilities_are_known_before_loading(tiny_embedder_dir: Path, tiny_cross_encoder_dir: Path,
                                                     tmp_path: Path, cache_dir: Path) -> None:
    embedding = EncoderEngine(spec(tiny_embedder_dir), cache_dir)
    assert embedding.state is EngineState.LOADING
    assert embedding.info.kind == "sentence-transformers"
    assert embedding.info.capabilities == {Capability.EMBEDDINGS, Capability.RERANK}
    assert embedding.info.rerank_method == "embedding-cosine"
    crossing = EncoderEngine(spec(tiny_cross_encoder_dir), cache_dir)
    assert crossing.info.capabilities == {Capability.RERANK}
    assert crossing.info.rerank_method == "cross-encoder"
    # a sentence-transformers CrossEncoder save (modules.json and all) is a cross-encoder too
    (tmp_path / "modules.json").write_text("[]")
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"model_type": "CrossEncoder"}))
    assert EncoderEngine(spec(tmp_path), cache_dir).info.rerank_method == "cross-encoder"
    # missing, or the operator says: as told / an embedding model
    assert EncoderEngine(spec(tmp_path / "absent"), cache_dir).info.rerank_method == "embedding-cosine"
    told = EncoderEngine(spec(tiny_embedder_dir, task="rerank"), cache_dir)
    assert told.info.capabilities == {Capability.RERANK}
    assert EncoderEngine(spec("builtin:all-minilm-l6-v2"), cache_dir).info.capabilities == {
        Capability.EMBEDDINGS, Capability.RERANK}
    assert isinstance(embedding, Embedder) and isinstance(crossing, Reranker)


async def test_a_loading_engine_answers_503_model_loading(tiny_embedder_dir: Path, cache_dir: Path) -> None:
    engine = EncoderEngine(spec(tiny_embedder_dir), cache_dir)
    error = await refused(engine.embed(EmbedRequest("r", ("hi",))))
    assert error.code is ErrorCode.MODEL_LOADING and error.status == 503 and error.retry_after
    error = await refused(engine.rerank(RerankRequest("r", "q", ("d",))))
    assert error.code is ErrorCode.MODEL_LOADING


@pytest.mark.parametrize(("path", "named"), [
    ("/nonexistent/encoder", "/nonexistent/encoder"),
    ("builtin:no-such-model", "builtin:all-minilm-l6-v2"),  # the unknown name, and the known ones
])
async def test_a_model_that_cannot_load_fails_with_an_operator_message(path: str, named: str,
                                                                       cache_dir: Path) -> None:
    engine = EncoderEngine(spec(path), cache_dir)
    with pytest.raises(ModelLoadError) as failed:
        await engine.start()
    assert path in str(failed.value) and named in str(failed.value)
    assert engine.state is EngineState.FAILED
    error = await refused(engine.embed(EmbedRequest("r", ("hi",))))
    assert error.code is ErrorCode.MODEL_UNAVAILABLE


async def test_rerank_on_an_embedding_checkpoint_refuses_to_load(tiny_embedder_dir: Path, cache_dir: Path) -> None:
    engine = EncoderEngine(spec(tiny_embedder_dir, task="rerank"), cache_dir)
    with pytest.raises(ModelLoadError) as failed:
        await engine.start()
    assert "ForSequenceClassification" in str(failed.value) and "task: embed" in str(failed.value)


# ---- embeddings ---------------------------------------------------------------------------------


async def test_vectors_match_sentence_transformers_in_input_order(embedder: EncoderEngine,
                                                                  reference: SentenceTransformer) -> None:
    info = embedder.info
    assert (info.embedding_dimensions, info.context_length, info.dtype, info.device) == (HIDDEN, WINDOW,
                                                                                         "float32", "cpu")
    result = await embedder.embed(EmbedRequest("r", TEXTS))
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (len(TEXTS), HIDDEN)
    np.testing.assert_allclose(result.vectors, reference.encode(list(TEXTS)), atol=1e-5)
    assert result.prompt_tokens == sum(len(tokens(reference, t)) for t in TEXTS)


async def test_concurrent_requests_are_batched_without_changing_their_vectors(
        tiny_embedder_dir: Path, cache_dir: Path, reference: SentenceTransformer) -> None:
    """16 single-text calls of different lengths on an idle engine share forward passes (it waits for a full
    batch, up to 1 s); padding inside a pass leaves each vector as it is alone."""
    engine = await started(tiny_embedder_dir, cache_dir, max_num_seqs=16, batch_wait_ms=1000)
    try:
        texts = [" ".join(["cats"] * (1 + i * 3)) for i in range(16)]
        results = await asyncio.gather(*(engine.embed(EmbedRequest(f"r{i}", (t,))) for i, t in enumerate(texts)))
        stats = engine.stats()
        assert stats.batches < 16 and stats.max_batch > 1 and stats.batched_inputs == 16
    finally:
        await engine.close()
    expected = reference.encode(texts, batch_size=1)
    for result, vector in zip(results, expected, strict=True):
        np.testing.assert_allclose(result.vectors[0], vector, atol=1e-5)


async def test_a_large_request_keeps_its_order_through_sorted_chunks(
        tiny_embedder_dir: Path, cache_dir: Path, reference: SentenceTransformer) -> None:
    """96 inputs of 3 to 64 tokens: one pass, run on CPU as length-sorted chunks (> CPU_CHUNK_TOKENS padded in
    all), every row back in its input's place."""
    engine = await started(tiny_embedder_dir, cache_dir, max_num_seqs=128)
    try:
        lengths = [(i * 37) % 62 + 1 for i in range(96)]  # shuffled lengths, 1 to 62 words
        texts = [" ".join(["dogs"] * n) for n in lengths]
        assert sum(n + 2 for n in lengths) > CPU_CHUNK_TOKENS
        result = await engine.embed(EmbedRequest("r", tuple(texts)))
        assert engine.stats().batches == 1
    finally:
        await engine.close()
    np.testing.assert_allclose(result.vectors, reference.encode(texts), atol=1e-5)
    assert result.prompt_tokens == sum(n + 2 for n in lengths)


async def test_token_ids_are_run_as_given(embedder: EncoderEngine, reference: SentenceTransformer) -> None:
    ids = tuple(tokens(reference, "hello world"))
    by_ids, by_text = await asyncio.gather(embedder.embed(EmbedRequest("a", (ids,))),
                                           embedder.embed(EmbedRequest("b", ("hello world",))))
    np.testing.assert_allclose(by_ids.vectors, by_text.vectors, atol=1e-6)
    assert by_ids.prompt_tokens == len(ids) == by_text.prompt_tokens


@pytest.mark.parametrize(("inputs", "says"), [
    (("fine", ""), "input 1"),
    (("fine", ()), "input 1"),
    (((5, 10**6),), "vocabulary"),
    (((-1,),), "vocabulary"),
    (tuple(f"t{i}" for i in range(9)), "at most 8"),
])
async def test_bad_inputs_are_400_before_anything_runs(embedder: EncoderEngine, inputs: tuple[Any, ...],
                                                       says: str) -> None:
    batches = embedder.stats().batches
    error = await refused(embedder.embed(EmbedRequest("r", inputs)))
    assert error.code is ErrorCode.INVALID_REQUEST and error.status == 400 and error.param == "input"
    assert says in error.message
    assert embedder.stats().batches == batches


async def test_a_long_text_is_cut_to_the_window(embedder: EncoderEngine, reference: SentenceTransformer) -> None:
    result = await embedder.embed(EmbedRequest("r", (LONG, "dogs")))
    assert result.prompt_tokens == WINDOW + len(tokens(reference, "dogs"))
    np.testing.assert_allclose(result.vectors[0], reference.encode(LONG), atol=1e-5)  # it truncates alike
    ids = tuple(tokens(reference, LONG))
    cut = await embedder.embed(EmbedRequest("r", (ids,)))
    assert cut.prompt_tokens == WINDOW


async def test_a_strict_engine_refuses_a_long_input_naming_it(tiny_embedder_dir: Path, cache_dir: Path,
                                                              reference: SentenceTransformer) -> None:
    engine = await started(tiny_embedder_dir, cache_dir, truncate=False)
    try:
        assert (await engine.embed(EmbedRequest("ok", ("dogs",)))).vectors.shape == (1, HIDDEN)
        count = len(tokens(reference, LONG))
        for long in (LONG, tuple(tokens(reference, LONG))):
            error = await refused(engine.embed(EmbedRequest("r", ("dogs", long))))
            assert error.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and error.param == "input"
            assert "input 1" in error.message and str(count) in error.message and str(WINDOW) in error.message
    finally:
        await engine.close()


async def test_dimensions_other_than_native_are_400_without_matryoshka(embedder: EncoderEngine) -> None:
    assert embedder.info.matryoshka_dimensions is None
    full = await embedder.embed(EmbedRequest("r", TEXTS, dimensions=HIDDEN))
    assert full.vectors.shape == (len(TEXTS), HIDDEN)
    error = await refused(embedder.embed(EmbedRequest("r", TEXTS, dimensions=16)))
    assert error.code is ErrorCode.INVALID_REQUEST and error.param == "dimensions"
    assert "Matryoshka" in error.message and str(HIDDEN) in error.message


async def test_matryoshka_keeps_a_renormalised_prefix(tiny_embedder_dir: Path, cache_dir: Path) -> None:
    engine = await started(tiny_embedder_dir, cache_dir, matryoshka_dimensions=())
    listed = await started(tiny_embedder_dir, cache_dir, matryoshka_dimensions=(8, 16))
    try:
        assert engine.info.matryoshka_dimensions == ()
        full = (await engine.embed(EmbedRequest("r", TEXTS))).vectors
        short = await engine.embed(EmbedRequest("r", TEXTS, dimensions=8))
        assert short.vectors.shape == (len(TEXTS), 8) and short.vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(short.vectors, axis=1), 1.0, atol=1e-5)
        prefix = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
        np.testing.assert_allclose(short.vectors, prefix, atol=1e-5)
        for size in (0, HIDDEN + 1):
            error = await refused(engine.embed(EmbedRequest("r", TEXTS, dimensions=size)))
            assert error.param == "dimensions" and f"1 to {HIDDEN}" in error.message
        assert (await listed.embed(EmbedRequest("r", TEXTS, dimensions=16))).vectors.shape == (len(TEXTS), 16)
        error = await refused(listed.embed(EmbedRequest("r", TEXTS, dimensions=12)))
        assert error.param == "dimensions" and "8, 16, 32" in error.message
    finally:
        await engine.close()
        await listed.close()


# ---- rerank -------------------------------------------------------------------------------------


async def test_an_embedding_model_reranks_by_clipped_cosine(embedder: EncoderEngine,
                                                            reference: SentenceTransformer) -> None:
    query, documents = "cats", TEXTS
    result = await embedder.rerank(RerankRequest("r", query, documents))
    vectors = reference.encode([query, *documents])
    cosine = vectors[1:] @ vectors[0] / (np.linalg.norm(vectors[1:], axis=1) * np.linalg.norm(vectors[0]))
    np.testing.assert_allclose(result.scores, np.clip(cosine, 0, 1), atol=1e-5)
    assert all(0.0 <= s <= 1.0 for s in result.scores)
    assert result.prompt_tokens == sum(len(tokens(reference, t)) for t in (query, *documents))


@pytest.mark.parametrize(("query", "documents", "param"), [
    ("", ("a",), "query"),
    ("   ", ("a",), "query"),
    ("q", (), "documents"),
    ("q", ("a", ""), "documents"),
    ("q", tuple(f"d{i}" for i in range(9)), "documents"),  # max_inputs is 8
])
async def test_bad_rerank_requests_are_400(embedder: EncoderEngine, query: str, documents: tuple[str, ...],
                                           param: str) -> None:
    error = await refused(embedder.rerank(RerankRequest("r", query, documents)))
    assert error.code is ErrorCode.INVALID_REQUEST and error.param == param


async def test_a_cross_encoder_scores_as_sentence_transformers_does(
        cross: EncoderEngine, tiny_cross_encoder_dir: Path) -> None:
    assert cross.info.capabilities == {Capability.RERANK} and cross.info.context_length == WINDOW
    query, documents = "what is the capital of france", ("paris is the capital", "cats", "你好世界", LONG)
    result = await cross.rerank(RerankRequest("r", query, documents))
    direct = CrossEncoder(str(tiny_cross_encoder_dir), device="cpu", local_files_only=True)
    expected = direct.predict([(query, d) for d in documents])  # sigmoid of the one logit
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)
    assert all(0.0 <= s <= 1.0 for s in result.scores) and len(set(result.scores)) == len(documents)
    pair_tokens = [len(direct.tokenizer(query, d, truncation="longest_first", max_length=WINDOW)["input_ids"])
                   for d in documents]
    assert pair_tokens[-1] == WINDOW and result.prompt_tokens == sum(pair_tokens)
    error = await refused(cross.embed(EmbedRequest("r", ("hi",))))
    assert error.code is ErrorCode.WRONG_MODEL_KIND


async def test_a_closed_engine_is_unavailable(tiny_cross_encoder_dir: Path, cache_dir: Path) -> None:
    engine = await started(tiny_cross_encoder_dir, cache_dir)
    assert (await engine.rerank(RerankRequest("r", "q", ("d",)))).scores
    await engine.close()
    assert engine.state is EngineState.CLOSED
    error = await refused(engine.rerank(RerankRequest("r", "q", ("d",))))
    assert error.code is ErrorCode.MODEL_UNAVAILABLE


async def test_models_loading_together_each_get_their_own_dtype(tiny_embedder_dir: Path, tiny_cross_encoder_dir: Path,
                                                                 tiny_model_dir: Path, cache_dir: Path) -> None:
    """The registry starts every engine at once.  transformers sets torch's process-wide default dtype while it
    builds a model, so loads that overlap built each other's layers in the wrong dtype (MiniLM served beside
    SmolLM2 failed its first forward pass: "mat1 and mat2 must have the same dtype")."""
    import torch

    from inhouse.config import TransformersSpec
    from inhouse.engine.local.loader import load_model

    models = [(tiny_embedder_dir, "bfloat16"), (tiny_cross_encoder_dir, "float32"),
              (tiny_embedder_dir, "float32"), (tiny_cross_encoder_dir, "bfloat16")]
    for _ in range(3):
        engines = [EncoderEngine(SentenceTransformersSpec(name=f"e{i}", path=str(path), dtype=dtype), cache_dir)
                   for i, (path, dtype) in enumerate(models)]
        chat = asyncio.to_thread(load_model, TransformersSpec(name="c", path=str(tiny_model_dir), dtype="bfloat16"),
                                 cache_dir, "sdpa")
        loaded, *_ = await asyncio.gather(chat, *(e.start() for e in engines))
        try:
            assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
            for engine, (_, want) in zip(engines, models, strict=True):
                assert engine.state is EngineState.READY and engine.info.dtype == want
                assert engine._model is not None
                assert {p.dtype for p in engine._model.model.parameters()} == {getattr(torch, want)}
            assert torch.get_default_dtype() == torch.float32
        finally:
            await asyncio.gather(*(e.close() for e in engines))
