"""A fast fake OpenAI upstream: nginx answering canned chat completions from memory.

`/v1/chat/completions` returns a chat.completion JSON, `/stream/v1/chat/completions`
an SSE stream (role chunk, content chunks, finish chunk, usage chunk, `[DONE]`).
nginx costs a few microseconds per request, so what the bench measures is the gateway.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.procs import BenchError, Processes, free_port, wait_for_http

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
UPSTREAM_MODEL = "gpt-4o-mini-2024-07-18"
COMPLETION_ID = "chatcmpl-bench0000000000000000000001"
CREATED = 1732147200
ANSWER = ["Hello", "!", " How", " can", " I", " help", " you", " today", "?"]
USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": len(ANSWER),
    "total_tokens": 9 + len(ANSWER),
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}


def _envelope(kind: str) -> dict[str, Any]:
    return {
        "id": COMPLETION_ID,
        "object": kind,
        "created": CREATED,
        "model": UPSTREAM_MODEL,
        "system_fingerprint": "fp_bench0001",
    }


def completion_body() -> str:
    """A non-streaming chat.completion as OpenAI sends it."""
    message = {"role": "assistant", "content": "".join(ANSWER), "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    body = {**_envelope("chat.completion"), "choices": [choice], "usage": USAGE}
    return json.dumps(body, separators=(",", ":"))


def stream_body() -> str:
    """An SSE stream as OpenAI sends it with stream_options.include_usage."""
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": "", "refusal": None}, None),
        *(({"content": piece}, None) for piece in ANSWER),
        ({}, "stop"),
    ]
    events = []
    for delta, finish in deltas:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        events.append({**_envelope("chat.completion.chunk"), "choices": [choice], "usage": None})
    events.append({**_envelope("chat.completion.chunk"), "choices": [], "usage": USAGE})
    lines = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events]
    return "".join(lines) + "data: [DONE]\n\n"


def _nginx_string(text: str) -> str:
    """Escape text for a single-quoted nginx string (`return` would expand `$`)."""
    if "$" in text:
        raise ValueError("nginx would read '$' as a variable")
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def render_config(tmp: Path, port: int, extra_locations: str = "") -> str:
    """The nginx config; `extra_locations` (server-level blocks, which may use the
    @JSON_BODY@ and @SSE_BODY@ placeholders) are added before the catch-all."""
    text = TEMPLATE.read_text()
    for key, value in {
        "@EXTRA_LOCATIONS@": extra_locations,  # first: its placeholders are filled next
        "@TMP@": str(tmp),
        "@PORT@": str(port),
        "@JSON_BODY@": _nginx_string(completion_body()),
        "@SSE_BODY@": _nginx_string(stream_body()),
    }.items():
        text = text.replace(key, value)
    return text


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def start_nginx(
    procs: Processes, tmp: Path, nginx: str, extra_locations: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """Write the config, start nginx in the foreground, wait until it answers."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(render_config(tmp, port, extra_locations))
    log = tmp / "nginx-stderr.log"
    # -e: the compiled-in error log (/var/log/nginx) is opened before the config is read.
    argv = [nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejected {conf}:\n{check.stderr}")
    proc = procs.start(argv, cwd=tmp, log=log)
    wait_for_http(proc, port, "/health", timeout_s=10, log=tmp / "nginx-error.log")
    return proc, port


def start_redis(procs: Processes, tmp: Path) -> str:
    """A private redis-server (the one embedded mode uses) for the gateway's records."""
    from app.embedded import redis_server_binary

    sock = tmp / "redis.sock"
    argv = [
        redis_server_binary(),
        "--port",
        "0",
        "--unixsocket",
        str(sock),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(tmp),
    ]
    proc = procs.start(argv, log=tmp / "redis.log")
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError("redis-server did not start")
        time.sleep(0.05)
    return f"unix://{sock}"
