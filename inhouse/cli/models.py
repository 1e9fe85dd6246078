"""``inhouse models list|swap|rollback|show`` and ``inhouse reload``: a running server's admin API, from the shell.

Each command is one admin request; the answer is printed (a table for ``list``, JSON with ``--json``) and a
refusal is printed to stderr with exit code 1 (2 when the server cannot be reached).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from inhouse.cli.admin_client import add_server_flags, call
from inhouse.cli.table import render_table

__all__ = ["add_parser", "add_reload_parser"]


def _percent(text: str) -> float:
    """``10%``, ``10`` or ``0.1`` → 0.1."""
    raw = text.strip().rstrip("%")
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share (10%, or 0.1)") from None
    share = value / 100 if text.strip().endswith("%") or value >= 1 else value
    if not 0 < share < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a canary share is between 0% and 100%, exclusive")
    return share


def _server_flags(p: argparse.ArgumentParser) -> None:
    add_server_flags(p, timeout=1800.0)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("models", help="list, swap, roll back and inspect the models of a running server")
    sub = p.add_subparsers(dest="models_command", required=True)
    listing = sub.add_parser("list", help="every served model, its state and its deployments'")
    swap = sub.add_parser("swap", help="load a new version beside the old, check it, then switch to it")
    swap.add_argument("name", help="the public model name")
    swap.add_argument("--path", help="the new version's checkpoint (a directory or .gguf file on the server)")
    swap.add_argument("--version", dest="version_label", help="a version label (default: a checkpoint hash)")
    swap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                      help="another model field to change, its value as JSON (repeatable)")
    swap.add_argument("--canary", type=_percent, help="send this share of requests (10%%) to the new version "
                      "for the window, then promote or roll back")
    swap.add_argument("--window", type=float, help="canary window in seconds (default: the server's)")
    rollback = sub.add_parser("rollback", help="bring the previous version back (health-gated)")
    rollback.add_argument("name")
    show = sub.add_parser("show", help="versions, deployments and the last swap of a model")
    show.add_argument("name")
    for action in (listing, swap, rollback, show):
        _server_flags(action)
    p.set_defaults(run=run)


def add_reload_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("reload", help="make a running server re-read its config file (like SIGHUP)")
    _server_flags(p)
    p.set_defaults(run=run, models_command="reload")


def _swap_body(args: argparse.Namespace) -> dict[str, Any] | str:
    body: dict[str, Any] = {}
    if args.path:
        body["path"] = args.path
    if args.version_label:
        body["version"] = args.version_label
    for item in args.set:
        field, sep, raw = item.partition("=")
        if not sep:
            return f"--set wants FIELD=JSON, got {item!r}"
        try:
            body[field] = json.loads(raw)
        except ValueError:
            body[field] = raw  # a bare string
    if not body:
        return "say what to change: --path NEW (or --set FIELD=VALUE)"
    if args.canary is not None:
        body["canary"] = args.canary
        if args.window is not None:
            body["canary_window_s"] = args.window
    return body


def run(args: argparse.Namespace) -> int:
    command = args.models_command
    if command == "swap":
        body = _swap_body(args)
        if isinstance(body, str):
            print(f"inhouse: {body}", file=sys.stderr)
            return 2
        method, path, payload = "POST", f"/admin/models/{args.name}/swap", body
    elif command == "rollback":
        method, path, payload = "POST", f"/admin/models/{args.name}/rollback", None
    elif command == "show":
        method, path, payload = "GET", f"/admin/models/{args.name}", None
    elif command == "list":
        method, path, payload = "GET", "/admin/models", None
    else:
        method, path, payload = "POST", "/admin/reload", None
    data = call(args, method, path, payload)
    if isinstance(data, int):
        return data
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
    elif command == "list":
        print(_listing(data))
    else:
        _print(data)
    if data.get("outcome") == "rolled_back":
        print(f"inhouse: the canary was rolled back: {data.get('reason')}", file=sys.stderr)
        return 1
    if data.get("failed"):
        print(f"inhouse: some models were not swapped: {data['failed']}", file=sys.stderr)
        return 1
    return 0


def _print(data: dict[str, Any]) -> None:
    for k, v in data.items():
        if k != "object" and v not in (None, [], {}):
            print(f"{k:>18}: {json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else v}")


def _listing(data: dict[str, Any]) -> str:
    """One row per deployment of each model (``GET /admin/models``), then the errors of any that failed."""
    rows: list[list[object]] = []
    errors = []
    for model in data.get("data", []):
        for d in model.get("deployments", []):
            rows.append([model["id"], model["state"], d["name"], d["engine"], d["state"],
                         "yes" if d.get("healthy") else "no", d.get("in_flight"), d.get("running"), d.get("waiting")])
            if d.get("error"):
                errors.append(f"{model['id']} ({d['name']}): {d['error']}")
    table = render_table(["MODEL", "STATE", "DEPLOYMENT", "ENGINE", "DEPLOYMENT STATE", "HEALTHY", "IN FLIGHT",
                          "RUNNING", "WAITING"], rows)
    notes = [*(f"error: {e}" for e in errors), *(["the server is draining"] if data.get("draining") else [])]
    return "\n".join([table, *notes])
