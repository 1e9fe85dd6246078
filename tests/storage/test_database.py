"""Database: migrations on real SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text

from inhouse.storage.database import Database, StorageError
from inhouse.storage.schema import MIGRATIONS, schema_version


def test_migrate_creates_the_schema_once(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert db.migrate() == len(MIGRATIONS)
        assert db.migrate() == len(MIGRATIONS)  # a second start changes nothing
        with db.begin() as conn:
            assert conn.execute(select(schema_version.c.version)).scalar_one() == len(MIGRATIONS)
            assert conn.execute(text("SELECT count(*) FROM inhouse_audit_head")).scalar_one() == 1
    finally:
        db.close()


def test_a_newer_schema_is_refused_with_the_fix(database_url: str) -> None:
    db = Database(database_url)
    try:
        db.migrate()
        with db.begin() as conn:
            conn.execute(schema_version.update().values(version=len(MIGRATIONS) + 1))
        with pytest.raises(StorageError, match="upgrade inhouse"):
            db.migrate()
    finally:
        db.close()


def test_bad_urls_are_explained() -> None:
    with pytest.raises(StorageError, match="not a database URL"):
        Database("not a url")
    with pytest.raises(StorageError, match="only sqlite and postgresql"):
        Database("mysql://x@localhost/db")


def test_sqlite_runs_in_wal_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        db.migrate()
        with db.begin() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
    finally:
        db.close()
