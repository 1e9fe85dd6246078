"""The audit log: one hash-chained row per API call, written durably before the call is acknowledged."""
