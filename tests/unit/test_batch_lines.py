"""Batch input lines: the envelope of each request (`parse_line`) and the whole-file
check an upload gets (`scan_upload`): numbered errors, unique ids, the request limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from app.files.batch_lines import BadLine, BatchLine, parse_line, scan_upload


def line(custom_id: Any = "a", **overrides: Any) -> bytes:
    """A request line; `...` for a field leaves it out."""
    item: dict[str, Any] = {
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "demo", "messages": [{"role": "user", "content": "Hi"}]},
    }
    for key, value in {"custom_id": custom_id, **overrides}.items():
        if value is ...:
            item.pop(key, None)
        else:
            item[key] = value
    return orjson.dumps(item) + b"\n"


def bad(raw: bytes, number: int = 3) -> BadLine:
    with pytest.raises(BadLine) as caught:
        parse_line(raw, number)
    assert caught.value.line == number
    assert caught.value.message.startswith(f"Line {number}: ")
    return caught.value


def test_a_good_line() -> None:
    embed = {"model": "e", "input": "text"}
    got = parse_line(line("req-1", url="/v1/embeddings", body=embed), 7)
    assert got == BatchLine(7, "req-1", "POST", "/v1/embeddings", embed)
    assert parse_line(b"\xef\xbb\xbf" + line(), 1).custom_id == "a"  # a BOM on line 1
    assert parse_line(line().rstrip(b"\n") + b"\r\n", 2).custom_id == "a"


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b"{not json\n", "invalid_json", None),
        (b"[1, 2]\n", "invalid_json", None),
        (b"   \n", "invalid_json", None),
        (b'{"custom_id": "\xff"}\n', "invalid_encoding", None),
        (line(...), "missing_required_parameter", "custom_id"),
        (line(""), "invalid_value", "custom_id"),
        (line(12), "invalid_value", "custom_id"),
        (line("x" * 513), "invalid_value", "custom_id"),
        (line(method="GET"), "invalid_value", "method"),
        (line(method=...), "invalid_value", "method"),
        (line(url="/v1/completions"), "invalid_url", "url"),
        (line(url="https://api.openai.com/v1/chat/completions"), "invalid_url", "url"),
        (line(body=...), "missing_required_parameter", "body"),
        (line(body=[1]), "invalid_value", "body"),
        (line(body={"messages": []}), "invalid_value", "body.model"),
        (line(body={"model": 3}), "invalid_value", "body.model"),
        (line(body={"model": "m", "stream": True}), "invalid_value", "body.stream"),
    ],
)
def test_bad_lines_say_which_and_why(raw: bytes, code: str, param: str | None) -> None:
    error = bad(raw)
    assert (error.code, error.param) == (code, param)


def test_stream_false_is_fine() -> None:
    assert parse_line(line(body={"model": "m", "stream": False}), 1).body["stream"] is False


def write(tmp_path: Path, *lines: bytes) -> Path:
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def scan_error(path: Path, max_lines: int = 100, **kw: Any) -> BadLine:
    with pytest.raises(BadLine) as caught:
        scan_upload(path, max_lines, **kw)
    return caught.value


def test_scan_counts_requests_and_allows_trailing_blank_lines(tmp_path: Path) -> None:
    assert scan_upload(write(tmp_path, line("a"), line("b"), line("c")), 100) == 3
    assert scan_upload(write(tmp_path, line("a"), line("b").rstrip(b"\n")), 100) == 2
    assert scan_upload(write(tmp_path, line("a"), b"\n", b"  \r\n"), 100) == 1


def test_scan_names_the_first_bad_line(tmp_path: Path) -> None:
    error = scan_error(write(tmp_path, line("a"), line("b"), b"oops\n", b"worse\n"))
    assert (error.line, error.code) == (3, "invalid_json")
    assert error.message.startswith("Line 3: ")
    blank = scan_error(write(tmp_path, line("a"), b"\n", line("b")))
    assert (blank.line, blank.code) == (2, "invalid_json")


def test_scan_refuses_duplicate_ids_naming_both_lines(tmp_path: Path) -> None:
    error = scan_error(write(tmp_path, line("a"), line("b"), line("a")))
    assert (error.line, error.code, error.param) == (3, "duplicate_custom_id", "custom_id")
    assert "line 1" in error.message
    assert error.message.startswith("Line 3: ")


def test_scan_limits_requests_and_line_length(tmp_path: Path) -> None:
    assert scan_upload(write(tmp_path, line("a"), line("b")), 2) == 2
    error = scan_error(write(tmp_path, line("a"), line("b"), line("c")), max_lines=2)
    assert (error.line, error.code) == (3, "too_many_requests")
    long = line("b", body={"model": "m", "input": "x" * 1000})
    error = scan_error(write(tmp_path, line("a"), long), max_line_bytes=500)
    assert (error.line, error.code) == (2, "line_too_large")
    exact = line("a").rstrip(b"\n")
    assert scan_upload(write(tmp_path, exact + b"\n"), 5, max_line_bytes=len(exact)) == 1
    assert scan_upload(write(tmp_path, exact), 5, max_line_bytes=len(exact)) == 1
    assert scan_error(write(tmp_path, exact), max_line_bytes=len(exact) - 1).line == 1


def test_scan_refuses_empty_files_and_bad_utf8(tmp_path: Path) -> None:
    assert scan_error(write(tmp_path)).code == "empty_file"
    assert scan_error(write(tmp_path, b"\n\n")).code == "empty_file"
    error = scan_error(write(tmp_path, line("a"), b'{"custom_id": "caf\xe9"}\n'))
    assert (error.line, error.code) == (2, "invalid_encoding")
