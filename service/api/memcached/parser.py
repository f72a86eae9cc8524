"""Framing of the memcached text and meta protocols (memcached's doc/protocol.txt): command
lines, and the data block that follows a storage command. Pure: bytes in, requests out.

A request is complete only when its whole data block and the ``\\r\\n`` after it are in the
buffer, however the client's bytes were split across TCP reads: a storage command is never
executed on a partial value. A data block that does not end in ``\\r\\n`` is consumed and
answered ``CLIENT_ERROR bad data chunk`` (nothing is written); a value past the size limit
is read and thrown away (``SERVER_ERROR object too large for cache``), as memcached does.
"""

from __future__ import annotations

from dataclasses import dataclass

# Commands followed by a data block, and where their line says its length.
_LENGTH_AT = {b"set": 3, b"add": 3, b"replace": 3, b"append": 3, b"prepend": 3, b"cas": 3}
_META_SET = b"ms"
_MAX_DIGITS = 20  # a length of more digits is not a length


@dataclass(frozen=True, slots=True)
class Request:
    """One command: its name, the other tokens of its line, and its data block (storage
    commands) or None."""

    command: bytes
    args: list[bytes]
    data: bytes | None = None

    @property
    def noreply(self) -> bool:
        """The text protocol's ``noreply``: the last token of the line."""
        return bool(self.args) and self.args[-1] == b"noreply"


@dataclass(frozen=True, slots=True)
class Refused:
    """A request answered without running: the error line to send (unless ``noreply``), and
    whether the connection cannot go on (a line longer than the limit)."""

    reply: bytes
    noreply: bool = False
    close: bool = False


def client_error(why: str) -> bytes:
    return b"CLIENT_ERROR " + why.encode() + b"\r\n"


def server_error(why: str) -> bytes:
    return b"SERVER_ERROR " + why.encode() + b"\r\n"


class Parser:
    """Requests from a connection's bytes, in order. ``feed`` the bytes read, then call
    ``next`` until it returns None (more bytes needed)."""

    def __init__(self, max_line: int, max_value: int) -> None:
        self.max_line = max_line
        self.max_value = max_value
        self._buf = bytearray()
        self._pos = 0
        # A storage command whose line is read and whose data block is awaited.
        self._pending: tuple[bytes, list[bytes], int] | None = None
        # Bytes of a refused value still to throw away, and the reply once they are.
        self._swallow = 0
        self._after_swallow: Refused | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536:  # reclaim the consumed head now and then, not every read
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next(self) -> Request | Refused | None:
        if self._swallow:
            return self._swallowing()
        if self._pending is not None:
            return self._data_block()
        end = self._buf.find(b"\n", self._pos)
        if end < 0:
            if self.buffered > self.max_line:
                self._pos = len(self._buf)
                return Refused(client_error("line too long"), close=True)
            return None
        if end - self._pos > self.max_line:
            self._pos = end + 1
            return Refused(client_error("line too long"))
        line = bytes(self._buf[self._pos : end])
        self._pos = end + 1
        tokens = line.split()
        if not tokens:
            return Refused(b"ERROR\r\n")
        command, args = tokens[0], tokens[1:]
        at = 1 if command == _META_SET else _LENGTH_AT.get(command)
        if at is None:
            return Request(command, args)
        length = _length(args, at)
        noreply = command != _META_SET and bool(args) and args[-1] == b"noreply"
        if length is None:
            return Refused(client_error("bad command line format"), noreply)
        if length > self.max_value:
            self._swallow = length + 2
            self._after_swallow = Refused(server_error("object too large for cache"), noreply)
            return self._swallowing()
        self._pending = (command, args, length)
        return self._data_block()

    def _data_block(self) -> Request | Refused | None:
        assert self._pending is not None
        command, args, length = self._pending
        if self.buffered < length + 2:
            return None
        start, stop = self._pos, self._pos + length
        self._pos = stop + 2
        self._pending = None
        if self._buf[stop : stop + 2] != b"\r\n":
            noreply = command != _META_SET and bool(args) and args[-1] == b"noreply"
            return Refused(client_error("bad data chunk"), noreply)
        return Request(command, args, bytes(self._buf[start:stop]))

    def _swallowing(self) -> Refused | None:
        take = min(self._swallow, self.buffered)
        self._pos += take
        self._swallow -= take
        if self._swallow:
            return None
        refused, self._after_swallow = self._after_swallow, None
        assert refused is not None
        return refused


def _length(args: list[bytes], at: int) -> int | None:
    """The data block's length: the token at ``at``, a non-negative decimal integer."""
    if len(args) <= at:
        return None
    token = args[at]
    if not token.isdigit() or len(token) > _MAX_DIGITS:
        return None
    return int(token)
