"""Reference apps for ``python -m bench.suite``, served like ``wbcache serve`` (uvicorn,
uvloop, httptools, one process, no access log): ``ceiling`` (no storage at all) and
``write_through`` (Postgres upsert then Redis SET, synchronously)."""
