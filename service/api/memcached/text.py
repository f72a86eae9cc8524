"""The text protocol's commands (protocol.txt): arguments checked, run on the items, and
the reply. ``noreply`` is the server's business (it drops the whole reply)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from service.api.memcached.door import Door
from service.api.memcached.errors import BadCommand
from service.api.memcached.ops import Item, Mode, Outcome, Stored
from service.api.memcached.parser import Request
from service.api.memcached.values import MAX_FLAGS

_BAD_FORMAT = "bad command line format"
_MAX_U64 = 2**64 - 1
_MODES = {
    b"set": Mode.SET,
    b"add": Mode.ADD,
    b"replace": Mode.REPLACE,
    b"append": Mode.APPEND,
    b"prepend": Mode.PREPEND,
    b"cas": Mode.SET,
}


def unsigned(token: bytes, limit: int, why: str = _BAD_FORMAT) -> int:
    if not token.isdigit() or len(token) > 20 or int(token) > limit:
        raise BadCommand(why)
    return int(token)


def signed(token: bytes) -> int:
    body = token[1:] if token[:1] == b"-" else token
    if not body.isdigit() or len(body) > 19:
        raise BadCommand(_BAD_FORMAT)
    return int(token)


def _args(req: Request, least: int, most: int) -> list[bytes]:
    """The arguments without a trailing ``noreply``, between ``least`` and ``most``."""
    args = req.args[:-1] if req.noreply else req.args
    if not least <= len(args) <= most:
        raise BadCommand(_BAD_FORMAT)
    return args


def _line(outcome: Outcome) -> bytes:
    """The reply line of ``outcome``: its name is memcached's word (STORED, EXISTS, ...)."""
    return outcome.name.encode() + b"\r\n"


def _value_line(key: bytes, item: Item, with_cas: bool) -> bytes:
    head = b"VALUE %s %d %d" % (key, item.flags, len(item.value))
    if with_cas:
        head += b" %d" % item.cas
    return head + b"\r\n" + item.value + b"\r\n"


async def _retrieve(door: Door, keys: list[bytes], with_cas: bool, exptime: int | None) -> bytes:
    if not keys:
        raise BadCommand(_BAD_FORMAT)
    names = [door.name(k) for k in keys]
    if len(names) == 1:  # the common get: no task of its own
        items: list[Item | None] = [await door.items.get(names[0])]
    else:  # read concurrently: the shared Redis connection sends them together
        items = list(await asyncio.gather(*(door.items.get(n) for n in names)))
    out = []
    for key, name, item in zip(keys, names, items, strict=True):
        door.stats.count_get(item is not None)
        if item is None:
            continue
        if exptime is not None:
            await door.items.touch(name, exptime)
        out.append(_value_line(key, item, with_cas))
    out.append(b"END\r\n")
    return b"".join(out)


async def get(door: Door, req: Request) -> bytes:
    return await _retrieve(door, req.args, req.command == b"gets", None)


async def gat(door: Door, req: Request) -> bytes:
    if len(req.args) < 2:
        raise BadCommand(_BAD_FORMAT)
    exptime = signed(req.args[0])
    door.stats.touches += 1
    return await _retrieve(door, req.args[1:], req.command == b"gats", exptime)


async def store(door: Door, req: Request) -> bytes:
    is_cas = req.command == b"cas"
    args = _args(req, 5 if is_cas else 4, 5 if is_cas else 4)
    name = door.name(args[0])
    flags = unsigned(args[1], MAX_FLAGS)
    exptime = signed(args[2])
    cas = unsigned(args[4], _MAX_U64) if is_cas else None
    assert req.data is not None
    door.stats.sets += 1
    done = await door.items.store_value(name, _MODES[req.command], req.data, flags, exptime, cas)
    door.stats.count_cas(is_cas, done.outcome)
    return _line(done.outcome)


async def delete(door: Door, req: Request) -> bytes:
    args = _args(req, 1, 2)
    if len(args) == 2 and args[1] != b"0":  # the legacy "delete <key> 0" only
        raise BadCommand("bad command line format.  Usage: delete <key> [noreply]")
    done = await door.items.delete(door.name(args[0]))
    door.stats.count("delete", done.outcome is Outcome.DELETED)
    return _line(done.outcome)


async def arith(door: Door, req: Request) -> bytes:
    args = _args(req, 2, 2)
    name = door.name(args[0])
    delta = unsigned(args[1], _MAX_U64, "invalid numeric delta argument")
    incr = req.command == b"incr"
    done = await door.items.arith(name, delta, incr)
    return arith_reply(door, done, incr)


def arith_reply(door: Door, done: Stored, incr: bool) -> bytes:
    door.stats.count("incr" if incr else "decr", done.outcome is Outcome.STORED)
    if done.outcome is Outcome.NON_NUMERIC:
        raise BadCommand("cannot increment or decrement non-numeric value")
    if done.outcome is Outcome.STORED:
        return done.value + b"\r\n"
    return _line(done.outcome)


async def touch(door: Door, req: Request) -> bytes:
    args = _args(req, 2, 2)
    done = await door.items.touch(door.name(args[0]), signed(args[1]))
    door.stats.count("touch", done.outcome is Outcome.TOUCHED)
    return _line(done.outcome)


async def flush_all(door: Door, req: Request) -> bytes:
    args = _args(req, 0, 1)
    if args:
        signed(args[0])  # a delay: checked, not honoured (the store is not a cache to age)
    door.stats.flushes += 1
    if not door.allow_flush:
        return (
            b"SERVER_ERROR flush_all is disabled: this store persists every write "
            b"(set MEMCACHED_ALLOW_FLUSH=true to let it delete the memcached collection)\r\n"
        )
    await door.items.flush()
    return b"OK\r\n"


async def version(door: Door, req: Request) -> bytes:
    return b"VERSION " + door.version.encode() + b"\r\n"


async def verbosity(door: Door, req: Request) -> bytes:
    args = _args(req, 1, 1)
    unsigned(args[0], _MAX_U64)
    return b"OK\r\n"


# Sub-statistics of memcached's slab allocator and LRU: a store has none to show.
_EMPTY_STATS = frozenset((b"items", b"slabs", b"sizes", b"conns"))


async def stats(door: Door, req: Request) -> bytes:
    if not req.args:
        lines = door.stats_lines()
    elif req.args[0] == b"reset":
        door.stats.reset()
        return b"RESET\r\n"
    elif req.args[0] == b"settings":
        lines = door.settings_lines()
    elif req.args[0] in _EMPTY_STATS:
        return b"END\r\n"
    else:
        return b"ERROR\r\n"  # as memcached answers a sub-command it does not know
    out = [b"STAT %s %s\r\n" % (k.encode(), str(v).encode()) for k, v in lines]
    return b"".join(out) + b"END\r\n"


Handler = Callable[[Door, Request], Awaitable[bytes]]

COMMANDS: dict[bytes, Handler] = {
    b"get": get,
    b"gets": get,
    b"gat": gat,
    b"gats": gat,
    b"set": store,
    b"add": store,
    b"replace": store,
    b"append": store,
    b"prepend": store,
    b"cas": store,
    b"delete": delete,
    b"incr": arith,
    b"decr": arith,
    b"touch": touch,
    b"flush_all": flush_all,
    b"version": version,
    b"verbosity": verbosity,
    b"stats": stats,
}
