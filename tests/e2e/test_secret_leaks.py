"""Keys, their hashes and Authorization headers never leak, proven with real processes.

A gateway under uvicorn (DEBUG logging, keys required) and an arq worker are given a
planted master key and provider keys; virtual keys are made through the admin API. Then
the error paths a client or an upstream can cause are forced: missing, made-up,
misspelt, revoked and rate-limited keys, a route the key may not use, bad and oversized
bodies, upstreams that fail, time out, refuse connections or echo the credentials they
were sent (OpenAI, Anthropic and Gemini adapters). Afterwards everything the system
produced is searched (every response and header, both processes' output, /metrics,
every row of every table, every Redis key under the prefix and arq's, the files in the
var dir including a snapshot), through gzip, zlib and base64 layers. None of the planted
secrets, nor a key's SHA-256 or its first 16 hex digits, may be anywhere but where they
belong: the hash in `api_keys.key_hash` and in the name of the resolver's Redis cache
entry (both the lookup index), a key in the one answer that creates it, and a key a user
pasted into a prompt in the answer that echoes the prompt back.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import hashlib
import json
import os
import re
import secrets
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web
from redis.asyncio import Redis
from sqlalchemy import MetaData, select

from app.config import normalise_database_url
from app.store.db import make_engine
from tests.e2e.conftest import free_port, start_gateway, start_worker, stop, wait_for
from tests.fakes.server import FakeServer, FakeState, remember

pytestmark = pytest.mark.e2e

MAX_BODY = 64 * 1024
# What tests/fakes/openai_fake.py answers a request without a bearer token: a provider
# echoing a key in its 401 message, which the gateway must cut before passing it on.
UPSTREAM_ECHOED_KEY = "sk-fake-leak-1234567890"
HEX = re.compile(r"[0-9a-f]+")
B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{24,}={0,2}")
KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
# Settings and keys from the environment of whoever runs the tests stay out of the rig.
INHERITED_NOT = ("FLYWHEEL_", "OPENAI", "ANTHROPIC", "GEMINI")
# The worker's logging at its most (arq's own setup leaves the gateway's loggers to
# Python's last resort, WARNING and up): the gateway's loggers at DEBUG and libraries at
# INFO, as `configure_logging` sets them for FLYWHEEL_LOG_LEVEL=DEBUG.
WORKER_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": "INFO"},
    "loggers": {"flywheel": {"level": "DEBUG"}, "arq": {"level": "DEBUG"}},
}


# --- what is planted, and where it may be -------------------------------------------


@dataclass(frozen=True)
class Planted:
    name: str
    value: str

    @property
    def folds(self) -> bool:
        # Hashes are hex: an upper-case spelling is the same leak.
        return bool(HEX.fullmatch(self.value))

    def forms(self) -> tuple[bytes, ...]:
        """The spellings searched for: as is; for a full hash, also its raw digest in
        base64 (standard and URL-safe), as a log or a JSON encoder might render it."""
        out = [self.value.encode()]
        if self.folds and len(self.value) == 64:
            digest = bytes.fromhex(self.value)
            out += [base64.b64encode(digest).rstrip(b"="), base64.urlsafe_b64encode(digest)[:40]]
        return tuple(out)


@dataclass
class Corpus:
    """Everything the system produced, each piece with where it came from and which
    planted secrets may be there by design."""

    entries: list[tuple[str, bytes, frozenset[str]]] = field(default_factory=list)

    def add(self, where: str, data: bytes | str, allow: Iterable[str] = ()) -> None:
        raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        self.entries.append((where, raw, frozenset(allow)))


def _unpacked(data: bytes) -> list[bytes]:
    """What a blob may hide: gzip files, zlib payloads (the cache's `z` + zlib) and
    base64 runs (a snapshot's binary values)."""
    attempts: list[tuple[Callable[[bytes], bytes], bytes]] = []
    if data[:2] == b"\x1f\x8b":
        attempts.append((gzip.decompress, data))
    attempts += [(zlib.decompress, data[skip:]) for skip in (0, 1) if data[skip : skip + 1] == b"x"]
    for run in B64_RUN.findall(data)[:200]:
        padded = run + b"=" * (-len(run) % 4)
        attempts += [(base64.b64decode, padded), (base64.urlsafe_b64decode, padded)]
    out = []
    for unpack, blob in attempts:
        try:
            out.append(unpack(blob))
        except (OSError, EOFError, zlib.error, binascii.Error, ValueError):
            continue
    return out


def _layers(data: bytes, depth: int = 0) -> Iterator[bytes]:
    yield data
    if depth < 3:
        for inner in _unpacked(data):
            yield from _layers(inner, depth + 1)


def find_leaks(corpus: Corpus, planted: list[Planted]) -> list[str]:
    """`<secret names> in <where>` for every piece holding a secret it may not hold."""
    found = []
    for where, data, allow in corpus.entries:
        layers = list(_layers(data))
        folded = [layer.lower() for layer in layers]
        names = [
            p.name
            for p in planted
            if p.name not in allow
            and any(
                form.lower() in h if p.folds else form in h
                for form in p.forms()
                for h in (folded if p.folds else layers)
            )
        ]
        if names:
            found.append(f"{', '.join(names)} in {scrub(where, planted)}")
    return found


def scrub(text: str, planted: list[Planted]) -> str:
    """`text` with every planted secret replaced by its name: for failure messages."""
    for p in sorted(planted, key=lambda p: -len(p.value)):
        text = re.sub(re.escape(p.value), f"<{p.name}>", text, flags=re.IGNORECASE)
    return text[:300]


# --- an upstream that echoes the credentials it is sent --------------------------------


def _echo_app(state: FakeState) -> web.Application:
    """Providers' worst habits: the key sent back in an error message, a whole header
    dump in a 5xx page, the bearer in a mid-stream error event and in response headers."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await remember(state, request)
        auth = request.headers.get("authorization", "")
        token = auth.partition(" ")[2]
        model = str(body.get("model", "")) if isinstance(body, dict) else ""
        echo = {"x-echo-authorization": auth, "x-api-key-used": token}

        def error(status: int, message: str) -> web.Response:
            err = {"message": message, "type": "invalid_request_error", "param": None}
            return web.json_response({"error": {**err, "code": None}}, status=status, headers=echo)

        if model == "echo-401":
            return error(401, f"Incorrect API key provided: {token}. Sent: {auth}")
        if model == "echo-429":
            return error(429, f"Rate limit reached for key {token} ({auth})")
        if model == "echo-500":
            dump = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
            return web.Response(status=500, text=f"Internal error\n{dump}", headers=echo)
        chunk = {
            "id": "chatcmpl-echo",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}],
        }
        if model == "echo-stream-error":
            resp = web.StreamResponse(headers={"content-type": "text/event-stream", **echo})
            await resp.prepare(request)
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            broken = {"error": {"message": f"stream broke for {auth}", "type": "server_error"}}
            await resp.write(b"data: " + json.dumps(broken).encode() + b"\n\n")
            await resp.write_eof()
            return resp
        answer = {
            "id": "chatcmpl-echo",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        if isinstance(body, dict) and body.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream", **echo})
            await resp.prepare(request)
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            done = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await resp.write(b"data: " + json.dumps(done).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.json_response(answer, headers=echo)

    async def other(request: web.Request) -> web.Response:
        """Anthropic's /v1/messages and Google's :generateContent: a 401 naming the key
        as it was sent, in a shape both providers' error readers take."""
        await remember(state, request)
        sent = {k: v for k, v in request.headers.items() if k.lower() in KEY_HEADERS}
        err = {
            "type": "authentication_error",
            "status": "UNAUTHENTICATED",
            "code": 401,
            "message": f"API key not valid: {sent}",
        }
        echo = {f"x-echo-{k}": v for k, v in sent.items()}
        return web.json_response({"type": "error", "error": err}, status=401, headers=echo)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/{tail:.*}", other)
    return app


# --- the processes ----------------------------------------------------------------------


def _routes(openai: FakeServer, echo: FakeServer) -> dict[str, Any]:
    def route(
        base: str, model: str, *, key: str | None = "OPENAI_API_KEY", **extra: Any
    ) -> dict[str, Any]:
        deployment: dict[str, Any] = {
            "name": f"d-{model}",
            "provider": "openai_compatible",
            "model": model,
            "api_base": base + "/v1",
        }
        if key is not None:
            deployment["api_key_env"] = key
        deployment.update(extra.pop("deployment", {}))
        # No retries: each failing route fails once per request, as the test counts.
        return {"strategy": "priority", "retries": 0, "deployments": [deployment], **extra}

    routes = {
        "gpt-fake": route(openai.url, "gpt-fake"),
        "other": route(openai.url, "gpt-fake"),
        "fails-500": route(openai.url, "fail-500"),
        "fails-429": route(openai.url, "fail-429"),
        "nokey": route(openai.url, "gpt-fake", key=None),
        "slow": route(openai.url, "slow-3000", timeout_s=0.3),
        # Nothing listens there (a port just closed): the connection is refused.
        "dead": route(f"http://127.0.0.1:{free_port()}", "gpt-fake"),
        "embed": route(openai.url, "text-embed"),
        "embed-fails": route(openai.url, "fail-500"),
        # A key pasted into a prompt on a route that keeps bodies: kept redacted. Not
        # cached: the cache keeps answers as they are, which is its point.
        "stored": route(openai.url, "gpt-fake", bodies={"store": True}, cache={"mode": "off"}),
        "claude-echo": route(
            echo.url,
            "claude-echo",
            key="ANTHROPIC_API_KEY",
            deployment={"provider": "anthropic", "api_base": echo.url},
        ),
        "gemini-echo": route(
            echo.url,
            "gemini-echo",
            key="GEMINI_API_KEY",
            deployment={"provider": "gemini", "api_base": echo.url},
        ),
        "demo": {
            "deployments": [
                {"name": "mock", "provider": "mock", "model": "mock-1", "mock": {"latency_ms": 1}}
            ]
        },
    }
    for mode in ("echo-401", "echo-429", "echo-500", "echo-stream-error", "echo-ok"):
        routes[mode] = route(echo.url, mode)
    return {"routes": routes}


@dataclass
class Rig:
    url: str
    tmp: Path
    prefix: str
    master: str
    providers: dict[str, str]  # env var -> the planted key
    gateway: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    echo: FakeServer
    openai: FakeServer


@pytest.fixture
def rig(
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    key_prefix: str,
    openai_upstream: FakeServer,
) -> Iterator[Rig]:
    # Shapes no pattern knows, so only exact handling of these values can hide them.
    master = "mk" + secrets.token_hex(24)
    providers = {
        env: name + secrets.token_hex(24)
        for env, name in (
            ("OPENAI_API_KEY", "oai"),
            ("ANTHROPIC_API_KEY", "ant"),
            ("GEMINI_API_KEY", "gem"),
        )
    }
    prefix = f"{key_prefix}leaks{secrets.token_hex(3)}:"
    with FakeServer(_echo_app) as echo:
        routes = tmp_path / "routes.yaml"
        routes.write_text(yaml.safe_dump(_routes(openai_upstream, echo)))
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(INHERITED_NOT)},
            "FLYWHEEL_ENV": "staging",
            "FLYWHEEL_AUTH": "required",
            "FLYWHEEL_MASTER_KEY": master,
            "FLYWHEEL_LOG_LEVEL": "DEBUG",
            "FLYWHEEL_CONFIG": str(routes),
            "FLYWHEEL_VAR_DIR": str(tmp_path),
            "FLYWHEEL_REDIS_PREFIX": prefix,
            "FLYWHEEL_CACHE_MODE": "on",
            "FLYWHEEL_MAX_BODY_BYTES": str(MAX_BODY),
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            **providers,
        }
        with (tmp_path / "worker.log").open("wb") as out:
            worker = start_worker(env, out, "--custom-log-dict", f"{__name__}.WORKER_LOGGING")
        with (tmp_path / "gateway.log").open("wb") as out:
            # With the access log: the most output there is to search.
            gateway = start_gateway(env, port, out, "--log-level", "debug")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(url + "/health", proc=gateway)
            yield Rig(
                url, tmp_path, prefix, master, providers, gateway, worker, echo, openai_upstream
            )
        finally:
            stop(gateway)
            stop(worker)


# --- traffic ------------------------------------------------------------------------------


@dataclass
class Probe:
    client: httpx.AsyncClient
    corpus: Corpus
    planted: list[Planted]
    v1_ids: dict[str, str] = field(default_factory=dict)  # request id -> label

    async def send(
        self,
        label: str,
        method: str,
        path: str,
        *,
        expect: int | set[int],
        key: str | None = None,
        headers: dict[str, str] | None = None,
        allow: Iterable[str] = (),
        stream: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        sent = dict(headers or {})
        if key is not None:
            sent["authorization"] = f"Bearer {key}"
        if stream:
            async with self.client.stream(method, path, headers=sent, **kwargs) as resp:
                await resp.aread()
        else:
            resp = await self.client.request(method, path, headers=sent, **kwargs)
        where = f"the answer to {label!r} ({method} {path}, {resp.status_code})"
        allowed = frozenset(allow)
        headers_text = "\n".join(f"{k}: {v}" for k, v in resp.headers.multi_items())
        self.corpus.add(f"headers of {where}", headers_text, allowed)
        self.corpus.add(f"body of {where}", resp.content, allowed)
        if method == "POST" and path.startswith("/v1/"):
            self.v1_ids[resp.headers["x-request-id"]] = label
        wanted = {expect} if isinstance(expect, int) else expect
        assert resp.status_code in wanted, (
            f"{label}: {resp.status_code} {scrub(resp.text, self.planted)}"
        )
        return resp

    async def chat(
        self, label: str, model: str, *, expect: int | set[int], key: str | None, **kw: Any
    ) -> httpx.Response:
        content = kw.pop("content", "hello")
        body = {"model": model, "messages": [{"role": "user", "content": content}], **kw}
        stream = bool(kw.get("stream"))
        return await self.send(
            label,
            "POST",
            "/v1/chat/completions",
            expect=expect,
            key=key,
            json=body,
            stream=stream,
        )


@dataclass(frozen=True)
class Key:
    id: str
    secret: str

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.secret.encode()).hexdigest()


async def make_key(probe: Probe, master: str, name: str, **spec: Any) -> Key:
    resp = await probe.send(
        f"create key {name}",
        "POST",
        "/admin/keys",
        expect=201,
        key=master,
        json={"name": name, **spec},
        allow=[name],  # the one answer that shows a secret, by design
    )
    body = resp.json()
    return Key(body["id"], body["key"])


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 8192):
        yield data[start : start + 8192]


async def force_everything(probe: Probe, rig: Rig, keys: dict[str, Key], made_up: str) -> None:
    """Every error path a client (or an upstream) can reach, and the successes around them."""
    main, revoked, rpm = keys["virtual"].secret, keys["revoked"].secret, keys["rpm"].secret
    master, send, chat = rig.master, probe.send, probe.chat
    openai_key = rig.providers["OPENAI_API_KEY"]
    made_up_fw = "fw-" + secrets.token_urlsafe(32)

    # Who is calling: missing, made-up, misspelt and misplaced credentials.
    await chat("no key", "gpt-fake", expect=401, key=None)
    await chat("made-up fw- key", "gpt-fake", expect=401, key=made_up_fw)
    await chat("made-up bearer token", "gpt-fake", expect=401, key=made_up)
    for label, value in (
        ("key without a scheme", main),
        ("Token scheme", f"Token {main}"),
        ("Basic scheme", f"Basic {master}"),
        ("bearer with trailing junk", f"Bearer {main} {made_up}"),
    ):
        await send(
            label,
            "POST",
            "/v1/chat/completions",
            expect=401,
            headers={"authorization": value},
            json={"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]},
        )
    await send(
        "x-api-key header",
        "POST",
        "/v1/chat/completions",
        expect=401,
        headers={"x-api-key": main, "api-key": master},
        json={"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]},
    )
    await chat("revoked key, still valid", "gpt-fake", expect=200, key=revoked)
    await send("revoke", "DELETE", f"/admin/keys/{keys['revoked'].id}", expect=200, key=master)
    await chat("revoked key", "gpt-fake", expect=401, key=revoked)
    await chat("route not allowed", "other", expect=403, key=main)
    await chat("unknown model", "no-such-route", expect={403, 404}, key=main)

    # Bodies the gateway cannot take, each carrying secrets it must not echo.
    await send(
        "malformed JSON",
        "POST",
        "/v1/chat/completions",
        content=b'{"model": "gpt-fake", "api_key": "' + master.encode() + b'", ',
        expect=400,
        key=main,
    )
    await send(
        "form body",
        "POST",
        "/v1/chat/completions",
        headers={"content-type": "application/x-www-form-urlencoded"},
        content=f"model=gpt-fake&api_key={openai_key}&authorization=Bearer+{master}",
        expect=400,
        key=main,
    )
    await send(
        "JSON that is not an object",
        "POST",
        "/v1/chat/completions",
        content=json.dumps([master, openai_key]),
        expect=400,
        key=main,
    )
    await send(
        "invalid field",
        "POST",
        "/v1/chat/completions",
        json={"model": "gpt-fake", "messages": master, "user": openai_key},
        expect=400,
        key=main,
    )
    await send("empty body", "POST", "/v1/chat/completions", content=b"", expect=400, key=main)
    await send(
        "text/plain JSON",
        "POST",
        "/v1/chat/completions",
        headers={"content-type": "text/plain"},
        content=json.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": "t"}]}),
        expect={200, 400, 415},
        key=main,
    )
    big = json.dumps({"model": "gpt-fake", "secret": (master + " ") * (MAX_BODY // 40)}).encode()
    await send("oversized body", "POST", "/v1/chat/completions", content=big, expect=413, key=main)
    await send(
        "oversized chunked body",
        "POST",
        "/v1/chat/completions",
        content=_chunks(big),
        expect=413,
        key=main,
    )
    await send("wrong method", "GET", "/v1/chat/completions", expect=405, key=main)

    # Upstreams failing, and upstreams echoing the provider key they were sent.
    await chat("upstream 500", "fails-500", expect=502, key=main)
    await chat("upstream 500, streamed", "fails-500", expect=502, key=main, stream=True)
    await chat("upstream 429", "fails-429", expect=429, key=main)
    await chat("upstream timeout", "slow", expect=504, key=main)
    await chat("upstream unreachable", "dead", expect=502, key=main)
    await chat("upstream unreachable, streamed", "dead", expect=502, key=main, stream=True)
    for label, model, status, stream in (
        ("upstream 401 echoing a key", "nokey", 401, False),
        ("upstream 401 echoing ours", "echo-401", 401, False),
        ("upstream 429 echoing ours", "echo-429", 429, False),
        ("upstream 500 dumping headers", "echo-500", 502, False),
        ("stream error echoing ours", "echo-stream-error", 200, True),
        ("Anthropic 401 echoing ours", "claude-echo", 401, False),
        ("Gemini 401 echoing ours", "gemini-echo", 401, False),
    ):
        resp = await chat(label, model, expect=status, key=main, stream=stream)
        # The control: the echo reached the gateway, which passed the message on cut.
        assert "***" in resp.text, label
    await chat("upstream headers echoing ours", "echo-ok", expect=200, key=main)
    await chat("streamed headers echoing ours", "echo-ok", expect=200, key=main, stream=True)

    # Successes, cache hits included (the second of each pair), by both kinds of key.
    for _ in range(2):
        await chat("answer", "gpt-fake", expect=200, key=main)
        await chat("streamed answer", "gpt-fake", expect=200, key=main, stream=True)
    await chat("master key", "other", expect=200, key=master)
    await chat("mock", "demo", expect=200, key=main)

    # A key over its RPM.
    await chat("within rpm", "demo", expect=200, key=rpm)
    for n in range(3):
        await chat(f"over rpm {n}", "demo", expect=429, key=rpm)

    # Embeddings.
    emb = {"model": "embed", "input": "hello"}
    await send("embeddings", "POST", "/v1/embeddings", json=emb, expect=200, key=main)
    await send("embeddings no key", "POST", "/v1/embeddings", json=emb, expect=401)
    await send(
        "embeddings upstream 500",
        "POST",
        "/v1/embeddings",
        json={**emb, "model": "embed-fails"},
        expect=502,
        key=main,
    )
    await send(
        "embeddings malformed",
        "POST",
        "/v1/embeddings",
        content=b'{"input": "' + master.encode(),
        expect=400,
        key=main,
    )

    # A user pasting a key into a prompt of a route that stores bodies: the stored copy
    # is redacted. The answer echoes the prompt (the fake upstream does): that is the
    # client's own text, allowed there.
    pasted = keys["pasted"].secret
    resp = await send(
        "key pasted in a prompt",
        "POST",
        "/v1/chat/completions",
        json={"model": "stored", "messages": [{"role": "user", "content": f"my key {pasted}"}]},
        expect=200,
        key=main,
        allow=["pasted"],
    )
    assert pasted in resp.text  # the upstream did see (and echo) the prompt

    # Models.
    await send("models", "GET", "/v1/models", expect=200, key=main)
    await send("model not allowed", "GET", "/v1/models/other", expect=403, key=main)
    await send("models no key", "GET", "/v1/models", expect=401)
    await send("models made-up key", "GET", "/v1/models", expect=401, key=made_up)

    # Admin endpoints with anything but the master key.
    target = f"/admin/keys/{keys['virtual'].id}"
    for label, key in (("virtual key", main), ("made-up key", made_up), ("revoked key", revoked)):
        await send(f"admin list, {label}", "GET", "/admin/keys", expect={401, 403}, key=key)
        await send(f"admin read, {label}", "GET", target, expect={401, 403}, key=key)
        await send(f"admin revoke, {label}", "DELETE", target, expect={401, 403}, key=key)
        await send(
            f"admin create, {label}",
            "POST",
            "/admin/keys",
            json={"name": "x"},
            expect={401, 403},
            key=key,
        )
        await send(
            f"admin cooldowns, {label}", "GET", "/admin/cooldowns", expect={401, 403}, key=key
        )
    await send("admin no key", "GET", "/admin/keys", expect=401)
    await send(
        "admin master key misspelt",
        "GET",
        "/admin/keys",
        expect=401,
        headers={"authorization": f"Bearer {master}x"},
    )
    # The master key, with bodies the admin API refuses.
    await send(
        "admin create, malformed JSON",
        "POST",
        "/admin/keys",
        content=b'{"name": "' + openai_key.encode(),
        headers={"content-type": "application/json"},
        expect={400, 422},
        key=master,
    )
    await send(
        "admin create, secrets in unknown fields",
        "POST",
        "/admin/keys",
        json={"name": "x", "key": main, "key_hash": keys["virtual"].hash},
        expect={400, 422},
        key=master,
    )
    await send(
        "admin create, form body",
        "POST",
        "/admin/keys",
        content=f"name=x&key={main}",
        headers={"content-type": "application/x-www-form-urlencoded"},
        expect={400, 422},
        key=master,
    )
    await send(
        "admin read, no such key",
        "GET",
        "/admin/keys/key_000000000000000000000000",
        expect=404,
        key=master,
    )
    await send("admin update", "PATCH", target, json={"rpm": 1000}, expect=200, key=master)


async def read_everything(probe: Probe, rig: Rig, keys: dict[str, Key]) -> None:
    """The operator's views: the key listing (display prefixes only), metrics, health."""
    master, send = rig.master, probe.send
    listing = (await send("admin list", "GET", "/admin/keys", expect=200, key=master)).json()
    shown = {k["id"]: k for k in listing["data"]}
    for key in keys.values():
        row = shown[key.id]
        assert row["display_prefix"] == key.secret[:10]
        assert "key" not in row
        assert "key_hash" not in row
        one = await send("admin read", "GET", f"/admin/keys/{key.id}", expect=200, key=master)
        assert one.json()["display_prefix"] == key.secret[:10]
    for path in ("/metrics", "/metrics/cache", "/metrics/summary", "/health", "/health/detailed"):
        await send(f"scrape {path}", "GET", path, expect=200)
    await send("metrics history", "GET", "/metrics/history", expect={200, 503})
    await send("cooldowns", "GET", "/admin/cooldowns", expect=200, key=master)
    # A snapshot of the learned state, written by the worker into the var dir.
    await send("snapshot", "POST", "/admin/snapshots?wait_s=20", expect=200, key=master, timeout=30)
    await send("snapshots", "GET", "/admin/snapshots", expect=200, key=master)


# --- everything the system kept -----------------------------------------------------------


async def wait_for_records(database_url: str, ids: dict[str, str], within_s: float) -> None:
    """Until every /v1 request's record is a row (the worker consolidates them)."""
    engine = make_engine(normalise_database_url(database_url))
    table = MetaData()
    try:
        async with engine.connect() as conn:
            await conn.run_sync(lambda c: table.reflect(c, only=["requests"]))
        requests = table.tables["requests"]
        deadline = time.monotonic() + within_s
        while True:
            async with engine.connect() as conn:
                query = select(requests.c.id).where(requests.c.id.in_(list(ids)))
                stored = set((await conn.execute(query)).scalars())
            missing = [label for rid, label in ids.items() if rid not in stored]
            if not missing:
                return
            assert time.monotonic() < deadline, f"records never stored: {missing}"
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()


async def dump_database(database_url: str, corpus: Corpus, keys: dict[str, Key]) -> None:
    """Every row of every table, cell by cell; `api_keys.key_hash` may hold the hashes."""
    engine = make_engine(normalise_database_url(database_url))
    meta = MetaData()
    hashes = {f"{name} sha256" for name in keys} | {f"{name} sha256[:16]" for name in keys}
    try:
        async with engine.connect() as conn:
            await conn.run_sync(meta.reflect)
            for table in meta.sorted_tables:
                rows = (await conn.execute(select(table))).mappings().all()
                for i, row in enumerate(rows):
                    for column, value in row.items():
                        allow = hashes if (table.name, column) == ("api_keys", "key_hash") else ()
                        data = value if isinstance(value, bytes) else str(value)
                        corpus.add(f"database {table.name}.{column} (row {i})", data, allow)
            api_keys = meta.tables["api_keys"]
            stored = dict((await conn.execute(select(api_keys.c.id, api_keys.c.key_hash))).all())
    finally:
        await engine.dispose()
    # The control: what is stored is exactly the SHA-256 searched for.
    for key in keys.values():
        assert stored[key.id] == key.hash


async def dump_redis(redis_url: str, prefix: str, corpus: Corpus, keys: dict[str, Key]) -> int:
    """Every key under the prefix, and arq's job keys, with its value whatever its type.
    The resolver's cache entries are named by the key's hash, as the database indexes it."""
    client = Redis.from_url(redis_url)
    allowed = {f"{name} sha256" for name in keys} | {f"{name} sha256[:16]" for name in keys}
    count = 0
    try:
        for pattern in (prefix + "*", "arq:*"):
            async for raw in client.scan_iter(match=pattern, count=1000):
                name = raw.decode("utf-8", "replace")
                allow = allowed if name.startswith(prefix + "keyinfo:") else set()
                corpus.add(f"the name of Redis key {name}", raw, allow)
                kind = (await client.type(raw)).decode()
                value: Any
                if kind == "string":
                    value = await client.get(raw)
                elif kind == "hash":
                    value = await client.hgetall(raw)
                elif kind == "list":
                    value = await client.lrange(raw, 0, -1)
                elif kind == "set":
                    value = await client.smembers(raw)
                elif kind == "zset":
                    value = await client.zrange(raw, 0, -1, withscores=True)
                elif kind == "stream":
                    value = [
                        await client.xrange(raw),
                        await client.xinfo_groups(raw),
                    ]
                else:
                    continue  # gone since the scan (another session's arq job)
                corpus.add(f"Redis {kind} {name}", _flatten(value))
                count += 1
    finally:
        await client.aclose()
    return count


def _flatten(value: Any) -> bytes:
    """Redis replies as bytes: nested bytes kept whole (a compressed value stays
    decompressible), joined by newlines."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        return b"\n".join(_flatten(k) + b"\n" + _flatten(v) for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return b"\n".join(_flatten(v) for v in value)
    return str(value).encode()


def dump_files(tmp: Path, corpus: Corpus) -> dict[str, int]:
    """Every file in the var dir: the processes' output line by line, snapshots whole."""
    lines: dict[str, int] = {}
    for path in sorted(tmp.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".log":
            lines[path.name] = 0
            for n, line in enumerate(data.splitlines(), 1):
                corpus.add(f"{path.name} line {n}: {line.decode('utf-8', 'replace')}", line)
                lines[path.name] = n
        else:
            corpus.add(f"file {path.relative_to(tmp)}", data)
    return lines


# --- the test -----------------------------------------------------------------------------


def test_the_search_sees_through_encodings() -> None:
    """The search itself finds a secret through the layers blobs are stored in."""
    secret = Planted("probe", "fw-" + secrets.token_urlsafe(32))
    digest = Planted("probe sha256", hashlib.sha256(secret.value.encode()).hexdigest())
    blob = b"z" + zlib.compress(json.dumps({"a": secret.value}).encode())
    snapshot = gzip.compress(json.dumps({"value": base64.b64encode(blob).decode()}).encode())
    corpus = Corpus()
    corpus.add("snapshot", snapshot)
    corpus.add("upper-case hash", digest.value.upper())
    corpus.add("allowed", secret.value, allow=["probe"])
    assert find_leaks(corpus, [secret, digest]) == [
        "probe in snapshot",
        "probe sha256 in upper-case hash",
    ]


async def test_no_secret_reaches_logs_errors_metrics_or_storage(
    rig: Rig, redis_url: str, database_url: str
) -> None:
    started = time.monotonic()
    corpus = Corpus()
    made_up = "tok_" + secrets.token_hex(20)
    planted = [
        Planted("master key", rig.master),
        *(Planted(f"provider key {env}", value) for env, value in rig.providers.items()),
        Planted("made-up bearer token", made_up),
        Planted("key an upstream echoed", UPSTREAM_ECHOED_KEY),
    ]
    async with httpx.AsyncClient(base_url=rig.url, timeout=20) as client:
        probe = Probe(client, corpus, planted)
        keys = {
            "virtual": await make_key(
                probe, rig.master, "virtual", allowed_routes=sorted(_allowed(rig))
            ),
            "revoked": await make_key(probe, rig.master, "revoked"),
            "rpm": await make_key(probe, rig.master, "rpm", rpm=1),
            "pasted": await make_key(probe, rig.master, "pasted"),
        }
        for name, key in keys.items():
            planted += [
                Planted(name, key.secret),
                Planted(f"{name} sha256", key.hash),
                Planted(f"{name} sha256[:16]", key.hash[:16]),
            ]
        await force_everything(probe, rig, keys, made_up)
        await read_everything(probe, rig, keys)

    # The gateway stops first: what it still holds is shipped, and its output is whole.
    stop(rig.gateway)
    await wait_for_records(database_url, probe.v1_ids, within_s=15)
    stop(rig.worker)

    await dump_database(database_url, corpus, keys)
    redis_keys = await dump_redis(redis_url, rig.prefix, corpus, keys)
    lines = dump_files(rig.tmp, corpus)
    # Controls: there was something to search.
    assert lines["gateway.log"] > 10
    assert lines["worker.log"] > 3
    assert redis_keys > 5
    assert any(where.startswith("file snapshots") for where, _, _ in corpus.entries)

    leaks = find_leaks(corpus, planted)
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks[:40])

    # The gateway sent upstream its provider keys and nothing of the client's (the fakes
    # serve the whole session: other tests' requests carry no secret of this one).
    client_secrets = [p for p in planted if not p.name.startswith("provider key")]
    upstream = Corpus()
    for fake in (rig.echo, rig.openai):
        for n, seen in enumerate(fake.seen):
            upstream.add(f"headers of upstream request {n}", json.dumps(seen.headers))
            upstream.add(f"body of upstream request {n}", json.dumps(seen.body), ["pasted"])
    leaks = find_leaks(upstream, client_secrets)
    assert not leaks, "client secrets sent upstream:\n" + "\n".join(leaks[:40])
    # The control: each provider key did reach the echoing upstream.
    sent = {v for s in rig.echo.seen for k, v in s.headers.items() if k.lower() in KEY_HEADERS}
    openai, anthropic, gemini = rig.providers.values()
    assert {f"Bearer {openai}", anthropic, gemini} <= sent
    took = time.monotonic() - started
    print(f"{len(probe.v1_ids)} requests, {len(corpus.entries)} pieces searched, {took:.1f} s")


def _allowed(rig: Rig) -> set[str]:
    routes = yaml.safe_load((rig.tmp / "routes.yaml").read_text())["routes"]
    return set(routes) - {"other"}
