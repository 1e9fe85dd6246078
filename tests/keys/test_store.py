"""KeyStore on real SQLite and PostgreSQL: secrets are shown once and stored only as hashes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from inhouse.keys.store import KeyLimits, KeyStore
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


def test_cache_remembers_hits_and_misses_briefly(store: KeyStore) -> None:
    store._cache_seconds = 0.2
    key, secret = store.create("c")
    assert store.cached(secret) == (False, None)
    store.remember(secret, key)
    store.remember("ih-bogus", None)
    assert store.cached(secret) == (True, key) and store.cached("ih-bogus") == (True, None)
    time.sleep(0.25)
    assert store.cached(secret) == (False, None)
