"""Database: one SQLAlchemy engine for SQLite (WAL) or PostgreSQL, migrated to the current schema.

Owns connecting, the SQLite pragmas, and applying ``schema.MIGRATIONS`` under a lock so that several
replicas starting at once migrate exactly once.  Callers use ``begin()`` for a transaction.  All calls
block: async code runs them in a thread (the audit writer has its own).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, event, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.pool import NullPool

from inhouse.storage.schema import MIGRATIONS, schema_version

__all__ = ["Database", "StorageError"]

log = logging.getLogger("inhouse.storage")


class StorageError(Exception):
    """The database cannot be opened or migrated; the message names the URL (without password) and the fix."""


class Database:
    def __init__(self, url: str, sqlite_sync: str = "normal") -> None:
        """``sqlite_sync``: ``normal`` (WAL default) keeps every commit through a crash or SIGKILL of the
        process; ``full`` also through a power cut or OS crash, at an fsync per commit."""
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise StorageError(f"database_url {url!r} is not a database URL (sqlite:///path or postgresql://...)") \
                from None
        self.url = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(parsed, poolclass=NullPool if parsed.database == ":memory:" else None,
                                                connect_args={"check_same_thread": False, "timeout": 30})
            sync = {"normal": "NORMAL", "full": "FULL"}[sqlite_sync]
            event.listen(self.engine, "connect", lambda conn, _record: _sqlite_pragmas(conn, sync))
            # BEGIN IMMEDIATE: a writer takes the write lock at the start, so two processes never deadlock
            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        elif self.dialect == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            self.engine = create_engine(parsed, pool_size=4, max_overflow=4, pool_pre_ping=True)
        else:
            raise StorageError(f"database_url {self.url}: only sqlite and postgresql are supported")

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def migrate(self) -> int:
        """Bring the schema to the latest version; returns it."""
        try:
            with self.begin() as conn:
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(7346295)"))  # one migrator at a time
                schema_version.create(conn, checkfirst=True)
                current = conn.execute(select(schema_version.c.version)).scalar()
                if current is None:
                    current = 0
                    conn.execute(schema_version.insert().values(version=0))
                if current > len(MIGRATIONS):
                    raise StorageError(f"database {self.url} is at schema version {current}, newer than this "
                                       f"inhouse ({len(MIGRATIONS)}); upgrade inhouse")
                for version in range(current, len(MIGRATIONS)):
                    log.info("database %s: migrating schema %d -> %d", self.url, version, version + 1)
                    MIGRATIONS[version](conn)
                    conn.execute(schema_version.update().values(version=version + 1))
                return len(MIGRATIONS)
        except OperationalError as exc:
            raise StorageError(f"cannot open database {self.url}: {exc.orig}") from None

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, sync: str) -> None:
    # the pysqlite driver opens transactions itself unless told not to; SQLAlchemy's "begin" event does it
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={sync}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
