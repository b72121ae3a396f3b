"""POST /v1/feedback: score a past answer by its completion `id` (the request id).

The score joins the request records on their way to the workers (the same buffer and
stream, so it survives a Redis outage like they do, and nothing here touches the
database). A worker stores it and, when the request it names was the caller's, forwards
it to LangSmith as feedback on that request's run. Repeated feedback for one answer
replaces the earlier score.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from app.api.auth import authenticate
from app.api.body import read_json_object, request_body, validate
from app.deps import StateDep
from app.errors import ServiceUnavailableError
from app.store.records import FeedbackRecord

router = APIRouter()

MAX_COMMENT = 4000
MAX_BODY = 64 * 1024


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(min_length=1, max_length=64, description="the answer's `id`")]
    score: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    comment: Annotated[str | None, Field(max_length=MAX_COMMENT)] = None


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
    if not state.recorder.ships:
        raise ServiceUnavailableError(
            "feedback cannot be kept: this gateway has no Redis", code="feedback_unavailable"
        )
    state.recorder.ship(
        FeedbackRecord(
            request_id=item.id,
            score=item.score,
            tenant=caller.tenant,
            created_at=time.time(),
            comment=item.comment,
        )
    )
    accepted = FeedbackAccepted(id=item.id, score=item.score)
    return Response(accepted.model_dump_json(), status_code=202, media_type="application/json")
