"""API keys (hashed at rest, scoped, revocable) and the per-key rate limiter."""
