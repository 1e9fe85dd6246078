"""``inhouse adapters load|unload|list``: a running server's LoRA adapters (``/admin/adapters``), from the shell.

Each command is one admin request; the answer is printed (JSON with ``--json``) and a refusal is printed to
stderr with exit code 1 (2 when the server cannot be reached).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from inhouse.cli.admin_client import add_server_flags, call

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("adapters", help="load, unload and list the LoRA adapters of a running server")
    sub = p.add_subparsers(dest="adapters_command", required=True)
    load = sub.add_parser("load", help="serve a PEFT LoRA adapter under its own model name, over a base model")
    load.add_argument("name", help="the adapter's public model name")
    load.add_argument("--base", required=True, help="the served model it was trained on")
    source = load.add_mutually_exclusive_group(required=True)
    source.add_argument("--path", help="the PEFT adapter directory (on the server; transformers, vllm, auto bases)")
    source.add_argument("--upstream-model", help="its model name on the upstream (an upstream base)")
    unload = sub.add_parser("unload", help="stop serving an adapter (its requests in flight finish first)")
    unload.add_argument("name")
    listing = sub.add_parser("list", help="the served adapters")
    for action in (load, unload, listing):
        add_server_flags(action, timeout=600.0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    command = args.adapters_command
    payload: dict[str, Any] | None = None
    if command == "load":
        method, path = "POST", "/admin/adapters"
        payload = {"name": args.name, "base": args.base, "path": args.path, "upstream_model": args.upstream_model}
        payload = {k: v for k, v in payload.items() if v is not None}
    elif command == "unload":
        method, path = "DELETE", f"/admin/adapters/{args.name}"
    else:
        method, path = "GET", "/admin/adapters"
    data = call(args, method, path, payload)
    if isinstance(data, int):
        return data
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
    elif command == "list":
        for a in data.get("data", []):
            memory = {True: "resident", False: "on disk", None: "-"}[a["resident"]]
            where = a.get("path") or f"upstream:{a.get('upstream_model')}"
            print(f"{a['name']}\tbase={a['base']}\t{a['state']}\t{memory}\t{where}")
    else:
        print(" ".join(f"{k}={v}" for k, v in data.items() if k != "object"))
    return 0
