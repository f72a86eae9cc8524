"""The meta commands (protocol.txt, "Meta Commands"): ``mg``, ``ms``, ``md``, ``ma``, ``mn``.

Flags are single letters, some with a token; the flags that return data are answered in
the order the client sent them. ``q`` hides the success codes (``HD``, and ``EN`` of a
miss), never an error. Flags about memcached's own LRU and stale items (``N``/``R``
vivify-on-miss for mg, ``I`` invalidate, ``E`` explicit cas) have no meaning on a store
whose cas is the record's version: ``CLIENT_ERROR`` names them rather than ignore them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable

from service.api.memcached.door import Door
from service.api.memcached.errors import BadCommand
from service.api.memcached.ops import Mode, Outcome, Stored
from service.api.memcached.parser import Request
from service.api.memcached.text import arith_reply, signed, unsigned
from service.api.memcached.values import MAX_FLAGS

_MAX_U64 = 2**64 - 1
_CODES = {
    Outcome.STORED: b"HD",
    Outcome.DELETED: b"HD",
    Outcome.TOUCHED: b"HD",
    Outcome.NOT_STORED: b"NS",
    Outcome.EXISTS: b"EX",
    Outcome.NOT_FOUND: b"NF",
}
_SET_MODES = {
    b"S": Mode.SET,
    b"E": Mode.ADD,
    b"A": Mode.APPEND,
    b"P": Mode.PREPEND,
    b"R": Mode.REPLACE,
}
_IGNORED = frozenset(b"PLu")  # proxy hints and "don't bump in the LRU"


class _Flags:
    def __init__(self, tokens: list[bytes], known: bytes) -> None:
        self.order: list[tuple[int, bytes]] = []
        self.tokens: dict[int, bytes] = {}
        for token in tokens:
            flag = token[0]
            if flag in _IGNORED:
                continue
            if flag not in known:
                raise BadCommand(f"invalid flag {chr(flag)!r} for this command")
            self.order.append((flag, token[1:]))
            self.tokens[flag] = token[1:]

    def __contains__(self, flag: str) -> bool:
        return ord(flag) in self.tokens

    def get(self, flag: str) -> bytes | None:
        return self.tokens.get(ord(flag))


def _key(req: Request, flags: _Flags) -> bytes:
    key = req.args[0]
    if "b" not in flags:
        return key
    try:
        return base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise BadCommand("error decoding key") from None


def _returned(flags: _Flags, key: bytes, values: dict[str, bytes]) -> bytes:
    """The return flags in request order: O and k echoed (b with k), and ``values``."""
    out = []
    for flag, token in flags.order:
        c = chr(flag)
        if c == "O":
            out.append(b"O" + token)
        elif c == "k":
            out.append(b"k" + key)
        elif c == "b" and "k" in flags:
            out.append(b"b")
        elif c in values:
            out.append(c.encode() + values[c])
    return b"".join(b" " + f for f in out)


def _int(flags: _Flags, flag: str, default: int, limit: int = _MAX_U64) -> int:
    token = flags.get(flag)
    return default if token is None else unsigned(token, limit)


async def mg(door: Door, req: Request) -> bytes:
    if not req.args:
        raise BadCommand("bad command line format")
    flags = _Flags(req.args[1:], b"bcfhklOqstvT")
    name = door.name(_key(req, flags))
    item = await door.items.get(name)
    door.stats.count_get(item is not None)
    if item is None:
        return b"" if "q" in flags else b"EN\r\n"
    ttl = flags.get("T")
    if ttl is not None:
        door.stats.touches += 1
        await door.items.touch(name, signed(ttl))
    values = {
        "c": b"%d" % item.cas,
        "f": b"%d" % item.flags,
        "s": b"%d" % len(item.value),
        "t": b"-1",  # the cached copy's TTL is not the item's life: the record stays
        "h": b"0",
        "l": b"0",
    }
    returned = _returned(flags, req.args[0], values)
    if "v" in flags:
        return b"VA %d%s\r\n%s\r\n" % (len(item.value), returned, item.value)
    return b"HD" + returned + b"\r\n"


async def ms(door: Door, req: Request) -> bytes:
    if len(req.args) < 2:
        raise BadCommand("bad command line format")
    flags = _Flags(req.args[2:], b"bcCFkOqTM")
    name = door.name(_key(req, flags))
    mode_token = (flags.get("M") or b"S").upper()
    if mode_token not in _SET_MODES:
        raise BadCommand("invalid mode for ms")
    cas_token = flags.get("C")
    cas = unsigned(cas_token, _MAX_U64) if cas_token is not None else None
    ttl = flags.get("T")
    assert req.data is not None
    door.stats.sets += 1
    done = await door.items.store_value(
        name,
        _SET_MODES[mode_token],
        req.data,
        _int(flags, "F", 0, MAX_FLAGS),
        signed(ttl) if ttl is not None else 0,
        cas,
    )
    door.stats.count_cas(cas is not None, done.outcome)
    return _status(flags, req, done.outcome, {"c": b"%d" % done.cas})


async def md(door: Door, req: Request) -> bytes:
    if not req.args:
        raise BadCommand("bad command line format")
    flags = _Flags(req.args[1:], b"bCkOq")
    cas_token = flags.get("C")
    cas = unsigned(cas_token, _MAX_U64) if cas_token is not None else None
    done = await door.items.delete(door.name(_key(req, flags)), cas)
    door.stats.count("delete", done.outcome is Outcome.DELETED)
    return _status(flags, req, done.outcome, {})


async def ma(door: Door, req: Request) -> bytes:
    if not req.args:
        raise BadCommand("bad command line format")
    flags = _Flags(req.args[1:], b"bCNJDTMqtcvkO")
    name = door.name(_key(req, flags))
    mode = (flags.get("M") or b"I").upper()
    if mode not in (b"I", b"+", b"D", b"-"):
        raise BadCommand("invalid mode for ma")
    incr = mode in (b"I", b"+")
    cas_token = flags.get("C")
    cas = unsigned(cas_token, _MAX_U64) if cas_token is not None else None
    delta = _int(flags, "D", 1)
    done = await door.items.arith(name, delta, incr, cas)
    vivify = flags.get("N")
    if done.outcome is Outcome.NOT_FOUND and vivify is not None and cas is None:
        initial = b"%d" % _int(flags, "J", 0)
        created = await door.items.store_value(name, Mode.ADD, initial, 0, signed(vivify))
        if created.outcome is Outcome.STORED:
            done = Stored(Outcome.STORED, created.cas, initial)
        else:  # created meanwhile by another client: apply the delta to it
            done = await door.items.arith(name, delta, incr)
    arith_reply(door, done, incr)  # counts, and refuses a non-numeric value
    if done.outcome is not Outcome.STORED:
        return _status(flags, req, done.outcome, {})
    ttl = flags.get("T")
    if ttl is not None:
        await door.items.touch(name, signed(ttl))
    returned = _returned(flags, req.args[0], {"c": b"%d" % done.cas, "t": b"-1"})
    if "v" in flags:
        return b"VA %d%s\r\n%s\r\n" % (len(done.value), returned, done.value)
    return b"" if "q" in flags else b"HD" + returned + b"\r\n"


def _status(flags: _Flags, req: Request, outcome: Outcome, values: dict[str, bytes]) -> bytes:
    code = _CODES[outcome]
    if code == b"HD" and "q" in flags:
        return b""
    return code + _returned(flags, req.args[0], values) + b"\r\n"


async def mn(door: Door, req: Request) -> bytes:
    return b"MN\r\n"


COMMANDS: dict[bytes, Callable[[Door, Request], Awaitable[bytes]]] = {
    b"mg": mg,
    b"ms": ms,
    b"md": md,
    b"ma": ma,
    b"mn": mn,
}
