"""Private Redis and PostgreSQL server processes.

Two users: the test suite (throwaway servers that it stops, SIGKILLs and restarts) and
``wbcache up`` (servers for a laptop whose data lives under a directory that survives
restarts).  Both servers run in a session of their own (so a terminal's Ctrl-C reaches only
the owner, which decides the stop order), listen on 127.0.0.1 only, and log to a file in
their data directory.  Redis is a child of this process; PostgreSQL is started and stopped by
``pg_ctl -w``.  Process control goes through psutil (service.dev.processes).

Layout of a data directory::

    <data_dir>/wbcache-<kind>.pid   JSON: pid, port, binary, start time (see cleanup_orphan)
    <data_dir>/<kind>.log           server output, appended on every start
    <data_dir>/appendonlydir/       Redis AOF (RedisServer)
    <data_dir>/pgdata/              PostgreSQL cluster (PostgresServer; initdb on first start)

Modules: ``server`` (the lifecycle both share), ``redis_server``, ``postgres_server``,
``binaries`` (where the server binaries come from), ``processes`` (psutil).

Servers still running when the interpreter exits normally are stopped by an atexit hook.  A
server left behind by a process that was SIGKILLed is found through its pid file by
``cleanup_orphan(data_dir)``; ``start()`` refuses to run next to such an orphan.
"""

from service.dev.binaries import find_postgres_bindir, find_redis_server
from service.dev.postgres_server import PostgresServer
from service.dev.redis_server import RedisServer
from service.dev.server import EmbeddedServerError, free_port

__all__ = [
    "EmbeddedServerError",
    "PostgresServer",
    "RedisServer",
    "find_postgres_bindir",
    "find_redis_server",
    "free_port",
]
