"""`flywheel run` (what `make run` starts) and the CLI's start-up checks, as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from app.store.schema import SCHEMA_REVISION
from tests.e2e.conftest import BIN, ROOT, free_port

pytestmark = pytest.mark.e2e


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    drop = ("FLYWHEEL_", "REDIS_URL", "DATABASE_URL", "OPENAI", "ANTHROPIC", "GEMINI", "PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({"FLYWHEEL_VAR_DIR": str(tmp), **extra})
    return env


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes], timeout_s: float = 40
) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    last: dict[str, object] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"flywheel run exited with {proc.returncode}"
        try:
            last = httpx.get(url + "/health/detailed", timeout=2).json()
            if last.get("status") == "ok":
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"not healthy in {timeout_s}s: {last}")


def run_once(tmp: Path, port: int, sig: signal.Signals) -> None:
    env = clean_env(tmp, PORT=str(port))
    proc = subprocess.Popen(
        [str(BIN / "flywheel"), "run"],
        env=env,
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        detail = wait_healthy(url, proc)
        assert detail["redis"] == {"status": "ok", "latency_ms": detail["redis"]["latency_ms"]}  # type: ignore[index]
        assert str(detail["database"]["revision"]) == SCHEMA_REVISION  # type: ignore[index]
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names
        assert "arq" in names
        assert "uvicorn" in names
        answer = httpx.post(
            url + "/v1/chat/completions",
            timeout=10,
            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert answer.status_code == 200
        # No master key was set: the embedded system made one, for its user only, and
        # the admin endpoints take it (the same one on every start).
        made = tmp / "master_key"
        assert made.stat().st_mode & 0o777 == 0o600
        master = made.read_text().strip()
        status = httpx.get(
            url + "/v1/virtuous-cycle/status",
            headers={"authorization": f"Bearer {master}"},
            timeout=10,
        )
        assert status.status_code == 200, status.text
        assert "demo-cycle" in status.json()["routes"]
        # The same key logs in to the dashboard, whose page `make run` serves.
        with httpx.Client(base_url=url, timeout=10) as browser:
            assert browser.get("/dashboard/").status_code == 303
            login = browser.post("/dashboard/login", json={"key": master})
            assert login.status_code == 204, login.text
            assert "Flywheel" in browser.get("/dashboard/").text
        proc.send_signal(sig)
        assert proc.wait(20) == 0
        assert proc.stdout is not None
        assert master.encode() not in proc.stdout.read()  # only where it is, never itself
    finally:
        if proc.poll() is None:
            proc.kill()
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], f"orphans left: {alive}"
    assert (tmp / "flywheel.db").exists()


def test_flywheel_run_starts_everything_and_stops_cleanly_twice(tmp_path: Path) -> None:
    port = free_port()
    run_once(tmp_path, port, signal.SIGINT)
    # A second run on the same var dir and port works (stale socket, migrated database).
    run_once(tmp_path, port, signal.SIGTERM)


def test_bad_routes_file_fails_startup_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "routes.yaml"
    bad.write_text("routes:\n  r:\n    deployments:\n      - {name: a, provider: nope, model: m}\n")
    env = clean_env(tmp_path, FLYWHEEL_CONFIG=str(bad))
    out = subprocess.run(
        [str(BIN / "flywheel"), "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert str(bad) in out.stderr
    assert "routes.r.deployments.0.provider" in out.stderr
    uv = subprocess.run(
        [str(BIN / "python"), "-m", "uvicorn", "app.main:app"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert uv.returncode != 0
    assert "routes.r.deployments.0.provider" in uv.stderr


def test_prod_without_master_key_refuses_to_start(tmp_path: Path) -> None:
    env = clean_env(tmp_path, FLYWHEEL_ENV="prod")
    out = subprocess.run(
        [str(BIN / "flywheel"), "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode != 0
    assert "FLYWHEEL_MASTER_KEY" in out.stderr + out.stdout


def test_profile_masks_secrets(tmp_path: Path) -> None:
    env = clean_env(
        tmp_path,
        OPENAI_API_KEY="sk-live-should-never-print-42",
        FLYWHEEL_POLICY="quality_optimized",
        FLYWHEEL_MASTER_KEY="master-never-print",
    )
    out = subprocess.run(
        [str(BIN / "flywheel"), "profile"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "sk-live-should-never-print-42" not in out.stdout
    assert "master-never-print" not in out.stdout
    assert "policy: quality_optimized" in out.stdout
    assert "gpt-4o-mini" in out.stdout  # the example route its key enables
    assert "**********" in out.stdout
