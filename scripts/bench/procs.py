"""Child processes that always stop: each runs in its own session and is ended by group.

`Processes` is a context manager; leaving it (normally, on an error or on Ctrl-C)
terminates every process it started, then kills whatever is still alive.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

STOP_GRACE_S = 5.0


class BenchError(RuntimeError):
    """Something the bench needs did not work; the message says what."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_status(port: int, path: str, timeout_s: float = 1.0) -> int | None:
    """The status of GET http://127.0.0.1:port/path, or None when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def rss_mb(pid: int) -> float:
    """Resident set size of one process in MB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Processes:
    """Starts processes and guarantees they are gone when the block ends."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A second Ctrl-C must not cut the clean-up short.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous)

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start argv in a new session (its own process group), output to `log`."""
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if log is not None and not isinstance(out, int):
                out.close()
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Terminate the process group, wait a little, then kill it."""
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=STOP_GRACE_S)
        # Workers (nginx) may outlive a killed master; the group still names them.
        _signal_group(proc, signal.SIGKILL)
        if proc in self._running:
            self._running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._running)):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.stop(proc)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session made the child a group leader, so its pid is the group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def wait_for_http(
    proc: subprocess.Popen[bytes],
    port: int,
    path: str,
    *,
    timeout_s: float,
    log: Path | None,
    since: float | None = None,
) -> float:
    """Poll until GET path answers 200; seconds since `since` (perf_counter) or since now.

    Fails as soon as the process exits, with the end of its log.
    """
    start = time.perf_counter() if since is None else since
    while True:
        if http_status(port, path, timeout_s=0.5) == 200:
            return time.perf_counter() - start
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode}{log_tail(log)}")
        if time.perf_counter() - start > timeout_s:
            raise BenchError(f"{path} on port {port} not 200 after {timeout_s:.0f}s{log_tail(log)}")
        time.sleep(0.005)


def log_tail(log: Path | None, lines: int = 30) -> str:
    """The end of a log file, framed for an error message ("" if there is none)."""
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- " + str(log) + " (last lines) ---\n" + "\n".join(text)
