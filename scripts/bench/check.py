"""One request per side before the load: wrk only counts status codes, so make sure a
200 really carries the fake upstream's answer (JSON message, or SSE chunks + `[DONE]`).
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

from bench.body import AUTHORIZATION, ChatBody
from bench.upstream import ANSWER

EXPECTED = "".join(ANSWER)


def post(
    url: str, body: str, authorization: str | None = AUTHORIZATION
) -> tuple[int, dict[str, str], str]:
    """POST a JSON body (Authorization header unless None); status, headers, text."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        headers = {"content-type": "application/json"}
        if authorization is not None:
            headers["authorization"] = authorization
        conn.request("POST", parts.path, body=body.encode(), headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, text
    finally:
        conn.close()


def get(url: str) -> tuple[int, dict[str, str], str]:
    """GET `url`: status, headers, text."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("GET", parts.path)
        resp = conn.getresponse()
        text = resp.read().decode()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, text
    finally:
        conn.close()


def stream_content(text: str) -> str:
    """The content of an SSE chat stream; ValueError unless it ends with `[DONE]`."""
    events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    if not events or events[-1] != "[DONE]":
        raise ValueError("the stream does not end with `data: [DONE]`")
    pieces = []
    for event in events[:-1]:
        for choice in json.loads(event).get("choices") or []:
            pieces.append((choice.get("delta") or {}).get("content") or "")
    return "".join(pieces)


def verify(
    url: str,
    body: ChatBody,
    cache: str | None = None,
    *,
    authorization: str | None = AUTHORIZATION,
    require_headers: tuple[str, ...] = (),
) -> str:
    """Raise RuntimeError unless `url` answers like OpenAI; a one-line description.

    With `cache` (hit-l1, hit-l2), the answer must also come from that cache tier; every
    header named in `require_headers` must be there. `authorization`: the Authorization
    header to send (None: none).
    """
    status, headers, text = post(url, body.numbered(0), authorization)
    try:
        if status != 200:
            raise ValueError(f"status {status}")
        if cache is not None and headers.get("x-flywheel-cache") != cache:
            raise ValueError(f"x-flywheel-cache {headers.get('x-flywheel-cache')!r}, not {cache}")
        if missing := [h for h in require_headers if h not in headers]:
            raise ValueError(f"no {', '.join(missing)} header in the answer")
        if body.stream:
            content = stream_content(text)
        else:
            content = json.loads(text)["choices"][0]["message"]["content"]
        if content != EXPECTED:
            raise ValueError(f"content {content!r}, expected {EXPECTED!r}")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeError(f"{url} ({body.model}) answered wrongly: {exc}\n{text[:2000]}") from exc
    shown = ("x-flywheel-", "x-ratelimit-")
    facts = [f"{k}={v}" for k, v in sorted(headers.items()) if k.startswith(shown)]
    return f"{headers.get('content-type', '?')}" + (f"; {', '.join(facts)}" if facts else "")
