"""``inhouse doctor [--config FILE] [--json]``: is this machine ready to serve this config, and what to fix if not.

Runs every check (``inhouse.cli.checks``, ``inhouse.cli.model_checks``) against the settings ``inhouse serve``
would build from the same file, prints one line per check with the fix under each problem (a JSON object
with ``--json``), and exits 1 when any check failed, 0 otherwise (warnings included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from inhouse.cli.checks import (
    Check,
    check_database,
    check_port,
    check_python,
    check_redis,
    check_torch,
    check_vllm,
)
from inhouse.cli.model_checks import check_config, check_memory, check_model

__all__ = ["add_parser", "run_checks"]

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("doctor", help="check Python, torch, memory, model files, database, Redis, port and "
                            "vLLM for a config, and say what to fix")
    p.add_argument("--config", type=Path, help="the YAML file inhouse serve would use (default: the embedded models)")
    p.add_argument("--json", action="store_true", help="print one JSON object: {ok, checks: [...]}")
    p.set_defaults(run=run)


def run_checks(config_file: Path | None) -> list[Check]:
    """Every check, in the order an operator fixes things: the runtime, the config, its models, its services."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checks = [check_python()]
    settings, config = check_config(config_file)
    checks += [check_torch(settings), config]
    # where a .venv-vllm may be: here, beside the config, and the checkout this inhouse runs from
    near = (Path.cwd(), *([config_file.parent] if config_file else []), Path(__file__).resolve().parents[2])
    places = tuple(dict.fromkeys(p.resolve() for p in near))
    if settings is not None:
        checks += [check_model(spec, i, config_file) for i, spec in enumerate(settings.models)]
        checks += [check_memory(settings), check_database(settings), check_redis(settings), check_port(settings)]
    checks.append(check_vllm(settings, places))
    return checks


def run(args: argparse.Namespace) -> int:
    checks = run_checks(args.config)
    failed = [c for c in checks if c.status == "fail"]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [c.as_json() for c in checks]}, ensure_ascii=False))
    else:
        _print(checks)
    return 1 if failed else 0


def _print(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"[{_MARK[c.status]}] {c.name:<{width}}  {c.detail}")
        if c.fix:
            print(f"       {'':<{width}}  fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    summary = "ready to serve" if not failed else f"{failed} problem{'s' if failed > 1 else ''} to fix"
    print(f"\n{summary}" + (f", {warned} warning{'s' if warned > 1 else ''}" if warned else ""),
          file=sys.stdout)
