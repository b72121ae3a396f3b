"""Cache keys, the L1 LRU and the stored form of an answer (no network)."""

from __future__ import annotations

import orjson
import pytest

from app.cache.entry import Cached, CorruptEntry
from app.cache.keys import cache_key, route_pattern, tenant_of
from app.cache.l1 import L1Cache

BODY = {
    "model": "chat",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 1,
    "max_tokens": 5,
}


def key(body: dict[str, object], **kw: object) -> str:
    args: dict[str, object] = {"tenant": "t1", **kw}
    return cache_key("p:", "chat", "chat", body, **args)  # type: ignore[arg-type]


def test_key_is_stable_across_order_and_equal_spellings() -> None:
    reordered = orjson.loads(orjson.dumps(dict(reversed(list(BODY.items())))))
    assert key(BODY) == key(reordered)
    assert key(BODY) == key({**BODY, "temperature": 1.0})
    assert key(BODY) == key(
        {k: v for k, v in BODY.items() if k != "max_tokens"} | {"max_completion_tokens": 5}
    )
    assert key(BODY) == key({**BODY, "user": "u", "metadata": {"x": "y"}, "stream": True})
    assert key(BODY).startswith("p:cache:v1:chat:")


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.5},
        {"top_p": 0.9},
        {"seed": 1},
        {"n": 2},
        {"stop": ["x"]},
        {"response_format": {"type": "json_object"}},
        {"tool_choice": "none"},
        {"some_new_parameter": 1},
        {"messages": [{"role": "user", "content": "hi!"}]},
    ],
)
def test_key_splits_on_everything_that_changes_the_answer(change: dict[str, object]) -> None:
    assert key(BODY) != key({**BODY, **change})


def test_key_splits_on_tenant_variant_route_and_endpoint() -> None:
    base = key(BODY)
    assert base != key(BODY, tenant="t2")
    assert base != key(BODY, variant="b")
    assert base != cache_key("p:", "chat", "other", BODY, tenant="t1")
    assert base != cache_key("p:", "embeddings", "chat", BODY, tenant="t1")
    assert tenant_of("Bearer a") != tenant_of("Bearer b")
    assert tenant_of(None) == "anonymous"
    assert "Bearer" not in tenant_of("Bearer sk-secret")


def test_route_pattern_escapes_glob_characters() -> None:
    assert route_pattern("p:", None) == "p:cache:v1:*"
    assert route_pattern("p:", "a*b[1]") == "p:cache:v1:a\\*b\\[1\\]:" + "?" * 64
    # Exactly the route's answers: not route "a:b", not the fill locks.
    own = key(BODY)
    route = own.split(":")[-2]
    import fnmatch

    pattern = route_pattern("p:", route)
    assert fnmatch.fnmatchcase(own, pattern)
    assert not fnmatch.fnmatchcase(own + ":lock", pattern)
    assert not fnmatch.fnmatchcase(
        cache_key("p:", "chat", route + ":b", BODY, tenant="t1"), pattern
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_l1_is_an_lru_bounded_by_entries() -> None:
    l1: L1Cache[str] = L1Cache(max_entries=2, max_bytes=10_000)
    l1.put("a", "A", size=10, ttl_s=60, route="r")
    l1.put("b", "B", size=10, ttl_s=60, route="r")
    assert l1.get("a") == "A"  # a is now the most recently used
    l1.put("c", "C", size=10, ttl_s=60, route="r")
    assert l1.get("b") is None
    assert (l1.get("a"), l1.get("c")) == ("A", "C")
    assert l1.evictions == 1
    assert len(l1) == 2


def test_l1_is_bounded_by_bytes_and_refuses_what_cannot_fit() -> None:
    l1: L1Cache[str] = L1Cache(max_entries=100, max_bytes=100)
    for name in "abcd":
        l1.put(name, name, size=30, ttl_s=60, route="r")
    assert l1.bytes <= 100
    assert l1.get("a") is None
    assert l1.get("d") == "d"
    assert not l1.put("huge", "x", size=101, ttl_s=60, route="r")
    l1.put("d", "d2", size=50, ttl_s=60, route="r")  # replacing adjusts the byte count
    assert l1.bytes <= 100
    assert l1.get("d") == "d2"


def test_l1_expires_and_purges_by_route() -> None:
    clock = Clock()
    l1: L1Cache[str] = L1Cache(max_entries=10, max_bytes=1000, clock=clock)
    l1.put("a", "A", size=1, ttl_s=5, route="r1")
    l1.put("b", "B", size=1, ttl_s=50, route="r2")
    clock.now = 6
    assert l1.get("a") is None
    assert l1.expirations == 1
    assert l1.purge("r2") == 1
    assert len(l1) == 0
    assert l1.bytes == 0


def test_cached_answer_renders_each_hit_with_its_own_id() -> None:
    answer = {
        "id": "upstream-id",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "id"}}],
    }
    cached = Cached.of("chat", "r", answer)
    rendered = orjson.loads(cached.json_body("chatcmpl-new"))
    assert rendered["id"] == "chatcmpl-new"
    assert rendered["choices"] == answer["choices"]


@pytest.mark.parametrize("size", [10, 100_000])
def test_cached_answer_round_trips_through_its_stored_form(size: int) -> None:
    answer = {"object": "list", "data": [{"embedding": [0.5] * size, "index": 0}]}
    cached = Cached.of("embeddings", "e", answer)
    stored = cached.encode(compress_min_bytes=1024)
    assert stored[:1] == (b"z" if size > 100 else b"j")
    back = Cached.decode(stored)
    assert back.answer == answer
    assert back.json_body("ignored") == cached.json_body("ignored")
    if size > 100:
        assert len(stored) < len(orjson.dumps(answer)) / 10  # large values are compressed


def test_unreadable_stored_values_are_reported() -> None:
    for junk in (b"", b"q{}", b"j{not json", b"z" + b"\x00" * 8, b'j{"kind": "chat"}'):
        with pytest.raises(CorruptEntry):
            Cached.decode(junk)
