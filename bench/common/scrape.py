"""Reading a server's Prometheus ``/metrics``: counters by name, and the prefix-cache hit rate between two reads.

Owns parsing the text exposition format (each sample line ``name{labels} value``; samples of one name are
summed over their labels) and knowing which counters say how much of the prompts a prefix cache served:
vLLM's ``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries`` (tokens), any other server's counters
named ``..._prefix_cache_hits`` / ``..._prefix_cache_queries``, and inhouse's
``inhouse_engine_prefix_cache_hit_tokens_total`` / ``..._miss_tokens_total`` (queries = hits + misses).  A
server without them, or without ``/metrics``, gives None.  It must not start servers or print.
"""

from __future__ import annotations

import re

import httpx

__all__ = ["Counters", "hit_rate", "parse", "read"]

Counters = dict[str, float]

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+([-+0-9.eEinfaINF]+)")
_HITS = re.compile(r"(?:^|[:_])prefix_cache_hits(?:_total)?$")
_QUERIES = re.compile(r"(?:^|[:_])prefix_cache_queries(?:_total)?$")
_HIT_TOKENS = re.compile(r"(?:^|[:_])prefix_cache_hit_tokens(?:_total)?$")
_MISS_TOKENS = re.compile(r"(?:^|[:_])prefix_cache_miss_tokens(?:_total)?$")


def parse(text: str) -> Counters:
    out: Counters = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            out[match[1]] = out.get(match[1], 0.0) + float(match[2])
        except ValueError:
            continue
    return out


def read(url: str, timeout_s: float = 10.0) -> Counters | None:
    """The server's ``/metrics`` as summed samples by name; None when it has none."""
    try:
        response = httpx.get(url + "/metrics", timeout=timeout_s)
    except httpx.HTTPError:
        return None
    return parse(response.text) if response.status_code == 200 else None


def _sum(counters: Counters, pattern: re.Pattern[str]) -> float | None:
    values = [v for k, v in counters.items() if pattern.search(k)]
    return sum(values) if values else None


def _hits_and_queries(counters: Counters) -> tuple[float | None, float | None]:
    hits, queries = _sum(counters, _HITS), _sum(counters, _QUERIES)
    if hits is None and queries is None:  # inhouse's counters: hit and missed prompt tokens
        hits, missed = _sum(counters, _HIT_TOKENS), _sum(counters, _MISS_TOKENS)
        queries = hits + missed if hits is not None and missed is not None else None
    return hits, queries


def hit_rate(before: Counters | None, after: Counters | None) -> float | None:
    """Share of prompt tokens the prefix cache served between two reads (None: no such counters, or no queries)."""
    if before is None or after is None:
        return None
    (hits_now, asked_now), (hits_then, asked_then) = _hits_and_queries(after), _hits_and_queries(before)
    if hits_now is None or hits_then is None or asked_now is None or asked_then is None:
        return None
    asked = asked_now - asked_then
    return (hits_now - hits_then) / asked if asked > 0 else None
