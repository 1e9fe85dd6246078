"""``inhouse audit verify|tail|search|export``: read the audit log and check its hash chain.

``export --follow`` keeps going after the rows already there: it polls the database (SQLite or PostgreSQL,
read-only, from any host that reaches it) for rows committed since, prints each as a JSON line as it comes,
and stops cleanly on Ctrl-C or SIGTERM: the feed for Vector or Filebeat (docs/operations.md)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from inhouse.audit.query import export, search, status_range, verify
from inhouse.cli.keys import parse_time
from inhouse.cli.state import StateError, add_state_flags, database_from_args
from inhouse.storage.database import Database

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
        q.add_argument("--status", type=_status, help="an HTTP status (429) or a class of them (4xx, 5xx)")
        q.add_argument("--limit", type=int, default=20 if name == "tail" else 1000 if name == "search" else 10**9)
        q.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
        if name == "export":
            q.add_argument("--follow", "-f", action="store_true",
                           help="after the rows there, keep printing new rows as they are committed (JSON lines)")
            q.add_argument("--interval", type=float, default=1.0, help="--follow: seconds between polls")
            q.add_argument("--after-seq", type=int, help="only rows after this seq (resume a feed where it stopped)")
    for action in sub.choices.values():
        action.add_argument("--config", type=Path, help="the server's YAML config (for its database)")
        add_state_flags(action)
    p.set_defaults(run=run)


def _status(text: str) -> tuple[int, int]:
    try:
        return status_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    try:
        db = database_from_args(args)
    except StateError as exc:
        print(f"inhouse: {exc}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "follow", False):
            if args.format != "jsonl":
                print("inhouse: --follow writes JSON lines only (leave out --format csv)", file=sys.stderr)
                return 2
            return _follow(db, args)
        if args.audit_command == "verify":
            result = verify(db)
            print(json.dumps({"ok": result.ok, "rows": result.rows, "problem": result.problem}))
            return 0 if result.ok else 1
        rows = search(db, since=args.since, until=args.until, key=args.key, model=args.model, status=args.status,
                      limit=args.limit,
                      newest_first=args.audit_command != "export", after_seq=getattr(args, "after_seq", None))
        if args.audit_command == "tail":
            rows.reverse()  # oldest of the newest first, like tail
        for piece in export(rows, args.format):
            sys.stdout.write(piece)
        return 0
    finally:
        db.close()


_PAGE = 1000


def _follow(db: Database, args: argparse.Namespace) -> int:
    """Every matching row after ``--after-seq`` (default: all), then each new one, until Ctrl-C or SIGTERM."""
    stopping: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopping.append(sig))
    last: int | None = args.after_seq
    try:
        while not stopping:
            rows = search(db, since=args.since, until=args.until, key=args.key, model=args.model, status=args.status,
                          limit=_PAGE, newest_first=False, after_seq=last)
            for piece in export(rows, "jsonl"):
                sys.stdout.write(piece)
            sys.stdout.flush()
            if rows:
                last = rows[-1]["seq"]
            if len(rows) < _PAGE:  # caught up: wait for more
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        sys.stderr.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
