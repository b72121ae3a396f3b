"""Deployment files cannot run here (no Docker), so they are checked by reading.

The commands, env names and health path they use are the ones the e2e tests run.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {name.upper() for name in Settings.model_fields}


def test_compose_services_health_and_env() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"gateway", "worker", "redis", "postgres", "migrate"} <= set(services)
    for name in ("gateway", "worker", "redis", "postgres"):
        assert "healthcheck" in services[name], name
    assert services["migrate"]["command"] == ["flywheel", "migrate"]
    assert services["worker"]["command"] == ["flywheel", "worker"]
    assert services["gateway"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert "/health" in " ".join(services["gateway"]["healthcheck"]["test"])
    for name in ("gateway", "worker", "migrate"):
        assert set(services[name]["environment"]) <= SETTINGS, name


def test_railway_uses_dockerfile_port_and_health() -> None:
    railway = json.loads((ROOT / "railway.json").read_text())
    assert railway["build"]["builder"] == "DOCKERFILE"
    deploy = railway["deploy"]
    assert deploy["healthcheckPath"] == "/health"
    assert "$PORT" in deploy["startCommand"] or "${PORT" in deploy["startCommand"]
    assert "app.main:app" in deploy["startCommand"]
    assert deploy["restartPolicyType"] in {"ON_FAILURE", "ALWAYS"}


def test_dockerfile_runs_the_production_commands() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "uvicorn app.main:app" in text
    assert "$PORT" in text
    assert "HEALTHCHECK" in text
    assert "/health" in text
    copied = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    sources = {src for srcs in copied for src in srcs}
    assert {"app", "workers", "migrations", "alembic.ini", "pyproject.toml"} <= sources


def test_ci_runs_make_test() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()
