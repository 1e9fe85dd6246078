"""``inhouse doctor``'s config, model file and memory checks: failures name the file, the key and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

from inhouse.cli.model_checks import check_config, check_memory, check_model
from inhouse.config import Settings, load_settings, model_spec

GIB = 1024**3


def test_config_error_names_the_file_and_the_key(tmp_path: Path) -> None:
    config = tmp_path / "inhouse.yaml"
    config.write_text("models:\n  - name: a\n    engine: transformers\n    path: x\n    gpu_memory_utilization: 0.5\n")
    settings, check = check_config(config)
    assert settings is None and check.status == "fail"
    assert str(config) in check.detail and "models.0.gpu_memory_utilization" in check.detail
    assert check.fix is not None and str(config) in check.fix


def test_a_missing_config_file_says_so(tmp_path: Path) -> None:
    settings, check = check_config(tmp_path / "nope.yaml")
    assert settings is None and check.status == "fail" and "cannot read config file" in check.detail
    assert check.fix is not None and "--config" in check.fix


def test_config_ok_lists_the_models(tmp_path: Path) -> None:
    config = tmp_path / "inhouse.yaml"
    config.write_text("models:\n  - {name: a, engine: fake}\n  - {name: b, engine: fake}\n")
    settings, check = check_config(config)
    assert settings is not None and check.status == "ok" and "2 models (a, b)" in check.detail


def _spec(path: Path | str, engine: str = "transformers") -> object:
    return model_spec(name="m", path=str(path), engine=engine)


def test_missing_path_names_file_key_and_fix(tmp_path: Path) -> None:
    config = tmp_path / "inhouse.yaml"
    check = check_model(_spec(tmp_path / "nope"), 3, config)  # type: ignore[arg-type]
    assert check.status == "fail" and check.name == "model m"
    assert f"{config}: models.3.path" in check.detail and "does not exist" in check.detail
    assert ".gguf file" in check.detail and check.fix == "correct path, or copy the model there"


def test_a_file_that_is_not_gguf_fails(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>not found</html>")
    check = check_model(_spec(fake), 0, None)  # type: ignore[arg-type]
    assert check.status == "fail" and "is not a GGUF file" in check.detail and "models.0.path" in check.detail


def test_a_checkpoint_without_weights_fails(tmp_path: Path, tiny_model_dir: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_model_dir / "config.json", partial)
    check = check_model(_spec(partial), 0, None)  # type: ignore[arg-type]
    assert check.status == "fail" and "no weight files" in check.detail and check.fix is not None


def test_damaged_safetensors_fail(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    check = check_model(_spec(broken), 0, None)  # type: ignore[arg-type]
    assert check.status == "fail" and "model.safetensors" in check.detail and "copy it again" in (check.fix or "")


def test_a_good_checkpoint_is_ok_with_its_size(tiny_model_dir: Path) -> None:
    check = check_model(_spec(tiny_model_dir), 0, None)  # type: ignore[arg-type]
    assert check.status == "ok" and "an HF checkpoint" in check.detail and "M parameters" in check.detail


def test_fake_and_upstream_models_have_no_files_to_check() -> None:
    assert check_model(model_spec(name="f", engine="fake"), 0, None).status == "ok"
    upstream = model_spec(name="u", engine="upstream", base_url="http://127.0.0.1:1/v1")
    assert check_model(upstream, 0, None).status == "ok"


def _memory_settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return load_settings(None, {"state_dir": tmp_path, "models": [
        {"name": "a", "path": str(tiny_model_dir), "engine": "transformers", "dtype": "float32", "device": "cpu"},
        {"name": "f", "engine": "fake"}]}, base_dir=tmp_path)


def test_memory_fails_when_the_weights_do_not_fit(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = _memory_settings(tiny_model_dir, tmp_path)
    check = check_memory(settings, available=lambda device: 1024)
    assert check.status == "fail" and "cpu: needs about" in check.detail and "a " in check.detail
    assert check.fix is not None and "dtype" in check.fix


def test_memory_ok_when_they_fit_and_warns_when_free_memory_is_unknown(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = _memory_settings(tiny_model_dir, tmp_path)
    assert check_memory(settings, available=lambda device: 64 * GIB).status == "ok"
    assert check_memory(settings, available=lambda device: None).status == "warn"
