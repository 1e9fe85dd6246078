"""VllmEngine's answer schemas: a schema vLLM refuses is a 400 naming its request field, before admission, and each
schema text is checked once; the check is vLLM's own (run in ``.venv-vllm``, which has vLLM)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from inhouse.config import VllmSpec
from inhouse.engine.answer_schema import AnswerSchema
from inhouse.engine.base import EngineInfo, EngineState, GenerateRequest, SamplingParams
from inhouse.engine.vllm import VllmEngine, schema_refused
from inhouse.errors import ErrorCode, InhouseError
from tests.process import REPO

GOOD = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'
BAD = '{"type":"object","properties":{"a":{"type":"nonsense"}}}'


class ScriptedEngine(VllmEngine):
    """A VllmEngine without vLLM: ready, and refusing the schemas that mention "nonsense"."""

    def __init__(self, tool_parser: str | None = None) -> None:
        super().__init__(VllmSpec(name="m", path="unused"), Path("unused"))
        self._state = EngineState.READY
        self._info = EngineInfo(kind="vllm", context_length=64, max_num_seqs=2, tool_parser=tool_parser)
        self._prompts = object()  # type: ignore[assignment]  # never reached: schemas are checked first
        self.checked: list[str] = []

    def _check_schema(self, text: str) -> str | None:
        self.checked.append(text)
        return "Grammar error: Invalid type: nonsense" if "nonsense" in text else None


def chat(**fields: object) -> GenerateRequest:
    return GenerateRequest("r", SamplingParams(), messages=({"role": "user", "content": "hi"},),
                           **fields)  # type: ignore[arg-type]


def json_schema(text: str) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads(text)}}


def test_a_refused_schema_is_a_400_naming_the_field_it_came_from() -> None:
    refused = schema_refused(AnswerSchema(BAD, "response_format.json_schema.schema"), "Grammar error: " + "x" * 500)
    assert refused.code is ErrorCode.INVALID_REQUEST and refused.param == "response_format.json_schema.schema"
    assert str(refused).startswith("response_format's JSON schema cannot be enforced: Grammar error: xxx")
    assert len(str(refused)) < 400  # vLLM's reason, cut short
    tools = schema_refused(AnswerSchema(BAD, "tools"), "Grammar error")
    assert tools.param == "tools" and "the tools' parameters cannot be enforced" in str(tools)


async def test_a_refused_response_format_schema_is_refused_before_admission() -> None:
    engine = ScriptedEngine()
    with pytest.raises(InhouseError) as refused:
        await engine.submit([chat(response_format=json_schema(BAD))])
    assert refused.value.code is ErrorCode.INVALID_REQUEST
    assert refused.value.param == "response_format.json_schema.schema"
    assert engine._gate.in_progress == 0


async def test_a_tool_whose_parameters_cannot_be_enforced_is_refused_naming_tools() -> None:
    engine = ScriptedEngine(tool_parser="constrained_json")
    tool = {"type": "function", "function": {"name": "f", "parameters": json.loads(BAD)}}
    with pytest.raises(InhouseError) as refused:
        await engine.submit([chat(tools=(tool,), tool_choice="required")])
    assert refused.value.param == "tools"
    assert engine.checked[0].startswith('{"type":"object","properties":{"f":')  # the envelope, not the parameters


async def test_each_schema_text_is_checked_once() -> None:
    engine = ScriptedEngine()
    good = chat(response_format=json_schema(GOOD))
    await engine._check_schemas([None])
    assert engine.checked == []  # free text: nothing to check
    for _ in range(3):
        with pytest.raises(InhouseError):
            await engine.submit([good, good, chat(response_format=json_schema(BAD))])
    assert sorted(engine.checked) == sorted([json.dumps(json.loads(GOOD), separators=(",", ":")),
                                            json.dumps(json.loads(BAD), separators=(",", ":"))])


VLLM_CHECK = """
import json, sys
from vllm import EngineArgs
from vllm.config import StructuredOutputsConfig
from vllm.renderers import renderer_from_config
from inhouse.engine.answer_schema import AnswerSchema
from inhouse.engine.base import SamplingParams
from inhouse.engine.vllm import _sampling_params, schema_refusal

config = EngineArgs(model=sys.argv[1], dtype="float32", max_model_len=256,
                    structured_outputs_config=StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True)
                    ).create_engine_config()
tokenizer = renderer_from_config(config).tokenizer
schemas = json.loads(sys.argv[2])
params = _sampling_params(SamplingParams(), 16, AnswerSchema(schemas[0], "tools"))
print(json.dumps({"refusals": [schema_refusal(s, config, tokenizer) for s in schemas],
                  "json": params.structured_outputs.json}))
"""


@pytest.mark.slow
def test_vllms_own_check_accepts_and_refuses_as_vllm_would(vllm_python: str, tiny_model_dir: Path) -> None:
    deep = '{"type":"array","items":' * 100 + "{}" + "}" * 100
    schemas = [GOOD, BAD, deep, '{"type":"string","pattern":"(a"}', "not json"]
    proc = subprocess.run([vllm_python, "-c", VLLM_CHECK, str(tiny_model_dir), json.dumps(schemas)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    good, bad, too_deep, bad_pattern, not_json = out["refusals"]
    assert good is None
    assert "nonsense" in bad
    assert "nested too deeply" in too_deep
    assert "unclosed group" in bad_pattern
    assert not_json is not None
    assert out["json"] == GOOD  # the schema text goes to vLLM as is (its key order is the answer's)
