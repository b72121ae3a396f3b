"""Values the database can keep, checked where a client's body is validated.

PostgreSQL refuses NUL in text (and in JSON), nothing stores a string that is not valid
Unicode (a JSON body may spell lone surrogates as `\\ud800` escapes, which Python's JSON
parser, used for the bodies FastAPI binds, lets through), and integers past 64 bits or
numbers that are not finite have no column or JSON to go in, and JSON nested deeper
than the serializers go cannot be answered with. Refused here, such a value is the
client's 400; stored, it was a 503 blaming the database (or a 500).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator

INT64 = 2**63
MAX_DEPTH = 64  # metadata and parameters: annotations, not documents


def storable_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def storable_json(value: Any) -> Any:
    """`value` itself, once every string (keys too) and number in it is storable."""
    pending = [(value, 0)]
    while pending:  # not recursive: the nesting is as deep as the client made it
        item, depth = pending.pop()
        if isinstance(item, dict | list | tuple) and depth >= MAX_DEPTH:
            raise ValueError(f"must not be nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, str):
            storable_text(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str):
                    storable_text(key)
                pending.append((inner, depth + 1))
        elif isinstance(item, list | tuple):
            pending.extend((inner, depth + 1) for inner in item)
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int) and not -INT64 <= item < INT64:
            raise ValueError("integers must fit in 64 bits")
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite")
    return value


def storable_time(value: datetime | None) -> datetime | None:
    """A time that is still a time once converted to UTC (as it is stored)."""
    if value is not None and value.tzinfo is not None:
        try:
            value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of range once converted to UTC") from None
    return value


StorableText = Annotated[str, AfterValidator(storable_text)]
