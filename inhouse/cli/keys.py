"""``inhouse keys create|list|show|revoke|rotate``: API keys in the configured database."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from inhouse.cli.state import StateError, add_state_flags, database_from_args
from inhouse.keys.store import KeyLimits, KeyStore

__all__ = ["add_parser", "parse_time"]


def parse_time(text: str) -> float:
    """Unix seconds, an ISO date/time (UTC unless it names a zone), or an age like 30m, 12h, 7d (that long ago)."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in units:
        return dt.datetime.now(dt.UTC).timestamp() - int(text[:-1]) * units[text[-1]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time (2026-12-31, 2026-12-31T18:00, unix seconds, "
                                         "or 30m/12h/7d)") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _future(text: str) -> float:
    """``--expires``: a finite time in the future, as the admin API requires (nan would mean never)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in units:  # --expires 30d: that long from now
        return dt.datetime.now(dt.UTC).timestamp() + int(text[:-1]) * units[text[-1]]
    when = parse_time(text)
    if not (math.isfinite(when) and when > time.time()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time in the future")
    return when


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("keys", help="create, list, show, revoke and rotate API keys")
    sub = p.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="create a key and print its secret (once)")
    create.add_argument("--name", required=True)
    create.add_argument("--models", help="comma-separated model names this key may use (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens (prompt + completion) per minute")
    create.add_argument("--max-concurrency", type=int, help="requests in flight at once")
    create.add_argument("--token-budget", type=int, help="tokens per --budget-period")
    create.add_argument("--budget-period", choices=["day", "month"])
    create.add_argument("--expires", type=_future, help="date/time (UTC) or a duration from now like 30d")
    create.add_argument("--admin", action="store_true", help="may use /admin (manage keys, read the audit log)")
    for name in ("show", "revoke", "rotate"):
        one = sub.add_parser(name, help=f"{name} a key by id or name")
        one.add_argument("key", help="key id (key_...) or name")
    sub.add_parser("list", help="all keys, revoked ones included")
    for action in sub.choices.values():
        action.add_argument("--config", type=Path, help="the server's YAML config (for its database)")
        action.add_argument("--json", action="store_true", help="print JSON")
        add_state_flags(action)
    p.set_defaults(run=run)


def _print(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
        return
    for k, v in data.items():
        if v is not None:
            print(f"{k:>16}: {v}")


def run(args: argparse.Namespace) -> int:
    try:
        db = database_from_args(args)
    except StateError as exc:
        print(f"inhouse: {exc}", file=sys.stderr)
        return 2
    keys = KeyStore(db)
    try:
        return _dispatch(args, keys)
    finally:
        db.close()


def _dispatch(args: argparse.Namespace, keys: KeyStore) -> int:
    command = args.keys_command
    if command == "create":
        if (args.token_budget is None) != (args.budget_period is None):
            print("inhouse: --token-budget and --budget-period go together", file=sys.stderr)
            return 2
        limits = KeyLimits(args.rpm, args.tpm, args.max_concurrency, args.token_budget, args.budget_period)
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        try:
            key, secret = keys.create(args.name, admin=args.admin, models=models, limits=limits,
                                      expires_at=args.expires)
        except ValueError as exc:  # KeyNameTakenError among them: the store's refusals are written for people
            print(f"inhouse: {exc}", file=sys.stderr)
            return 1
        _print(args, {**key.public(), "secret": secret})
        if not args.json:
            print("\nThe secret is shown only now; store it where the application can read it.", file=sys.stderr)
        return 0
    if command == "list":
        found = keys.list()
        if args.json:
            print(json.dumps([k.public() for k in found], ensure_ascii=False))
            return 0
        for k in found:
            info = k.public()
            scope = ",".join(k.models) if k.models is not None else "*"
            print(f"{k.id}  {k.prefix}...  {info['status']:<8} {'admin ' if k.admin else ''}{k.name}  models={scope}")
        return 0
    if command == "rotate":
        rotated = keys.rotate(args.key)
        if rotated is None:
            print(f"inhouse: no active key {args.key!r}", file=sys.stderr)
            return 1
        _print(args, {**rotated[0].public(), "secret": rotated[1]})
        return 0
    one = keys.get(args.key) if command == "show" else keys.revoke(args.key)
    if one is None:
        print(f"inhouse: no key {args.key!r}", file=sys.stderr)
        return 1
    _print(args, one.public())
    return 0
