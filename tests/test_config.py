"""Settings are validated once, with messages an operator can act on."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from inhouse.config import (
    BUILTIN_CHAT_MODEL,
    BUILTIN_EMBEDDING_MODEL,
    AdapterSpec,
    ConfigError,
    SentenceTransformersSpec,
    UpstreamSpec,
    load_settings,
    model_spec,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inhouse.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_is_the_embedded_chat_and_embedding_models() -> None:
    settings = load_settings()
    assert [m.path for m in settings.models] == [BUILTIN_CHAT_MODEL, BUILTIN_EMBEDDING_MODEL]
    assert [m.name for m in settings.models] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    assert isinstance(settings.models[1], SentenceTransformersSpec)
    assert settings.host == "127.0.0.1" and settings.port == 8000


def test_sentence_transformers_options_and_a_generator_option_refused_by_name(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, """
models:
  - name: emb
    engine: sentence-transformers
    path: ./minilm
    dtype: bf16
    task: embed
    truncate: false
    matryoshka_dimensions: [64, 128]
"""))
    spec = settings.models[0]
    assert isinstance(spec, SentenceTransformersSpec)
    assert (spec.dtype, spec.task, spec.truncate, spec.matryoshka_dimensions) == ("bfloat16", "embed", False, (64, 128))
    assert spec.path == str((tmp_path / "minilm").resolve())
    with pytest.raises(ConfigError, match="'kv_cache_gib' is not an option of engine sentence-transformers"):
        load_settings(write(tmp_path, "models: [{name: e, engine: sentence-transformers, path: x, kv_cache_gib: 2}]"))


def test_upstream_capabilities_default_to_generation(tmp_path: Path) -> None:
    spec = model_spec(name="u", engine="upstream", base_url="http://x/v1")
    assert isinstance(spec, UpstreamSpec) and spec.capabilities == ("chat", "completion")
    with pytest.raises(ConfigError, match="capabilities"):
        load_settings(write(tmp_path, "models: [{name: u, engine: upstream, base_url: http://x, "
                                      "capabilities: [speech]}]"))


def test_yaml_models_paths_templates_and_aliases(tmp_path: Path) -> None:
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    path = write(tmp_path, """
port: 9001
models:
  - name: a
    path: ./weights
    dtype: bf16
    chat_template: t.jinja
    defaults: {temperature: 0.3, max_tokens: 64}
  - name: b
    path: builtin:smollm2-135m-instruct
""")
    settings = load_settings(path)
    a, b = settings.models
    assert a.path == str((tmp_path / "weights").resolve())
    assert a.dtype == "bfloat16"
    assert a.chat_template == "{{ messages[0]['content'] }}"
    assert a.defaults.temperature == 0.3
    assert b.path == BUILTIN_CHAT_MODEL
    assert settings.port == 9001


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "port: 9001\n"), {"port": 9002, "host": None})
    assert settings.port == 9002 and settings.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("models: [{name: a, path: x, max_num_seqs: 0}]", "models.0.max_num_seqs"),
        ("models: [{name: a, path: x, colour: red}]", "models.0.colour"),
        ("models: [{name: a, path: x}, {name: a, path: y}]", "repeated: a"),
        ("port: [1", "not valid YAML"),
        ("- just a list", "mapping"),
        ("models: [{name: a, path: x, chat_template: missing.jinja}]", "does not exist"),
    ],
)
def test_bad_config_is_explained(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert fragment in str(info.value)


def test_metrics_key_names_is_off_unless_set(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "port: 9001\n")).metrics.key_names is False
    assert load_settings(write(tmp_path, "metrics: {key_names: true}\n")).metrics.key_names is True
    with pytest.raises(ConfigError, match=r"metrics\.key_name"):
        load_settings(write(tmp_path, "metrics: {key_name: true}\n"))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(Path("/nonexistent/inhouse.yaml"))


def test_the_kv_budget_is_an_option_of_the_transformers_engine_too() -> None:
    spec = model_spec(name="a", path="/m", engine="transformers", kv_cache_gib=0.5)
    assert getattr(spec, "kv_cache_gib", None) == 0.5
    assert getattr(model_spec(name="a", path="/m", engine="transformers"), "kv_cache_gib", 1) is None
    with pytest.raises(ValidationError):
        model_spec(name="a", path="/m", engine="transformers", kv_cache_gib=0)


def test_an_option_of_another_engine_is_refused_by_name() -> None:
    for model, key, engine in (({"name": "a", "path": "/m", "engine": "transformers", "gpu_memory_utilization": 0.5},
                                "gpu_memory_utilization", "transformers"),
                               ({"name": "b", "path": "/m", "base_url": "http://x/v1"}, "base_url", "auto"),
                               ({"name": "c", "engine": "upstream", "base_url": "http://x/v1", "dtype": "bf16"},
                                "dtype", "upstream")):
        with pytest.raises(ConfigError) as refused:
            load_settings(overrides={"models": [model]})
        assert f"models.0.{key}: '{key}' is not an option of engine {engine}" in str(refused.value)
    with pytest.raises(ConfigError, match=r"models\.0\.base_url: Field required \(engine upstream\)"):
        load_settings(overrides={"models": [{"name": "d", "engine": "upstream"}]})
    spec = model_spec(name="e", engine="upstream", base_url="http://x/v1")
    assert isinstance(spec, UpstreamSpec) and spec.deployment_label == "http://x/v1"
    assert model_spec(name="f", path="/m").engine == "auto"  # the default kind


def test_an_option_of_another_engine_on_an_adapter_model_is_refused_by_name(tmp_path: Path) -> None:
    """An adapter model is its own kind: a stray option is named at its key, not under the ``adapter:`` key."""
    _adapter_dir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        load_settings(write(tmp_path, "models:\n  - {name: b, engine: transformers, path: x}\n"
                                      "  - {name: s, base: b, adapter: support-v3, kv_cache_gib: 2}\n"))
    assert "models.1.kv_cache_gib: 'kv_cache_gib' is not an option of engine adapter" in str(refused.value)
    assert "adapter.kv_cache_gib" not in str(refused.value)


def test_tls_files_are_relative_to_the_config_file_and_checked_together(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, """
tls_cert: certs/server.pem
tls_key: certs/server.key
tls_client_ca: /etc/ca.pem
models:
  - {name: up, engine: upstream, base_url: "https://fleet:8443/v1", ca_file: ca.pem, client_cert: gw.pem,
     client_key: gw.key}
"""))
    assert settings.tls_cert == tmp_path / "certs" / "server.pem" and settings.tls_key == tmp_path / "certs/server.key"
    assert settings.tls_client_ca == Path("/etc/ca.pem")
    up = settings.models[0]
    assert isinstance(up, UpstreamSpec)
    assert (up.ca_file, up.client_cert, up.client_key) == (str(tmp_path / "ca.pem"), str(tmp_path / "gw.pem"),
                                                           str(tmp_path / "gw.key"))
    with pytest.raises(ConfigError, match="tls_client_ca: Value error, needs tls_cert"):
        load_settings(overrides={"tls_client_ca": "/etc/ca.pem"})
    with pytest.raises(ConfigError, match="tls_key: Value error, needs tls_cert"):
        load_settings(overrides={"tls_key": "/etc/k.pem"})
    with pytest.raises(ConfigError, match=r"models\.0: .*ca_file, client_cert: only for an https:// base_url"):
        load_settings(overrides={"models": [{"name": "u", "engine": "upstream", "base_url": "http://fleet/v1",
                                             "ca_file": "/ca.pem", "client_cert": "/c.pem"}]})
    with pytest.raises(ConfigError, match="client_key needs client_cert"):
        load_settings(overrides={"models": [{"name": "u", "engine": "upstream", "base_url": "https://fleet/v1",
                                             "client_key": "/k.pem"}]})


def _adapter_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "support-v3"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def test_an_adapter_model_is_served_over_its_base(tmp_path: Path) -> None:
    _adapter_dir(tmp_path)
    settings = load_settings(write(tmp_path, "models:\n"
                                   "  - {name: base, engine: transformers, path: x, max_loras: 3}\n"
                                   "  - {name: support-bot, base: base, adapter: support-v3}\n"))
    base, adapter = settings.models
    assert isinstance(adapter, AdapterSpec) and adapter.base == "base"
    assert adapter.adapter == str(tmp_path / "support-v3") and adapter.path == adapter.adapter  # relative to the file
    assert getattr(base, "max_loras", None) == 3


@pytest.mark.parametrize("engine", ["vllm", "auto"])
def test_an_adapter_over_a_vllm_or_auto_base(tmp_path: Path, engine: str) -> None:
    _adapter_dir(tmp_path)
    settings = load_settings(write(tmp_path, "models:\n"
                                   f"  - {{name: base, engine: {engine}, path: x, max_loras: 2, max_lora_rank: 64}}\n"
                                   "  - {name: support-bot, base: base, adapter: support-v3}\n"))
    base, adapter = settings.models
    assert isinstance(adapter, AdapterSpec) and adapter.adapter == str(tmp_path / "support-v3")
    assert (getattr(base, "max_loras", None), getattr(base, "max_lora_rank", None)) == (2, 64)


def test_an_adapter_over_an_upstream_base_is_its_name_there(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "models:\n"
                                   "  - {name: remote, engine: upstream, base_url: 'http://u/v1'}\n"
                                   "  - {name: support-bot, base: remote, upstream_model: support-v3}\n"))
    adapter = settings.models[1]
    assert isinstance(adapter, AdapterSpec) and adapter.adapter is None
    assert adapter.upstream_model == "support-v3" and adapter.path == "upstream:support-v3"


@pytest.mark.parametrize(
    ("models", "fragment"),
    [
        ("[{name: b, engine: transformers, path: x}, {name: s, base: nope, adapter: support-v3}]",
         "models.1.base: adapter 's' names base 'nope'"),
        ("[{name: b, engine: fake}, {name: s, base: b, adapter: support-v3}]",
         "models.1.base: the base 'b' of adapter 's' must be a transformers, vllm, auto or upstream model, not 'fake'"),
        ("[{name: b, engine: upstream, base_url: 'http://u/v1'}, {name: s, base: b, adapter: support-v3}]",
         "models.1.upstream_model: the base 'b' of adapter 's' is an upstream"),
        ("[{name: b, engine: vllm, path: x}, {name: s, base: b, upstream_model: support-v3}]",
         "models.1.adapter: the base 'b' of adapter 's' is served here (vllm)"),
        ("[{name: b, engine: vllm, path: x}, {name: s, base: b, adapter: support-v3, upstream_model: v3}]",
         "either adapter: (a PEFT directory"),
        ("[{name: b, engine: transformers, path: x}, {name: s, base: b, adapter: elsewhere}]",
         "models.1.adapter: "),
    ],
)
def test_a_bad_adapter_model_is_refused_naming_the_key(tmp_path: Path, models: str, fragment: str) -> None:
    _adapter_dir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, f"models: {models}\n"))
    assert fragment in str(info.value)
    if "elsewhere" in models:
        assert f"{tmp_path / 'elsewhere' / 'adapter_config.json'} does not exist" in str(info.value)


def test_the_prefix_cache_switch_is_on_every_engine_that_loads_weights_and_its_tuning_where_it_applies(
        tmp_path: Path) -> None:
    """``prefix_cache`` on transformers, vllm (vLLM's own) and auto (the default engine: it was refused there);
    the transformers engine's budget and chunk size on transformers and auto (its fallback), not on vllm."""
    settings = load_settings(write(tmp_path, """
models:
  - {name: a, path: ./m, prefix_cache: false, prefix_cache_gib: 2, prefill_chunk_tokens: 0}
  - {name: v, engine: vllm, path: ./m, prefix_cache: false}
  - {name: t, engine: transformers, path: ./m, prefix_cache_gib: 0.5}
"""))
    auto, vllm, transformers = settings.models
    assert (auto.prefix_cache, auto.prefix_cache_gib, auto.prefill_chunk_tokens) == (False, 2, 0)  # type: ignore[union-attr]
    assert vllm.prefix_cache is False and transformers.prefix_cache is True  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="'prefill_chunk_tokens' is not an option of engine vllm"):
        load_settings(write(tmp_path, "models: [{name: v, engine: vllm, path: x, prefill_chunk_tokens: 0}]"))
