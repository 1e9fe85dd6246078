"""How much KV memory a model of the local engine gets: the ``kv_cache_gib`` setting, or a share of free memory.

Owns the decision and its refusal.  The budget must hold one sequence as long as the context (what the tiers
charge for it, plus their slack), or the model would refuse requests it accepts: then the model does not start,
and the message says what it needs.  Without a setting, a model takes a third of the memory free at start, at
most what ``max_num_seqs`` full-context sequences need.
"""

from __future__ import annotations

from typing import Any

from inhouse.engine.base import ModelLoadError
from inhouse.engine.local.kv_tiers import KVTiers
from inhouse.engine.memory import available_bytes

__all__ = ["kv_budget_tokens"]

_GIB = 2**30
_FREE_SHARE = 1 / 3


def kv_budget_tokens(name: str, setting_gib: float | None, tiers: KVTiers[Any], max_num_seqs: int,
                     device: str = "cpu", free_bytes: int | None = None) -> int:
    """The model's KV memory in tokens (bytes / ``tiers.bytes_per_token``), or ModelLoadError."""
    per_token = tiers.bytes_per_token
    one = tiers.charge(tiers.max_length) + tiers.slack  # one full-context sequence
    if setting_gib is not None:
        budget = int(setting_gib * _GIB) // per_token
    else:
        free = free_bytes if free_bytes is not None else available_bytes(device)
        most = max_num_seqs * tiers.charge(tiers.max_length) + tiers.slack
        budget = most if free is None else min(most, int(free * _FREE_SHARE) // per_token)
    if budget < one:
        what = f"kv_cache_gib: {setting_gib:g}" if setting_gib is not None else "a third of the free memory"
        raise ModelLoadError(
            f"model {name!r} cannot hold one sequence of its whole context in {what} "
            f"({budget * per_token / _GIB:.2f} GiB): {tiers.max_length} tokens need {one * per_token / _GIB:.2f} GiB "
            f"({per_token} bytes a token). Raise kv_cache_gib, or lower context_length.")
    return budget
