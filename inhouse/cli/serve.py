"""``inhouse serve``: one model from a path, several from a YAML file, or the embedded default."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from inhouse.cli.state import StateError, add_state_flags, open_access
from inhouse.config import (
    BUILTIN_CHAT_MODEL,
    BUILTIN_EMBEDDING_MODEL,
    DEFAULT_EMBEDDING_NAME,
    DEFAULT_MODEL_NAME,
    ConfigError,
    ExtraModels,
    ModelSpec,
    Settings,
    UpstreamSpec,
    load_settings,
)

__all__ = ["add_parser", "build_settings", "run"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("serve", help="start the OpenAI-compatible server")
    p.add_argument("--config", type=Path, help="YAML file declaring models and server settings")
    p.add_argument("--model", help="a local HF checkpoint dir or .gguf file (default: the embedded SmolLM2)")
    p.add_argument("--name", help="the public model name for --model (default: the directory or file name)")
    p.add_argument("--engine", choices=["auto", "transformers", "vllm", "fake"],
                   help="engine for the model (auto: vLLM when installed)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"])
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--context-length", type=int, help="cap the context window (tokens)")
    p.add_argument("--max-num-seqs", type=int, help="sequences decoded together at most")
    p.add_argument("--max-waiting", type=int, help="requests allowed to wait beyond those; then 429")
    p.add_argument("--chat-template", type=Path, help="a Jinja chat template file overriding the tokenizer's")
    p.add_argument("--embedding-model", metavar="PATH",
                   help="a sentence-transformers model (embedding model or cross-encoder reranker) to serve beside "
                   "the chat model; default: the embedded all-MiniLM-L6-v2 when no --model is given; none: no "
                   "embedding model")
    p.add_argument("--embedding-name", help="the public name for --embedding-model (default: the directory name)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--cache-dir", type=Path, help="where converted GGUF models are cached")
    p.add_argument("--keepalive", type=float, dest="keepalive_seconds", help="SSE keep-alive interval, seconds")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["auto", "json", "text"],
                   help="JSON lines, readable text, or auto (default): JSON unless stderr is a terminal")
    p.add_argument("--drain-seconds", type=float,
                   help="on SIGTERM, how long requests in flight may take to finish (default 30)")
    add_state_flags(p)
    p.add_argument("--auth", choices=["keys", "none"], help="keys (default): every API route needs a key; "
                   "none: no authentication, for a lab only")
    p.add_argument("--redis-url", help="share rate limits with every replica using this Redis (redis://...)")
    p.add_argument("--upstream", action="append", default=[], metavar="NAME=[ID@]BASE_URL",
                   help="serve NAME from an OpenAI-compatible server, which calls it ID (default: NAME; "
                   "repeatable; the same NAME twice balances)")
    p.add_argument("--upstream-model", action="append", default=[], metavar="NAME=ID",
                   help="the upstream's model id for NAME (what its GET /models lists), for every deployment of NAME")
    p.add_argument("--upstream-key", action="append", default=[], metavar="NAME=KEY",
                   help="the API key for NAME's upstream")
    p.add_argument("--fallback", action="append", default=[], metavar="NAME=OTHER",
                   help="when every deployment of NAME fails, answer with OTHER (repeatable, in order)")
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve HTTPS with this certificate (PEM, chain "
                   "included)")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="the private key of --tls-cert (PEM; default: in the "
                   "--tls-cert file)")
    p.add_argument("--tls-client-ca", type=Path, metavar="FILE", help="require client certificates signed by this CA "
                   "(mTLS); the audit log records each one's subject")
    p.set_defaults(run=run)


_MODEL_FLAGS = ("engine", "dtype", "device", "context_length", "max_num_seqs", "max_waiting", "chat_template")


def build_settings(args: argparse.Namespace) -> Settings:
    """Settings from the flags: ``--config`` for a file of models, else ``--model`` (or the default) plus flags."""
    overrides = {
        "host": args.host,
        "port": args.port,
        "cache_dir": args.cache_dir,
        "keepalive_seconds": args.keepalive_seconds,
        "log_level": args.log_level,
        "auth": args.auth,
        "redis_url": args.redis_url,
        "database_url": args.database_url,
        "state_dir": args.state_dir,
        **{key: getattr(args, key).expanduser().resolve() for key in ("tls_cert", "tls_key", "tls_client_ca")
           if getattr(args, key) is not None},
        "log_format": args.log_format,
        "drain_seconds": args.drain_seconds,
    }
    model_flags = {key: getattr(args, key) for key in _MODEL_FLAGS if getattr(args, key) is not None}
    if args.config is not None:
        if args.model or args.name or args.embedding_model or model_flags:
            flags = ", ".join("--" + k.replace("_", "-") for k in ("model", "name", "embedding_model", *model_flags)
                              if getattr(args, k))
            raise ConfigError(f"{flags} cannot be combined with --config; set them per model in the file")
        return load_settings(args.config, overrides, extra=_gateway_flags(args))
    extra = _gateway_flags(args)
    if extra.models and not args.model and not args.name and not model_flags:
        if args.embedding_model not in (None, "none"):
            extra.models.append(_embedding_model(args))
        return load_settings(None, overrides, extra=extra, base_dir=Path.cwd(), default_model=False)
    if args.embedding_model != "none" and (args.embedding_model is not None or not args.model):
        extra.models.append(_embedding_model(args))
    if args.model:
        path = Path(args.model).expanduser()
        model: dict[str, object] = {
            "name": args.name or (path.stem if path.suffix == ".gguf" else path.resolve().name),
            "path": args.model if args.model.startswith("builtin:") else str(path.resolve()),
        }
    else:
        model = {"name": args.name or DEFAULT_MODEL_NAME, "path": BUILTIN_CHAT_MODEL}
    model.update({k: str(v) if k == "chat_template" else v for k, v in model_flags.items()})
    return load_settings(None, overrides, model, base_dir=Path.cwd(), extra=extra)


def _embedding_model(args: argparse.Namespace) -> dict[str, object]:
    """``--embedding-model`` (default: the embedded all-MiniLM-L6-v2) as a sentence-transformers model."""
    source = args.embedding_model or BUILTIN_EMBEDDING_MODEL
    if source.startswith("builtin:"):
        name = args.embedding_name or (DEFAULT_EMBEDDING_NAME if source == BUILTIN_EMBEDDING_MODEL else source[8:])
        return {"name": name, "engine": "sentence-transformers", "path": source}
    path = Path(source).expanduser().resolve()
    return {"name": args.embedding_name or path.name, "engine": "sentence-transformers", "path": str(path)}


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"{flag} wants NAME=VALUE, got {value!r}")
        out.append((name.strip(), rest.strip()))
    return out


def _upstream_target(name: str, value: str) -> tuple[str | None, str]:
    """``ID@URL`` → (ID, URL), the URL starting at the last ``@http`` (an ID may hold ``/``, ``:`` and ``@``);
    a bare URL → (None, URL)."""
    at = value.rfind("@http")
    if at == -1:
        return None, value
    model, url = value[:at].strip(), value[at + 1:].strip()
    if not model:
        raise ConfigError(f"--upstream {name}={value}: the model id before '@' is empty")
    return model, url


def _gateway_flags(args: argparse.Namespace) -> ExtraModels:
    keys = dict(_pairs(args.upstream_key, "--upstream-key"))
    upstream_models = dict(_pairs(args.upstream_model, "--upstream-model"))
    upstreams = _pairs(args.upstream, "--upstream")
    unknown = sorted(set(upstream_models) - {name for name, _ in upstreams})
    if unknown:
        raise ConfigError(f"--upstream-model {unknown[0]}=...: there is no --upstream {unknown[0]}=...")
    models: list[dict[str, object]] = []
    for name, value in upstreams:
        model, url = _upstream_target(name, value)
        if model is not None and name in upstream_models and upstream_models[name] != model:
            raise ConfigError(f"--upstream {name}={value} names model {model!r} but --upstream-model says "
                              f"{upstream_models[name]!r}")
        models.append({"name": name, "engine": "upstream", "base_url": url, "api_key": keys.get(name),
                       "upstream_model": model or upstream_models.get(name), "deployment": url})
    fallbacks: dict[str, list[str]] = {}
    for name, other in _pairs(args.fallback, "--fallback"):
        fallbacks.setdefault(name, []).append(other)
    return ExtraModels(models, fallbacks)


def run(args: argparse.Namespace) -> int:
    # No hub, ever: weights come from local paths and packages only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars in the log
    try:
        settings = build_settings(args)
    except ConfigError as exc:
        print(f"inhouse: {exc}", file=sys.stderr)
        return 2
    from inhouse.cli.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    from inhouse.engine.allocator import keep_freed_memory

    logging.getLogger("inhouse").info("memory allocator: %s", keep_freed_memory(os.environ))  # before any weights load
    from inhouse.engine.progress import quiet_library_bars

    quiet_library_bars()  # off a terminal; the conversion and load say their steps as log lines
    import uvicorn

    from inhouse.engine.factory import build_engine, build_engines
    from inhouse.gateway.health import HealthMonitor
    from inhouse.gateway.registry import ModelRegistry
    from inhouse.gateway.router import Router
    from inhouse.gateway.swap import Swapper
    from inhouse.metrics import Metrics
    from inhouse.server import create_app
    from inhouse.server.drain import Drain, DrainingServer
    from inhouse.server.tls import server_tls

    try:
        tls = server_tls(settings)  # unreadable certificate files are refused before anything opens
        access = open_access(settings)
    except (ConfigError, StateError) as exc:
        print(f"inhouse: {exc}", file=sys.stderr)
        return 2
    try:
        registry = ModelRegistry.of(build_engines(settings.models, settings.cache_dir))
    except ConfigError as exc:
        print(f"inhouse: {exc}", file=sys.stderr)
        return 2
    metrics = Metrics(settings.metrics)
    router = Router(registry, settings.routing, metrics)
    swapper = Swapper(registry, settings.swap,
                      lambda spec: build_engine(spec, settings.cache_dir, [(d.spec, d.engine) for d in registry.all()]))
    drain = Drain(settings.drain_seconds)
    app = create_app(settings, registry, router, HealthMonitor(registry, settings.routing), access, metrics,
                     swapper=swapper, reload=(lambda: build_settings(args)) if args.config is not None else None,
                     drain=drain)
    for spec in settings.models:
        logging.getLogger("inhouse").info("serving %s from %s (engine %s)", spec.name, _source(spec), spec.engine)
    if settings.tls_client_ca is not None:
        logging.getLogger("inhouse").info("mTLS: clients need a certificate signed by %s", settings.tls_client_ca)
    # SIGTERM drains first (inhouse/server/drain.py); uvicorn's own logging is off: its lines reach ours, and the
    # access sink logs each call, so uvicorn's access log would say it twice
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, log_config=None, access_log=False, **tls)
    server = DrainingServer(config, drain)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn re-raises the SIGINT it handled, at the end
        server.run()
    return 0 if server.started else 3  # 3: it never started (the port is taken, ...), as uvicorn.run exits


def _source(spec: ModelSpec) -> str:
    """Where a model comes from, for the start-up line: its weights, or its upstream (and the upstream's id)."""
    if isinstance(spec, UpstreamSpec):
        model = spec.upstream_model
        return spec.base_url + (f" as model {model!r}" if model and model != spec.name else "")
    return spec.path or "no weights"
