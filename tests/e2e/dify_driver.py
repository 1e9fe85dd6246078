"""Drives Dify's own plugin SDK against a running server, the way Dify's plugin runtime calls it.

Run by ``.venv-dify/bin/python`` (the SDK needs Python >= 3.12; ``scripts/dify_venv.sh`` builds that venv),
never imported by the 3.11 test suite.  ``tests/e2e/test_dify.py`` and ``test_dify_embeddings.py`` run it as
a subprocess and read the one JSON object it prints on stdout.

What is real here, and what only watches:

* real: ``import dify_plugin`` (which applies gevent's monkey patching first, as in the plugin process); one
  fresh model instance per call, as ``ModelFactory.get_instance`` builds it for a customizable-model provider
  (``self.models[model_type](self.provider.models)``, an empty schema list): ``OAICompatLargeLanguageModel``,
  ``OAICompatEmbeddingModel`` or ``OAICompatRerankModel``; credentials as Dify stores them when a user filled
  in only the URL and the model name (every value a string, the form defaults of that model type filled in,
  see shared/DIFY_CONTRACT.md §2); the daemon's own request entities (``ModelInvokeLLMRequest``,
  ``ModelInvokeTextEmbeddingRequest``, ``ModelInvokeRerankRequest``) parse the call; then
  ``validate_credentials(model, credentials)`` or ``invoke(...)`` with the arguments ``PluginExecutor`` uses
  (``invoke_llm``: ``model, credentials, prompt_messages, model_parameters, tools, stop, stream, user_id``;
  ``invoke_text_embedding``: ``model, credentials, texts, user=user_id, input_type=input_type``;
  ``invoke_rerank``: ``model, credentials, query, docs, score_threshold, top_n, user_id``).
* watching only: ``requests.post`` (and the copy the rerank module imported by name) is wrapped to record
  each request the SDK sends (URL, headers, body) and the response (status, content type, and the body when
  it was not streamed); it calls through unchanged.
* guard: urllib3's ``create_connection`` refuses any host but loopback and records the attempt, so nothing
  in the SDK can reach the internet from a test, whatever it tries.

The two stand-ins, both for token counting with GPT-2's tokenizer, which tiktoken downloads from
``openaipublic.blob.core.windows.net`` on first use (an air-gapped Dify fails right there):

* LLM: the token estimator (``_num_tokens_from_string``) counts the call and raises
  ``TokenEstimationRefusedError``.  A call means the server gave no usage, so Dify would guess; the
  stand-in fails the way an air-gapped Dify does, without sending anything off this machine.
* embeddings: ``OAICompatEmbeddingModel._invoke`` calls ``_get_num_tokens_by_gpt2`` on **every text of every
  call**, whatever the server answers, only to cut texts of ``context_size`` (credential, "4096") GPT-2
  tokens or more.  That call cannot be avoided (a finding: the bare SDK embedding class needs tiktoken's
  GPT-2 files, or a pre-filled ``TIKTOKEN_CACHE_DIR``, before it embeds anything).  Refusing it would fail
  every embedding, so it is replaced by a faithful offline bound: GPT-2 is a byte-level BPE, every token
  covers at least one UTF-8 byte, so the byte count bounds the token count from above.  Below the context
  size the bound proves the SDK sends the text uncut, exactly as with the real tokenizer, and that is what
  the stand-in returns; at or above it the cut would depend on the real count, so it raises
  ``TokenEstimationRefusedError`` instead of guessing.  Each call is counted (``gpt2_counts``).  With
  ``--tiktoken`` the real method runs instead, on an empty ``TIKTOKEN_CACHE_DIR``: the guard then shows the
  download an air-gapped plugin would attempt (and refuses it).

Usage::

    dify_driver.py SCENARIO --base-url URL --model NAME [--api-key KEY]
        LLM:        [--prompt TEXT] [--max-tokens N] [--stop WORD]... [--stream]
        tools:      [--function-calling-type tool_call|function_call]
        embeddings: [--text TEXT]... [--input-type document|query] [--tiktoken]
        rerank:     [--query TEXT] [--doc TEXT]... [--score-threshold X] [--top-n N]

SCENARIO is ``validate`` (the LLM "Save" ping), ``blocking`` (stream=False), ``stream`` (stream=True),
``multiturn`` (system prompt, then user/assistant/user), ``stop`` (stop words; blocking unless --stream),
``tools`` (Dify's function-calling agent, first turn: the ``get_weather`` tool offered, blocking unless
--stream) or ``tools-round-trip`` (that turn, then the agent's second: the assistant message with the parsed
tool calls and one ``ToolPromptMessage`` result per call; both turns blocking unless --stream), both with the
credentials of a model whose "Function calling" is set (``--function-calling-type``, default ``tool_call``),
``embed-validate`` / ``embed`` (the text-embedding class: Save, or one invoke with all --text) or
``rerank-validate`` / ``rerank`` (the rerank class: Save, or one invoke; no --top-n sends ``top_n: null``)
or ``vision`` (a chat model whose "Vision Support" is on; the user message carries --image-file as Dify's
``ImagePromptMessageContent``, base64, then the --prompt text; blocking unless --stream).
The exit status is 0 when the SDK call succeeded, 1 when it raised (the JSON then says what it raised).
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# Import order matters as in the plugin process: the package import applies gevent's patching first.
import dify_plugin  # noqa: F401
import requests
import urllib3.util.connection
from dify_plugin.core.entities.plugin.request import (
    ModelInvokeLLMRequest,
    ModelInvokeRerankRequest,
    ModelInvokeTextEmbeddingRequest,
)
from dify_plugin.entities.model import ModelType
from dify_plugin.entities.model.llm import LLMResultChunk
from dify_plugin.entities.model.message import (
    AssistantPromptMessage,
    ImagePromptMessageContent,
    PromptMessage,
    PromptMessageTool,
    SystemPromptMessage,
    TextPromptMessageContent,
    ToolPromptMessage,
    UserPromptMessage,
)
from dify_plugin.interfaces.model.openai_compatible import rerank as sdk_rerank
from dify_plugin.interfaces.model.openai_compatible.llm import OAICompatLargeLanguageModel
from dify_plugin.interfaces.model.openai_compatible.rerank import OAICompatRerankModel
from dify_plugin.interfaces.model.openai_compatible.text_embedding import OAICompatEmbeddingModel

TOOL_SCENARIOS = ("tools", "tools-round-trip")
LLM_SCENARIOS = ("validate", "blocking", "stream", "multiturn", "stop", *TOOL_SCENARIOS, "vision")
EMBEDDING_SCENARIOS = ("embed-validate", "embed")
RERANK_SCENARIOS = ("rerank-validate", "rerank")
SCENARIOS = LLM_SCENARIOS + EMBEDDING_SCENARIOS + RERANK_SCENARIOS
USER_ID = "dify-e2e-user"  # apps always pass the end user's id; the SDK forwards it as `user`
MULTITURN_SYSTEM = "You are a helpful geography assistant. Answer in one short sentence."
MULTITURN_FIRST_QUESTION = "What is the capital of France?"
MULTITURN_FIRST_ANSWER = "The capital of France is Paris."
MULTITURN_SECOND_QUESTION = "And what is the capital of Germany?"
TOOLS_SYSTEM = "You are a helpful assistant. Use tools when they are relevant."
WEATHER_TOOL = PromptMessageTool(  # what Dify builds from a tool's parameter form (agent node / agent app)
    name="get_weather",
    description="Get the current weather for a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"}},
                "required": ["city"]},
)
WEATHER_RESULT = json.dumps({"city": "Paris", "temperature_c": 21, "condition": "sunny"})
EMBEDDING_CONTEXT_SIZE = 4096  # the form default of "Model context size" for text-embedding models
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


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


def embedding_credentials(base_url: str) -> dict[str, str]:
    """The same for a text-embedding model: the form shows max_chunks, context_size, encoding_format, vision."""
    return {
        "endpoint_url": base_url,
        "max_chunks": "1",  # read by nobody: the SDK's schema hardcodes MAX_CHUNKS 1
        "context_size": str(EMBEDDING_CONTEXT_SIZE),
        "encoding_format": "not_set",  # read only by the official plugin; the SDK always sends "float"
        "vision_support": "no_support",
    }


def rerank_credentials(base_url: str) -> dict[str, str]:
    """The same for a rerank model: context_size and vision_support (both unread by the SDK class)."""
    return {"endpoint_url": base_url, "context_size": "4096", "vision_support": "no_support"}


def tool_credentials(base_url: str, function_calling_type: str, stream: bool) -> dict[str, str]:
    """A model whose "Function calling" the user set; "Stream function calling" set too when streaming (§9).

    The agent streams a tool turn only when the model has STREAM_TOOL_CALL (``stream_function_calling``
    ``supported``, form default ``not_supported``): ``invoke_llm(stream=self.stream_tool_call)``.
    """
    return {**dify_credentials(base_url), "function_calling_type": function_calling_type,
            "stream_function_calling": "supported" if stream else "not_supported"}


def credentials_for(scenario: str, base_url: str) -> dict[str, str]:
    if scenario in EMBEDDING_SCENARIOS:
        return embedding_credentials(base_url)
    if scenario in RERANK_SCENARIOS:
        return rerank_credentials(base_url)
    if scenario == "vision":  # the model form's "Vision Support" set to Support
        return {**dify_credentials(base_url), "vision_support": "support"}
    return dify_credentials(base_url)


class TokenEstimationRefusedError(RuntimeError):
    """Raised where the SDK would count tokens with GPT-2's tokenizer and the stand-in cannot answer exactly."""


class RemoteConnectionRefusedError(ConnectionError):
    """Raised when anything in the driver tries to open a connection to a host other than loopback."""


class Recorder:
    """Records what ``requests.post`` sends; stands in for GPT-2 token counting; keeps the network local."""

    def __init__(self) -> None:
        self.wire: list[dict[str, Any]] = []
        self.estimations = 0
        self.gpt2_counts = 0
        self.remote_connections: list[str] = []

    def install(self, gpt2_stand_in: bool = True) -> None:
        """``gpt2_stand_in`` False leaves the SDK's own GPT-2 counting (tiktoken) to meet the network guard."""
        recorded = self._wrap_post(requests.post)
        requests.post = recorded
        sdk_rerank.post = recorded  # the rerank module did `from requests import post` at import time
        cls = OAICompatLargeLanguageModel
        cls._num_tokens_from_string = self._refuse(cls._num_tokens_from_string)
        if gpt2_stand_in:
            embedder = OAICompatEmbeddingModel
            embedder._get_num_tokens_by_gpt2 = self._gpt2_upper_bound(embedder._get_num_tokens_by_gpt2)
        urllib3.util.connection.create_connection = self._loopback_only(urllib3.util.connection.create_connection)

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
                # a streamed body belongs to the SDK's parser; any other was already read by requests
                "response_body": None if kwargs.get("stream") else _body_of(response),
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

    def _gpt2_upper_bound(self, method: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(method)
        def upper_bound(_model: object, text: str) -> int:
            self.gpt2_counts += 1
            bound = len(text.encode("utf-8"))  # byte-level BPE: at most one GPT-2 token per byte
            if bound >= EMBEDDING_CONTEXT_SIZE:
                raise TokenEstimationRefusedError(
                    f"the SDK cuts texts of {EMBEDDING_CONTEXT_SIZE}+ GPT-2 tokens; this one has {bound} bytes, "
                    "so only the real tokenizer (which tiktoken downloads from the internet) could say where")
            return bound

        return upper_bound

    def _loopback_only(self, create: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(create)
        def loopback_only(address: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
            if address[0] not in LOOPBACK:
                self.remote_connections.append(f"{address[0]}:{address[1]}")
                raise RemoteConnectionRefusedError(f"the driver refuses to connect to {address[0]}")
            return create(address, *args, **kwargs)

        return loopback_only


def _body_of(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:4000]


def prompt_messages(args: argparse.Namespace) -> list[PromptMessage]:
    if args.scenario == "multiturn":
        return [
            SystemPromptMessage(content=MULTITURN_SYSTEM),
            UserPromptMessage(content=MULTITURN_FIRST_QUESTION),
            AssistantPromptMessage(content=MULTITURN_FIRST_ANSWER),
            UserPromptMessage(content=MULTITURN_SECOND_QUESTION),
        ]
    if args.scenario == "vision":  # a chat app with vision on: the uploaded file, then the user's question
        with open(args.image_file, "rb") as image:
            picture = ImagePromptMessageContent(format=args.image_file.rsplit(".", 1)[-1], mime_type=args.image_mime,
                                                base64_data=base64.b64encode(image.read()).decode(),
                                                detail=ImagePromptMessageContent.DETAIL(args.image_detail))
        return [UserPromptMessage(content=[picture, TextPromptMessageContent(data=args.prompt)])]
    return [UserPromptMessage(content=args.prompt)]


def daemon_request(args: argparse.Namespace, credentials: dict[str, str],
                   messages: list[PromptMessage] | None = None,
                   tools: list[PromptMessageTool] | None = None) -> ModelInvokeLLMRequest:
    """The request the plugin daemon decodes, built from its JSON form so the SDK's own parsing runs."""
    stream = args.scenario == "stream" or (args.scenario in ("stop", "vision", *TOOL_SCENARIOS) and args.stream)
    payload = {
        "user_id": USER_ID,
        "provider": "openai_api_compatible",
        "model_type": ModelType.LLM.value,
        "model": args.model,
        "credentials": credentials,
        "prompt_messages": [m.model_dump(mode="json") for m in messages or prompt_messages(args)],
        "model_parameters": {"temperature": 0, "max_tokens": args.max_tokens},
        "stop": args.stop or None,
        "tools": [t.model_dump(mode="json") for t in tools] if tools else None,
        "stream": stream,
    }
    return ModelInvokeLLMRequest.model_validate(payload)


def chunk_record(chunk: LLMResultChunk) -> dict[str, Any]:
    usage = chunk.delta.usage
    return {
        "content": chunk.delta.message.content,
        "tool_calls": [{"id": call.id, "type": call.type, "name": call.function.name,
                        "arguments": call.function.arguments} for call in chunk.delta.message.tool_calls],
        "finish_reason": chunk.delta.finish_reason,
        "usage": None if usage is None else {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
    }


def invoke_llm(data: ModelInvokeLLMRequest) -> dict[str, Any]:
    """``PluginExecutor.invoke_llm`` on a fresh instance; every chunk the host would receive, summed up."""
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
        "tool_calls": [call for c in chunks for call in c["tool_calls"]],
        "tool_call_chunk_indexes": [i for i, c in enumerate(chunks) if c["tool_calls"]],
    }


def run_invoke(args: argparse.Namespace, credentials: dict[str, str]) -> dict[str, Any]:
    return invoke_llm(daemon_request(args, credentials))


def agent_history(first: dict[str, Any]) -> list[PromptMessage]:
    """What ``FunctionCallAgentRunner`` appends after a turn with tool calls: the assistant message (its text, the
    calls with arguments re-serialised by ``json.dumps(json.loads(...), ensure_ascii=False)``), then one
    ``ToolPromptMessage`` per call (the tool's answer, the call's id, the tool's name)."""
    calls = [(c["id"], c["name"], json.loads(c["arguments"]) if c["arguments"] != "" else {})
             for c in first["tool_calls"]]
    assistant = AssistantPromptMessage(content=first["text"], tool_calls=[
        AssistantPromptMessage.ToolCall(id=call_id, type="function", function=AssistantPromptMessage.ToolCall.
                                        ToolCallFunction(name=name, arguments=json.dumps(arguments,
                                                                                         ensure_ascii=False)))
        for call_id, name, arguments in calls])
    results = [ToolPromptMessage(content=WEATHER_RESULT, tool_call_id=call_id, name=name) for call_id, name, _ in calls]
    return [assistant, *results]


def run_tools(args: argparse.Namespace, credentials: dict[str, str]) -> dict[str, Any]:
    credentials = {**credentials, **tool_credentials(credentials["endpoint_url"], args.function_calling_type,
                                                     args.stream)}
    messages: list[PromptMessage] = [SystemPromptMessage(content=TOOLS_SYSTEM), UserPromptMessage(content=args.prompt)]
    first = invoke_llm(daemon_request(args, credentials, messages, [WEATHER_TOOL]))
    if args.scenario == "tools":
        return first
    if not first["tool_calls"]:
        raise AssertionError(f"the first turn returned no tool calls to answer: {first}")
    second = invoke_llm(daemon_request(args, credentials, [*messages, *agent_history(first)], [WEATHER_TOOL]))
    return {"first": first, **second}


def run_validate(args: argparse.Namespace, credentials: dict[str, str]) -> dict[str, Any]:
    OAICompatLargeLanguageModel([]).validate_credentials(args.model, credentials)
    return {}


def run_embed_validate(args: argparse.Namespace, credentials: dict[str, str]) -> dict[str, Any]:
    OAICompatEmbeddingModel([]).validate_credentials(args.model, credentials)
    return {}


def run_embed(args: argparse.Namespace, credentials: dict[str, str]) -> dict[str, Any]:
    data = ModelInvokeTextEmbeddingRequest.model_validate({
        "user_id": USER_ID,
        "provider": "openai_api_compatible",
        "model_type": ModelType.TEXT_EMBEDDING.value,
        "model": args.model,
        "credentials": credentials,
        "texts": args.text or ["What is the capital of France?"],
        "input_type": args.input_type,
    })
    model = OAICompatEmbeddingModel([])  # ModelFactory.get_instance: a fresh instance, empty schemas
    result = model.invoke(data.model, data.credentials, data.texts, user=data.user_id, input_type=data.input_type)
    return {
        "model": result.model,
        "embeddings": result.embeddings,
        "usage": {"tokens": result.usage.tokens, "total_tokens": result.usage.total_tokens},
    }


def run_rerank_validate(args: argparse.Namespace, credentials: dict[str, str]) -> dict[str, Any]:
    OAICompatRerankModel([]).validate_credentials(args.model, credentials)
    return {}


def run_rerank(args: argparse.Namespace, credentials: dict[str, str]) -> dict[str, Any]:
    data = ModelInvokeRerankRequest.model_validate({
        "user_id": USER_ID,
        "provider": "openai_api_compatible",
        "model_type": ModelType.RERANK.value,
        "model": args.model,
        "credentials": credentials,
        "query": args.query,
        "docs": args.doc,
        "score_threshold": args.score_threshold,
        "top_n": args.top_n,
    })
    model = OAICompatRerankModel([])  # ModelFactory.get_instance: a fresh instance, empty schemas
    result = model.invoke(data.model, data.credentials, data.query, data.docs, data.score_threshold, data.top_n,
                          data.user_id)
    return {"model": result.model, "docs": [doc.model_dump() for doc in result.docs]}


RUNNERS: dict[str, Callable[[argparse.Namespace, dict[str, str]], dict[str, Any]]] = {
    "validate": run_validate,
    **dict.fromkeys(("blocking", "stream", "multiturn", "stop", "vision"), run_invoke),
    **dict.fromkeys(TOOL_SCENARIOS, run_tools),
    "embed-validate": run_embed_validate,
    "embed": run_embed,
    "rerank-validate": run_rerank_validate,
    "rerank": run_rerank,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--base-url", required=True, help="the API Base URL as typed into Dify")
    parser.add_argument("--model", required=True, help="the model name as typed into Dify")
    parser.add_argument("--api-key", help="the API key as typed into Dify (default: left empty)")
    llm = parser.add_argument_group("LLM scenarios")
    llm.add_argument("--prompt", default="What is the capital of France?")
    llm.add_argument("--max-tokens", type=int, default=48)
    llm.add_argument("--stop", action="append", default=[], help="a stop word (repeatable)")
    llm.add_argument("--stream", action="store_true", help="stream the `stop` and tools scenarios")
    llm.add_argument("--function-calling-type", choices=("tool_call", "function_call"), default="tool_call",
                     help="the tools scenarios' \"Function calling\" credential")
    vision = parser.add_argument_group("vision scenario (the model's \"Vision Support\" credential is on)")
    vision.add_argument("--image-file", help="the image a user uploaded (sent as base64 in the user message)")
    vision.add_argument("--image-mime", default="image/png")
    vision.add_argument("--image-detail", choices=("low", "high"), default="low")
    embed = parser.add_argument_group("embedding scenarios")
    embed.add_argument("--text", action="append", default=[], help="a text to embed (repeatable, in order)")
    embed.add_argument("--input-type", choices=("document", "query"), default="document")
    embed.add_argument("--tiktoken", action="store_true",
                       help="no GPT-2 stand-in: the SDK's tiktoken runs on an empty cache, as in an air-gapped plugin")
    rerank = parser.add_argument_group("rerank scenarios")
    rerank.add_argument("--query", default="What is the capital of France?")
    rerank.add_argument("--doc", action="append", default=[], help="a document to rerank (repeatable)")
    rerank.add_argument("--score-threshold", type=float, help="Dify's score threshold (default: none)")
    rerank.add_argument("--top-n", type=int, help="Dify's top K (default: none, sent as top_n: null)")
    args = parser.parse_args(argv)
    if args.scenario == "vision" and not args.image_file:
        parser.error("the vision scenario needs --image-file")
    if args.scenario == "stop" and not args.stop:
        parser.error("the stop scenario needs at least one --stop")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    recorder = Recorder()
    recorder.install(gpt2_stand_in=not args.tiktoken)
    if args.tiktoken:  # nothing cached: tiktoken must download GPT-2's files, and the guard refuses the host
        os.environ["TIKTOKEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="tiktoken-empty-")
    credentials = credentials_for(args.scenario, args.base_url)
    if args.api_key:
        credentials["api_key"] = args.api_key
    started = time.monotonic()
    out: dict[str, Any] = {"scenario": args.scenario, "sdk_version": _sdk_version()}
    try:
        out.update(RUNNERS[args.scenario](args, credentials))
        out["ok"] = True
    except Exception as exc:
        out.update(ok=False, error_type=type(exc).__name__, error=str(exc))
    out.update(seconds=round(time.monotonic() - started, 3), wire=recorder.wire, estimations=recorder.estimations,
               gpt2_counts=recorder.gpt2_counts, remote_connections=recorder.remote_connections)
    if args.tiktoken:
        shutil.rmtree(os.environ["TIKTOKEN_CACHE_DIR"], ignore_errors=True)
    print(json.dumps(out, ensure_ascii=False))
    return 0 if out["ok"] else 1


def _sdk_version() -> str:
    from importlib.metadata import version

    return version("dify-plugin")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
