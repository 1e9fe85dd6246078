"""KeyStore on real SQLite and PostgreSQL: secrets are shown once and stored only as hashes."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from inhouse.keys.store import KeyLimits, KeyNameError, KeyNameTakenError, KeyStore
from inhouse.storage.database import Database
from inhouse.storage.schema import api_keys


@pytest.fixture
def store(database_url: str) -> Iterator[KeyStore]:
    db = Database(database_url)
    db.migrate()
    yield KeyStore(db)
    db.close()


def test_secret_is_random_shown_once_and_stored_hashed(store: KeyStore) -> None:
    key, secret = store.create("app", models=["a"], limits=KeyLimits(rpm=5))
    _other, other_secret = store.create("app2")
    assert secret.startswith("ih-") and len(secret) >= 40 and secret != other_secret
    assert key.prefix == secret[:11] and key.id.startswith("key_")
    with store._db.begin() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(api_keys))]
    stored = repr(rows)
    assert secret not in stored and secret[11:] not in stored
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    assert "secret" not in key.public() and hashlib.sha256(secret.encode()).hexdigest() not in repr(key.public())
    assert store.find_secret(secret) == key
    assert store.find_secret(secret + "x") is None


def test_scope_limits_expiry(store: KeyStore) -> None:
    key, _ = store.create("scoped", models=["a", "b"], limits=KeyLimits(rpm=1, tpm=2, max_concurrency=3,
                                                                         token_budget=4, budget_period="day"),
                          expires_at=time.time() - 1)
    assert key.allows("a") and not key.allows("c")
    assert key.limits == KeyLimits(1, 2, 3, 4, "day")
    assert not key.usable(time.time()) and key.public()["status"] == "expired"
    with pytest.raises(ValueError, match="budget_period"):
        store.create("bad", limits=KeyLimits(token_budget=5))


def test_revoke_and_rotate(store: KeyStore) -> None:
    key, _secret = store.create("svc", models=["m"], limits=KeyLimits(rpm=7))
    rotated = store.rotate("svc")
    assert rotated is not None
    new, new_secret = rotated
    assert new.id != key.id and new.name == "svc" and new.models == ("m",) and new.limits.rpm == 7
    old = store.get(key.id)
    assert old is not None and old.revoked_at is not None
    assert store.find_secret(new_secret) == new
    revoked = store.revoke(new.id)
    assert revoked is not None and not revoked.usable(time.time())
    assert store.rotate(new.id) is None  # a revoked key cannot be rotated
    assert [k.id for k in store.list()] == [key.id, new.id]
    assert store.list(include_revoked=False) == []


FULL = KeyLimits(rpm=11, tpm=22, max_concurrency=3, token_budget=44, budget_period="month")


@pytest.mark.parametrize(("admin", "models", "limits", "expires_in"), [
    (False, [], FULL, 3600.0),  # deny-all must stay deny-all (it became "every model")
    (True, ["a", "b"], KeyLimits(token_budget=5, budget_period="day"), None),
    (False, None, KeyLimits(), None),
], ids=["deny-all", "admin-scoped", "unlimited"])
def test_rotate_copies_every_field_exactly(store: KeyStore, admin: bool, models: list[str] | None,
                                           limits: KeyLimits, expires_in: float | None) -> None:
    expires_at = time.time() + expires_in if expires_in is not None else None
    old, _ = store.create("svc", admin=admin, models=models, limits=limits, expires_at=expires_at)
    rotated = store.rotate("svc")
    assert rotated is not None
    new = rotated[0]
    assert new.models == (tuple(models) if models is not None else None)
    assert (new.name, new.admin, new.limits, new.expires_at) == (old.name, admin, limits, old.expires_at)
    if models == []:
        assert not new.allows("a") and new.public()["models"] == []
    unchanged = {"id", "prefix", "created_at", "revoked_at", "status"}
    assert {k: v for k, v in new.public().items() if k not in unchanged} == \
        {k: v for k, v in old.public().items() if k not in unchanged}


def test_names_are_unique_among_active_keys(store: KeyStore) -> None:
    first, _ = store.create("admin", admin=True)
    with pytest.raises(KeyNameTakenError, match="taken by an active key"):
        store.create("admin")  # a non-admin key must not take the admin's name
    rotated = store.rotate("admin")  # rotation keeps the name: the old key is revoked in the same transaction
    assert rotated is not None and rotated[0].name == "admin"
    with pytest.raises(KeyNameTakenError):
        store.create("admin")
    assert store.revoke("admin") is not None
    again, _ = store.create("admin")  # a revoked key's name is free again
    assert store.get("admin") == again and store.get(first.id) is not None  # by id still reaches old keys
    assert [k.id for k in store.list(include_revoked=False)] == [again.id]


def test_a_name_shaped_like_a_key_id_is_refused(store: KeyStore) -> None:
    """Keys are found by id first, so a key named like another key's id would make revoking "it" by name revoke
    the other key."""
    other, _ = store.create("svc")
    for name in (other.id, "key_0123456789ab"):
        with pytest.raises(KeyNameError, match="looks like a key id"):
            store.create(name)
    assert store.create("key_for_ci")[0].name == "key_for_ci"  # not the id shape: fine


def test_concurrent_creates_of_one_name_make_one_key(store: KeyStore) -> None:
    outcomes: list[str] = []

    def create() -> None:
        try:
            store.create("race")
            outcomes.append("created")
        except KeyNameTakenError:
            outcomes.append("taken")

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created"] + ["taken"] * 5
    assert len([k for k in store.list(include_revoked=False) if k.name == "race"]) == 1


def test_rotating_twice_concurrently_leaves_one_active_key(store: KeyStore) -> None:
    key, _ = store.create("twice")
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(store.rotate(key.id))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([r for r in results if r is not None]) == 1
    assert len([k for k in store.list(include_revoked=False) if k.name == "twice"]) == 1


def test_expiry_must_be_a_finite_time(store: KeyStore) -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="expires_at"):
            store.create("never", expires_at=bad)
    assert store.get("never") is None


def test_cache_remembers_hits_and_misses_briefly(store: KeyStore) -> None:
    store._cache_seconds = 0.2
    key, secret = store.create("c")
    assert store.cached(secret) == (False, None)
    store.remember(secret, key)
    store.remember("ih-bogus", None)
    assert store.cached(secret) == (True, key) and store.cached("ih-bogus") == (True, None)
    time.sleep(0.25)
    assert store.cached(secret) == (False, None)
