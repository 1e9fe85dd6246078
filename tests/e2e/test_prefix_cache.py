"""The prefix cache through the real CLI: a repeated long system prompt is served from the cache (the hit
counters in ``/metrics`` grow), and the answer and its ``usage`` are the same as the first time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.process import ServerProcess

NAME = "tiny-prefix"
CONTEXT = " ".join(["The quick brown fox jumps over the lazy dog. What is the capital of France?"] * 12)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, cache_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    args = ["--engine", "transformers", "--model", str(tiny_model_dir), "--name", NAME, "--dtype", "float32",
            "--max-num-seqs", "4"]
    with ServerProcess(args, cache_dir, logs_dir / "prefix-cache.log", ready_timeout=600) as s:
        yield s


def prefix_counters(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("inhouse_engine_prefix_cache") and s.labels.get("model") == NAME}


def ask(sdk: openai.OpenAI, question: str) -> tuple[str, tuple[int, int]]:
    answer = sdk.chat.completions.create(model=NAME, max_tokens=16, temperature=0.0, messages=[
        {"role": "system", "content": CONTEXT}, {"role": "user", "content": question}])
    assert answer.usage is not None
    return answer.choices[0].message.content or "", (answer.usage.prompt_tokens, answer.usage.completion_tokens)


def test_a_repeated_context_hits_and_answers_the_same(server: ServerProcess) -> None:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as sdk:
        before = prefix_counters(server)
        first = ask(sdk, "hello")
        between = prefix_counters(server)
        second = ask(sdk, "hello")
        after = prefix_counters(server)
        other = ask(sdk, "what is the capital of France?")
        last = prefix_counters(server)
    assert first[1][0] > 128, "the prompt is shorter than two blocks: the test would prove little"
    assert second == first  # the same text, the same usage
    assert between["inhouse_engine_prefix_cache_hit_tokens_total"] == before[
        "inhouse_engine_prefix_cache_hit_tokens_total"]
    assert between["inhouse_engine_prefix_cache_bytes"] > 0
    assert after["inhouse_engine_prefix_cache_hit_tokens_total"] >= between[
        "inhouse_engine_prefix_cache_hit_tokens_total"] + 128
    assert last["inhouse_engine_prefix_cache_hit_tokens_total"] > after[
        "inhouse_engine_prefix_cache_hit_tokens_total"]  # another question over the same context hits too
    assert other[1][0] > first[1][0]


def test_a_streamed_answer_reports_the_same_usage_from_the_cache(server: ServerProcess) -> None:
    messages = [{"role": "system", "content": CONTEXT}, {"role": "user", "content": "stream it"}]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as sdk:
        runs = []
        for _ in range(2):
            chunks = list(sdk.chat.completions.create(
                model=NAME, max_tokens=16, temperature=0.0, messages=messages,  # type: ignore[arg-type]
                stream=True, stream_options={"include_usage": True}))
            usage = chunks[-1].usage
            assert usage is not None
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            runs.append((text, usage.prompt_tokens, usage.completion_tokens))
    assert runs[0] == runs[1]
