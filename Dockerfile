# One image for every wbcache process; the command picks which:
#   API (default):  wbcache serve --host 0.0.0.0 --port 8000
#   worker:         wbcache worker        (health: wbcache healthcheck worker)
#   migrations:     wbcache migrate       (one-shot, before the API and workers)
# docker-compose.yml runs all three; `make lint` checks both files (scripts/check_deploy.py).

# --- build: a virtualenv with the locked dependencies, then the package ---------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from the hashed lock (every transitive package pinned): this layer
# is rebuilt only when requirements.lock changes, not on every code change.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps --requirement requirements.lock

# Then the project itself, without resolving anything: the lock installed it all.
COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
COPY alembic ./alembic
# The Python client ships in the same distribution (pyproject.toml lists the package).
COPY wbcache ./wbcache
RUN pip install --no-deps . \
    && pip check

# --- runtime: the virtualenv only, run as an unprivileged user --------------------------
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --system --gid 10001 wbcache \
    && useradd --system --uid 10001 --gid wbcache --create-home --home-dir /home/wbcache \
        --shell /usr/sbin/nologin wbcache

COPY --from=build /opt/venv /opt/venv

# Numeric, so the runtime (and Kubernetes' runAsNonRoot) can tell it is not root.
USER 10001:10001
WORKDIR /home/wbcache

EXPOSE 8000

# The API's probe: exits 0 when GET /healthz answers on port 8000. Worker containers
# override it with `wbcache healthcheck worker` (docker-compose.yml does).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["wbcache", "healthcheck", "api"]

CMD ["wbcache", "serve", "--host", "0.0.0.0", "--port", "8000"]
