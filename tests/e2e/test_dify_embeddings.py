"""Dify knowledge bases on inhouse: embeddings and rerank through Dify's own plugin SDK (``dify-plugin``).

``tests/e2e/dify_driver.py`` drives the SDK's ``OAICompatEmbeddingModel`` and ``OAICompatRerankModel`` as
the plugin runtime does (a fresh instance per call, credentials as Dify stores them, the daemon's request
entities, ``PluginExecutor``'s positional arguments) and prints what the SDK returned to Dify together with
every request it sent and every response it read.  The server is the real CLI with all-MiniLM-L6-v2 (which
also reranks, by cosine similarity), a fake chat model, and the tiny random cross-encoder when that fixture
exists.

What these tests pin down about the SDK (shared/DIFY_CONTRACT.md §14, §15), besides what the server must do:

* embeddings: one POST per text (the schema's ``MAX_CHUNKS`` is 1), ``{"input": [text], "model",
  "user", "encoding_format": "float"}``; vectors read from ``data[i].embedding`` in order; the usage Dify
  bills is the sum of our ``usage.total_tokens``.  Before sending, the SDK counts every text with GPT-2's
  tokenizer (tiktoken), which an air-gapped plugin would have to download: the driver stands in for it
  offline, and ``test_the_sdk_needs_gpt2_from_the_internet_before_it_embeds`` shows the real one failing.
* Save for embeddings drops our error body: the user reads only the status code.
* rerank: scores are min-max normalised over the results we return, so the last one is always 0.0 and a
  single result (one document, or ``top_n`` 1) is 0.0, which any score threshold drops.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.dify import Dify
from tests.process import ServerProcess

pytestmark = pytest.mark.slow

MINILM = "all-minilm-l6-v2"
CHAT = "chat"
RERANKER = "tiny-reranker"
DIMENSIONS = 384
USER_ID = "dify-e2e-user"  # the driver's end user, forwarded by the SDK as `user`
GPT2_DOWNLOAD_HOST = "openaipublic.blob.core.windows.net:443"

SENTENCES = [
    "The bank raised its interest rates to fight inflation.",
    "Patients must fast for eight hours before the blood test.",
    "Our office is closed on public holidays and weekends.",
]
CJK = [
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "東京は日本の首都で、世界有数の大都市です。",
]
QUERY = "How do I reset my password?"
PARAPHRASE = "What are the steps to change a forgotten password?"
UNRELATED = [
    "The factory's conveyor belt needs new bearings every six months.",
    "Tomatoes grow best in warm, sunny weather with regular watering.",
    "The orchestra performed Beethoven's ninth symphony last night.",
]
DOCS = [UNRELATED[0], PARAPHRASE, UNRELATED[1], UNRELATED[2]]  # the paraphrase is index 1
VALIDATE_QUERY = "What is the capital of the United States?"  # the SDK's rerank Save: 2 documents, threshold 0.8


def cross_encoder_dir(request: pytest.FixtureRequest) -> Path | None:
    """The tiny random cross-encoder from tests/conftest.py, if that fixture exists."""
    try:
        return Path(request.getfixturevalue("tiny_cross_encoder_dir"))
    except pytest.FixtureLookupError:
        return None


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           cache_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("dify-embeddings")
    models = [f'  - {{name: {MINILM}, engine: sentence-transformers, path: "builtin:all-minilm-l6-v2"}}',
              f"  - {{name: {CHAT}, engine: fake}}"]
    reranker = cross_encoder_dir(request)
    if reranker is not None:
        models.append(f'  - {{name: {RERANKER}, engine: sentence-transformers, path: "{reranker}"}}')
    config = folder / "inhouse.yaml"
    config.write_text("models:\n" + "\n".join(models) + "\n")
    server = ServerProcess(["--config", str(config)], cache_dir, folder / "server.log", ready_timeout=240)
    try:
        server.start(wait_ready=False)
        server.wait_settled()  # a model that failed to load fails here at once, with its error, not in 240 s
        models = httpx.get(server.url + "/health", timeout=10).json()["models"]
        failed = {name: m.get("error") for name, m in models.items() if m["state"] != "ready"}
        assert not failed, f"models failed to load: {failed}; log: {server.log_path}"
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def has_reranker(server: ServerProcess, http: httpx.Client) -> bool:
    return RERANKER in {m["id"] for m in http.get("/v1/models").json()["data"]}


def direct_embedding(http: httpx.Client, text: str) -> np.ndarray:
    response = http.post("/v1/embeddings", json={"model": MINILM, "input": text})
    assert response.status_code == 200, response.text
    return np.array(response.json()["data"][0]["embedding"], dtype=np.float64)


def cosine(a: Any, b: Any) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def offline(result: dict[str, Any]) -> None:
    """Nothing left this machine and nothing was estimated."""
    assert result["remote_connections"] == []
    assert result["estimations"] == 0


def embedding_requests(result: dict[str, Any], base: str, texts: list[str]) -> list[dict[str, Any]]:
    """One POST per text, each exactly what the SDK always sends; returns the responses it read."""
    assert [sent["url"] for sent in result["wire"]] == [base + "/embeddings"] * len(texts)
    bodies = []
    for sent, text in zip(result["wire"], texts, strict=True):
        assert sent["body"] == {"input": [text], "model": MINILM, "user": USER_ID, "encoding_format": "float"}
        assert "Authorization" not in sent["headers"]
        assert sent["status"] == 200
        assert sent["response_content_type"].startswith("application/json")
        body: dict[str, Any] = sent["response_body"]
        assert len(body["data"]) == 1
        assert all(isinstance(x, float) for x in body["data"][0]["embedding"])  # floats, never base64
        bodies.append(body)
    return bodies


def assert_vector(vector: list[float]) -> None:
    assert len(vector) == DIMENSIONS
    array = np.asarray(vector, dtype=np.float64)
    assert np.all(np.isfinite(array))
    assert np.linalg.norm(array) == pytest.approx(1.0, abs=1e-3)  # MiniLM normalises; never all-zero


def only_rerank_request(result: dict[str, Any], url: str, docs: list[str], top_n: int | None,
                        model: str = MINILM, query: str = QUERY) -> dict[str, Any]:
    """The one POST the SDK sent, exactly; returns our response after checking its shape."""
    assert len(result["wire"]) == 1, result["wire"]
    sent: dict[str, Any] = result["wire"][0]
    assert sent["url"] == url
    assert sent["body"] == {"model": model, "query": query, "documents": docs, "top_n": top_n,
                            "return_documents": True}
    assert "Authorization" not in sent["headers"]
    assert sent["status"] == 200, sent["response_body"]
    body: dict[str, Any] = sent["response_body"]
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    for r in body["results"]:
        assert r["document"] == {"text": docs[r["index"]]}
    return body


def sdk_view(results: list[dict[str, Any]], docs: list[str], threshold: float | None) -> list[dict[str, Any]]:
    """What ``OAICompatRerankModel._invoke`` makes of our results: min-max over the returned set (a range of
    0 counts as 1), then the threshold on the normalised score, then sorted by it."""
    scores = [r["relevance_score"] for r in results]
    low, high = min(scores), max(scores)
    span = high - low if high != low else 1.0
    view = [{"index": r["index"], "text": docs[r["index"]], "score": (r["relevance_score"] - low) / span}
            for r in results]
    return sorted((d for d in view if threshold is None or d["score"] >= threshold),
                  key=lambda d: d["score"], reverse=True)


# --- embeddings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["/v1", ""])
def test_embedding_save_passes(dify: Dify, server: ServerProcess, suffix: str) -> None:
    result = dify.ok("embed-validate", server.url + suffix, MINILM)
    assert len(result["wire"]) == 1
    sent = result["wire"][0]
    assert sent["url"] == server.url + suffix + "/embeddings"
    assert sent["body"] == {"input": ["ping"], "model": MINILM}  # Save sends no encoding_format and no user
    assert sent["status"] == 200
    assert sent["response_body"]["model"] == MINILM  # the key the SDK's Save insists on
    assert result["gpt2_counts"] == 0  # Save does not count tokens
    offline(result)


def test_embedding_save_of_a_chat_model_fails_with_only_the_status(dify: Dify, server: ServerProcess) -> None:
    result = dify.run("embed-validate", server.url + "/v1", CHAT)
    assert not result["ok"]
    assert result["error_type"] == "CredentialsValidateFailedError"
    # the SDK's Save reports the status alone; our readable body reaches the plugin, not the user
    assert result["error"] == "Credentials validation failed with status code 400"
    sent = result["wire"][0]
    assert sent["status"] == 400
    error = sent["response_body"]["error"]
    assert error["code"] == "model_not_supported"
    assert f"'{CHAT}'" in error["message"] and "embeddings" in error["message"] and MINILM in error["message"]
    offline(result)


@pytest.mark.parametrize("suffix", ["/v1", ""])
def test_embedding_one_text_as_dify_sends_it(dify: Dify, server: ServerProcess, http: httpx.Client,
                                             suffix: str) -> None:
    text = SENTENCES[0]
    result = dify.ok("embed", server.url + suffix, MINILM, "--text", text)
    (body,) = embedding_requests(result, server.url + suffix, [text])
    (vector,) = result["embeddings"]
    assert_vector(vector)
    assert vector == body["data"][0]["embedding"]
    assert cosine(vector, direct_embedding(http, text)) > 0.999
    tokens = body["usage"]["total_tokens"]
    assert tokens > 0
    assert result["usage"] == {"tokens": tokens, "total_tokens": tokens}  # ours, not an estimate
    assert result["model"] == MINILM
    assert result["gpt2_counts"] == 1  # the SDK counted the text with GPT-2 (stood in offline) before sending
    offline(result)


def test_embedding_several_texts_one_request_each_in_order(dify: Dify, server: ServerProcess,
                                                           http: httpx.Client) -> None:
    texts = [*SENTENCES, CJK[0]]
    result = dify.ok("embed", server.url + "/v1", MINILM, *(a for t in texts for a in ("--text", t)))
    bodies = embedding_requests(result, server.url + "/v1", texts)  # MAX_CHUNKS 1: a POST per text
    assert len(result["embeddings"]) == len(texts)
    for vector, text in zip(result["embeddings"], texts, strict=True):
        assert_vector(vector)
        assert cosine(vector, direct_embedding(http, text)) > 0.999
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            assert cosine(result["embeddings"][i], result["embeddings"][j]) < 0.9
    total = sum(b["usage"]["total_tokens"] for b in bodies)
    assert result["usage"] == {"tokens": total, "total_tokens": total}
    assert result["gpt2_counts"] == len(texts)
    offline(result)


def test_embedding_cjk_texts(dify: Dify, server: ServerProcess, http: httpx.Client) -> None:
    result = dify.ok("embed", server.url + "/v1", MINILM, "--text", CJK[0], "--text", CJK[1],
                     "--input-type", "query")
    bodies = embedding_requests(result, server.url + "/v1", CJK)  # the UTF-8 text arrives unchanged
    for vector, text in zip(result["embeddings"], CJK, strict=True):
        assert_vector(vector)
        assert cosine(vector, direct_embedding(http, text)) > 0.999
    assert cosine(result["embeddings"][0], result["embeddings"][1]) < 0.95  # not all unknown tokens
    han = sum(1 for ch in CJK[0] if "\u4e00" <= ch <= "\u9fff")
    assert bodies[0]["usage"]["total_tokens"] >= han  # one wordpiece per Han character at least
    offline(result)


def test_embedding_a_dify_sized_chunk_longer_than_the_window(dify: Dify, server: ServerProcess,
                                                             http: httpx.Client) -> None:
    """Dify's default chunk (500+ tokens) is far beyond MiniLM's 256-token window, and the SDK only cuts at
    its context_size (4096 GPT-2 tokens): the server must embed it anyway, not answer 400."""
    chunk = " ".join([*SENTENCES, *UNRELATED, PARAPHRASE] * 6)
    assert 2000 < len(chunk.encode()) < 4096  # well past 256 wordpieces; below the SDK's cut (exact offline)
    result = dify.ok("embed", server.url + "/v1", MINILM, "--text", chunk)
    (body,) = embedding_requests(result, server.url + "/v1", [chunk])
    (vector,) = result["embeddings"]
    assert_vector(vector)
    assert cosine(vector, direct_embedding(http, chunk)) > 0.999
    assert result["usage"]["total_tokens"] == body["usage"]["total_tokens"] > 0
    offline(result)


def test_the_sdk_needs_gpt2_from_the_internet_before_it_embeds(dify: Dify, server: ServerProcess) -> None:
    """A finding, not a server bug: with the SDK's own tiktoken and an empty cache (an air-gapped plugin),
    the embedding fails before any request reaches us, reported to Dify as our server being unavailable."""
    result = dify.run("embed", server.url + "/v1", MINILM, "--text", SENTENCES[0], "--tiktoken")
    assert not result["ok"]
    assert result["wire"] == []
    assert result["remote_connections"] == [GPT2_DOWNLOAD_HOST]  # refused by the driver's guard
    assert result["error_type"] == "InvokeServerUnavailableError"
    assert "openaipublic.blob.core.windows.net" in result["error"]


# --- rerank -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", ""])
def test_rerank_save_passes(dify: Dify, server: ServerProcess, suffix: str) -> None:
    result = dify.ok("rerank-validate", server.url + suffix, MINILM)
    docs = result["wire"][0]["body"]["documents"]
    assert len(docs) == 2 and "Carson City" in docs[0]
    body = only_rerank_request(result, server.url + suffix.rstrip("/") + "/rerank", docs, None,
                               query=VALIDATE_QUERY)
    assert len(body["results"]) == 2  # top_n null: every document
    offline(result)


def test_rerank_save_of_a_chat_model_fails(dify: Dify, server: ServerProcess) -> None:
    result = dify.run("rerank-validate", server.url + "/v1", CHAT)
    assert not result["ok"]
    assert result["error_type"] == "CredentialsValidateFailedError"
    assert "400 Client Error" in result["error"]  # requests' wording: our body is not shown here either
    error = result["wire"][0]["response_body"]["error"]
    assert error["code"] == "model_not_supported" and "rerank" in error["message"]
    offline(result)


def test_rerank_paraphrase_first_threshold_and_top_n(dify: Dify, server: ServerProcess) -> None:
    threshold, top_n = 0.5, 3
    result = dify.ok("rerank", server.url + "/v1", MINILM, "--query", QUERY,
                     *(a for d in DOCS for a in ("--doc", d)),
                     "--score-threshold", str(threshold), "--top-n", str(top_n))
    body = only_rerank_request(result, server.url + "/v1/rerank", DOCS, top_n)
    assert len(body["results"]) == top_n  # the server cuts; the SDK trusts it
    assert body["results"][0]["index"] == DOCS.index(PARAPHRASE)
    assert body["results"][0]["relevance_score"] > body["results"][1]["relevance_score"] + 0.2
    assert result["docs"] == sdk_view(body["results"], DOCS, threshold)
    assert result["docs"][0] == {"index": DOCS.index(PARAPHRASE), "text": PARAPHRASE, "score": 1.0}
    assert len(result["docs"]) < top_n  # the last result is normalised to 0.0 and always fails the threshold
    assert body["usage"]["total_tokens"] > 0
    offline(result)


def test_rerank_top_n_null_returns_every_document(dify: Dify, server: ServerProcess) -> None:
    result = dify.ok("rerank", server.url, MINILM, "--query", QUERY, *(a for d in DOCS for a in ("--doc", d)))
    body = only_rerank_request(result, server.url + "/rerank", DOCS, None)
    assert sorted(r["index"] for r in body["results"]) == list(range(len(DOCS)))
    assert result["docs"] == sdk_view(body["results"], DOCS, None)
    assert [d["index"] for d in result["docs"]] == [r["index"] for r in body["results"]]
    assert result["docs"][0]["index"] == DOCS.index(PARAPHRASE)
    assert result["docs"][0]["score"] == 1.0 and result["docs"][-1]["score"] == 0.0
    offline(result)


@pytest.mark.parametrize("threshold", [None, 0.5], ids=["no-threshold", "threshold"])
def test_rerank_a_single_document_scores_zero_in_the_sdk(dify: Dify, server: ServerProcess,
                                                         threshold: float | None) -> None:
    """A finding: the SDK's min-max over one result gives 0.0 (the range of 0 counts as 1), so a relevant
    lone document is ranked 0.0 and any threshold drops it, whatever score we sent."""
    options = [] if threshold is None else ["--score-threshold", str(threshold)]
    result = dify.ok("rerank", server.url + "/v1", MINILM, "--query", QUERY, "--doc", PARAPHRASE, *options)
    body = only_rerank_request(result, server.url + "/v1/rerank", [PARAPHRASE], None)
    (ours,) = body["results"]
    assert ours["relevance_score"] > 0.5  # relevant, by our score
    expected = [] if threshold is not None else [{"index": 0, "text": PARAPHRASE, "score": 0.0}]
    assert result["docs"] == expected
    offline(result)


def test_rerank_top_n_one_leaves_nothing_above_a_threshold(dify: Dify, server: ServerProcess) -> None:
    """The same finding through Dify's "Top K" = 1: we return the best document, the SDK scores it 0.0."""
    result = dify.ok("rerank", server.url + "/v1", MINILM, "--query", QUERY,
                     *(a for d in DOCS for a in ("--doc", d)), "--score-threshold", "0.1", "--top-n", "1")
    body = only_rerank_request(result, server.url + "/v1/rerank", DOCS, 1)
    assert [r["index"] for r in body["results"]] == [DOCS.index(PARAPHRASE)]
    assert result["docs"] == []
    offline(result)


def test_rerank_with_a_cross_encoder(dify: Dify, server: ServerProcess, has_reranker: bool) -> None:
    if not has_reranker:
        pytest.skip("tests/conftest.py has no tiny_cross_encoder_dir fixture yet")
    validated = dify.ok("rerank-validate", server.url + "/v1", RERANKER)
    only_rerank_request(validated, server.url + "/v1/rerank", validated["wire"][0]["body"]["documents"], None,
                        model=RERANKER, query=VALIDATE_QUERY)
    result = dify.ok("rerank", server.url + "/v1", RERANKER, "--query", QUERY,
                     *(a for d in DOCS for a in ("--doc", d)), "--top-n", "3")
    body = only_rerank_request(result, server.url + "/v1/rerank", DOCS, 3, model=RERANKER)
    assert len(body["results"]) == 3  # random weights: only the shape and the SDK's arithmetic are checked
    assert result["docs"] == sdk_view(body["results"], DOCS, None)
    embed = dify.run("embed-validate", server.url + "/v1", RERANKER)  # a reranker-only model cannot embed
    assert not embed["ok"]
    assert embed["wire"][0]["response_body"]["error"]["code"] == "model_not_supported"
    offline(result)
