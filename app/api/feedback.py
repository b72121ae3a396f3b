"""POST /v1/feedback: score a past answer by its completion `id` (the request id).

A score in [0, 1] or a thumb (`up` is 1, `down` 0), and an optional comment. Only the key
that made the request, or the master key, may score it: an unknown id and another
tenant's request are both a 404 (nothing says the latter exists). The owner is looked up
without writing anything (`app.store.owners`: this gateway's memory, the Redis index,
then the database); when neither Redis nor the database answers, the feedback is
accepted and the worker, which applies it only to a request of the same tenant, decides.

The score joins the request records on their way to the workers (the same buffer and
stream, so it survives a Redis outage like they do). A worker stores it, makes it the
request's quality (feedback outranks the judge and the rules) and, when the request it
names was the caller's, forwards it to LangSmith as feedback on that request's run.
Repeated feedback for one answer replaces the earlier score.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from app.api.auth import authenticate
from app.api.body import read_json_object, request_body, validate
from app.deps import StateDep
from app.errors import InvalidRequestError, NotFoundError, ServiceUnavailableError
from app.schemas.storable import StorableText
from app.state import AppState
from app.store.owners import OwnerCheck, Verdict
from app.store.records import FeedbackRecord

router = APIRouter()

MAX_COMMENT = 4000
MAX_BODY = 64 * 1024


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[StorableText, Field(min_length=1, max_length=64, description="the answer's `id`")]
    score: Annotated[float | None, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = None
    thumbs: Literal["up", "down"] | None = None
    comment: Annotated[StorableText | None, Field(max_length=MAX_COMMENT)] = None

    def value(self) -> float:
        """The score given, a thumb up being 1 and down 0; exactly one of them."""
        if (self.score is None) == (self.thumbs is None):
            raise InvalidRequestError(
                "give either `score` (0 to 1) or `thumbs` (up or down), not both",
                param="score",
                code="invalid_value",
            )
        if self.score is not None:
            return self.score
        return 1.0 if self.thumbs == "up" else 0.0


FEEDBACK = TypeAdapter(FeedbackRequest)


class FeedbackAccepted(BaseModel):
    object: str = "feedback"
    id: str
    score: float
    status: str = "accepted"


@router.post("/v1/feedback", status_code=202, response_model=FeedbackAccepted, tags=["flywheel"])
async def feedback(request: Request, state: StateDep) -> Response:
    caller = await authenticate(state, request.headers)
    length = request.headers.get("content-length")
    body = await read_json_object(request_body(request), length, MAX_BODY)
    item = validate(FEEDBACK, body)
    score = item.value()
    if not state.recorder.ships:
        raise ServiceUnavailableError(
            "feedback cannot be kept: this gateway has no Redis", code="feedback_unavailable"
        )
    verdict = await owner_check(state).check(item.id, caller.tenant)
    if verdict in (Verdict.UNKNOWN, Verdict.FOREIGN):
        # Another tenant's request is "not found" too: nothing says that it exists.
        raise NotFoundError(
            f"no completion {item.id!r} was made with this API key",
            param="id",
            code="request_not_found",
        )
    state.recorder.ship(
        FeedbackRecord(
            request_id=item.id,
            score=score,
            tenant=caller.tenant,
            created_at=time.time(),
            comment=item.comment,
        )
    )
    accepted = FeedbackAccepted(id=item.id, score=score)
    return Response(accepted.model_dump_json(), status_code=202, media_type="application/json")


def owner_check(state: AppState) -> OwnerCheck:
    settings = state.settings
    return OwnerCheck(
        owners=state.recorder.owners,
        redis=state.redis,
        engine=state.engine,
        redis_timeout_s=settings.flywheel_redis_timeout_s,
        # A read on the request path, bounded like the API key lookup's.
        db_timeout_s=settings.flywheel_key_lookup_timeout_s,
    )
