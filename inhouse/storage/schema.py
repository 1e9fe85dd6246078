"""The tables, and the numbered migrations that create and change them.

Owns the schema only.  A migration is a function of a connection; ``MIGRATIONS[i]`` takes the schema
from version ``i`` to ``i + 1``.  Append new ones, never edit old ones: databases in the field are at
every version ever shipped.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    text,
)

__all__ = ["MIGRATIONS", "api_keys", "audit_head", "audit_log", "metadata", "schema_version"]

metadata = MetaData()

schema_version = Table(
    "inhouse_schema_version", metadata,
    Column("version", Integer, nullable=False),
)

api_keys = Table(
    "inhouse_api_keys", metadata,
    Column("id", String(32), primary_key=True),  # "key_" + 12 hex: shown in lists and audit rows
    Column("name", String(200), nullable=False),
    Column("prefix", String(16), nullable=False),  # the secret's first characters, for recognising it
    Column("secret_hash", String(64), nullable=False, unique=True),  # sha256 hex of the whole secret
    Column("admin", Boolean, nullable=False, default=False),
    Column("models", Text),  # JSON list of allowed model names; NULL: every model
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("max_concurrency", Integer),
    Column("token_budget", BigInteger),
    Column("budget_period", String(8)),  # day | month
    Column("expires_at", Float),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

audit_log = Table(
    "inhouse_audit_log", metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),  # assigned under the chain lock
    Column("at", Float, nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("key_id", String(32)),
    Column("key_name", String(200)),
    Column("client_ip", String(64)),
    Column("method", String(8), nullable=False),
    Column("path", String(200), nullable=False),
    Column("model", String(200)),  # as asked
    Column("served_model", String(200)),  # what answered (a fallback may differ)
    Column("deployment", String(200)),
    Column("status", Integer, nullable=False),
    Column("error_code", String(64)),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("stream", Boolean, nullable=False, default=False),
    Column("finish_reason", String(32)),
    Column("prompt_text", Text),
    Column("response_text", Text),
    Column("prev_hash", String(64), nullable=False),
    Column("row_hash", String(64), nullable=False),
    Column("client_subject", String(500)),  # the client certificate's subject (mTLS); schema v3
    Column("model_version", String(200)),  # the version that answered; schema v4
)

# One row (id 1): the chain's last seq and hash.  Writers lock it, so replicas sharing one database
# append to one chain, and a deleted last row is still detected.
audit_head = Table(
    "inhouse_audit_head", metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("row_hash", String(64), nullable=False),
)

GENESIS = "0" * 64


def _v1(conn: Connection) -> None:
    for table in (api_keys, audit_log, audit_head):
        table.create(conn)
    conn.execute(audit_head.insert().values(id=1, seq=0, row_hash=GENESIS))


def _v2(conn: Connection) -> None:
    # plain SQL: an Index object would attach itself to the shared Table and be created again by _v1
    conn.execute(text("CREATE INDEX ix_inhouse_audit_at ON inhouse_audit_log (at)"))
    conn.execute(text("CREATE INDEX ix_inhouse_audit_key ON inhouse_audit_log (key_id, at)"))


def _add_column(conn: Connection, table: str, column: str, sql_type: str) -> None:
    """ALTER TABLE ... ADD COLUMN, unless _v1 already created the table with it (a new database)."""
    if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))


def _v3(conn: Connection) -> None:
    _add_column(conn, "inhouse_audit_log", "client_subject", "VARCHAR(500)")


def _v4(conn: Connection) -> None:
    _add_column(conn, "inhouse_audit_log", "model_version", "VARCHAR(200)")


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4]
