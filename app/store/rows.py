"""Request records (as the gateway ships them) into rows, inserted idempotently."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Table, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.quality import apply_feedback, rules_quality
from app.store.schema import Feedback, RequestBody, RequestRow

REQUESTS: Table = RequestRow.__table__  # type: ignore[assignment]
BODIES: Table = RequestBody.__table__  # type: ignore[assignment]
FEEDBACK: Table = Feedback.__table__  # type: ignore[assignment]

# Record field → column, where the names differ.
_RENAMED = {"request_id": "id", "cache": "cache_tier"}
# Fields that become columns by rule, not by name (see `rules_quality`).
_DERIVED = frozenset({"started_at", "bodies", "extra", "quality", "quality_reasons"})
_COLUMNS = {c.name: c for c in REQUESTS.columns}
# Every row carries every column (one executemany needs one shape), records from an
# older gateway included: missing fields take the column's default.
_DEFAULTS = {c.name: getattr(c.default, "arg", None) for c in REQUESTS.columns}


@dataclass(slots=True)
class Rows:
    requests: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    feedback: list[dict[str, Any]] = field(default_factory=list)

    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.requests] + [str(f["request_id"]) for f in self.feedback]

    def split(self) -> Iterator[Rows]:
        """One Rows per request, with its body if it has one; one per feedback."""
        bodies = {b["request_id"]: b for b in self.bodies}
        for row in self.requests:
            body = bodies.get(row["id"])
            yield Rows([row], [body] if body is not None else [])
        for item in self.feedback:
            yield Rows(feedback=[item])


def _clip_to(table: Table, name: str, value: Any) -> Any:
    """Strings cut to their column's length (a long model name must not sink a batch),
    without NUL characters (PostgreSQL text cannot hold them)."""
    if not isinstance(value, str):
        return value
    value = value.replace("\x00", "")
    length = getattr(table.columns[name].type, "length", None)
    return value[:length] if length is not None else value


def rows_of(records: list[Any]) -> tuple[Rows, list[Any]]:
    """The rows of the records, and the records that cannot be rows (no id, no time)."""
    out = Rows()
    refused: list[Any] = []
    seen: set[str] = set()
    for rec in records:
        if isinstance(rec, dict) and rec.get("kind") == "feedback":
            try:
                out.feedback.append(_feedback_row(rec))
            except (KeyError, TypeError, ValueError, OverflowError):
                refused.append(rec)
            continue
        try:
            row, created = _row(rec)
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError):
            refused.append(rec)
            continue
        if row["id"] in seen:
            continue  # a duplicate inside one batch would fail the insert
        seen.add(row["id"])
        out.requests.append(row)
        bodies = rec.get("bodies")
        if isinstance(bodies, dict) and bodies:
            out.bodies.append(_body_row(row, bodies, created))
    return out, refused


def _row(rec: dict[str, Any]) -> tuple[dict[str, Any], datetime]:
    row: dict[str, Any] = dict(_DEFAULTS)
    extra = dict(rec.get("extra") or {})
    for name, value in rec.items():
        column = _RENAMED.get(name, name)
        if column in _DERIVED:
            continue
        if column in _COLUMNS:
            row[column] = _clip_to(REQUESTS, column, value)
        else:
            extra[name] = value  # a field newer than this schema: kept, not lost
    if not isinstance(row["id"], str) or not row["id"]:
        raise ValueError("a record without a request id")
    created = datetime.fromtimestamp(float(rec["started_at"]), UTC)
    row["created_at"] = created
    row["extra"] = extra or None
    rules_quality(row, rec.get("quality"), rec.get("quality_reasons"))
    return row, created


def _feedback_row(rec: dict[str, Any]) -> dict[str, Any]:
    score = float(rec["score"])
    if not 0.0 <= score <= 1.0:
        raise ValueError("a score outside [0, 1]")
    at = datetime.fromtimestamp(float(rec["created_at"]), UTC)
    comment = rec.get("comment")
    return {
        "request_id": _clip_to(FEEDBACK, "request_id", str(rec["request_id"])),
        "score": score,
        "comment": _clip_to(FEEDBACK, "comment", None if comment is None else str(comment)),
        "tenant": _clip_to(FEEDBACK, "tenant", rec.get("tenant") or "anonymous"),
        "created_at": at,
        "updated_at": at,
    }


def _body_row(row: dict[str, Any], bodies: dict[str, Any], created: datetime) -> dict[str, Any]:
    def text(value: Any) -> str | None:
        return None if value is None else orjson.dumps(value).decode()

    retention = float(bodies.get("retention_s") or 0)
    return {
        "request_id": row["id"],
        "created_at": created,
        "expires_at": created + timedelta(seconds=retention),
        "route": row.get("route"),
        "request": text(bodies.get("request")),
        "response": text(bodies.get("response")),
    }


async def insert_rows(engine: AsyncEngine, rows: Rows) -> None:
    """Insert in one transaction, skipping ids already there (a replayed batch); then
    feedback decides the quality of the rows it names, whichever of the two came first."""
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    async with engine.begin() as conn:
        if rows.requests:
            stmt = insert(REQUESTS).on_conflict_do_nothing(index_elements=["id"])
            await conn.execute(stmt, rows.requests)
        if rows.bodies:
            stmt = insert(BODIES).on_conflict_do_nothing(index_elements=["request_id"])
            await conn.execute(stmt, rows.bodies)
        for item in rows.feedback:
            # The same caller's later score replaces its earlier one; scores of other
            # tenants are rows of their own (readers take the request owner's).
            stmt = insert(FEEDBACK).values(item)
            stmt = stmt.on_conflict_do_update(
                index_elements=["request_id", "tenant"],
                set_={
                    "score": stmt.excluded.score,
                    "comment": stmt.excluded.comment,
                    "updated_at": stmt.excluded.updated_at,
                },
                # Replicas (or an outage's buffer) can deliver an older score after a
                # newer one: the newest given wins, whatever the arrival order.
                where=FEEDBACK.c.updated_at <= stmt.excluded.updated_at,
            )
            await conn.execute(stmt)
        await apply_feedback(conn, rows.ids())


Matched = tuple[str, float, str | None, datetime]


async def matched_feedback(engine: AsyncEngine, items: list[dict[str, Any]]) -> list[Matched]:
    """Of these feedback rows (as stored), those on a request of the tenant that gave
    them (or given with the master key): (request id, score, comment, request start)."""
    if not items:
        return []
    given = {(str(f["request_id"]), str(f["tenant"])) for f in items}
    f, r = FEEDBACK, REQUESTS
    query = (
        select(f.c.request_id, f.c.tenant, f.c.score, f.c.comment, r.c.created_at)
        .join(r, r.c.id == f.c.request_id)
        .where(
            f.c.request_id.in_({rid for rid, _ in given}),
            or_(f.c.tenant == r.c.tenant, f.c.tenant == "master"),
        )
    )
    async with engine.connect() as conn:
        result = await conn.execute(query)
        # Only this batch's (request, tenant) pairs: not another caller's older score.
        return [(str(a), float(c), d, e) for a, b, c, d, e in result.all() if (a, b) in given]
