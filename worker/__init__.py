"""The wbcache worker: arq jobs that persist accepted writes to Postgres."""
