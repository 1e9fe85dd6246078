"""Per-key limits: requests and tokens per minute, concurrent requests, token budgets per day or month.

Owns the counting.  ``MemoryLimiter`` counts in this process; ``RedisLimiter`` counts in Redis with one
Lua script per admission, so every replica sharing the Redis enforces one limit together.  Windows are
fixed (the current UTC minute, day or month), which makes ``Retry-After`` exact: the seconds until the
window that refused the request ends.

Token budgets are reserved up front: once admitted, the caller ``reserve``s the most a request can use
(prompt + max_tokens); it is refused with 429 ``insufficient_quota`` unless that fits in what remains of
the period's budget, so parallel requests cannot overshoot it.  ``release`` reconciles the reservation
with the real usage (unused tokens are given back) and adds the real tokens to the minute's TPM count:
TPM is counted after the response, so a burst can overshoot it by the requests already in flight, as
with OpenAI's own limits.
"""

from __future__ import annotations

import calendar
import itertools
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from inhouse.errors import ErrorCode, InhouseError
from inhouse.keys.store import ApiKey

__all__ = ["Admission", "Limiter", "MemoryLimiter", "RedisLimiter"]

# A request still "in flight" after this long is assumed lost with its replica (Redis concurrency slots).
_STALE_SLOT_SECONDS = 1800


@dataclass
class Admission:
    """One admitted request's hold on its key's limits, and the ``x-ratelimit-*`` headers to send."""

    key_id: str
    slot: str = ""  # its concurrency slot in Redis (unique across replicas)
    headers: dict[str, str] = field(default_factory=dict)
    concurrent: bool = False
    reserved: int = 0  # tokens reserved against the budget, reconciled at release
    reserved_period: str = ""  # the budget period they were reserved in (a request is charged to it)


class Limiter(Protocol):
    async def acquire(self, key: ApiKey) -> Admission:
        """Admit one request or raise 429 (``rate_limit_exceeded`` / ``insufficient_quota``) with Retry-After."""

    async def reserve(self, key: ApiKey, admission: Admission, tokens: int) -> None:
        """Reserve ``tokens`` (prompt + max_tokens) of the key's budget or raise 429 ``insufficient_quota``.

        Nothing is reserved when refused; a key without a token budget costs nothing (no round trip).
        """

    async def release(self, key: ApiKey, admission: Admission, tokens: int) -> None:
        """The request finished having used ``tokens`` (prompt + completion); its reservation is settled."""

    async def close(self) -> None: ...


def _period(period: str | None, now: float) -> tuple[str, float]:
    """(id, end) of the budget period containing ``now``: a UTC day or month."""
    t = time.gmtime(now)
    if period == "month":
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return f"{t.tm_year}-{t.tm_mon:02d}", float(calendar.timegm((year, month, 1, 0, 0, 0)))
    start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    return f"{t.tm_year}-{t.tm_mon:02d}-{t.tm_mday:02d}", float(start + 86400)


def _short_of_budget(key: ApiKey, tokens: int, used: int) -> str:
    limits = key.limits
    assert limits.token_budget is not None
    return (f"this request may use up to {tokens} tokens (prompt + max_tokens) but only "
            f"{max(0, limits.token_budget - used)} of this API key's token budget of {limits.token_budget} "
            f"for the {limits.budget_period} remain")


def _retry(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _headers(key: ApiKey, requests_used: int, tokens_used: int, minute_end: float, now: float) -> dict[str, str]:
    out: dict[str, str] = {}
    reset = f"{max(0.0, minute_end - now):.0f}s"
    if key.limits.rpm is not None:
        out.update({"x-ratelimit-limit-requests": str(key.limits.rpm),
                    "x-ratelimit-remaining-requests": str(max(0, key.limits.rpm - requests_used)),
                    "x-ratelimit-reset-requests": reset})
    if key.limits.tpm is not None:
        out.update({"x-ratelimit-limit-tokens": str(key.limits.tpm),
                    "x-ratelimit-remaining-tokens": str(max(0, key.limits.tpm - tokens_used)),
                    "x-ratelimit-reset-tokens": reset})
    return out


def _refuse(which: str, key: ApiKey, retry_after: float, headers: dict[str, str],
            detail: str | None = None) -> InhouseError:
    """The 429 for the limit ``which``; ``detail`` replaces the standard message."""
    limits = key.limits
    messages = {
        "concurrency": (ErrorCode.RATE_LIMITED,
                        f"too many concurrent requests for this API key (limit {limits.max_concurrency})"),
        "rpm": (ErrorCode.RATE_LIMITED, f"rate limit reached for this API key: {limits.rpm} requests per minute"),
        "tpm": (ErrorCode.RATE_LIMITED, f"rate limit reached for this API key: {limits.tpm} tokens per minute"),
        "budget": (ErrorCode.QUOTA_EXCEEDED,
                   f"this API key used its token budget of {limits.token_budget} for the {limits.budget_period}"),
    }
    code, message = messages[which]
    message = detail or message
    return InhouseError(code, message + f"; retry in {_retry(retry_after)} s", retry_after=_retry(retry_after),
                        headers=headers)


class MemoryLimiter:
    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}
        self._requests: dict[str, tuple[int, int]] = {}  # key id -> (minute, count)
        self._tokens: dict[str, tuple[int, int]] = {}  # key id -> (minute, tokens)
        self._budget: dict[str, tuple[str, int]] = {}  # key id -> (period id, tokens)

    async def acquire(self, key: ApiKey) -> Admission:
        limits = key.limits
        admission = Admission(key.id)
        if not limits.any:
            return admission
        now = time.time()
        minute = int(now // 60)
        minute_end = (minute + 1) * 60.0
        requests = self._requests.get(key.id, (minute, 0))
        requests_used = requests[1] if requests[0] == minute else 0
        tokens = self._tokens.get(key.id, (minute, 0))
        tokens_used = tokens[1] if tokens[0] == minute else 0
        headers = _headers(key, requests_used, tokens_used, minute_end, now)
        if limits.max_concurrency is not None and self._in_flight.get(key.id, 0) >= limits.max_concurrency:
            raise _refuse("concurrency", key, 1, headers)
        if limits.rpm is not None and requests_used >= limits.rpm:
            raise _refuse("rpm", key, minute_end - now, headers)
        if limits.tpm is not None and tokens_used >= limits.tpm:
            raise _refuse("tpm", key, minute_end - now, headers)
        if limits.token_budget is not None:
            period, period_end = _period(limits.budget_period, now)
            budget = self._budget.get(key.id, (period, 0))
            if budget[0] == period and budget[1] >= limits.token_budget:
                raise _refuse("budget", key, period_end - now, headers)
        self._requests[key.id] = (minute, requests_used + 1)
        if limits.max_concurrency is not None:
            self._in_flight[key.id] = self._in_flight.get(key.id, 0) + 1
            admission.concurrent = True
        admission.headers = _headers(key, requests_used + 1, tokens_used, minute_end, now)
        return admission

    def _budget_used(self, key_id: str, period: str) -> int:
        budget = self._budget.get(key_id, (period, 0))
        return budget[1] if budget[0] == period else 0

    async def reserve(self, key: ApiKey, admission: Admission, tokens: int) -> None:
        limits = key.limits
        if limits.token_budget is None or tokens <= 0:
            return
        now = time.time()
        period, period_end = _period(limits.budget_period, now)
        used = self._budget_used(key.id, period)
        if used + tokens > limits.token_budget:
            raise _refuse("budget", key, period_end - now, admission.headers, _short_of_budget(key, tokens, used))
        self._budget[key.id] = (period, used + tokens)  # no await since the check: atomic on the event loop
        admission.reserved, admission.reserved_period = admission.reserved + tokens, period

    async def release(self, key: ApiKey, admission: Admission, tokens: int) -> None:
        if admission.concurrent:
            self._in_flight[key.id] = max(0, self._in_flight.get(key.id, 0) - 1)
        tokens = max(0, tokens)
        if not key.limits.any:
            return
        now = time.time()
        if tokens > 0:
            minute = int(now // 60)
            current = self._tokens.get(key.id, (minute, 0))
            self._tokens[key.id] = (minute, (current[1] if current[0] == minute else 0) + tokens)
        if key.limits.token_budget is not None and tokens != admission.reserved:
            period, _ = _period(key.limits.budget_period, now)
            if admission.reserved_period in ("", period):  # a reservation from a period that has ended is moot
                self._budget[key.id] = (period, max(0, self._budget_used(key.id, period) + tokens - admission.reserved))

    async def close(self) -> None:
        return None


# KEYS: 1 in-flight zset, 2 requests this minute, 3 tokens this minute, 4 budget this period
# ARGV: 1 now, 2 slot, 3 max_concurrency, 4 rpm, 5 tpm, 6 budget, 7 stale before, 8 budget ttl
# returns {refused-by (0 none, 1 concurrency, 2 rpm, 3 tpm, 4 budget), requests used, tokens used}
_ACQUIRE = """
local conc, rpm, tpm, budget = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local requests = tonumber(redis.call('GET', KEYS[2]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[3]) or '0')
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[7])
  if redis.call('ZCARD', KEYS[1]) >= conc then return {1, requests, tokens} end
end
if rpm >= 0 and requests >= rpm then return {2, requests, tokens} end
if tpm >= 0 and tokens >= tpm then return {3, requests, tokens} end
if budget >= 0 and tonumber(redis.call('GET', KEYS[4]) or '0') >= budget then return {4, requests, tokens} end
requests = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], 120)
if conc >= 0 then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], 3600)
end
return {0, requests, tokens}
"""

# KEYS: 1 budget this period; ARGV: 1 tokens, 2 budget, 3 budget ttl
# returns {reserved (1) or refused (0), budget used before}
_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, used} end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, used}
"""

# KEYS: 1 in-flight zset, 2 tokens this minute, 3 budget of the request's period
# ARGV: 1 slot, 2 tokens (for TPM), 3 budget change (tokens - reserved; negative gives back), 4 budget ttl (0: none)
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local tokens, change = tonumber(ARGV[2]), tonumber(ARGV[3])
if tokens > 0 then
  redis.call('INCRBY', KEYS[2], tokens)
  redis.call('EXPIRE', KEYS[2], 120)
end
if ARGV[4] ~= '0' and change ~= 0 then
  if redis.call('INCRBY', KEYS[3], change) < 0 then redis.call('SET', KEYS[3], 0) end
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
return 1
"""


class RedisLimiter:
    def __init__(self, url: str, prefix: str = "inhouse:rl") -> None:
        import redis.asyncio as redis

        self._redis: Any = redis.from_url(url)
        self._prefix = prefix
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._reserve = self._redis.register_script(_RESERVE)
        self._release = self._redis.register_script(_RELEASE)
        self._instance = uuid.uuid4().hex[:12]  # slots are "<instance>-<n>": unique without a uuid per request
        self._slots = itertools.count()

    def _keys(self, key: ApiKey, now: float) -> tuple[str, str, str, str, float]:
        minute = int(now // 60)
        period, period_end = _period(key.limits.budget_period, now)
        base = f"{self._prefix}:{key.id}"
        budget = self._budget_key(key, period)
        return f"{base}:inflight", f"{base}:req:{minute}", f"{base}:tok:{minute}", budget, period_end

    def _budget_key(self, key: ApiKey, period: str) -> str:
        return f"{self._prefix}:{key.id}:budget:{period}"

    async def acquire(self, key: ApiKey) -> Admission:
        limits = key.limits
        admission = Admission(key.id, slot=f"{self._instance}-{next(self._slots)}")
        if not limits.any:
            return admission
        now = time.time()
        inflight, req, tok, budget, period_end = self._keys(key, now)
        minute_end = (int(now // 60) + 1) * 60.0

        def arg(v: int | None) -> int:
            return -1 if v is None else v

        refused, requests_used, tokens_used = await self._acquire(
            keys=[inflight, req, tok, budget],
            args=[now, admission.slot, arg(limits.max_concurrency), arg(limits.rpm), arg(limits.tpm),
                  arg(limits.token_budget), now - _STALE_SLOT_SECONDS, int(period_end - now) + 3600])
        headers = _headers(key, int(requests_used), int(tokens_used), minute_end, now)
        if refused:
            which = {1: "concurrency", 2: "rpm", 3: "tpm", 4: "budget"}[int(refused)]
            wait = {"concurrency": 1.0, "budget": period_end - now}.get(which, minute_end - now)
            raise _refuse(which, key, wait, headers)
        admission.concurrent = limits.max_concurrency is not None
        admission.headers = headers
        return admission

    async def reserve(self, key: ApiKey, admission: Admission, tokens: int) -> None:
        limits = key.limits
        if limits.token_budget is None or tokens <= 0:
            return
        now = time.time()
        period, period_end = _period(limits.budget_period, now)
        reserved, used = await self._reserve(keys=[self._budget_key(key, period)],
                                             args=[tokens, limits.token_budget, int(period_end - now) + 3600])
        if not int(reserved):
            raise _refuse("budget", key, period_end - now, admission.headers,
                          _short_of_budget(key, tokens, int(used)))
        admission.reserved, admission.reserved_period = admission.reserved + tokens, period

    async def release(self, key: ApiKey, admission: Admission, tokens: int) -> None:
        if not key.limits.any:
            return
        tokens = max(0, tokens)
        now = time.time()
        inflight, _req, tok, budget, period_end = self._keys(key, now)
        if admission.reserved_period:  # charged to the period it was reserved in
            budget = self._budget_key(key, admission.reserved_period)
        ttl = int(period_end - now) + 3600 if key.limits.token_budget is not None else 0
        await self._release(keys=[inflight, tok, budget],
                            args=[admission.slot, tokens, tokens - admission.reserved, ttl])

    async def close(self) -> None:
        await self._redis.aclose()
