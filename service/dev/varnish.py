"""A throwaway Varnish running deploy/varnish/default.vcl (from a checkout), its backend
pointed at a local API: the edge tests/integration/test_edge.py and bench/edge.py go
through. Development only, like the rest of service/dev."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from service.dev.embedded import free_port

VCL = Path(__file__).resolve().parents[2] / "deploy" / "varnish" / "default.vcl"


def varnishd() -> str | None:
    return shutil.which("varnishd") or (
        "/usr/sbin/varnishd" if Path("/usr/sbin/varnishd").exists() else None
    )


def edge_vcl(backend_host: str, backend_port: int) -> str:
    """default.vcl with its backend's ``.host`` and ``.port`` lines edited, as a
    deployment edits them."""
    text = VCL.read_text()
    text, hosts = re.subn(r'(\.host\s*=\s*)"[^"]*";', rf'\g<1>"{backend_host}";', text, count=1)
    text, ports = re.subn(r'(\.port\s*=\s*)"[^"]*";', rf'\g<1>"{backend_port}";', text, count=1)
    assert hosts == ports == 1, "default.vcl lost its backend's .host/.port lines"
    return text


class Varnish:
    def __init__(self, workdir: Path, backend_port: int, port: int | None = None) -> None:
        self.workdir = workdir
        self.backend_port = backend_port
        self.port = port or free_port()
        self.popen: subprocess.Popen[bytes] | None = None
        self.log = workdir / "varnishd.log"

    def counters(self) -> dict[str, int]:
        """varnishstat's counters (``MAIN.cache_hit``...), by name."""
        out = subprocess.run(
            ["varnishstat", "-n", str(self.workdir / "state"), "-1", "-j"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        data = json.loads(out)
        fields = data.get("counters", data)  # varnishstat 7 nests them under "counters"
        return {
            name: int(v["value"])
            for name, v in fields.items()
            if isinstance(v, dict) and "value" in v
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Varnish:
        binary = varnishd()
        assert binary, "varnishd is missing: bash scripts/ensure-test-packages.sh"
        self.workdir.mkdir(parents=True, exist_ok=True)
        vcl = self.workdir / "default.vcl"
        vcl.write_text(edge_vcl("127.0.0.1", self.backend_port))
        argv = [
            binary,
            "-F",
            "-n",
            str(self.workdir / "state"),
            "-a",
            f"127.0.0.1:{self.port}",
            "-T",
            "127.0.0.1:0",
            "-f",
            str(vcl),
            "-s",
            "malloc,64m",
        ]
        if os.geteuid() == 0:
            # As root varnishd would switch to the varnish user, who cannot read a test's
            # temporary directory: stay root (a throwaway process on loopback).
            argv[1:1] = ["-j", "none"]
        out = self.log.open("ab")
        self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"varnishd exited:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"varnishd did not listen:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.popen = None


def edge_for_api(workdir: Path) -> tuple[int, Varnish]:
    """A started Varnish whose backend is a free port, for an API to be started on it
    (the edge comes first: the API's workers are told the edge's URL)."""
    api_port = free_port()
    return api_port, Varnish(workdir, api_port).start()
