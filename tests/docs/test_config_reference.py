"""The generated configuration reference: committed pages match the model, every key is there and described."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from inhouse import config, config_reference
from tests.process import REPO


def _documented() -> dict[str, config_reference.Row]:
    return {f"{s.anchor}:{r.key}": r for s in config_reference.sections() for r in s.rows}


@pytest.mark.parametrize("rel", sorted(config_reference.PAGES.values()), ids=str)
def test_committed_page_is_what_the_model_generates(rel: Path) -> None:
    committed = (REPO / rel).read_text(encoding="utf-8") if (REPO / rel).is_file() else ""
    assert committed == config_reference.pages()[rel], (
        f"{rel} is out of date with inhouse/config.py; refresh it with: {config_reference.REFRESH}")


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys |= _keys(sub, f"{prefix}{name}.")
        elif name not in ("models", "admin_key"):
            keys.add(f"{prefix}{name}")
    return keys


def test_every_key_of_the_model_is_documented() -> None:
    documented = {r.key for r in _documented().values()}
    specs = [config.TransformersSpec, config.VllmSpec, config.AutoSpec, config.SentenceTransformersSpec,
             config.UpstreamSpec, config.FakeSpec, config.AdapterSpec]
    expected = _keys(config.Settings).union(*(_keys(s) for s in specs)) - {"engine"}
    assert expected - documented == set()


def test_every_key_has_a_description_and_a_type() -> None:
    missing = sorted(k for k, r in _documented().items() if not r.description.strip() or not r.type)
    assert missing == [], f"add a description (a '# comment' on the field's line in inhouse/config.py): {missing}"


def test_every_example_is_a_valid_configuration() -> None:
    top: dict[str, object] = {}
    for section in config_reference.sections():
        example = yaml.safe_load(section.example)
        if "models" in example:
            for model in example["models"]:
                config.model_spec(**model)  # raises on an invalid example
        else:
            top.update(example)
    settings = config.Settings.model_validate(top)
    assert settings.port == 8000 and settings.audit.text == "off"


def test_descriptions_come_from_the_comments_in_config_py() -> None:
    rows = _documented()
    assert rows["top-level-keys:redis_url"].description.startswith("set: rate limits are shared")
    assert rows["engine-transformers:path"].description == "HF checkpoint dir, a .gguf file, or builtin:NAME"
    assert rows["engine-transformers:path"].default == "required"
    assert rows["routing:routing.retries"].type == "integer (≥ 0)"


def test_check_mode_fails_on_a_stale_page_and_names_the_command(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert config_reference.main(["--root", str(tmp_path)]) == 0
    assert config_reference.main(["--root", str(tmp_path), "--check"]) == 0
    page = tmp_path / config_reference.PAGES["zh-CN"]
    page.write_text(page.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    assert config_reference.main(["--root", str(tmp_path), "--check"]) == 1
    assert config_reference.REFRESH in capsys.readouterr().err
