"""The request log as the operator reads it: recorded requests, newest first, a page at
a time, filtered; and one request in full, with its kept bodies and its feedback.

The table holds millions of rows (thousands of requests a minute, kept for weeks), so a
page never loads, counts or OFFSET-pages the table. Pages are keyset pages on
(created_at DESC, id DESC), and a filter the indexes cannot serve (status, model, …)
only looks at the `SCAN_ROWS` newest rows below the cursor: the boundary row is found
first (one query along `ix_requests_created_at`, or `ix_requests_route_created_at`
when a route is given), then the matching rows between the cursor and it. A rare filter
therefore answers quickly with fewer rows (maybe none), `has_more` and a cursor at the
boundary, from which the next page scans on. Both databases run the same SQL.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson
from sqlalchemy import ColumnElement, and_, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.store.cycle_runs import iso
from app.store.metrics_history import as_utc
from app.store.rows import BODIES, FEEDBACK, REQUESTS
from app.store.schema import Feedback, RequestBody, RequestRow

# How many rows below the cursor one page may look at when a filter is not indexed.
SCAN_ROWS = 5000
QUALITY_BELOW: Final = 0.85
CACHE_TIERS: Final = ("hit-l1", "hit-l2", "miss", "bypass")
QUALITIES: Final = ("scored", "unscored", "low")
# A request id as the gateway makes them ("chatcmpl-…", "req-…"), and batch custom ids.
ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$"
_ID = re.compile(ID_PATTERN)
_CLASS = re.compile(r"^([1-5])xx$")
_CODE = re.compile(r"^[1-5][0-9][0-9]$")

BRIEF: Final = (
    "id",
    "created_at",
    "endpoint",
    "route",
    "deployment",
    "provider",
    "model",
    "variant",
    "key_id",
    "status",
    "error_type",
    "error_code",
    "stream",
    "latency_ms",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "cache_tier",
    "attempts",
    "finish_reason",
    "quality_score",
    "quality_source",
)

# Not the tenant: for a caller without a virtual key it is a hash of the token it sent.
_FULL: Final = tuple(c.name for c in REQUESTS.columns if c.name != "tenant")

Position = tuple[datetime, str]  # (created_at, id) of a row: where a page starts below


class LogQueryError(ValueError):
    """A parameter the log cannot be read with; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class LogFilter:
    """What rows to list: each field None is no condition; `since` is inclusive,
    `until` exclusive."""

    route: str | None = None
    deployment: str | None = None
    key_id: str | None = None
    model: str | None = None
    status: str | None = None
    cache: str | None = None
    quality: str | None = None
    quality_below: float | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            at = getattr(self, name)
            if at is not None:
                try:
                    as_utc(at)
                except OverflowError as e:  # 0001-01-01T00:00+14:00 has no UTC time
                    raise LogQueryError(name, f"{name} is out of range") from e

    def indexed(self) -> list[ColumnElement[bool]]:
        """The conditions the indexes serve (the scan runs along them)."""
        r = RequestRow
        terms: list[ColumnElement[bool]] = []
        if self.route is not None:
            terms.append(r.route == self.route)
        elif self.key_id is not None:
            # A key's requests are its tenant's: ix_requests_tenant_created_at serves them.
            terms.append(r.tenant == f"key:{self.key_id}")
        if self.since is not None:
            terms.append(r.created_at >= as_utc(self.since))
        if self.until is not None:
            terms.append(r.created_at < as_utc(self.until))
        return terms

    def residual(self) -> list[ColumnElement[bool]]:
        """The conditions checked row by row, within the bounded scan."""
        r = RequestRow
        terms: list[ColumnElement[bool]] = []
        by_key = self.key_id if self.route is not None else None  # else indexed
        for column, value in (
            (r.deployment, self.deployment),
            (r.key_id, by_key),
            (r.model, self.model),
        ):
            if value is not None:
                terms.append(column == value)
        if self.status is not None:
            terms.append(status_term(self.status))
        if self.cache is not None:
            if self.cache not in CACHE_TIERS:
                raise LogQueryError("cache", f"cache must be one of {', '.join(CACHE_TIERS)}")
            terms.append(r.cache_tier == self.cache)
        if self.quality is not None or self.quality_below is not None:
            terms.append(quality_term(self.quality, self.quality_below))
        return terms


@dataclass(frozen=True, slots=True)
class LogPage:
    data: list[dict[str, Any]]
    has_more: bool
    next_cursor: str | None
    scanned_to: datetime | None  # where the next page goes on from; None: the end


def status_term(spec: str) -> ColumnElement[bool]:
    """ok (< 400), error (>= 400), a class ("4xx") or an exact code ("429")."""
    s = RequestRow.status
    if spec == "ok":
        return s < 400
    if spec == "error":
        return s >= 400
    if found := _CLASS.match(spec):
        low = int(found.group(1)) * 100
        return and_(s >= low, s < low + 100)
    if _CODE.match(spec):
        return s == int(spec)
    raise LogQueryError(
        "status", 'status must be "ok", "error", a class such as "5xx" or a code such as "429"'
    )


def quality_term(quality: str | None, below: float | None) -> ColumnElement[bool]:
    """scored, unscored, or low (a score under `below`); `below` alone means low."""
    q = RequestRow.quality_score
    if quality is not None and quality not in QUALITIES:
        raise LogQueryError("quality", f"quality must be one of {', '.join(QUALITIES)}")
    if below is not None and not 0.0 <= below <= 1.0:
        raise LogQueryError("quality_below", "quality_below must be within [0, 1]")
    if quality in (None, "low"):
        return q < (QUALITY_BELOW if below is None else below)
    if below is not None:
        raise LogQueryError("quality_below", 'quality_below goes with quality "low" only')
    return q.is_not(None) if quality == "scored" else q.is_(None)


def encode_cursor(at: Position) -> str:
    text = f"{as_utc(at[0]).isoformat(timespec='microseconds')}|{at[1]}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position a `next_cursor` names; LogQueryError for anything else."""
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        when, sep, rid = raw.decode().partition("|")
        parsed = datetime.fromisoformat(when)
        if not sep or parsed.tzinfo is None or not _ID.match(rid):
            raise ValueError("not a cursor")
        return as_utc(parsed), rid  # OverflowError for a time with no UTC equivalent
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as e:
        raise LogQueryError("cursor", "cursor is not one this endpoint gave out") from e


def _below(at: Position) -> ColumnElement[bool]:
    """Strictly after `at` in (created_at DESC, id DESC) order. The plain `<=` lets the
    index bound the range; row-value comparisons are not portable."""
    r, (when, rid) = RequestRow, at
    return and_(
        r.created_at <= when,
        or_(r.created_at < when, and_(r.created_at == when, r.id < rid)),
    )


def _down_to(at: Position) -> ColumnElement[bool]:
    """At or before `at` in (created_at DESC, id DESC) order: the scan's lower end."""
    r, (when, rid) = RequestRow, at
    return and_(
        r.created_at >= when,
        or_(r.created_at > when, and_(r.created_at == when, r.id >= rid)),
    )


# The index's order, with the id breaking ties: every row has one place in it.
NEWEST_FIRST: Final = (RequestRow.created_at.desc(), RequestRow.id.desc())


async def _plan_for_values(conn: AsyncConnection) -> None:
    """asyncpg prepares statements, and after a few runs PostgreSQL may plan one once for
    any value: that generic plan walks ix_requests_created_at whatever the route, which
    for a rare route reads most of the table. Each query is planned for its values."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))


async def _boundary(conn: AsyncConnection, where: list[ColumnElement[bool]]) -> Position | None:
    """The `SCAN_ROWS`-th row along the index, when more rows lie beyond it."""
    r = RequestRow
    query = select(r.created_at, r.id).where(*where).order_by(*NEWEST_FIRST)
    # OFFSET within the bound only: the index is walked SCAN_ROWS rows, never further.
    found = (await conn.execute(query.offset(SCAN_ROWS - 1).limit(2))).all()
    return (as_utc(found[0][0]), str(found[0][1])) if len(found) == 2 else None


async def list_requests(
    engine: AsyncEngine, f: LogFilter, cursor: Position | None, limit: int
) -> LogPage:
    """Up to `limit` rows matching `f` below `cursor`, newest first, as `brief_json`."""
    residual = f.residual()  # first: a bad filter costs no query
    where = f.indexed()
    if cursor is not None:
        where.append(_below(cursor))
    columns = [REQUESTS.c[name] for name in BRIEF]
    async with engine.connect() as conn:
        await _plan_for_values(conn)
        # Without row-by-row conditions the LIMIT bounds the scan by itself.
        bound = await _boundary(conn, where) if residual else None
        query = select(*columns).where(*where, *residual)
        if bound is not None:
            query = query.where(_down_to(bound))
        query = query.order_by(*NEWEST_FIRST).limit(limit + 1)
        rows = (await conn.execute(query)).mappings().all()
    data = [brief_json(dict(row)) for row in rows[:limit]]
    last: Position | None = None
    if len(rows) > limit:
        last = (as_utc(rows[limit - 1]["created_at"]), str(rows[limit - 1]["id"]))
    elif bound is not None:
        last = bound
    if last is None:
        return LogPage(data, False, None, None)
    return LogPage(data, True, encode_cursor(last), last[0])


def brief_json(row: dict[str, Any]) -> dict[str, Any]:
    """A request as the log lists it."""
    out = {name: row[name] for name in BRIEF}
    out["created_at"] = iso(row["created_at"])
    return {"id": out.pop("id"), "object": "request.record", **out}


def _parsed(text: str | None) -> Any:
    """Bodies are stored as JSON text; one that does not parse is shown as stored."""
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


async def get_request(engine: AsyncEngine, request_id: str, now: datetime) -> dict[str, Any] | None:
    """One request in full with its unexpired bodies and its feedback, or None."""
    b, fb = RequestBody, Feedback
    async with engine.connect() as conn:
        found = (
            (await conn.execute(select(REQUESTS).where(RequestRow.id == request_id)))
            .mappings()
            .first()
        )
        if found is None:
            return None
        body = (
            (
                await conn.execute(
                    select(BODIES).where(b.request_id == request_id, b.expires_at > as_utc(now))
                )
            )
            .mappings()
            .first()
        )
        feedback = (
            await conn.execute(
                select(FEEDBACK).where(fb.request_id == request_id).order_by(fb.created_at)
            )
        ).mappings()
        scores = [_feedback_json(dict(row)) for row in feedback]
    out = brief_json(dict(found))
    out |= {name: found[name] for name in _FULL if name not in BRIEF}
    out["body"] = None if body is None else _body_json(dict(body))
    out["feedback"] = scores
    return out


def _body_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "request": _parsed(row["request"]),
        "response": _parsed(row["response"]),
        "created_at": iso(row["created_at"]),
        "expires_at": iso(row["expires_at"]),
    }


def _from(tenant: str) -> str:
    """Who gave feedback, as shown: a key's id, "master" or "anonymous"; any other
    tenant is a hash of a token a caller sent (keys optional), shown as "other"."""
    if tenant.startswith("key:"):
        return tenant[4:]
    return tenant if tenant in ("master", "anonymous") else "other"


def _feedback_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "request.feedback",
        "tenant": _from(row["tenant"]),
        "score": row["score"],
        "comment": row["comment"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }
