"""wbcache: a write-behind cache in front of Postgres (the shared core and the API)."""
