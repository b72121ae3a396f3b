"""GET /v1/virtuous-cycle/datasets through `create_app`: stored request/answer pairs
(inserted as the workers store them) exported as OpenAI chat fine-tuning JSONL, filtered
by route, quality, status, cache tier and expiry, paged across batch boundaries."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from app.api import datasets
from app.config import Settings
from app.main import create_app
from app.store.datasets import StoredPair, pairs_page
from app.store.schema import RequestBody, RequestRow
from tests.api.test_chat_api import assert_openai_error
from tests.conftest import Served, routes_for

MASTER = "sk-master-datasets-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@dataclass
class Rig:
    client: httpx.AsyncClient
    engine: AsyncEngine
    route: str
    other: str
    base: datetime
    n: int = 0

    async def pair(
        self,
        question: str,
        answer: dict[str, Any] | None = None,
        *,
        route: str | None = None,
        quality: float | None = 0.95,
        status: int = 200,
        cache: str = "miss",
        expires_in: timedelta = timedelta(days=7),
        request: dict[str, Any] | None = None,
        finish: str = "stop",
        tie: bool = False,
    ) -> str:
        """A request row with its stored bodies, one second after the previous one (at
        the same time with `tie`)."""
        self.n += 0 if tie else 1
        rid = f"chatcmpl-ds{uuid.uuid4().hex[:20]}"
        at = self.base + timedelta(seconds=self.n)
        body = request or {"model": "m", "messages": [{"role": "user", "content": question}]}
        message = answer or {"role": "assistant", "content": f"answer to {question}"}
        response = {
            "id": rid,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }
        route = route or self.route
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(RequestRow).values(
                    id=rid,
                    created_at=at,
                    endpoint="chat.completions",
                    route=route,
                    deployment="d",
                    status=status,
                    latency_ms=10.0,
                    cache_tier=cache,
                    quality_score=quality,
                    quality_source="rules",
                )
            )
            await conn.execute(
                insert(RequestBody).values(
                    request_id=rid,
                    created_at=at,
                    expires_at=datetime.now(UTC) + expires_in,
                    route=route,
                    request=orjson.dumps(body).decode(),
                    response=orjson.dumps(response).decode(),
                )
            )
        return rid

    async def export(self, **params: Any) -> list[dict[str, Any]]:
        resp = await self.client.get("/datasets", params={"route": self.route, **params})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/jsonl")
        assert resp.text == "" or resp.text.endswith("\n")
        return [orjson.loads(line) for line in resp.text.splitlines()]


@pytest.fixture
async def rig(make_settings: Callable[..., Settings], engine: AsyncEngine) -> AsyncIterator[Rig]:
    tag = uuid.uuid4().hex[:8]
    route, other = f"ds-{tag}", f"ds-other-{tag}"
    mock = {"deployments": [{"name": "d", "provider": "mock", "model": "d"}]}
    routes = routes_for(**{route: mock, other: mock})
    settings = make_settings(flywheel_master_key=MASTER)
    base = datetime.now(UTC) - timedelta(hours=1)
    async with (
        Served(create_app(settings, routes)) as gw,
        httpx.AsyncClient(
            base_url=gw.url + "/v1/virtuous-cycle", headers=ADMIN, timeout=10
        ) as client,
    ):
        yield Rig(client, engine, route, other, base)
    async with engine.begin() as conn:
        await conn.execute(delete(RequestBody).where(RequestBody.route.in_([route, other])))
        await conn.execute(delete(RequestRow).where(RequestRow.route.in_([route, other])))


def asked(line: dict[str, Any]) -> str:
    return str(line["messages"][0]["content"])


async def test_good_answers_of_the_route_in_the_fine_tuning_format(rig: Rig) -> None:
    await rig.pair("kept")
    await rig.pair("so-so", quality=0.85)
    await rig.pair("unscored", quality=None)
    await rig.pair("failed", status=500)
    await rig.pair("cached copy", cache="hit-l2")
    await rig.pair("expired", expires_in=-timedelta(minutes=1))
    await rig.pair("cut short", finish="length")
    await rig.pair("refused", {"role": "assistant", "content": None, "refusal": "No."})
    await rig.pair("elsewhere", route=rig.other)
    lines = await rig.export()
    assert lines == [
        {
            "messages": [
                {"role": "user", "content": "kept"},
                {"role": "assistant", "content": "answer to kept"},
            ]
        }
    ]
    looser = await rig.export(min_quality=0.8)
    assert [asked(line) for line in looser] == ["kept", "so-so"]
    since = (rig.base + timedelta(seconds=1.5)).isoformat()
    assert [asked(line) for line in await rig.export(min_quality=0.8, since=since)] == ["so-so"]


async def test_tools_and_tool_calls_as_the_format_spells_them(rig: Rig) -> None:
    request = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "Use tools."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        ],
        "tools": [TOOL],
        "parallel_tool_calls": False,
        "temperature": 0.3,
    }
    call = {
        "index": 0,  # as a streamed answer's assembled call carries it
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    answer = {"role": "assistant", "content": None, "tool_calls": [call]}
    await rig.pair("tools", answer, request=request, finish="tool_calls")
    unoffered = {**call, "function": {"name": "rm_rf", "arguments": "{}"}}
    await rig.pair(
        "bad call",
        {"role": "assistant", "content": None, "tool_calls": [unoffered]},
        request=request,
        finish="tool_calls",
    )
    audio = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
        ],
    }
    await rig.pair("audio", request=audio)
    [line] = await rig.export()
    assert line == {
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
        ],
        "tools": [TOOL],
        "parallel_tool_calls": False,
    }


async def test_pages_across_batch_boundaries_up_to_the_limit(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets, "PAGE_SIZE", 2)
    reads: list[int] = []

    async def counted(*args: Any) -> list[StoredPair]:
        reads.append(args[-1])
        return await pairs_page(*args)

    monkeypatch.setattr(datasets, "pairs_page", counted)
    for i in range(7):
        await rig.pair(f"q{i}", quality=0.5 if i == 3 else 0.95)  # one skipped mid-page
    await rig.pair("not json", request={"messages": "nope"})
    await rig.pair("q-last")
    for i in range(3):  # ties on created_at across a page boundary: ordered by id
        await rig.pair(f"tie{i}", tie=i > 0)
    everything = await rig.export()
    assert [asked(line) for line in everything[:7]] == [
        "q0", "q1", "q2", "q4", "q5", "q6", "q-last"
    ]  # fmt: skip
    assert sorted(asked(line) for line in everything[7:]) == ["tie0", "tie1", "tie2"]
    assert reads == [2] * 6  # eleven pairs, two a read; the last read comes up short
    reads.clear()
    assert [asked(line) for line in await rig.export(limit=3)] == ["q0", "q1", "q2"]
    assert reads == [2, 1]  # never more than the examples still wanted
    assert [asked(line) for line in await rig.export(limit=1)] == ["q0"]


async def test_unknown_route_bad_params_and_a_database_that_does_not_answer(
    rig: Rig, make_settings: Callable[..., Settings]
) -> None:
    missing = await rig.client.get("/datasets", params={"route": "no-such-route"})
    assert assert_openai_error(missing, 404, "invalid_request_error")["code"] == "route_not_found"
    refused: list[dict[str, str | int]] = [
        {},
        {"route": rig.route, "limit": 100_001},
        {"route": rig.route, "min_quality": 2},
    ]
    for params in refused:
        assert_openai_error(
            await rig.client.get("/datasets", params=params), 400, "invalid_request_error"
        )
    empty = await rig.client.get("/datasets", params={"route": rig.other})
    assert (empty.status_code, empty.text) == (200, "")
    settings = make_settings(
        flywheel_master_key=MASTER, database_url="postgresql://127.0.0.1:1/none"
    )
    routes = routes_for(r={"deployments": [{"name": "d", "provider": "mock", "model": "d"}]})
    async with (
        Served(create_app(settings, routes)) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=20) as client,
    ):
        down = await client.get("/v1/virtuous-cycle/datasets", params={"route": "r"})
    assert assert_openai_error(down, 503, "server_error")["code"] == "database_unavailable"
