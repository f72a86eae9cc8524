"""HTTP routers: records, operations (stats, health, invalidate, metrics)."""
