"""The CLI's side of the admin API: the ``--url/--key/--timeout/--json`` flags and one call to a running server.

Owns how a command reaches the server (``$INHOUSE_URL``, ``$INHOUSE_ADMIN_KEY``), and how an answer becomes an
exit status: 2 when the server cannot be reached, 1 with the error's message when it answered an error, else the
JSON body for the command to print.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import httpx

__all__ = ["add_server_flags", "call"]


def add_server_flags(p: argparse.ArgumentParser, timeout: float) -> None:
    p.add_argument("--url", default=os.environ.get("INHOUSE_URL", "http://127.0.0.1:8000"),
                   help="the server (default $INHOUSE_URL or http://127.0.0.1:8000)")
    p.add_argument("--key", default=os.environ.get("INHOUSE_ADMIN_KEY"),
                   help="an admin API key (default $INHOUSE_ADMIN_KEY)")
    p.add_argument("--timeout", type=float, default=timeout,
                   help=f"seconds to wait for the answer (default {timeout:g})")
    p.add_argument("--json", action="store_true", help="print JSON")


def call(args: argparse.Namespace, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
    """The server's JSON answer, or the exit status (int) after printing why there is none."""
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    try:
        response = httpx.request(method, args.url.rstrip("/") + path, json=payload, headers=headers,
                                 timeout=httpx.Timeout(args.timeout, connect=10.0))
    except httpx.HTTPError as exc:
        print(f"inhouse: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    try:
        data = response.json()
    except ValueError:
        data = {"error": {"message": response.text[:500] or f"HTTP {response.status_code}"}}
    if response.status_code >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        print(f"inhouse: {error.get('message') if isinstance(error, dict) else data}", file=sys.stderr)
        return 1
    return data
