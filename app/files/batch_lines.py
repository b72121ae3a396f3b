"""One line of a batch input file, as OpenAI's Batch API defines it:

    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Checked twice with the same code: when the file is uploaded (`scan_upload`, so a bad
file is refused with the line at fault rather than failing hours later in a batch), and
by the worker as it runs the batch (`parse_line`), which trusts nothing on disk. Only
the envelope is checked here; the body is validated like any request when it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT = "/v1/chat/completions", "/v1/embeddings"
SUPPORTED_ENDPOINTS = (CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT)
# A line becomes one request body; this bounds what one line may hold in memory.
MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_CUSTOM_ID = 512
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class BatchLine:
    number: int  # 1-based, as editors count
    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


class BadLine(Exception):
    """A line that is not a valid batch request; `message` starts with "Line N: "."""

    def __init__(self, line: int, code: str, message: str, param: str | None = None) -> None:
        self.line = line
        self.code = code
        self.message = f"Line {line}: {message}"
        self.param = param
        super().__init__(self.message)


def parse_line(raw: bytes, number: int) -> BatchLine:
    """The request on line `number` (its bytes, with or without the newline)."""
    if number == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM) :]  # editors on Windows add one; it is not part of the JSON
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(number, "invalid_encoding", f"not valid UTF-8 (byte {e.start + 1})") from None
    if not text.strip():
        raise BadLine(number, "invalid_json", "empty line; each line must hold one request")
    try:
        item = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise BadLine(number, "invalid_json", f"not valid JSON ({e})") from None
    if not isinstance(item, dict):
        raise BadLine(number, "invalid_json", "must be a JSON object")
    return BatchLine(number, _custom_id(item, number), *_request(item, number))


def _custom_id(item: dict[str, Any], number: int) -> str:
    custom_id = item.get("custom_id")
    if custom_id is None:
        raise BadLine(number, "missing_required_parameter", "`custom_id` is required", "custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadLine(
            number, "invalid_value", "`custom_id` must be a non-empty string", "custom_id"
        )
    if len(custom_id) > MAX_CUSTOM_ID:
        raise BadLine(
            number,
            "invalid_value",
            f"`custom_id` is longer than {MAX_CUSTOM_ID} characters",
            "custom_id",
        )
    return custom_id


def _request(item: dict[str, Any], number: int) -> tuple[str, str, dict[str, Any]]:
    method = item.get("method")
    if method != "POST":
        raise BadLine(number, "invalid_value", f'`method` must be "POST", not {method!r}', "method")
    url = item.get("url")
    if url not in SUPPORTED_ENDPOINTS:
        raise BadLine(
            number,
            "invalid_url",
            f"`url` must be one of {', '.join(SUPPORTED_ENDPOINTS)}, not {url!r}",
            "url",
        )
    body = item.get("body")
    if not isinstance(body, dict):
        code = "missing_required_parameter" if body is None else "invalid_value"
        raise BadLine(number, code, "`body` must be a JSON object (the request)", "body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadLine(
            number, "invalid_value", "`body.model` must be a non-empty string", "body.model"
        )
    if body.get("stream") is True:
        raise BadLine(
            number,
            "invalid_value",
            "`body.stream` must not be true: batch requests cannot stream",
            "body.stream",
        )
    return method, url, body


def numbered_lines(
    fh: BinaryIO, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, bytes]]:
    """Each request line of an open batch file with its number, one line in memory at a
    time. Blank lines are allowed only at the end (a final newline, or a few): one in
    the middle is refused (`BadLine`), as skipping it would make the numbers the user
    sees in errors disagree with their editor's."""
    blank_from: int | None = None  # the first of the blank lines since the last request
    number = 0
    while raw := fh.readline(max_line_bytes + 1):
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            raise BadLine(number, "line_too_large", f"longer than {max_line_bytes} bytes")
        if not raw.strip():
            blank_from = blank_from or number
            continue
        if blank_from is not None:
            raise BadLine(blank_from, "invalid_json", "empty line; each line must hold one request")
        yield number, raw


def scan_upload(path: Path, max_lines: int, max_line_bytes: int = MAX_LINE_BYTES) -> int:
    """The number of requests in the file at `path`, once every line is found valid and
    every `custom_id` unique; raises `BadLine` at the first fault. Blocking (run it in a
    thread)."""
    seen: dict[str, int] = {}  # custom_id -> its line
    with path.open("rb") as fh:
        for number, raw in numbered_lines(fh, max_line_bytes):
            line = parse_line(raw, number)
            first = seen.setdefault(line.custom_id, number)
            if first != number:
                raise BadLine(
                    number,
                    "duplicate_custom_id",
                    f"`custom_id` {line.custom_id!r} is already used on line {first}; "
                    "each request needs its own",
                    "custom_id",
                )
            if len(seen) > max_lines:
                raise BadLine(
                    number, "too_many_requests", f"a batch file holds at most {max_lines} requests"
                )
    if not seen:
        raise BadLine(1, "empty_file", "the file holds no requests")
    return len(seen)
