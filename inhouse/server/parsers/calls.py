"""Tool calls as the parsers emit them: a fresh call id, and a parsed JSON object turned into a call's pieces.

Owns the wire rules for a call: the id is ``call_`` and 24 random letters and digits; the arguments are always a
JSON object's text (``"{}"`` when the model gave none), as Dify's agent ``json.loads`` them.
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from inhouse.engine.base import ToolCallDelta

__all__ = ["call_id", "call_pieces", "name_and_arguments"]

_ALNUM = string.ascii_letters + string.digits


def call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def name_and_arguments(value: Any) -> tuple[str, str] | None:
    """``{"name": ..., "arguments" | "parameters": {...}}`` as (name, arguments JSON object text), else None."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def call_pieces(index: int, name: str, arguments: str) -> list[ToolCallDelta]:
    """The pieces of one whole call: its id and name first, then its arguments."""
    return [ToolCallDelta(index, id=call_id(), name=name), ToolCallDelta(index, arguments=arguments)]
