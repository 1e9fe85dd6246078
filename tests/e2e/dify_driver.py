"""Drives Dify's own plugin SDK against a running server, the way Dify's plugin runtime calls it.

Run by ``.venv-dify/bin/python`` (the SDK needs Python >= 3.12; ``scripts/dify_venv.sh`` builds that venv),
never imported by the 3.11 test suite.  ``tests/e2e/test_dify.py`` runs it as a subprocess and reads the
one JSON object it prints on stdout.

What is real here, and what only watches:

* real: ``import dify_plugin`` (which applies gevent's monkey patching first, as in the plugin process); one
  fresh ``OAICompatLargeLanguageModel([])`` per call, as ``ModelFactory.get_instance`` builds it for a
  customizable-model provider (``self.models[model_type](self.provider.models)``, an empty schema list);
  credentials as Dify stores them when a user filled in only the URL and the model name (every value a
  string, form defaults filled in, see shared/DIFY_CONTRACT.md §2); prompt messages parsed by the daemon's
  own ``ModelInvokeLLMRequest``; then ``validate_credentials(model, credentials)`` or
  ``invoke(model, credentials, prompt_messages, model_parameters, tools, stop, stream, user_id)`` with the
  positional arguments ``PluginExecutor.invoke_llm`` uses, and every chunk iterated as the host does.
* watching only: ``requests.post`` is wrapped to record each request the SDK sends (URL, headers, body)
  and the response status; it calls through unchanged.
* the one stand-in: the SDK's token estimator (``_num_tokens_from_string``) counts the call and raises
  ``TokenEstimationRefusedError``.  A call means the server gave no usage, so Dify would guess with GPT-2's
  tokenizer, which tiktoken first downloads from the internet: an air-gapped Dify fails right there.  The
  stand-in fails the same way without sending anything off this machine.

Usage::

    dify_driver.py SCENARIO --base-url URL --model NAME [--prompt TEXT] [--max-tokens N] [--stop WORD]...
                   [--stream]

SCENARIO is ``validate`` (the "Save" ping), ``blocking`` (stream=False), ``stream`` (stream=True),
``multiturn`` (system prompt, then user/assistant/user) or ``stop`` (stop words; blocking unless --stream).
The exit status is 0 when the SDK call succeeded, 1 when it raised (the JSON then says what it raised).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

# Import order matters as in the plugin process: the package import applies gevent's patching first.
import dify_plugin  # noqa: F401
import requests
from dify_plugin.core.entities.plugin.request import ModelInvokeLLMRequest
from dify_plugin.entities.model import ModelType
from dify_plugin.entities.model.llm import LLMResultChunk
from dify_plugin.entities.model.message import (
    AssistantPromptMessage,
    PromptMessage,
    SystemPromptMessage,
    UserPromptMessage,
)
from dify_plugin.interfaces.model.openai_compatible.llm import OAICompatLargeLanguageModel

SCENARIOS = ("validate", "blocking", "stream", "multiturn", "stop")
USER_ID = "dify-e2e-user"  # apps always pass the end user's id; the SDK forwards it as `user`
MULTITURN_SYSTEM = "You are a helpful geography assistant. Answer in one short sentence."
MULTITURN_FIRST_QUESTION = "What is the capital of France?"
MULTITURN_FIRST_ANSWER = "The capital of France is Paris."
MULTITURN_SECOND_QUESTION = "And what is the capital of Germany?"


def dify_credentials(base_url: str) -> dict[str, str]:
    """What Dify hands the plugin after a user typed only the API base URL and the model name (§2)."""
    return {
        "endpoint_url": base_url,
        "mode": "chat",
        "context_size": "4096",
        "max_tokens_to_sample": "4096",
        "agent_thought_support": "not_supported",
        "web_search_support": "not_supported",
        "compatibility_mode": "strict",
        "token_param_name": "auto",
        "user_identity_support": "support",
        "stream_include_usage": "enabled",
        "function_calling_type": "no_call",
        "stream_function_calling": "not_supported",
        "vision_support": "no_support",
        "video_support": "no_support",
        "audio_support": "no_support",
        "document_support": "no_support",
        "structured_output_support": "not_supported",
        "stream_mode_auth": "not_use",
        "stream_mode_delimiter": "\\n\\n",  # the form default, unicode-escaped; the SDK decodes it
    }


class TokenEstimationRefusedError(RuntimeError):
    """Raised where the SDK would estimate token counts because the server sent no usage."""


class Recorder:
    """Records what ``requests.post`` sends; counts and refuses the SDK's token estimation."""

    def __init__(self) -> None:
        self.wire: list[dict[str, Any]] = []
        self.estimations = 0

    def install(self) -> None:
        requests.post = self._wrap_post(requests.post)  # type: ignore[method-assign]
        cls = OAICompatLargeLanguageModel
        cls._num_tokens_from_string = self._refuse(cls._num_tokens_from_string)  # type: ignore[method-assign]

    def _wrap_post(self, post: Callable[..., requests.Response]) -> Callable[..., requests.Response]:
        @functools.wraps(post)
        def recorded(url: str, *args: Any, **kwargs: Any) -> requests.Response:
            response = post(url, *args, **kwargs)
            sent = response.request
            body = sent.body.decode("utf-8") if isinstance(sent.body, bytes) else sent.body
            assert body is None or isinstance(body, str), type(body)  # the SDK sends json= or data=bytes
            self.wire.append({
                "url": sent.url,
                "headers": dict(sent.headers),
                "body": json.loads(body) if body else None,
                "status": response.status_code,
                "response_content_type": response.headers.get("content-type"),
            })
            return response

        return recorded

    def _refuse(self, method: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(method)
        def refused(*args: Any, **kwargs: Any) -> int:
            self.estimations += 1
            raise TokenEstimationRefusedError(
                "the server sent no usage, so Dify estimates tokens with GPT-2's tokenizer via tiktoken, "
                "which downloads it from the internet (fails in an air-gapped Dify)")

        return refused


def prompt_messages(args: argparse.Namespace) -> list[PromptMessage]:
    if args.scenario == "multiturn":
        return [
            SystemPromptMessage(content=MULTITURN_SYSTEM),
            UserPromptMessage(content=MULTITURN_FIRST_QUESTION),
            AssistantPromptMessage(content=MULTITURN_FIRST_ANSWER),
            UserPromptMessage(content=MULTITURN_SECOND_QUESTION),
        ]
    return [UserPromptMessage(content=args.prompt)]


def daemon_request(args: argparse.Namespace, credentials: dict[str, str]) -> ModelInvokeLLMRequest:
    """The request the plugin daemon decodes, built from its JSON form so the SDK's own parsing runs."""
    stream = args.scenario == "stream" or (args.scenario == "stop" and args.stream)
    payload = {
        "user_id": USER_ID,
        "provider": "openai_api_compatible",
        "model_type": ModelType.LLM.value,
        "model": args.model,
        "credentials": credentials,
        "prompt_messages": [m.model_dump(mode="json") for m in prompt_messages(args)],
        "model_parameters": {"temperature": 0, "max_tokens": args.max_tokens},
        "stop": args.stop or None,
        "tools": None,
        "stream": stream,
    }
    return ModelInvokeLLMRequest.model_validate(payload)


def chunk_record(chunk: LLMResultChunk) -> dict[str, Any]:
    usage = chunk.delta.usage
    return {
        "content": chunk.delta.message.content,
        "finish_reason": chunk.delta.finish_reason,
        "usage": None if usage is None else {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
    }


def run_invoke(args: argparse.Namespace, credentials: dict[str, str]) -> dict[str, Any]:
    data = daemon_request(args, credentials)
    model = OAICompatLargeLanguageModel([])  # ModelFactory.get_instance: a fresh instance, empty schemas
    result = model.invoke(data.model, data.credentials, data.prompt_messages, data.model_parameters,
                          data.tools, data.stop, data.stream, data.user_id)
    chunks = [chunk_record(chunk) for chunk in result]
    with_usage = [i for i, c in enumerate(chunks) if c["usage"] is not None]
    return {
        "stream": data.stream,
        "text": "".join(c["content"] for c in chunks if isinstance(c["content"], str)),
        "chunks": len(chunks),
        "content_chunks": sum(1 for c in chunks if c["content"]),
        "usage": chunks[with_usage[-1]]["usage"] if with_usage else None,
        "usage_chunk_indexes": with_usage,
        "finish_reason": chunks[-1]["finish_reason"] if chunks else None,
    }


def run_validate(args: argparse.Namespace, credentials: dict[str, str]) -> dict[str, Any]:
    OAICompatLargeLanguageModel([]).validate_credentials(args.model, credentials)
    return {}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--base-url", required=True, help="the API Base URL as typed into Dify")
    parser.add_argument("--model", required=True, help="the model name as typed into Dify")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--stop", action="append", default=[], help="a stop word (repeatable)")
    parser.add_argument("--stream", action="store_true", help="stream the `stop` scenario")
    parser.add_argument("--api-key", help="the API key as typed into Dify (default: left empty)")
    args = parser.parse_args(argv)
    if args.scenario == "stop" and not args.stop:
        parser.error("the stop scenario needs at least one --stop")

    recorder = Recorder()
    recorder.install()
    credentials = dify_credentials(args.base_url)
    if args.api_key:
        credentials["api_key"] = args.api_key
    started = time.monotonic()
    out: dict[str, Any] = {"scenario": args.scenario, "sdk_version": _sdk_version()}
    try:
        run = run_validate if args.scenario == "validate" else run_invoke
        out.update(run(args, credentials))
        out["ok"] = True
    except Exception as exc:
        out.update(ok=False, error_type=type(exc).__name__, error=str(exc))
    out.update(seconds=round(time.monotonic() - started, 3), wire=recorder.wire, estimations=recorder.estimations)
    print(json.dumps(out, ensure_ascii=False))
    return 0 if out["ok"] else 1


def _sdk_version() -> str:
    from importlib.metadata import version

    return version("dify-plugin")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
