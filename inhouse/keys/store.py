"""KeyStore: API keys in the database, hashed, with a short verification cache.

Owns creating, listing, revoking and rotating keys, and turning a presented secret into an ``ApiKey``.
A secret is ``ih-`` + 43 url-safe characters (32 random bytes); only its SHA-256 and its first
characters (for recognising it in lists) are stored, and it is printed once, at creation.
Names are unique among active (not revoked) keys: ``create`` refuses a taken one with
``KeyNameTakenError``, and a name shaped like a key id (found by id first, it would stand for another key) with
``KeyNameError``; ``rotate`` revokes the old key and creates its copy in one transaction.
``authenticate`` hashes the secret and looks the hash up in a cache that lives ``cache_seconds``
(2 s by default), so auth costs microseconds and a revoke reaches every replica within that time.
Blocking calls (database) are the callers' to run in a thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select, text

from inhouse.storage.database import Database
from inhouse.storage.schema import api_keys

__all__ = ["ApiKey", "KeyLimits", "KeyNameError", "KeyNameTakenError", "KeyStore", "hash_secret"]

SECRET_PREFIX = "ih-"
_CACHE_MAX = 10_000  # distinct secrets remembered; random bad keys must not grow memory without bound
_NAME_LOCK = 7346296  # PostgreSQL advisory lock space for key names (with hashtext(name) as the second key)
_ID_SHAPE = re.compile(r"key_[0-9a-f]{12}")  # what _new_row makes ids of


class KeyNameError(ValueError):
    """A name a new key may not have; the message is written for people."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class KeyNameTakenError(KeyNameError):
    """An active key already has this name: names are unique among keys that are not revoked."""

    def __init__(self, name: str) -> None:
        super().__init__(name, f"the name {name!r} is taken by an active key; revoke or rotate that key, "
                         "or choose another name")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyLimits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    token_budget: int | None = None
    budget_period: str | None = None  # day | month

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrency, self.token_budget))


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    admin: bool
    models: tuple[str, ...] | None  # None: every model
    limits: KeyLimits
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict[str, Any]:
        """What lists, the admin API and ``keys show`` print: never the secret or its hash."""
        return {"id": self.id, "name": self.name, "prefix": self.prefix, "admin": self.admin,
                "models": list(self.models) if self.models is not None else None,
                "rpm": self.limits.rpm, "tpm": self.limits.tpm, "max_concurrency": self.limits.max_concurrency,
                "token_budget": self.limits.token_budget, "budget_period": self.limits.budget_period,
                "created_at": self.created_at, "expires_at": self.expires_at, "revoked_at": self.revoked_at,
                "status": "revoked" if self.revoked_at else
                ("expired" if self.expires_at is not None and time.time() >= self.expires_at else "active")}


def _row_to_key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id, name=row.name, prefix=row.prefix, admin=bool(row.admin),
        models=tuple(json.loads(row.models)) if row.models is not None else None,
        limits=KeyLimits(rpm=row.rpm, tpm=row.tpm, max_concurrency=row.max_concurrency,
                         token_budget=row.token_budget, budget_period=row.budget_period),
        created_at=row.created_at, expires_at=row.expires_at, revoked_at=row.revoked_at,
    )


def _new_row(name: str, admin: bool, models: list[str] | None, limits: KeyLimits, expires_at: float | None,
             secret: str | None) -> tuple[dict[str, Any], str]:
    """The row of a new key (checked) and its secret."""
    if limits.token_budget is not None and limits.budget_period not in ("day", "month"):
        raise ValueError("a token budget needs budget_period day or month")
    if expires_at is not None and not math.isfinite(expires_at):
        raise ValueError("expires_at must be a finite time (unix seconds)")
    secret = secret or SECRET_PREFIX + secrets.token_urlsafe(32)
    row = {"id": "key_" + secrets.token_hex(6), "name": name, "prefix": secret[:11],
           "secret_hash": hash_secret(secret), "admin": admin,
           "models": json.dumps(models) if models is not None else None,
           "rpm": limits.rpm, "tpm": limits.tpm, "max_concurrency": limits.max_concurrency,
           "token_budget": limits.token_budget, "budget_period": limits.budget_period,
           "expires_at": expires_at, "created_at": time.time(), "revoked_at": None}
    return row, secret


def _active_named(conn: Connection, name: str) -> bool:
    query = select(func.count()).select_from(api_keys).where(api_keys.c.name == name,
                                                              api_keys.c.revoked_at.is_(None))
    return bool(conn.execute(query).scalar())


class KeyStore:
    def __init__(self, db: Database, cache_seconds: float = 2.0) -> None:
        self._db = db
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}

    # ------------------------------------------------------------------ management (blocking)

    def create(self, name: str, *, admin: bool = False, models: list[str] | None = None,
               limits: KeyLimits | None = None, expires_at: float | None = None,
               secret: str | None = None) -> tuple[ApiKey, str]:
        """A new key and its secret (shown once).  ``secret`` adopts a given one (the admin key from env).

        Raises ``KeyNameTakenError`` if an active key has this name, ``KeyNameError`` for a name shaped like a
        key id, ``ValueError`` for a token budget without a period or an expiry that is not a finite time.
        """
        if _ID_SHAPE.fullmatch(name):
            raise KeyNameError(name, f"the name {name!r} looks like a key id (key_ and 12 hex digits); "
                               "keys are found by id first, so choose another name")
        row, secret = _new_row(name, admin, models, limits or KeyLimits(), expires_at, secret)
        with self._db.begin() as conn:
            self._lock_name(conn, name)
            if _active_named(conn, name):
                raise KeyNameTakenError(name)
            conn.execute(api_keys.insert().values(**row))
        key = self.get(row["id"])
        assert key is not None
        return key, secret

    def list(self, include_revoked: bool = True) -> list[ApiKey]:
        query = select(api_keys).order_by(api_keys.c.created_at)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self._db.begin() as conn:
            return [_row_to_key(r) for r in conn.execute(query)]

    def get(self, id_or_name: str) -> ApiKey | None:
        """By id, else by name: the active key of that name (there is at most one), else the newest revoked one."""
        with self._db.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == id_or_name)).first()
            if row is None:
                row = conn.execute(select(api_keys).where(api_keys.c.name == id_or_name)
                                   .order_by(api_keys.c.revoked_at.is_(None).desc(), api_keys.c.created_at.desc())
                                   ).first()
        return _row_to_key(row) if row is not None else None

    def revoke(self, id_or_name: str) -> ApiKey | None:
        key = self.get(id_or_name)
        if key is None:
            return None
        if key.revoked_at is None:
            with self._db.begin() as conn:
                conn.execute(api_keys.update().where(api_keys.c.id == key.id).values(revoked_at=time.time()))
        self._cache.clear()
        return self.get(key.id)

    def rotate(self, id_or_name: str) -> tuple[ApiKey, str] | None:
        """A new key with the same name, admin flag, models, limits and expiry; the old one is revoked.

        Both happen in one transaction, so the name is never taken twice nor left free.  None if there is
        no such key or it is revoked already (a concurrent rotate or revoke got there first).
        """
        old = self.get(id_or_name)
        if old is None or old.revoked_at is not None:
            return None
        row, secret = _new_row(old.name, old.admin, list(old.models) if old.models is not None else None,
                               old.limits, old.expires_at, None)
        with self._db.begin() as conn:
            self._lock_name(conn, old.name)
            revoked = conn.execute(api_keys.update()
                                   .where(api_keys.c.id == old.id, api_keys.c.revoked_at.is_(None))
                                   .values(revoked_at=time.time()))
            if revoked.rowcount != 1:
                return None
            conn.execute(api_keys.insert().values(**row))
        self._cache.clear()
        new = self.get(row["id"])
        assert new is not None
        return new, secret

    def has_admin(self) -> bool:
        with self._db.begin() as conn:
            return conn.execute(select(api_keys.c.id).where(api_keys.c.admin.is_(True),
                                                            api_keys.c.revoked_at.is_(None))).first() is not None

    def find_secret(self, secret: str) -> ApiKey | None:
        digest = hash_secret(secret)
        with self._db.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.secret_hash == digest)).first()
        if row is None or not hmac.compare_digest(row.secret_hash, digest):
            return None
        return _row_to_key(row)

    def _lock_name(self, conn: Connection, name: str) -> None:
        """Serialise writers of one name: PostgreSQL by an advisory lock; SQLite's BEGIN IMMEDIATE already does."""
        if self._db.dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:name))"),
                         {"space": _NAME_LOCK, "name": name})

    # ------------------------------------------------------------------ the request path

    def cached(self, secret: str) -> tuple[bool, ApiKey | None]:
        """(hit, key) from the cache alone: microseconds, no I/O."""
        entry = self._cache.get(hash_secret(secret))
        if entry is None or entry[1] < time.monotonic():
            return False, None
        return True, entry[0]

    def remember(self, secret: str, key: ApiKey | None) -> None:
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[hash_secret(secret)] = (key, time.monotonic() + self._cache_seconds)
