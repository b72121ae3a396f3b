"""Budget periods (UTC): which one a moment falls in, and when it ends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def period_of(period: str | None, now: float) -> tuple[str, float | None]:
    """The period's id (part of its Redis key) and its end as a Unix time (None: never)."""
    at = datetime.fromtimestamp(now, UTC)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day.strftime("d%Y%m%d"), (day + timedelta(days=1)).timestamp()
    if period == "week":
        start = day - timedelta(days=day.weekday())  # ISO weeks start on Monday
        year, week, _ = start.isocalendar()
        return f"w{year}{week:02d}", (start + timedelta(days=7)).timestamp()
    if period == "month":
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
        return start.strftime("m%Y%m"), end.timestamp()
    return "total", None
