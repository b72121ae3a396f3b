"""The cache across real gateway processes on one Redis, driven by the openai SDK."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import ROOT, System, free_port, stop, wait_for


class Gateways:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = {**env, "FLYWHEEL_CACHE_MODE": "on"}
        self.log = log
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)]
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [*argv, "--host", "127.0.0.1", "--no-access-log"],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for(url + "/health", proc=proc)
        return proc, url


@pytest.fixture
def gateways(system: System, tmp_path: Path) -> Iterator[Gateways]:
    group = Gateways(system.env, tmp_path / "gateways.log")
    try:
        yield group
    finally:
        for proc in group.procs:
            stop(proc)


def ask(url: str, marker: str, *, stream: bool = False) -> tuple[str, str]:
    """(x-flywheel-cache, answer text) for one question through the SDK."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-cache-e2e", max_retries=0)
    messages = [{"role": "user", "content": f"remember {marker}"}]
    if not stream:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-fake",
            messages=messages,  # type: ignore[arg-type]
        )
        return raw.headers["x-flywheel-cache"], raw.parse().choices[0].message.content or ""
    raw_stream = client.chat.completions.with_raw_response.create(
        model="gpt-fake",
        messages=messages,  # type: ignore[arg-type]
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in raw_stream.parse() if c.choices]
    return raw_stream.headers["x-flywheel-cache"], "".join(pieces)


def test_l2_is_shared_by_processes_and_survives_a_restart(
    system: System, gateways: Gateways
) -> None:
    marker = uuid.uuid4().hex
    one, url_one = gateways.start()
    _, url_two = gateways.start()
    tier, text = ask(url_one, marker)
    assert tier == "miss"
    assert marker in text
    time.sleep(0.3)  # the L2 write happens after the answer
    assert ask(url_two, marker) == ("hit-l2", text)
    assert ask(url_two, marker) == ("hit-l1", text)
    assert ask(url_two, marker, stream=True) == ("hit-l1", text)
    stop(one)
    _, url_again = gateways.start()
    assert ask(url_again, marker, stream=True) == ("hit-l2", text)
    assert sum(marker in str(s.body) for s in system.openai.seen) == 1
