"""Opening inhouse's state for the CLI: the database, the keys, the limiter and the audit writer.

Owns the first-run bootstrap of the admin key and the ``auth: none`` warning.  Shared by ``serve``,
``keys`` and ``audit``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from inhouse.audit.writer import AuditWriter, TextPolicy
from inhouse.config import Settings
from inhouse.keys.limiter import Limiter, MemoryLimiter, RedisLimiter
from inhouse.keys.store import KeyStore, hash_secret
from inhouse.server.access import AccessParts
from inhouse.storage.database import Database, StorageError

__all__ = ["StateError", "add_state_flags", "database_from_args", "open_access", "open_database"]

log = logging.getLogger("inhouse")


class StateError(Exception):
    """State cannot be opened; worded for the operator."""


def add_state_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", help="sqlite:///path or postgresql://user@host/db "
                                          "(default: sqlite in --state-dir)")
    p.add_argument("--state-dir", type=Path, help="where the default SQLite database lives "
                                                  "(default: $INHOUSE_STATE_DIR or ~/.local/share/inhouse)")


def database_from_args(args: argparse.Namespace) -> Database:
    """The database of ``--config`` / ``--database-url`` / ``--state-dir`` (keys and audit commands)."""
    from inhouse.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config, {"database_url": args.database_url, "state_dir": args.state_dir})
    except ConfigError as exc:
        raise StateError(str(exc)) from None
    return open_database(settings)


def open_database(settings: Settings) -> Database:
    try:
        db = Database(settings.database, sqlite_sync=settings.audit.sqlite_sync)
        db.migrate()
    except StorageError as exc:
        raise StateError(str(exc)) from None
    return db


def open_access(settings: Settings) -> AccessParts:
    if settings.auth == "none":
        log.warning("AUTH IS OFF (auth: none): anyone who can reach %s:%d can use every model and nothing "
                    "identifies them in the audit log. Use this only in a lab.", settings.host, settings.port)
    db = open_database(settings)
    keys = None
    if settings.auth == "keys":
        keys = KeyStore(db, cache_seconds=settings.key_cache_seconds)
        _bootstrap_admin(keys, settings)
    limiter: Limiter = RedisLimiter(settings.redis_url) if settings.redis_url else MemoryLimiter()
    policy = TextPolicy(settings.audit.text, settings.audit.text_chars, settings.audit.redact)
    audit = AuditWriter(db, policy) if settings.audit.enabled else None
    if audit is None:
        log.warning("the audit log is off (audit.enabled: false): calls are not recorded")
    return AccessParts(db=db, keys=keys, limiter=limiter, audit=audit)


def _bootstrap_admin(keys: KeyStore, settings: Settings) -> None:
    if settings.admin_key:
        if keys.find_secret(settings.admin_key) is None:
            # a new secret for the bootstrap admin (a rotated Kubernetes secret): named by its prefix, since
            # names are unique among active keys and the previous admin key stays until it is revoked
            existing = keys.get("admin")
            taken = existing is not None and existing.revoked_at is None
            name = f"admin-{hash_secret(settings.admin_key)[:8]}" if taken else "admin"
            keys.create(name, admin=True, secret=settings.admin_key)
            log.info("admin key from %s registered as %r", settings.admin_key_file or settings.admin_key_env, name)
        return
    if keys.has_admin():
        return
    key, secret = keys.create("admin", admin=True)
    # Printed once, to the terminal only: the log never carries a secret.
    print(f"\n  inhouse: first run, an admin API key was created ({key.id}). It is shown only this once:\n\n"
          f"      {secret}\n\n  Keep it safe; create keys for applications with it "
          f"(inhouse keys create / POST /admin/keys).\n", file=sys.stderr, flush=True)
