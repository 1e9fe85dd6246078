"""response_format (and vLLM's guided_json / structured_outputs) through the real CLI with the official OpenAI SDK,
on both engines: the tiny random model answers JSON that validates against the schema only because the engine
constrains its decoding (llguidance in the transformers engine, vLLM's structured outputs in the vLLM one)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema_rs
import openai
import pytest

from tests.conftest import TINY
from tests.e2e.helpers import assert_error
from tests.process import ServerProcess

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "alerts": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["city", "temperature_c", "unit", "alerts"],
    "additionalProperties": False,
}


def test_json_schema_answers_validate_blocking_and_streaming(tiny_server: ServerProcess) -> None:
    with openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0) as client:
        for seed in range(3):
            reply = client.chat.completions.create(
                model=TINY, messages=[{"role": "user", "content": "The weather in Paris?"}], max_tokens=200,
                seed=seed, temperature=0.8,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}})
            choice = reply.choices[0]
            assert choice.finish_reason == "stop", choice
            assert choice.message.content is not None
            jsonschema_rs.validate(SCHEMA, json.loads(choice.message.content))
        chunks = client.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "And in Rome?"}], max_tokens=200, seed=7, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}})
        pieces, finish = [], None
        for chunk in chunks:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "stop"
        jsonschema_rs.validate(SCHEMA, json.loads("".join(pieces)))
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "foo"}}})
        assert refused.value.status_code == 400
        assert refused.value.body is not None and "response_format.json_schema.schema" in json.dumps(refused.value.body)


@pytest.mark.parametrize("field", ["guided_json", "structured_outputs", "completions"])
def test_vllms_own_fields_are_enforced_too(tiny_server: ServerProcess, field: str) -> None:
    """Clients written for vLLM send ``guided_json`` or ``structured_outputs.json`` (a schema or its JSON text), on
    chat and on completions."""
    body: dict[str, Any] = {"model": TINY, "max_tokens": 200, "seed": 1, "temperature": 0.8}
    if field == "completions":
        path, body = "/v1/completions", {**body, "prompt": "Weather:", "guided_json": json.dumps(SCHEMA)}
    else:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": "The weather in Oslo?"}]
        body[field] = SCHEMA if field == "guided_json" else {"json": SCHEMA}
    with httpx.Client(base_url=tiny_server.url, timeout=120) as http:
        r = http.post(path, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["text"] if field == "completions" else choice["message"]["content"]
        assert choice["finish_reason"] == "stop"
        jsonschema_rs.validate(SCHEMA, json.loads(text))


@pytest.mark.parametrize(("extra", "param"), [
    ({"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": SCHEMA, "response_format": {"type": "json_object"}}, "guided_json"),
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, "response_format.json_schema.schema"),
])
def test_what_is_not_enforced_is_a_400(tiny_server: ServerProcess, extra: dict[str, Any], param: str) -> None:
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        assert_error(http.post("/v1/chat/completions", json=body), 400, "invalid_request", param)
