"""Per-key limits in memory and in a real Redis: the same behaviour from both."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from inhouse.errors import ErrorCode, InhouseError
from inhouse.keys.limiter import Admission, Limiter, MemoryLimiter, RedisLimiter
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


async def admitted_reserve(limiter: Limiter, key: ApiKey, tokens: int) -> Admission:
    admission = await limiter.acquire(key)
    await limiter.reserve(key, admission, tokens)
    return admission


async def test_a_reservation_that_does_not_fit_is_refused_and_reserves_nothing(limiter: Limiter) -> None:
    key = make_key("reserve", token_budget=30, budget_period="day")
    first = await admitted_reserve(limiter, key, 20)
    assert first.reserved == 20
    second = await limiter.acquire(key)  # 20 < 30: admitted, but 20 more do not fit
    with pytest.raises(InhouseError) as info:
        await limiter.reserve(key, second, 20)
    error = info.value
    assert error.code is ErrorCode.QUOTA_EXCEEDED and error.status == 429 and second.reserved == 0
    assert error.retry_after is not None and 1 <= error.retry_after <= 86400
    assert "up to 20 tokens" in error.message and "only 10" in error.message and "budget of 30" in error.message
    await limiter.reserve(key, second, 10)  # the refused reservation took nothing: exactly 10 remain
    with pytest.raises(InhouseError):
        await admitted_reserve(limiter, key, 1)


async def test_concurrent_reservations_never_exceed_the_budget(limiter: Limiter) -> None:
    key = make_key("parallel", token_budget=30, budget_period="day")
    admissions = [await limiter.acquire(key) for _ in range(8)]
    outcomes = await asyncio.gather(*(limiter.reserve(key, a, 10) for a in admissions), return_exceptions=True)
    refusals = [o for o in outcomes if isinstance(o, InhouseError)]
    assert len(refusals) == 5 and all(r.code is ErrorCode.QUOTA_EXCEEDED for r in refusals)
    assert sorted(a.reserved for a in admissions) == [0] * 5 + [10] * 3


async def test_release_gives_back_what_a_reservation_did_not_use(limiter: Limiter) -> None:
    key = make_key("giveback", token_budget=30, budget_period="month", tpm=1000)
    await limiter.release(key, await admitted_reserve(limiter, key, 25), 5)  # used 5 of 25: 25 remain
    failed = await admitted_reserve(limiter, key, 25)
    assert failed.headers["x-ratelimit-remaining-tokens"] == "995"  # TPM counts the 5 real tokens only
    await limiter.release(key, failed, 0)  # a request that failed gives its whole reservation back
    await limiter.release(key, await admitted_reserve(limiter, key, 25), 20)  # 5 remain after 5 + 20
    with pytest.raises(InhouseError) as info:
        await admitted_reserve(limiter, key, 6)
    assert info.value.code is ErrorCode.QUOTA_EXCEEDED and "only 5" in info.value.message
    await admitted_reserve(limiter, key, 5)


async def test_usage_beyond_the_reservation_is_charged(limiter: Limiter) -> None:
    key = make_key("beyond", token_budget=30, budget_period="day")
    await limiter.release(key, await admitted_reserve(limiter, key, 10), 25)  # 15 more than reserved
    with pytest.raises(InhouseError):
        await admitted_reserve(limiter, key, 6)
    await admitted_reserve(limiter, key, 5)


async def test_reserve_is_free_without_a_token_budget(limiter: Limiter) -> None:
    for key in (make_key("none"), make_key("rpm-only", rpm=100, tpm=10)):
        admission = await admitted_reserve(limiter, key, 10**9)
        assert admission.reserved == 0
        await limiter.release(key, admission, 5)


async def test_reserve_without_a_budget_makes_no_redis_round_trip() -> None:
    unreachable = RedisLimiter("redis://127.0.0.1:1")  # any call to Redis would fail
    try:
        for key in (make_key("none"), make_key("rpm-only", rpm=100)):
            admission = Admission(key.id)
            await unreachable.reserve(key, admission, 10**9)
            assert admission.reserved == 0
    finally:
        await unreachable.close()


async def test_two_redis_limiters_share_one_budget(redis_server: RedisServer) -> None:
    a, b = RedisLimiter(redis_server.url), RedisLimiter(redis_server.url)
    key = make_key("shared-budget", token_budget=30, budget_period="day")
    try:
        admissions = [(limiter, await limiter.acquire(key)) for limiter in (a, b) * 4]
        outcomes = await asyncio.gather(*(limiter.reserve(key, adm, 10) for limiter, adm in admissions),
                                        return_exceptions=True)
        assert sum(o is None for o in outcomes) == 3
        assert all(isinstance(o, InhouseError) for o in outcomes if o is not None)
    finally:
        await a.close()
        await b.close()


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
