"""``/v1/models``: model cards."""

from __future__ import annotations

from typing import Any

__all__ = ["model_card", "model_list"]


def model_card(name: str, created: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "inhouse", **extra}


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}
