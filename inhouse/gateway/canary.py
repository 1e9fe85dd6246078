"""The canary verdict: promote a new version or roll it back, from what both versions did over the window.

Owns the per-version outcome tally (``Tally``) and the pure decision ``judge``.  A request counts as an
error when the server failed it (5xx, or a stream that ended with a server-side error code); the caller's
own mistakes (4xx, a client that left) do not count against either version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from inhouse.config import SwapSettings

__all__ = ["SERVER_ERRORS", "Tally", "Verdict", "failing", "judge"]

SERVER_ERRORS = frozenset({"engine_error", "internal_error", "upstream_error", "upstream_unavailable",
                           "model_unavailable", "model_loading"})


@dataclass
class Tally:
    """One version's requests in the window: how many, how many the server failed, their TTFTs (ms)."""

    requests: int = 0
    errors: int = 0
    ttfts: list[float] = field(default_factory=list)

    def add(self, status: int, error_code: str | None, ttft_ms: float | None) -> None:
        self.requests += 1
        if status >= 500 or error_code in SERVER_ERRORS:
            self.errors += 1
        if ttft_ms is not None:
            self.ttfts.append(ttft_ms)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99_ttft(self) -> float | None:
        if not self.ttfts:
            return None
        ordered = sorted(self.ttfts)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def public(self) -> dict[str, object]:
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p99_ttft_ms": self.p99_ttft}


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str


def failing(canary: Tally, baseline: Tally, rules: SwapSettings) -> bool:
    """The canary already fails its error-rate test on enough requests: the window need not run to its end (each
    further request it takes is one more a client sees fail)."""
    return canary.requests >= rules.canary_min_requests and \
        canary.error_rate > baseline.error_rate + rules.canary_max_error_rate_delta


def judge(canary: Tally, baseline: Tally, rules: SwapSettings) -> Verdict:
    """Promote only when the canary saw enough requests, failed no more than ``canary_max_error_rate_delta``
    above the old version, and its p99 TTFT is within ``canary_max_ttft_ratio`` × the old's (or within
    ``canary_ttft_slack_ms`` of it: a few milliseconds are noise, not a regression).  With too few canary
    requests there is no evidence that it works: it is rolled back."""
    if canary.requests < rules.canary_min_requests:
        return Verdict(False, f"too few canary requests to judge ({canary.requests} < "
                              f"canary_min_requests={rules.canary_min_requests})")
    if canary.error_rate > baseline.error_rate + rules.canary_max_error_rate_delta:
        return Verdict(False, f"canary error rate {canary.error_rate:.1%} ({canary.errors}/{canary.requests}) "
                              f"against {baseline.error_rate:.1%} for the old version")
    new_p99, old_p99 = canary.p99_ttft, baseline.p99_ttft
    if new_p99 is not None and old_p99 is not None:
        limit = max(old_p99 * rules.canary_max_ttft_ratio, old_p99 + rules.canary_ttft_slack_ms)
        if new_p99 > limit:
            return Verdict(False, f"canary p99 TTFT {new_p99:.0f} ms against {old_p99:.0f} ms for the old version "
                                  f"(limit {limit:.0f} ms)")
    return Verdict(True, f"canary error rate {canary.error_rate:.1%} over {canary.requests} requests, p99 TTFT "
                         f"{'-' if new_p99 is None else f'{new_p99:.0f} ms'}")
