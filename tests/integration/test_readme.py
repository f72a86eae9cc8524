"""The README's shell blocks marked ``<!-- doc-test -->`` (quick start, examples, operating)
run as written, in order, in one bash session, against a fresh ``wbcache up`` started in an
empty directory the way ``make up`` starts it: embedded Redis and Postgres, no URL in the
environment, ``.venv`` beside it. Each ``curl -i`` answers the status its ``# NNN``
comment names, and every other command exits 0 (``set -e``).

Two things differ from a user's terminal, both said here: ``up`` listens on a free port,
which replaces ``8000`` in the blocks, and ``curl`` is a shell function that records the
status line of each ``curl -i`` before printing the answer as curl does."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx

from service.dev.embedded import free_port
from tests.support.up import Started, UpProc, cleanup, run_in, up_env, workdir

__all__ = ["cleanup", "up_env", "workdir"]  # fixtures

README = Path(__file__).resolve().parents[2] / "README.md"
MARK = "<!-- doc-test -->"
BLOCK = re.compile(re.escape(MARK) + r"\n```sh\n(.*?)\n```", re.S)
# A command's trailing comment that starts with a status: "...  # 201" or "# 200, the ...".
EXPECTED = re.compile(r"\S.*#\s+(\d{3})\b[^'\"\n]*$", re.M)

CURL_RECORDER = r"""
curl() {
  if [[ " $* " == *" -i "* ]]; then
    local out
    out=$(command curl -sS "$@")
    printf '%s\n' "$out"
    printf '%s\n' "$out" | head -1 | awk '{print $2}' >> "$STATUS_LOG"
  else
    command curl "$@"
  fi
}
"""


def doc_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_the_readme_marks_its_quick_start_examples_and_operating_blocks() -> None:
    blocks = doc_blocks()
    assert len(blocks) == README.read_text().count(MARK) >= 3
    joined = "\n".join(blocks)
    for needed in ("wbcache status", "wbcache drain", "wbcache dlq list", "If-None-Match"):
        assert needed in joined, needed


async def test_the_readme_runs_as_written(
    workdir: Path, up_env: dict[str, str], cleanup: list[tuple[UpProc, Started]]
) -> None:
    port = free_port()
    (workdir / ".venv").symlink_to(Path(sys.prefix))  # where `make up` installs wbcache
    up = UpProc(workdir, workdir / ".wbcache", port, up_env).start()
    cleanup.append((up, {}))
    async with httpx.AsyncClient(timeout=10) as client:
        await up.wait_ready(client)
    cleanup[-1] = (up, up.started())

    blocks = [b.replace(":8000", f":{port}") for b in doc_blocks()]
    expected = [status for block in blocks for status in EXPECTED.findall(block)]
    status_log = workdir / "statuses.log"
    status_log.touch()
    script = "set -euo pipefail\n" + CURL_RECORDER + "\n".join(blocks) + "\n"
    env = {**up_env, "STATUS_LOG": str(status_log)}
    run = run_in(workdir, env, ["bash", "-c", script], timeout=180)
    output = f"--- stdout\n{run.stdout[-6000:]}\n--- stderr\n{run.stderr[-3000:]}"
    assert run.returncode == 0, output
    got = status_log.read_text().split()
    assert got == expected, output
    assert "Traceback" not in run.stderr, output
