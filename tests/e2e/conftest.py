"""Real processes: the gateway under uvicorn and an arq worker, as production runs them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest
import yaml

from tests.fakes.anthropic_fake import anthropic_fake
from tests.fakes.gemini_fake import gemini_fake
from tests.fakes.server import FakeServer

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    url: str, timeout_s: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_gateway(
    env: dict[str, str], port: int, log: IO[bytes], *options: str
) -> subprocess.Popen[bytes]:
    """The gateway as production runs it: uvicorn, here on loopback."""
    argv = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1"]
    return subprocess.Popen(
        [*argv, "--port", str(port), *options],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


# The runner's own settings and keys stay out of the processes under test.
NOT_INHERITED = ("FLYWHEEL_", "OTEL_", "LANGSMITH_", "OPENAI", "ANTHROPIC", "GEMINI")


def process_env(
    tmp: Path,
    routes: dict[str, object],
    redis_url: str,
    database_url: str,
    prefix: str,
    **settings: str,
) -> dict[str, str]:
    """The environment of a gateway and worker under test: `routes` written to a routes
    file in `tmp` (also the var dir), the test Redis under `prefix`, the test database."""
    path = tmp / "routes.yaml"
    path.write_text(yaml.safe_dump(routes))
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED)},
        "FLYWHEEL_CONFIG": str(path),
        "FLYWHEEL_VAR_DIR": str(tmp),
        "FLYWHEEL_REDIS_PREFIX": prefix,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        **settings,
    }


def start_worker(env: dict[str, str], log: IO[bytes], *options: str) -> subprocess.Popen[bytes]:
    """An arq worker as production runs it (`options` go before the settings path)."""
    return subprocess.Popen(
        [str(BIN / "arq"), *options, "workers.main.WorkerSettings"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@dataclass
class System:
    url: str
    env: dict[str, str]
    gateway: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    openai: FakeServer
    anthropic: FakeServer
    gemini: FakeServer


def _routes(openai: FakeServer, anthropic: FakeServer, gemini: FakeServer) -> dict[str, object]:
    def single(provider: str, model: str, base: str, key_env: str) -> dict[str, object]:
        return {
            "strategy": "priority",
            "deployments": [
                {
                    "name": f"{provider}-{model}",
                    "provider": provider,
                    "model": model,
                    "api_base": base,
                    "api_key_env": key_env,
                    "input_cost_per_1k": 0.001,
                    "output_cost_per_1k": 0.002,
                }
            ],
        }

    return {
        "routes": {
            "gpt-fake": single(
                "openai_compatible", "gpt-fake", openai.url + "/v1", "OPENAI_API_KEY"
            ),
            "fails-429": single(
                "openai_compatible", "fail-429", openai.url + "/v1", "OPENAI_API_KEY"
            ),
            "claude": single("anthropic", "claude-fake", anthropic.url, "ANTHROPIC_API_KEY"),
            "gemini": single("gemini", "gemini-fake", gemini.url, "GEMINI_API_KEY"),
            "demo": {
                "deployments": [
                    {
                        "name": "mock",
                        "provider": "mock",
                        "model": "mock-1",
                        "mock": {"latency_ms": 5, "jitter_ms": 1},
                    }
                ]
            },
        }
    }


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    database_url: str,
    key_prefix: str,
    openai_upstream: FakeServer,
) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("e2e")
    with anthropic_fake() as anthropic, gemini_fake() as gemini:
        routes = tmp / "routes.yaml"
        routes.write_text(yaml.safe_dump(_routes(openai_upstream, anthropic, gemini)))
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "OPENAI"))},
            "FLYWHEEL_CONFIG": str(routes),
            "FLYWHEEL_VAR_DIR": str(tmp),
            "FLYWHEEL_REDIS_PREFIX": key_prefix + "e2e:",
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "PORT": str(port),
            "OPENAI_API_KEY": "sk-e2e-openai-0123456789",
            "ANTHROPIC_API_KEY": "sk-ant-e2e",
            "GEMINI_API_KEY": "gm-e2e-key",
        }
        log = (tmp / "gateway.log").open("wb")
        worker = start_worker(env, log)
        gateway = start_gateway(env, port, log, "--no-access-log")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(url + "/health", proc=gateway)
            yield System(url, env, gateway, worker, openai_upstream, anthropic, gemini)
        finally:
            stop(gateway)
            stop(worker)
            log.close()
