"""``usage.prompt_tokens_details.cached_tokens`` through the real CLI and the openai SDK.

On the tiny model with its prefix cache (blocks of 64 tokens): a first call over a long context reports 0, a second
sharing it reports whole blocks, in blocking and streaming answers of both endpoints; with ``prefix_cache: false``
every call reports 0.  Behind an upstream (tests/fault_upstream.py): its count is passed on when it makes sense,
and left out when it sent none or one larger than the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types import CompletionUsage

from tests.e2e.test_gateway import Upstream
from tests.process import ServerProcess

pytestmark = pytest.mark.slow

CACHED, UNCACHED, UPSTREAM = "tiny-cached", "tiny-uncached", "up"
BLOCK = 64


def context(topic: str) -> str:
    """A system prompt of well over two blocks, its own for each test (so the first call misses)."""
    return " ".join([f"Notes on {topic}: the quick brown fox jumps over the lazy dog."] * 16)


@pytest.fixture(scope="module")
def upstream(logs_dir: Path) -> Iterator[Upstream]:
    up = Upstream("cached", logs_dir).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def server(upstream: Upstream, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
           logs_dir: Path) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("cached-tokens") / "inhouse.yaml"
    config.write_text(f"""
models:
  - {{name: {CACHED}, engine: transformers, path: "{tiny_model_dir}", dtype: float32, max_num_seqs: 2}}
  - {{name: {UNCACHED}, engine: transformers, path: "{tiny_model_dir}", dtype: float32, max_num_seqs: 2,
     prefix_cache: false}}
  - {{name: {UPSTREAM}, engine: upstream, base_url: "{upstream.url}/v1", upstream_model: up-model}}
""", encoding="utf-8")
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "cached-tokens.log",
                       ready_timeout=600) as proc:
        yield proc


@pytest.fixture(scope="module")
def sdk(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def cached(usage: CompletionUsage | None) -> int | None:
    """The usage's cached prompt tokens (None: the detail was left out)."""
    assert usage is not None
    details = usage.prompt_tokens_details
    return None if details is None else details.cached_tokens


def chat(sdk: openai.OpenAI, model: str, system: str, question: str, stream: bool = False) -> CompletionUsage | None:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    if not stream:
        return sdk.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                           max_tokens=4, temperature=0.0).usage
    chunks = list(sdk.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                              max_tokens=4, temperature=0.0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    return chunks[-1].usage


def complete(sdk: openai.OpenAI, model: str, prompt: str, stream: bool = False) -> CompletionUsage | None:
    if not stream:
        return sdk.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0.0).usage
    chunks = list(sdk.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0.0, stream=True,
                                         stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    return chunks[-1].usage


def assert_whole_blocks(usage: CompletionUsage | None) -> None:
    hit = cached(usage)
    assert usage is not None and hit is not None
    assert hit > 0 and hit % BLOCK == 0 and hit < usage.prompt_tokens, usage


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
def test_a_chat_sharing_a_long_context_reports_its_cached_blocks(sdk: openai.OpenAI, stream: bool) -> None:
    system = context(f"chat {stream}")
    first = chat(sdk, CACHED, system, "hello", stream)
    second = chat(sdk, CACHED, system, "what is the capital of France?", stream)
    assert first is not None and first.prompt_tokens >= 2 * BLOCK
    assert cached(first) == 0  # OpenAI's shape: the detail is there, with 0, when nothing was cached
    assert_whole_blocks(second)


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
def test_a_completion_sharing_a_long_prompt_reports_its_cached_blocks(sdk: openai.OpenAI, stream: bool) -> None:
    prompt = context(f"completion {stream}")
    first = complete(sdk, CACHED, prompt, stream)
    second = complete(sdk, CACHED, prompt + " And one more line.", stream)
    assert cached(first) == 0
    assert_whole_blocks(second)


def test_without_a_prefix_cache_every_call_reports_zero(sdk: openai.OpenAI) -> None:
    system = context("no cache")
    usages = [chat(sdk, UNCACHED, system, "hello"), chat(sdk, UNCACHED, system, "hello", stream=True),
              complete(sdk, UNCACHED, system), complete(sdk, UNCACHED, system, stream=True)]
    assert [cached(u) for u in usages] == [0, 0, 0, 0]


def test_an_upstreams_cached_tokens_pass_through(sdk: openai.OpenAI, upstream: Upstream) -> None:
    upstream.script({"cached_tokens": 3}, {"cached_tokens": 3}, {"cached_tokens": 4})
    blocking = chat(sdk, UPSTREAM, "be brief", "hi")
    streamed = chat(sdk, UPSTREAM, "be brief", "hi", stream=True)
    completed = complete(sdk, UPSTREAM, "hi")
    assert (cached(blocking), cached(streamed), cached(completed)) == (3, 3, 4)
    assert blocking is not None and blocking.prompt_tokens == 5  # the upstream's own count


def test_an_upstream_that_sends_no_count_or_a_wrong_one_gets_none_reported(sdk: openai.OpenAI,
                                                                           upstream: Upstream) -> None:
    upstream.script({}, {"cached_tokens": 6}, {"cached_tokens": -1}, {"cached_tokens": "3"})
    usages = [chat(sdk, UPSTREAM, "be brief", "hi") for _ in range(4)]  # 6 > the prompt's 5 tokens
    assert [cached(u) for u in usages] == [None] * 4
    assert all(u is not None and u.prompt_tokens == 5 for u in usages)  # the rest of the usage stands
