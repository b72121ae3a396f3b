"""The effective quality of a request row: feedback > judge > rules.

The row is born with the rules' score (`quality_source="rules"`, from the gateway's
record). Feedback replaces whatever is there, but only feedback given by the request's
own tenant or with the master key; the newest such score wins. It is applied whichever
arrives first: when feedback is stored (on rows already there) and when rows are
inserted (from feedback stored before them). A judge's score replaces the rules' and an
earlier judge's, never feedback's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Table, and_, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.store.owners import MASTER
from app.store.schema import Feedback, RequestRow

REQUESTS: Table = RequestRow.__table__  # type: ignore[assignment]
FEEDBACK: Table = Feedback.__table__  # type: ignore[assignment]

RULES, JUDGE, FEEDBACK_SOURCE = "rules", "judge", "feedback"
FEEDBACK_REASONS = ["feedback"]
# Ids per statement: SQLite caps bound parameters (999 before 3.32).
CHUNK = 500


def rules_quality(row: dict[str, Any], score: Any, reasons: Any) -> None:
    """The record's rules score into the row's quality columns (a malformed one from a
    misbehaving gateway is dropped, not a reason to refuse the row)."""
    ok = isinstance(score, int | float) and not isinstance(score, bool) and 0.0 <= score <= 1.0
    row["quality_score"] = float(score) if ok else None
    row["quality_source"] = RULES if ok else None
    good_reasons = isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)
    row["quality_reasons"] = [r[:64] for r in reasons] if ok and good_reasons else None


def _owned() -> Any:
    """Feedback rows that count for the request row being updated (correlated)."""
    f, r = FEEDBACK, REQUESTS
    return and_(f.c.request_id == r.c.id, or_(f.c.tenant == r.c.tenant, f.c.tenant == MASTER))


async def apply_feedback(conn: AsyncConnection, request_ids: Iterable[str]) -> None:
    """Set the rows' quality to their newest owned feedback, where they have one."""
    ids = sorted(set(request_ids))
    newest = (
        select(FEEDBACK.c.score)
        .where(_owned())
        .order_by(FEEDBACK.c.updated_at.desc())
        .limit(1)
        .scalar_subquery()
    )
    for start in range(0, len(ids), CHUNK):
        stmt = (
            update(REQUESTS)
            .where(REQUESTS.c.id.in_(ids[start : start + CHUNK]), exists().where(_owned()))
            .values(
                quality_score=newest,
                quality_source=FEEDBACK_SOURCE,
                quality_reasons=FEEDBACK_REASONS,
            )
        )
        await conn.execute(stmt)


async def set_judge_score(
    engine: AsyncEngine, request_id: str, score: float, reasons: list[str]
) -> bool:
    """An LLM judge's score for a request: replaces the rules' (or an earlier judge's),
    never feedback's. Whether the row took it (False: no such row, or feedback decided).

    Safe against feedback landing at the same time: the condition is re-checked on the
    row as it is updated, and feedback applied later replaces the judge's score anyway.
    """
    if not 0.0 <= score <= 1.0:
        raise ValueError("a judge's score must be in [0, 1]")
    r = REQUESTS
    stmt = (
        update(r)
        .where(
            r.c.id == request_id,
            or_(r.c.quality_source.is_(None), r.c.quality_source != FEEDBACK_SOURCE),
        )
        .values(quality_score=score, quality_source=JUDGE, quality_reasons=reasons)
    )
    async with engine.begin() as conn:
        result = await conn.execute(stmt)
    return bool(result.rowcount)
