"""Durable state: API keys and the audit log, in SQLite (embedded default) or PostgreSQL."""
