"""``inhouse audit verify|tail|search|export``: read the audit log and check its hash chain."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inhouse.audit.query import export, search, verify
from inhouse.cli.keys import parse_time
from inhouse.cli.state import StateError, add_state_flags, database_from_args

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("audit", help="read the audit log, verify its hash chain")
    sub = p.add_subparsers(dest="audit_command", required=True)
    sub.add_parser("verify", help="check that no row was edited, inserted or deleted (exit 1 if one was)")
    for name, help_text in (("tail", "the newest rows"), ("search", "rows matching filters, newest first"),
                            ("export", "rows matching filters, oldest first, as JSONL or CSV")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--since", type=parse_time, help="2026-11-01, 2026-11-01T08:00, unix seconds, or 24h/7d")
        q.add_argument("--until", type=parse_time)
        q.add_argument("--key", help="key id or name")
        q.add_argument("--model", help="model asked or served")
        q.add_argument("--limit", type=int, default=20 if name == "tail" else 1000 if name == "search" else 10**9)
        q.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    for action in sub.choices.values():
        action.add_argument("--config", type=Path, help="the server's YAML config (for its database)")
        add_state_flags(action)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        db = database_from_args(args)
    except StateError as exc:
        print(f"inhouse: {exc}", file=sys.stderr)
        return 2
    try:
        if args.audit_command == "verify":
            result = verify(db)
            print(json.dumps({"ok": result.ok, "rows": result.rows, "problem": result.problem}))
            return 0 if result.ok else 1
        rows = search(db, since=args.since, until=args.until, key=args.key, model=args.model, limit=args.limit,
                      newest_first=args.audit_command != "export")
        if args.audit_command == "tail":
            rows.reverse()  # oldest of the newest first, like tail
        for piece in export(rows, args.format):
            sys.stdout.write(piece)
        return 0
    finally:
        db.close()
