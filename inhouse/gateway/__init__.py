"""Policy over engines: which engine answers a model name."""
