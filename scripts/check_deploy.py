"""The deployment checks no off-the-shelf tool makes (``make lint`` runs this; exit 1 and
one line per problem).  What tools do is left to them: hadolint lints the Dockerfile, the
Compose Specification JSON schema validates docker-compose.yml, promtool (when on PATH)
checks the Prometheus config and rules, runs the alert unit tests and parses the dashboard
queries.  Checked here, against this project:

- every command and healthcheck in the Dockerfile and docker-compose.yml is a ``wbcache``
  command line its CLI accepts, and they agree on the API's port;
- every COPY source gets through the .dockerignore allowlist (there is no Docker here);
- requirements.lock pins every runtime dependency of pyproject.toml at the same version,
  with hashes, and the image installs it with --require-hashes;
- compose: the start order (migrations before the API and workers), the grace periods exceed
  the drain bounds, Redis cannot evict pending writes and keeps an AOF, the URLs point at the
  compose services, workers can be scaled;
- the Sentinel overlay (deploy/sentinel/docker-compose.sentinel.yml), merged with the
  main file: all of the above, plus an odd number (3+) of Sentinels monitoring the redis
  service under one master name with a majority quorum, replicas that may be promoted
  (AOF, safe eviction, a volume), and REDIS_URL naming exactly those Sentinels and name;
- the alerts we rely on exist, and alerts and the Grafana dashboard read only metrics the
  service exports (counters through rate()), and the dashboard shows every one.

The Compose Specification schema is not copied into this repository: it is taken from the
``docker-compose`` 1.29.2 wheel on PyPI (``compose/config/compose_spec.json``), downloaded
once with pip and cached in the virtualenv.

Usage: python scripts/check_deploy.py [--root DIR] [--no-promtool]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_WHEEL = "docker-compose==1.29.2"
SCHEMA_MEMBER = "compose/config/compose_spec.json"
SCHEMA_CACHE = Path(sys.prefix) / "share" / "wbcache" / "compose_spec.json"


def compose_schema() -> dict[str, Any]:
    """The Compose Specification JSON schema, from the docker-compose wheel on PyPI."""
    if not SCHEMA_CACHE.exists():
        import zipfile

        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
                + ["--dest", tmp, SCHEMA_WHEEL],
                check=True,
            )
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(SCHEMA_MEMBER)
        SCHEMA_CACHE.parent.mkdir(parents=True, exist_ok=True)
        SCHEMA_CACHE.write_bytes(data)
    schema: dict[str, Any] = json.loads(SCHEMA_CACHE.read_text())
    return schema


APP_SERVICES = ("migrate", "api", "worker")
# Bounds the grace periods must exceed: uvicorn's graceful shutdown (service/cli.py,
# timeout_graceful_shutdown) and the worker's drain of its current batch.
API_DRAIN_SECONDS = 10.0
WORKER_DRAIN_SECONDS = 30.0
# What Redis must run with (README / CONTRACT: pending writes carry no TTL).
SAFE_EVICTION = {"volatile-lru", "volatile-ttl", "noeviction"}

# What the service exports on /metrics (names as exposed: counters with _total).
GAUGES = {
    "wbcache_pending",
    "wbcache_oldest_pending_age_seconds",
    "wbcache_queued_jobs",
    "wbcache_batches_in_flight",
    "wbcache_dead_letters",
    "wbcache_workers_live",
    "wbcache_edge_purges_pending",
}
COUNTERS = {
    "wbcache_flushed_writes_total",
    "wbcache_flush_batches_total",
    "wbcache_flush_failures_total",
    "wbcache_dead_lettered_total",
    "wbcache_cache_hits_total",
    "wbcache_cache_misses_total",
    "wbcache_edge_purges_total",
    "wbcache_edge_purge_failures_total",
}
HISTOGRAMS = {
    "wbcache_flush_batch_size",
    "wbcache_flush_duration_seconds",
    "wbcache_http_request_duration_seconds",
    "wbcache_edge_purge_latency_seconds",
}
HISTOGRAM_LABELS = {"wbcache_http_request_duration_seconds": {"method", "route", "status"}}

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?(?:(\d+)us)?$")
_METRIC = re.compile(r"\bwbcache_[a-z0-9_]+\b")
_VAR = re.compile(r"\$(?:\$|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


class Problems(list[str]):
    def add(self, where: str, message: str) -> None:
        self.append(f"{where}: {message}")


# --------------------------------------------------------------------------- helpers


def parse_duration(text: str | int | float) -> float | None:
    """Seconds in a Compose / Prometheus duration ("45s", "1m30s", "5m"), None if invalid."""
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(text.strip())
    if not text.strip() or m is None:
        return None
    h, mi, s, ms, us = (int(g) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000 + us / 1_000_000


def interpolate(value: Any, env: Mapping[str, str], missing: set[str]) -> Any:
    """Compose variable interpolation of every string value (not keys), as ``docker
    compose config`` does; names with neither a value nor a default go to ``missing``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, missing) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        expr = m.group(1) if m.group(1) is not None else m.group(2)
        op = re.search(r":-|-|:\?|\?|:\+|\+", expr)
        name = expr[: op.start()] if op else expr
        arg = expr[op.end() :] if op else ""
        kind = op.group(0) if op else ""
        val = env.get(name)
        if kind in (":-", "-"):
            if val is None or (kind == ":-" and val == ""):
                return str(interpolate(arg, env, missing))
            return val
        if kind in (":+", "+"):
            return str(interpolate(arg, env, missing)) if val else ""
        if val is None or (kind == ":?" and val == ""):
            missing.add(name)
            return ""
        return val

    return _VAR.sub(sub, value)


def load_compose(
    path: Path, env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], set[str]]:
    """The compose file as Compose sees it: YAML (anchors and merge keys resolved), then
    interpolated with ``env`` (default: empty, so the defaults in the file apply)."""
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a mapping")
    missing: set[str] = set()
    doc = interpolate(raw, env or {}, missing)
    return doc, missing


def as_argv(command: Any) -> list[str] | None:
    """Exec-form command as a list of strings; None for shell form or nothing."""
    if isinstance(command, list) and all(isinstance(a, str) for a in command):
        return list(command)
    return None


def _probed(hc: Any) -> str:
    """The URL ``wbcache healthcheck api`` probes: --url, else (no `wbcache up` in a
    container's directory) the CLI's default."""
    from service.cli import DEFAULT_API_URL

    url = hc.params.get("url")
    return str(url) if url is not None else DEFAULT_API_URL


def healthcheck_argv(test: Any) -> list[str] | None:
    """The argv of a Compose healthcheck ``test`` in exec form ["CMD", ...]."""
    argv = as_argv(test)
    if argv and argv[0] == "CMD":
        return argv[1:]
    return None


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


# --------------------------------------------------------------------------- wbcache CLI


@dataclass
class ParsedCommand:
    subcommand: str
    params: dict[str, Any] = field(default_factory=dict)


def parse_wbcache(argv: list[str]) -> ParsedCommand:
    """Parse a ``wbcache ...`` command line with the real CLI (nothing runs); raises
    ValueError when it is not one the CLI accepts."""
    import typer.main

    from service.cli import app

    if not argv or argv[0] != "wbcache":
        raise ValueError(f"{argv!r} does not run wbcache")
    if len(argv) < 2:
        raise ValueError("no wbcache subcommand")
    group = typer.main.get_command(app)
    commands: Mapping[str, Any] = getattr(group, "commands", {})
    sub = commands.get(argv[1])
    if sub is None:
        raise ValueError(f"`wbcache {argv[1]}` is not a subcommand ({', '.join(sorted(commands))})")
    try:
        ctx = sub.make_context(argv[1], list(argv[2:]))
    except Exception as exc:  # click's UsageError and kin: the CLI rejects the arguments
        raise ValueError(f"`{' '.join(argv)}`: {exc}") from exc
    return ParsedCommand(argv[1], dict(ctx.params))


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    stage: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    buf = ""
    start = 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), start, stage))
        buf = ""
    return out


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return as_argv(value)


def split_healthcheck(args: str) -> tuple[dict[str, str], str]:
    """HEALTHCHECK [--opt=v ...] CMD [...] -> options and what follows CMD."""
    options: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        opt, _, rest = rest.partition(" ")
        key, _, val = opt[2:].partition("=")
        options[key] = val
        rest = rest.strip()
    if not rest.upper().startswith("CMD"):
        return options, ""
    return options, rest[3:].strip()


@dataclass
class DockerfileFacts:
    cmd: list[str] | None = None
    healthcheck: list[str] | None = None
    expose: list[int] = field(default_factory=list)


def dockerignore_patterns(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, in order (the last match decides)."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    if not path.exists():
        return rules
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:].strip() if negate else line
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**", i):
                rx += ".*"
                i += 2
                if pat.startswith("/", i):
                    rx = rx[:-2] + "(?:.*/)?"
                    i += 1
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            elif pat[i] == "[":
                j = pat.find("]", i)
                rx += pat[i : j + 1] if j > 0 else re.escape(pat[i])
                i = j + 1 if j > 0 else i + 1
            else:
                rx += re.escape(pat[i])
                i += 1
        # A pattern that matches a directory also matches everything under it.
        rules.append((negate, re.compile(f"^{rx}(?:/.*)?$")))
    return rules


def dockerignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    excluded = False
    for negate, rx in rules:
        if rx.match(rel):
            excluded = not negate
    return excluded


def check_dockerfile(root: Path, problems: Problems) -> DockerfileFacts:
    path = root / "Dockerfile"
    where = "Dockerfile"
    facts = DockerfileFacts()
    if not path.exists():
        problems.add(where, "missing")
        return facts
    ins = parse_dockerfile(path)
    last = max((i.stage for i in ins), default=-1)
    final = [i for i in ins if i.stage == last]  # the runtime stage
    lock_install = [
        i
        for i in ins
        if i.keyword == "RUN" and "pip install" in i.args and "requirements.lock" in i.args
    ]
    if not lock_install:
        problems.add(where, "no `RUN pip install ... requirements.lock` step")
    elif not any("--require-hashes" in i.args for i in lock_install):
        problems.add(f"{where}:{lock_install[0].line}", "install the lock with --require-hashes")

    for i in final:
        if i.keyword == "EXPOSE":
            facts.expose += [int(p.split("/")[0]) for p in i.args.split()]
        elif i.keyword == "CMD":
            facts.cmd = exec_form(i.args)
            if facts.cmd is None:
                problems.add(f"{where}:{i.line}", "CMD must be in exec form (JSON array)")
        elif i.keyword == "HEALTHCHECK":
            _, cmd = split_healthcheck(i.args)
            facts.healthcheck = exec_form(cmd)
            if facts.healthcheck is None:
                problems.add(f"{where}:{i.line}", 'HEALTHCHECK must be `CMD ["..."]` (exec form)')
    if facts.cmd is None:
        problems.add(where, "no CMD")
    if facts.healthcheck is None:
        problems.add(where, "no HEALTHCHECK")

    serve_port: int | None = None
    if facts.cmd is not None:
        try:
            parsed = parse_wbcache(facts.cmd)
        except ValueError as exc:
            problems.add(f"{where} CMD", str(exc))
        else:
            if parsed.subcommand != "serve":
                problems.add(f"{where} CMD", "the default command must be `wbcache serve`")
            else:
                serve_port = int(parsed.params["port"])
                if parsed.params["host"] != "0.0.0.0":
                    problems.add(f"{where} CMD", "serve must bind 0.0.0.0 inside a container")
                if serve_port not in facts.expose:
                    problems.add(f"{where} CMD", f"serves on {serve_port}, EXPOSE {facts.expose}")
    if facts.healthcheck is not None:
        try:
            hc = parse_wbcache(facts.healthcheck)
        except ValueError as exc:
            problems.add(f"{where} HEALTHCHECK", str(exc))
        else:
            if hc.subcommand != "healthcheck" or hc.params.get("kind") != "api":
                problems.add(f"{where} HEALTHCHECK", "expected `wbcache healthcheck api`")
            elif serve_port is not None and urlsplit(_probed(hc)).port != serve_port:
                problems.add(
                    f"{where} HEALTHCHECK",
                    f"probes {hc.params['url']} but the API serves on port {serve_port}",
                )

    # Everything COPY'd from the context must get through .dockerignore.
    rules = dockerignore_patterns(root / ".dockerignore")
    for i in ins:
        if i.keyword not in ("COPY", "ADD") or "--from=" in i.args:
            continue
        words = [w for w in i.args.split() if not w.startswith("--")]
        for src in words[:-1]:
            src_path = root / src
            if not src_path.exists():
                problems.add(f"{where}:{i.line}", f"COPY source {src} does not exist")
                continue
            files = [src_path] if src_path.is_file() else sorted(src_path.rglob("*"))
            for f in files:
                rel = f.relative_to(root).as_posix()
                if not f.is_file() or "__pycache__" in rel or rel.endswith(".pyc"):
                    continue
                if dockerignored(rel, rules):
                    problems.add(".dockerignore", f"excludes {rel}, which the Dockerfile copies")
                    break
    return facts


# --------------------------------------------------------------------------- lock


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_lock(root: Path, problems: Problems) -> None:
    where = "requirements.lock"
    lock = root / "requirements.lock"
    if not lock.exists():
        problems.add(where, "missing")
        return
    pinned: dict[str, str] = {}
    text = lock.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text)
    for entry in entries:
        first = entry.split("\\", 1)[0].strip()
        if not first or first.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", first)
        if m is None:
            problems.add(where, f"not pinned with ==: {first}")
            continue
        pinned[_norm(m.group(1))] = m.group(2)
        if "--hash=sha256:" not in entry:
            problems.add(where, f"{m.group(1)} has no --hash")
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    if _norm(project["name"]) in pinned:
        problems.add(where, "must not contain the project itself (installed with --no-deps .)")
    for dep in project.get("dependencies", []):
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;]+)", dep)
        if m is None:
            problems.add("pyproject.toml", f"runtime dependency not pinned with ==: {dep}")
            continue
        name, version = _norm(m.group(1)), m.group(2)
        if pinned.get(name) != version:
            problems.add(
                where,
                f"{name}=={version} (pyproject.toml) is "
                f"{'missing' if name not in pinned else pinned[name]} in the lock: regenerate "
                "it (the command is at the top of requirements.lock)",
            )


# --------------------------------------------------------------------------- compose


def check_compose_doc(
    doc: Mapping[str, Any],
    facts: DockerfileFacts | None,
    problems: Problems,
    where: str = "docker-compose.yml",
) -> None:
    """The project's rules for a loaded (interpolated) compose document (``where`` names
    it in the problems: the main file, or the main file merged with an overlay)."""
    services: Mapping[str, Any] = doc.get("services") or {}
    for name in ("redis", "postgres", *APP_SERVICES):
        if name not in services:
            problems.add(where, f"no `{name}` service")
    if any(n not in services for n in ("redis", "postgres", *APP_SERVICES)):
        return
    volumes = doc.get("volumes") or {}

    def svc_where(name: str) -> str:
        return f"{where} services.{name}"

    def named_volume_at(name: str, target: str) -> None:
        for v in services[name].get("volumes") or []:
            src, _, rest = v.partition(":") if isinstance(v, str) else ("", "", "")
            if isinstance(v, dict):
                src, rest = v.get("source", ""), v.get("target", "")
            if rest.split(":")[0] == target:
                if src not in volumes:
                    problems.add(svc_where(name), f"{target} is not on a named volume")
                return
        problems.add(svc_where(name), f"no named volume mounted at {target}")

    def has_healthcheck(name: str) -> bool:
        hc = services[name].get("healthcheck") or {}
        return bool(hc.get("test")) and not hc.get("disable")

    # redis: an AOF on a volume, and no eviction of pending writes (they have no TTL)
    redis = services["redis"]
    argv = as_argv(redis.get("command")) or []
    flags = dict(zip(argv[1::2], argv[2::2], strict=False)) if argv[:1] == ["redis-server"] else {}
    if flags.get("--appendonly") != "yes":
        problems.add(svc_where("redis"), "must run with --appendonly yes")
    if flags.get("--maxmemory-policy") not in SAFE_EVICTION:
        problems.add(
            svc_where("redis"),
            f"--maxmemory-policy must be one of {sorted(SAFE_EVICTION)}: pending writes have "
            "no TTL, only clean entries may be evicted",
        )
    named_volume_at("redis", "/data")
    pg_env = environment(services["postgres"])
    named_volume_at("postgres", "/var/lib/postgresql/data")

    # every long-running service has a healthcheck (others wait for them to be healthy);
    # migrations run first, once
    for name in services:
        if name != "migrate" and not has_healthcheck(name):
            problems.add(svc_where(name), "no healthcheck")
    required = {
        "migrate": {"postgres": "service_healthy"},
        "api": {"migrate": "service_completed_successfully", "redis": "service_healthy"},
        "worker": {"migrate": "service_completed_successfully", "redis": "service_healthy"},
    }
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            if name in required:
                problems.add(svc_where(name), "depends_on needs conditions (the long syntax)")
            continue
        for dep, spec in deps.items():
            cond = (spec or {}).get("condition")
            if cond == "service_completed_successfully" and dep in services:
                restart = str(services[dep].get("restart", "no"))
                if restart not in ("no", "on-failure") and not restart.startswith("on-failure:"):
                    problems.add(
                        svc_where(dep), f"a one-shot must not restart (restart: {restart})"
                    )
        for dep, cond in required.get(name, {}).items():
            got = (deps.get(dep) or {}).get("condition")
            if got != cond:
                problems.add(svc_where(name), f"depends_on {dep}: condition {cond} (found {got})")

    # the application services: one image, real wbcache commands, consistent settings
    images = {str(services[n].get("image")) for n in APP_SERVICES}
    if len(images) != 1:
        problems.add(where, f"migrate, api and worker must share one image (found {images})")
    expected = {"migrate": "migrate", "api": "serve", "worker": "worker"}
    parsed: dict[str, ParsedCommand] = {}
    for name, sub in expected.items():
        command = as_argv(services[name].get("command"))
        if command is None:
            problems.add(svc_where(name), "command must be an exec-form list")
            continue
        try:
            parsed[name] = parse_wbcache(command)
        except ValueError as exc:
            problems.add(svc_where(name), str(exc))
            continue
        if parsed[name].subcommand != sub:
            problems.add(svc_where(name), f"command must be `wbcache {sub} ...`")
    for name, kind in (("api", "api"), ("worker", "worker")):
        probe = healthcheck_argv((services[name].get("healthcheck") or {}).get("test"))
        if probe is None:
            problems.add(svc_where(name), 'healthcheck test must be ["CMD", "wbcache", ...]')
            continue
        try:
            hc = parse_wbcache(probe)
        except ValueError as exc:
            problems.add(svc_where(name), f"healthcheck: {exc}")
            continue
        if hc.subcommand != "healthcheck" or hc.params.get("kind") != kind:
            problems.add(svc_where(name), f"healthcheck must be `wbcache healthcheck {kind}`")
        elif kind == "api" and "api" in parsed and parsed["api"].subcommand == "serve":
            if urlsplit(_probed(hc)).port != int(parsed["api"].params["port"]):
                problems.add(svc_where("api"), "the healthcheck probes another port than serve's")

    for name in APP_SERVICES:
        env = environment(services[name])
        redis_url = urlsplit(env.get("REDIS_URL", ""))
        if sentinel_url_hosts(env.get("REDIS_URL", "")) is not None:
            pass  # through Sentinels: check_sentinel_doc checks them
        elif redis_url.scheme not in ("redis", "rediss") or redis_url.hostname != "redis":
            problems.add(svc_where(name), "REDIS_URL must point at the redis service")
        db = urlsplit(env.get("DATABASE_URL", ""))
        if not db.scheme.startswith("postgres") or db.hostname != "postgres":
            problems.add(svc_where(name), "DATABASE_URL must point at the postgres service")
        elif (
            db.path.lstrip("/") != pg_env.get("POSTGRES_DB")
            or (db.username or "postgres") != pg_env.get("POSTGRES_USER", "postgres")
            or db.password != pg_env.get("POSTGRES_PASSWORD")
        ):
            problems.add(svc_where(name), "DATABASE_URL does not match the postgres service's")

    # the API's port
    api = services["api"]
    api_port = int(parsed["api"].params["port"]) if "api" in parsed else None
    targets = []
    for p in api.get("ports") or []:
        if isinstance(p, dict):
            targets.append(int(p.get("target", 0)))
        else:
            targets.append(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    if api_port is not None and api_port not in targets:
        problems.add(svc_where("api"), f"publishes {targets}, serve listens on {api_port}")
    if "api" in parsed and parsed["api"].params.get("host") != "0.0.0.0":
        problems.add(svc_where("api"), "serve must bind 0.0.0.0 inside a container")
    if facts is not None and facts.cmd is not None and "api" in parsed:
        if as_argv(api.get("command")) != facts.cmd:
            problems.add(svc_where("api"), "command differs from the Dockerfile's CMD")

    # grace periods longer than the drain bounds
    for name, bound in (("api", API_DRAIN_SECONDS), ("worker", WORKER_DRAIN_SECONDS)):
        grace = parse_duration(services[name].get("stop_grace_period", "10s"))
        if grace is None or grace <= bound:
            problems.add(
                svc_where(name),
                f"stop_grace_period must exceed {bound:.0f} s (its drain bound); "
                f"found {services[name].get('stop_grace_period', '10s (default)')}",
            )

    # --scale worker=N
    worker = services["worker"]
    if "container_name" in worker:
        problems.add(svc_where("worker"), "container_name prevents --scale worker=N")
    for p in worker.get("ports") or []:
        problems.add(svc_where("worker"), f"a published port ({p}) prevents --scale worker=N")
    if "hostname" in worker:
        problems.add(svc_where("worker"), "a fixed hostname makes scaled workers collide")


def check_compose(root: Path, facts: DockerfileFacts | None, problems: Problems) -> None:
    where = "docker-compose.yml"
    path = root / where
    if not path.exists():
        problems.add(where, "missing")
        return
    try:
        doc, missing = load_compose(path)
    except (yaml.YAMLError, ValueError) as exc:
        problems.add(where, f"not valid YAML: {exc}")
        return
    for name in sorted(missing):
        problems.add(where, f"${{{name}}} has no default: `docker compose up` needs it set")
    schema = compose_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    for err in errors:
        loc = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        problems.add(f"{where} {loc}", f"Compose Specification: {err.message}")
    if errors:
        return
    check_compose_doc(doc, facts, problems)


# --------------------------------------------------------------------------- Sentinel

SENTINEL_OVERLAY = "deploy/sentinel/docker-compose.sentinel.yml"
_MONITOR = re.compile(r"sentinel monitor (\S+) (\S+) (\d+) (\d+)")


def merge_compose(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``docker compose -f base -f overlay``, as far as these checks need it: mappings merge
    key by key (services, environment, depends_on, volumes), anything else the overlay
    sets replaces the base's (``command``, ``healthcheck.test``)."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_compose(merged[key], value)
        else:
            merged[key] = value
    return merged


def _command_text(service: Mapping[str, Any]) -> str:
    command = service.get("command")
    return " ".join(command) if isinstance(command, list) else str(command or "")


def sentinel_url_hosts(url: str) -> tuple[list[tuple[str, int]], str] | None:
    """The Sentinel hosts and master name of a ``redis+sentinel://`` URL, None otherwise."""
    from service.adapters.redis_url import is_sentinel_url, parse_sentinel_url

    if not is_sentinel_url(url):
        return None
    try:
        parsed = parse_sentinel_url(url)
    except ValueError:
        return [], ""
    return list(parsed.sentinels), parsed.master


def check_sentinel_doc(doc: Mapping[str, Any], where: str, problems: Problems) -> None:
    """The Sentinel topology of a merged compose document: an odd number (3+) of Sentinels
    that monitor the `redis` service under one master name with a majority quorum, replicas
    that could take over (AOF, safe eviction, a volume), and application services that
    reach Redis through exactly those Sentinels under that name."""
    services: Mapping[str, Any] = doc.get("services") or {}
    volumes = doc.get("volumes") or {}
    sentinels: dict[str, re.Match[str]] = {}
    for name, svc in services.items():
        text = _command_text(svc)
        if "--sentinel" not in text:
            continue
        m = _MONITOR.search(text)
        if m is None:
            problems.add(f"{where} services.{name}", "a Sentinel without `sentinel monitor`")
            continue
        sentinels[name] = m
    if len(sentinels) < 3 or len(sentinels) % 2 == 0:
        problems.add(where, f"{len(sentinels)} Sentinels: run an odd number, 3 or more")
    masters = {m.group(1) for m in sentinels.values()}
    if len(masters) > 1:
        problems.add(where, f"the Sentinels monitor different master names {sorted(masters)}")
    for name, m in sentinels.items():
        if (m.group(2), m.group(3)) != ("redis", "6379"):
            problems.add(f"{where} services.{name}", "must monitor the redis service (redis 6379)")
        if int(m.group(4)) <= len(sentinels) // 2:
            problems.add(
                f"{where} services.{name}",
                f"quorum {m.group(4)} is no majority of {len(sentinels)} Sentinels",
            )
        if not (services[name].get("healthcheck") or {}).get("test"):
            problems.add(f"{where} services.{name}", "no healthcheck")

    replicas = [
        n for n, s in services.items() if "--replicaof" in (as_argv(s.get("command")) or [])
    ]
    if not replicas:
        problems.add(where, "no replica (a service running redis-server --replicaof redis 6379)")
    for name in replicas:
        argv = as_argv(services[name].get("command")) or []
        flags = dict(zip(argv[1::2], argv[2::2], strict=False))
        if argv[argv.index("--replicaof") + 1 : argv.index("--replicaof") + 3] != ["redis", "6379"]:
            problems.add(
                f"{where} services.{name}", "must replicate the redis service (redis 6379)"
            )
        if flags.get("--appendonly") != "yes":
            problems.add(f"{where} services.{name}", "a replica may be promoted: --appendonly yes")
        if flags.get("--maxmemory-policy") not in SAFE_EVICTION:
            problems.add(
                f"{where} services.{name}",
                f"a replica may be promoted: --maxmemory-policy one of {sorted(SAFE_EVICTION)}",
            )
        mounts = [str(v).split(":") for v in services[name].get("volumes") or []]
        if not any(len(v) > 1 and v[1] == "/data" and v[0] in volumes for v in mounts):
            problems.add(f"{where} services.{name}", "no named volume mounted at /data")

    for name in APP_SERVICES:
        if name not in services:
            continue
        found = sentinel_url_hosts(environment(services[name]).get("REDIS_URL", ""))
        if found is None:
            problems.add(f"{where} services.{name}", "REDIS_URL must be a redis+sentinel:// URL")
            continue
        hosts, master = found
        if not hosts:
            problems.add(f"{where} services.{name}", "REDIS_URL is not a valid sentinel URL")
            continue
        if {h for h, _ in hosts} != set(sentinels) or any(p != 26379 for _, p in hosts):
            problems.add(
                f"{where} services.{name}",
                f"REDIS_URL names {sorted(h for h, _ in hosts)}, the Sentinels are "
                f"{sorted(sentinels)} (port 26379)",
            )
        if masters and master not in masters:
            problems.add(
                f"{where} services.{name}",
                f"REDIS_URL's master name {master!r} is not the monitored {sorted(masters)}",
            )
        if name != "migrate":
            deps = services[name].get("depends_on") or {}
            for s in sentinels:
                if not isinstance(deps, Mapping) or (deps.get(s) or {}).get("condition") != (
                    "service_healthy"
                ):
                    problems.add(f"{where} services.{name}", f"depends_on {s}: service_healthy")


def check_sentinel_overlay(root: Path, problems: Problems) -> None:
    where = SENTINEL_OVERLAY
    path = root / where
    if not path.exists():
        problems.add(where, "missing")
        return
    try:
        overlay, missing = load_compose(path)
        base, _ = load_compose(root / "docker-compose.yml")
    except (OSError, yaml.YAMLError, ValueError) as exc:
        problems.add(where, f"cannot load: {exc}")
        return
    for name in sorted(missing):
        problems.add(where, f"${{{name}}} has no default: `docker compose up` needs it set")
    validator = jsonschema.Draft7Validator(compose_schema())
    merged = merge_compose(base, overlay)
    errors = [*validator.iter_errors(overlay), *validator.iter_errors(merged)]
    for err in errors:
        loc = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        problems.add(f"{where} {loc}", f"Compose Specification: {err.message}")
    if errors:
        return
    check_compose_doc(merged, None, problems, where=f"{where} (merged)")
    check_sentinel_doc(merged, where, problems)


# --------------------------------------------------------------------------- PromQL


def _enclosing_functions(expr: str, index: int) -> list[str]:
    """Names of the function calls around ``expr[index]``, innermost first."""
    names: list[str] = []
    depth = 0
    for i in range(index - 1, -1, -1):
        c = expr[i]
        if c == ")":
            depth += 1
        elif c == "(":
            if depth:
                depth -= 1
                continue
            m = re.search(r"([a-z_]+)\s*$", expr[:i])
            names.append(m.group(1) if m else "")
    return names


def check_promql(expr: str, where: str, problems: Problems) -> set[str]:
    """The wbcache metrics one query reads exist, are read as their type needs (promtool
    parses the query); returns the metric families it reads."""
    used: set[str] = set()
    for m in _METRIC.finditer(expr):
        name = m.group(0)
        around = _enclosing_functions(expr, m.start())
        if name in GAUGES:
            used.add(name)
        elif name in COUNTERS:
            used.add(name)
            if not around or around[0] not in ("rate", "irate", "increase"):
                problems.add(where, f"counter {name} outside rate()/increase()")
        elif (base := re.sub(r"_(bucket|sum|count)$", "", name)) in HISTOGRAMS and base != name:
            used.add(base)
            if not around or around[0] not in ("rate", "irate", "increase"):
                problems.add(where, f"histogram series {name} outside rate()/increase()")
            if name.endswith("_bucket") and "histogram_quantile" not in around:
                problems.add(where, f"{name} outside histogram_quantile()")
            for label in re.findall(r"by \(([^)]*)\)", expr):
                extra = {x.strip() for x in label.split(",")} - {"le"}
                allowed = HISTOGRAM_LABELS.get(base, set()) | {"job", "instance"}
                if extra - allowed:
                    problems.add(where, f"{base} has no label(s) {sorted(extra - allowed)}")
        else:
            problems.add(where, f"{name} is not a metric wbcache exports")
    return used


# --------------------------------------------------------------------------- Prometheus


def _alert_rules(doc: Any) -> Iterator[dict[str, Any]]:
    """The rules of a Prometheus rules file (its structure is promtool's to check)."""
    groups = doc.get("groups") if isinstance(doc, dict) else None
    for group in groups if isinstance(groups, list) else []:
        rules = group.get("rules") if isinstance(group, dict) else None
        for rule in rules if isinstance(rules, list) else []:
            if isinstance(rule, dict) and isinstance(rule.get("expr"), str):
                yield rule


def check_prometheus(root: Path, problems: Problems) -> list[str]:
    """Returns the alert expressions (for promtool)."""
    base = root / "deploy" / "prometheus"
    where = "deploy/prometheus/alerts.yml"
    try:
        doc = yaml.safe_load((base / "alerts.yml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        problems.add(where, f"cannot load: {exc}")
        return []
    rules = list(_alert_rules(doc))
    exprs = [r["expr"] for r in rules]
    for rule in rules:
        check_promql(rule["expr"], f"{where} {rule.get('alert') or rule.get('record')}", problems)
    alerts = {str(r["alert"]): r for r in rules if "alert" in r}

    def find(pred: Any, what: str) -> dict[str, Any] | None:
        found = [r for r in alerts.values() if pred(r["expr"])]
        if not found:
            problems.add(where, f"no alert for {what}")
            return None
        return found[0]

    lag = find(
        lambda e: "wbcache_oldest_pending_age_seconds" in e and re.search(r">\s*60\b", e),
        "lag (oldest pending age > 60 s)",
    )
    if lag is not None and parse_duration(str(lag.get("for", "0s"))) != 300:
        problems.add(where, f"{lag['alert']}: expected `for: 5m`")
    find(
        lambda e: "wbcache_workers_live" in e and "wbcache_pending" in e,
        "no live worker while writes are pending",
    )
    find(lambda e: "wbcache_dead_letters" in e, "dead letters present")
    find(
        lambda e: re.search(r"(increase|rate)\(wbcache_flush_failures_total", e),
        "flush failures increasing",
    )

    pw = "deploy/prometheus/prometheus.yml"
    try:
        prom = yaml.safe_load((base / "prometheus.yml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        problems.add(pw, f"cannot load: {exc}")
        return exprs
    if "alerts.yml" not in (prom.get("rule_files") or []):
        problems.add(pw, "rule_files must load alerts.yml")
    jobs = {c.get("job_name"): c for c in prom.get("scrape_configs") or []}
    if "wbcache" not in jobs:
        problems.add(pw, 'no scrape job `wbcache` (the alerts use up{job="wbcache"})')
    else:
        targets = [t for sc in jobs["wbcache"].get("static_configs") or [] for t in sc["targets"]]
        if "api:8000" not in targets:
            problems.add(pw, "the wbcache job must scrape the compose api service (api:8000)")
        if jobs["wbcache"].get("metrics_path", "/metrics") != "/metrics":
            problems.add(pw, "metrics_path must be /metrics")
    return exprs


# --------------------------------------------------------------------------- Grafana


def _panels(panels: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for p in panels:
        if isinstance(p, dict):
            yield p
            yield from _panels(p.get("panels") or [])


def check_dashboard(root: Path, problems: Problems) -> list[str]:
    """Returns the queries (for promtool)."""
    where = "deploy/grafana/wbcache.json"
    try:
        dash = json.loads((root / where).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        problems.add(where, f"cannot load: {exc}")
        return []
    exprs: list[str] = []
    used: set[str] = set()
    for panel in _panels(dash.get("panels") or []):
        for target in panel.get("targets") or []:
            expr = target.get("expr") if isinstance(target, dict) else None
            if isinstance(expr, str) and expr.strip():
                exprs.append(expr)
                pw = f"{where} panel {panel.get('id')} {panel.get('title')!r}"
                used |= check_promql(expr, pw, problems)
    for name in sorted((GAUGES | COUNTERS | HISTOGRAMS) - used):
        problems.add(where, f"no panel shows {name}")
    return exprs


# --------------------------------------------------------------------------- promtool


def run_promtool(root: Path, queries: list[str], problems: Problems) -> bool:
    """Optional: promtool's own checks when it is installed. True if it ran."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return False
    base = root / "deploy" / "prometheus"
    runs = [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ]
    with tempfile.TemporaryDirectory() as tmp:
        # Every dashboard query, parsed by Prometheus as a recording rule.
        rules = {
            "groups": [
                {
                    "name": "dashboard",
                    "rules": [
                        {
                            "record": f"dashboard:query{i}",
                            "expr": q.replace("$__rate_interval", "1m").replace("$job", ".+"),
                        }
                        for i, q in enumerate(queries)
                    ],
                }
            ]
        }
        queries_file = Path(tmp) / "dashboard-queries.yml"
        queries_file.write_text(yaml.safe_dump(rules))
        runs.append(["check", "rules", str(queries_file)])
        for args in runs:
            proc = subprocess.run(
                [promtool, *args], cwd=base, capture_output=True, text=True, timeout=120
            )
            if proc.returncode != 0:
                what = "the dashboard queries" if args[-1] == str(queries_file) else args[-1]
                out = (proc.stdout + proc.stderr).strip()
                problems.add(f"promtool {' '.join(args[:2])} {what}", out)
    return True


# --------------------------------------------------------------------------- main


def check_all(root: Path = ROOT, promtool: bool = True) -> tuple[Problems, list[str]]:
    """All checks; returns the problems and notes on what ran."""
    problems = Problems()
    notes: list[str] = []
    facts = check_dockerfile(root, problems)
    check_lock(root, problems)
    check_compose(root, facts, problems)
    check_sentinel_overlay(root, problems)
    queries = check_prometheus(root, problems) + check_dashboard(root, problems)
    if promtool:
        if run_promtool(root, queries, problems):
            notes.append("promtool: config, rules, alert unit tests and dashboard queries")
        else:
            notes.append("promtool not installed: its checks skipped (optional)")
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    parser.add_argument("--no-promtool", action="store_true", help="skip promtool")
    args = parser.parse_args(argv)
    problems, notes = check_all(args.root.resolve(), promtool=not args.no_promtool)
    for note in notes:
        print(f"check_deploy: {note}")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"check_deploy: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(
        "check_deploy: Dockerfile, requirements.lock, docker-compose.yml (and its Sentinel "
        "overlay), deploy/ are OK"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
