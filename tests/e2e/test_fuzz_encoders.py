"""Seeded fuzzing of /v1/embeddings and /v1/rerank on tiny random encoders (the chat routes: test_fuzz.py).

Mutated bodies (hostile values, wrong types, deleted and unknown fields, broken JSON and UTF-8) go a batch
at a time, while innocent single-text requests are batched beside them in the same forward passes.  Every
answer is a 2xx or an OpenAI-shaped 4xx, never a 5xx; every innocent caller gets exactly the vector it gets
alone.  ``FUZZ_SEED`` / ``FUZZ_ROUNDS`` run it longer by hand.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.test_fuzz import BATCH, ROUNDS, SEED, encode, hostile
from tests.process import ServerProcess

EMBEDDER, RERANKER = "vec", "ranker"
EMBED_FIELDS = ["model", "input", "encoding_format", "dimensions", "user", "unknown_field"]
RERANK_FIELDS = ["model", "query", "documents", "top_n", "return_documents", "unknown_field"]
INPUTS: list[Any] = ["", " ", "北京" * 300, "word " * 2000, [[]], [[0]], [[-1]], [[10**6]], [[1] * 5000],
                     ["ok", ""], ["ok"] * 3000, [["a"]], [1, "a"], "a\u0000b"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_embedder_dir: Path,
           tiny_cross_encoder_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("fuzz-encoders")
    (folder / "inhouse.yaml").write_text(f"""
models:
  - {{name: {EMBEDDER}, engine: sentence-transformers, path: "{tiny_embedder_dir}", matryoshka_dimensions: [8, 16],
     dtype: float32, max_waiting: 512}}
  - {{name: {RERANKER}, engine: sentence-transformers, path: "{tiny_cross_encoder_dir}", max_waiting: 512}}
""", encoding="utf-8")
    with ServerProcess(["--config", str(folder / "inhouse.yaml")], cache_dir, folder / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def mutate(rng: random.Random, base: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    body = json.loads(json.dumps(base))
    for _ in range(rng.randint(1, 3)):
        roll, field = rng.random(), rng.choice(fields)
        if roll < 0.5:
            body[field] = hostile(rng)
        elif roll < 0.6:
            body.pop(field, None)
        elif "input" in body:
            body["input"] = rng.choice(INPUTS)
        else:
            body[rng.choice(["query", "documents"])] = rng.choice(INPUTS)
    return body


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.content[:500]
    assert response.headers.get("content-type", "").startswith("application/json"), response.content[:200]
    body = response.json()
    if response.status_code >= 400:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    else:
        assert body.get("data") or body.get("results") is not None, body


def vector(http: httpx.Client, text: str) -> np.ndarray:
    r = http.post("/v1/embeddings", json={"model": EMBEDDER, "input": [text]})
    assert r.status_code == 200, r.text
    return np.array(r.json()["data"][0]["embedding"])


@pytest.mark.parametrize(("path", "base", "fields"), [
    ("/v1/embeddings", {"model": EMBEDDER, "input": ["hello"]}, EMBED_FIELDS),
    ("/v1/rerank", {"model": RERANKER, "query": "hello", "documents": ["a", "b"]}, RERANK_FIELDS),
], ids=["embeddings", "rerank"])
def test_mutated_bodies_never_get_a_5xx_nor_change_an_innocent_vector(
        http: httpx.Client, path: str, base: dict[str, Any], fields: list[str]) -> None:
    rng = random.Random(f"{SEED}-{path}")
    texts = [f"innocent text number {i} 你好" for i in range(8)]
    alone = [vector(http, t) for t in texts]
    for _ in range(ROUNDS):
        payloads: list[tuple[str, Any]] = [("fuzz", encode(rng, mutate(rng, base, fields))) for _ in range(BATCH)]
        payloads += [("innocent", i) for i in range(len(texts))]
        rng.shuffle(payloads)

        def send(item: tuple[str, Any]) -> np.ndarray | None:
            kind, payload = item
            if kind == "innocent":
                return vector(http, texts[payload])
            check(http.post(path, content=payload, headers={"content-type": "application/json"}))
            return None

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(send, payloads))
        batched = {p[1]: a for p, a in zip(payloads, answers, strict=True) if p[0] == "innocent"}
        for i, want in enumerate(alone):
            assert np.allclose(batched[i], want, atol=1e-5), i
        assert http.post(path, json=base).status_code == 200
