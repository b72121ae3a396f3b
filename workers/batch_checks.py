"""A batch's `validating` step: every input line checked before any is run.

The upload already checked each line's shape (`app.files.batch_lines`); here the batch
adds what only it knows: its endpoint, the routes (and the owner key's access to them)
and the endpoint's request schema, the line count, and unique `custom_id`s. Errors are
reported as OpenAI does, each with its line, and fail the batch before any cost.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from app.files.batch_lines import (
    CHAT_ENDPOINT,
    EMBEDDINGS_ENDPOINT,
    BadLine,
    BatchLine,
    parse_line,
)
from app.schemas.chat import CHAT_REQUEST
from app.schemas.embeddings import EMBEDDING_REQUEST

MAX_ERRORS = 100  # reported; the first ones say what is wrong well enough
SCHEMAS: dict[str, TypeAdapter[Any]] = {
    CHAT_ENDPOINT: CHAT_REQUEST,
    EMBEDDINGS_ENDPOINT: EMBEDDING_REQUEST,
}


@dataclass(slots=True)
class Checked:
    total: int = 0
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def read_lines(path: Path, start: int = 1) -> Generator[BatchLine | BadLine, None, None]:
    """The input's lines from number `start` on, parsed (blocking: a thread's work)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number < start or not raw.strip():
                continue
            try:
                yield parse_line(raw, number)
            except BadLine as bad:
                yield bad


def check_input(
    path: Path,
    endpoint: str,
    route_problem: Callable[[str], tuple[str, str] | None],
    max_requests: int,
) -> Checked:
    """Every line of the batch's input (blocking). `route_problem(model)` is (code,
    message) when the owner cannot use that route."""
    checked = Checked()
    schema = SCHEMAS[endpoint]
    seen: dict[str, int] = {}
    problems: dict[str, tuple[str, str] | None] = {}
    for item in read_lines(path):
        checked.total += 1
        if isinstance(item, BadLine):
            checked.add(item.line, item.code, item.message, item.param)
            continue
        first = seen.setdefault(item.custom_id, item.number)
        if first != item.number:
            checked.add(
                item.number,
                "duplicate_custom_id",
                f"Line {item.number}: custom_id {item.custom_id!r} is already used on line "
                f"{first}; each request needs a unique custom_id.",
                "custom_id",
            )
        if item.url != endpoint:
            checked.add(
                item.number,
                "mismatched_endpoint",
                f"Line {item.number}: url {item.url!r} does not match the batch's endpoint "
                f"{endpoint!r}.",
                "url",
            )
            continue
        model = item.body["model"]
        if model not in problems:
            problems[model] = route_problem(model)
        problem = problems[model]
        if problem is not None:
            checked.add(item.number, problem[0], f"Line {item.number}: {problem[1]}", "model")
        checked.model = checked.model or model
        try:
            schema.validate_python(item.body)
        except ValidationError as e:
            first_error = e.errors()[0]
            where = ".".join(str(p) for p in first_error["loc"]) or "body"
            checked.add(
                item.number,
                "invalid_request",
                f"Line {item.number}: body.{where}: {first_error['msg']}",
                f"body.{where}",
            )
    if checked.total == 0:
        checked.add(None, "empty_file", "The input file has no requests.")
    elif checked.total > max_requests:
        checked.add(
            None,
            "too_many_requests",
            f"The input file has {checked.total} requests; a batch takes at most {max_requests}.",
        )
    return checked
