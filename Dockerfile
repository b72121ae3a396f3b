# Flywheel gateway and worker image (one image, two commands).
FROM python:3.12-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p app workers && touch app/__init__.py workers/__init__.py \
    && pip install . && pip uninstall -y flywheel-gateway

COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
COPY alembic.ini flywheel.example.yaml ./
# Editable, so `flywheel migrate` finds alembic.ini and migrations/ under /app.
RUN pip install --no-deps -e . \
    && useradd --system --uid 10001 --home /app flywheel \
    && mkdir -p /app/var/files && chown -R flywheel /app/var

USER flywheel
ENV FLYWHEEL_ENV=prod \
    HOST=0.0.0.0 \
    PORT=8000
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8000\")}/health', timeout=2)"

# The gateway; the worker runs the same image with `flywheel worker`,
# migrations with `flywheel migrate`.
CMD ["sh", "-c", "exec uvicorn app.main:app --host \"$HOST\" --port \"$PORT\" --no-access-log --proxy-headers"]
