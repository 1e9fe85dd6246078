"""The shape an answer must take, as a request asks for it: OpenAI's ``response_format``, and vLLM's ``guided_json``
and ``structured_outputs`` (``json`` / ``json_object``), which clients written for vLLM send instead.

Owns reading the three into one OpenAI ``response_format`` dict (what engines and upstreams are given), and refusing
what inhouse does not enforce (vLLM's regex, choice, grammar and structural tags) or a request that sets two of them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from inhouse.errors import ErrorCode, InhouseError
from inhouse.protocol.common import WireModel

__all__ = ["JsonSchemaFormat", "ResponseFormat", "StructuredFields", "StructuredOutputs"]

_UNSUPPORTED = ("regex", "choice", "grammar", "structural_tag")


class JsonSchemaFormat(WireModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(WireModel):
    """vLLM's ``structured_outputs`` (0.10+; ``guided_*`` before): only its JSON forms are enforced here."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: Any = None
    choice: Any = None
    grammar: Any = None
    structural_tag: Any = None


class StructuredFields(WireModel):
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("structured_outputs")
    @classmethod
    def _only_json(cls, value: StructuredOutputs | None) -> StructuredOutputs | None:
        for name in _UNSUPPORTED:
            if value is not None and getattr(value, name) is not None:
                raise ValueError(f"structured_outputs.{name} is not supported: use json (a JSON schema) or json_object")
        return value

    def answer_format(self) -> dict[str, Any] | None:
        """The request's answer format as an OpenAI ``response_format`` dict (None: free text), or a 400."""
        given = [name for name in ("response_format", "guided_json", "structured_outputs")
                 if getattr(self, name) is not None]
        if len(given) > 1:
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"set only one of {' and '.join(given)}", param=given[1])
        if self.response_format is not None:
            return self.response_format.model_dump(by_alias=True, exclude_none=True)
        if self.guided_json is not None:
            return _json_schema(self.guided_json, "guided_json")
        outputs = self.structured_outputs
        if outputs is None or (outputs.json_ is None and not outputs.json_object):
            return None
        if outputs.json_ is None:
            return {"type": "json_object"}
        return _json_schema(outputs.json_, "structured_outputs.json")


def _json_schema(schema: dict[str, Any] | str, param: str) -> dict[str, Any]:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InhouseError(ErrorCode.INVALID_REQUEST, "the JSON schema is not valid JSON", param=param) from None
        if not isinstance(schema, dict):
            raise InhouseError(ErrorCode.INVALID_REQUEST, "the JSON schema must be a JSON object", param=param)
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
