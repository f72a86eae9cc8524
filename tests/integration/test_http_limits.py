"""Slow and idle clients against a real ``wbcache serve`` (uvicorn, httptools) over real
sockets: the head size limit, the head, body and keep-alive deadlines, and the connection
cap (service/adapters/http_server.py). Deadlines are set to about a second here, so the
tests that wait for one wait about that long."""

from __future__ import annotations

import select
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

from tests.support.procs import ApiProc, WorkerProc

Procs = Callable[..., ApiProc | WorkerProc]
MIB = 1024 * 1024
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: wbcache\r\n\r\n"
HEALTHZ_BODY = b'{"status":"ok"}'


def _api(procs: Procs, **env: str) -> ApiProc:
    api = procs("api", **env)
    assert isinstance(api, ApiProc)
    return api


def _connect(api: ApiProc) -> socket.socket:
    return socket.create_connection(("127.0.0.1", api.port), timeout=10)


def _read_until_closed(sock: socket.socket, bound: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection (or resets it), and
    whether it did so within ``bound`` seconds."""
    data = b""
    deadline = time.monotonic() + bound
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _read_response(sock: socket.socket, ending: bytes) -> bytes:
    data = b""
    while not data.endswith(ending):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def _closed_by_server(sock: socket.socket) -> bool:
    """Without waiting: has the server closed (or reset) this connection?"""
    sock.settimeout(0)
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return False
        except ConnectionError:
            return True
        if not chunk:
            return True


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def _error_code(answer: bytes) -> str:
    code: str = orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"]
    return code


def test_a_head_over_the_limit_is_refused_without_being_buffered(procs: Procs) -> None:
    api = _api(procs, HTTP_MAX_HEADER_BYTES="16384")

    ok = httpx.get(f"{api.url}/healthz", headers={"X-Fill": "a" * 15_000})
    assert ok.status_code == 200
    refused = httpx.get(f"{api.url}/healthz", headers={"X-Fill": "a" * 17_000})
    assert refused.status_code == 431, refused.text
    assert refused.json()["error"]["code"] == "header_too_large"

    # Small pipelined requests adding up to more than the limit in one read: all served.
    with _connect(api) as sock:
        sock.sendall(HEALTHZ * 1000)  # 40 KB
        answers = b""
        while answers.count(HEALTHZ_BODY) < 1000:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {answers.count(HEALTHZ_BODY)} answers"
            answers += chunk
        assert answers.count(b"HTTP/1.1 200 ") == 1000

    # 48 MiB of one header (what once stalled the API and took its RSS to 270 MB).
    peak_before = _peak_rss_kib(api.pid)
    started = time.monotonic()
    with _connect(api) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: wbcache\r\nX-Big: ")
        try:
            for _ in range(48):
                sock.sendall(b"a" * MIB)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the client finished sending
        answer, closed = _read_until_closed(sock, 10)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert closed
    assert elapsed < 5, elapsed

    healthz_started = time.monotonic()
    assert httpx.get(f"{api.url}/healthz", timeout=2).status_code == 200
    assert time.monotonic() - healthz_started < 1
    grown_mib = (_peak_rss_kib(api.pid) - peak_before) / 1024
    assert grown_mib < 16, f"peak RSS grew by {grown_mib:.1f} MiB"


def test_a_head_must_arrive_within_the_header_timeout(procs: Procs) -> None:
    api = _api(procs, HTTP_HEADER_TIMEOUT_SECONDS="1")

    # A head trickled a byte at a time is cut off with 408 a second after the open.
    with _connect(api) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: wbcache\r\n")
        answered = False
        for byte in b"X-Slow: " + b"a" * 100:  # 0.05 s a byte: about 5 s in all
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                answered = True
                break
            sock.sendall(bytes([byte]))
        assert answered, "the trickled head was never cut off"
        answer, closed = _read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert _error_code(answer) == "header_timeout"
    assert closed
    assert 0.9 < time.monotonic() - started < 3

    # A connection that sends nothing is closed then too, with nothing to answer.
    with _connect(api) as sock:
        started = time.monotonic()
        answer, closed = _read_until_closed(sock, 5)
    assert (answer, closed) == (b"", True)
    assert 0.9 < time.monotonic() - started < 3

    # On a kept-alive connection the next head's deadline runs from its first byte.
    with _connect(api) as sock:
        sock.sendall(HEALTHZ)
        assert _read_response(sock, HEALTHZ_BODY).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.7)  # idle between requests: under the keep-alive timeout (5 s)
        sock.sendall(HEALTHZ[:20])
        started = time.monotonic()
        answer, closed = _read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert closed
    assert 0.9 < time.monotonic() - started < 3

    # A head in two parts well within the deadline is served.
    with _connect(api) as sock:
        sock.sendall(HEALTHZ[:20])
        time.sleep(0.3)  # the slow (but not too slow) client under test
        sock.sendall(HEALTHZ[20:])
        assert _read_response(sock, HEALTHZ_BODY).startswith(b"HTTP/1.1 200 ")
    assert httpx.get(f"{api.url}/healthz").status_code == 200


def test_idle_keep_alive_connections_are_closed(procs: Procs) -> None:
    api = _api(procs, HTTP_KEEP_ALIVE_TIMEOUT_SECONDS="1")
    with _connect(api) as sock:
        sock.sendall(HEALTHZ)
        assert _read_response(sock, HEALTHZ_BODY).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        answer, closed = _read_until_closed(sock, 4)
    assert (answer, closed) == (b"", True)
    assert time.monotonic() - started < 2.5


def test_a_body_that_stalls_or_trickles_past_the_body_timeout_is_cut_off(
    procs: Procs,
) -> None:
    api = _api(procs, HTTP_BODY_TIMEOUT_SECONDS="1", HTTP_BODY_MIN_RATE="20")
    doc = b'{"payload": "' + b"x" * 64 + b'"}'
    head = (
        f"PUT /v1/t{uuid.uuid4().hex[:12]}/k HTTP/1.1\r\nHost: wbcache\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(doc)}\r\n\r\n"
    ).encode()

    # Pauses shorter than the timeout, 40 bytes/s: the document is stored.
    with _connect(api) as sock:
        sock.sendall(head)
        for part in (doc[:20], doc[20:40], doc[40:]):
            time.sleep(0.5)  # the slow (but not too slow) client under test
            sock.sendall(part)
        answer = _read_response(sock, b"}")
    assert answer.startswith(b"HTTP/1.1 201 "), answer

    # Half a body, then nothing: 408 a second after the last byte, and closed.
    with _connect(api) as sock:
        sock.sendall(head + doc[:20])
        started = time.monotonic()
        answer, closed = _read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert _error_code(answer) == "body_timeout"
    assert closed
    assert 0.9 < time.monotonic() - started < 3

    # A byte every 0.25 s: no pause reaches the timeout, but 4 bytes/s is under the
    # 20 bytes/s minimum: cut off about 1.25 s after the head (1 s + 5 bytes / 20).
    with _connect(api) as sock:
        sock.sendall(head)
        started = time.monotonic()
        answered = False
        for byte in doc:  # about 20 s in all
            readable, _, _ = select.select([sock], [], [], 0.25)
            if readable:
                answered = True
                break
            sock.sendall(bytes([byte]))
        assert answered, "the trickled body was never cut off"
        answer, closed = _read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert _error_code(answer) == "body_timeout"
    assert closed
    assert 1.1 < time.monotonic() - started < 3.5
    assert httpx.get(f"{api.url}/healthz").status_code == 200


def test_idle_sockets_past_the_connection_cap_do_not_lock_clients_out(procs: Procs) -> None:
    api = _api(procs, HTTP_MAX_CONNECTIONS="50", HTTP_HEADER_TIMEOUT_SECONDS="60")
    idle = [_connect(api) for _ in range(80)]
    try:
        started = time.monotonic()
        assert httpx.get(f"{api.url}/healthz", timeout=2).status_code == 200
        assert time.monotonic() - started < 2

        # The oldest idle sockets made room for the newer ones and for that client.
        deadline = time.monotonic() + 5
        while len(closed := [s for s in idle if _closed_by_server(s)]) < 31:
            assert time.monotonic() < deadline, f"{len(closed)} of 80 closed"
            time.sleep(0.05)
        assert len(closed) == 31, len(closed)
        assert closed == idle[:31]
    finally:
        for s in idle:
            s.close()


def test_busy_connections_at_the_cap_turn_new_ones_away_with_503(procs: Procs) -> None:
    api = _api(procs, HTTP_MAX_CONNECTIONS="50", HTTP_HEADER_TIMEOUT_SECONDS="60")
    busy: list[socket.socket] = []
    try:
        for _ in range(50):
            # A request, and the first half of the next one: not idle once it is answered.
            sock = _connect(api)
            busy.append(sock)
            sock.sendall(HEALTHZ + HEALTHZ[:20])
            assert _read_response(sock, HEALTHZ_BODY).startswith(b"HTTP/1.1 200 ")

        with _connect(api) as fresh:
            fresh.sendall(HEALTHZ)
            answer, closed = _read_until_closed(fresh, 5)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"\r\nretry-after: 1\r\n" in answer.lower()
        assert _error_code(answer) == "unavailable"

        # Existing clients are still served (and stay busy: half a request more).
        busy[0].sendall(HEALTHZ[20:] + HEALTHZ[:20])
        assert _read_response(busy[0], HEALTHZ_BODY).startswith(b"HTTP/1.1 200 ")

        # Once one goes away, new clients are served again.
        busy.pop().close()
        deadline = time.monotonic() + 5
        while True:
            try:
                if httpx.get(f"{api.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no room made for new clients"
            time.sleep(0.05)
    finally:
        for s in busy:
            s.close()
