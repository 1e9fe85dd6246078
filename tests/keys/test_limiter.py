"""Per-key limits in memory and in a real Redis: the same behaviour from both."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from inhouse.errors import ErrorCode, InhouseError
from inhouse.keys.limiter import Limiter, MemoryLimiter, RedisLimiter
from inhouse.keys.store import ApiKey, KeyLimits
from tests.services import RedisServer


def make_key(name: str, **limits: object) -> ApiKey:
    return ApiKey(id=f"key_{name}_{time.time_ns()}", name=name, prefix="ih-xxxxxxxx", admin=False, models=None,
                  limits=KeyLimits(**limits), created_at=0.0, expires_at=None, revoked_at=None)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    if request.param == "memory":
        yield MemoryLimiter()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    shared = RedisLimiter(server.url)
    yield shared
    await shared.close()


async def refused(limiter: Limiter, key: ApiKey) -> InhouseError:
    with pytest.raises(InhouseError) as info:
        await limiter.acquire(key)
    return info.value


async def test_requests_per_minute(limiter: Limiter) -> None:
    key = make_key("rpm", rpm=2)
    first = await limiter.acquire(key)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    await limiter.acquire(key)
    error = await refused(limiter, key)
    assert error.code is ErrorCode.RATE_LIMITED and error.status == 429
    seconds_left = 60 - time.time() % 60
    assert error.retry_after is not None and abs(error.retry_after - seconds_left) <= 1.5
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert "2 requests per minute" in error.message


async def test_concurrency_is_released(limiter: Limiter) -> None:
    key = make_key("conc", max_concurrency=1)
    held = await limiter.acquire(key)
    assert (await refused(limiter, key)).retry_after == 1
    await limiter.release(key, held, 0)
    await limiter.release(key, await limiter.acquire(key), 0)


async def test_tokens_per_minute_count_real_usage(limiter: Limiter) -> None:
    key = make_key("tpm", tpm=100)
    await limiter.release(key, await limiter.acquire(key), 60)
    second = await limiter.acquire(key)  # 60 < 100: admitted
    assert second.headers["x-ratelimit-remaining-tokens"] == "40"
    await limiter.release(key, second, 60)
    error = await refused(limiter, key)
    assert "100 tokens per minute" in error.message and error.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_token_budget_is_a_quota(limiter: Limiter) -> None:
    key = make_key("budget", token_budget=50, budget_period="day")
    await limiter.release(key, await limiter.acquire(key), 50)
    error = await refused(limiter, key)
    assert error.code is ErrorCode.QUOTA_EXCEEDED and error.to_dict()["error"]["type"] == "insufficient_quota"
    assert error.retry_after is not None and error.retry_after <= 86400


async def test_unlimited_keys_cost_nothing(limiter: Limiter) -> None:
    key = make_key("free")
    for _ in range(50):
        admission = await limiter.acquire(key)
        assert admission.headers == {}
        await limiter.release(key, admission, 1000)


async def test_two_redis_limiters_share_one_limit(redis_server: RedisServer) -> None:
    a, b = RedisLimiter(redis_server.url), RedisLimiter(redis_server.url)
    key = make_key("shared", rpm=3)
    try:
        await a.acquire(key)
        await b.acquire(key)
        await a.acquire(key)
        assert (await refused(b, key)).code is ErrorCode.RATE_LIMITED
    finally:
        await a.close()
        await b.close()
