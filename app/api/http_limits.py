"""HTTP-level protection per process: slowapi's limiter over in-memory storage.

Per client address on every endpoint (health endpoints have their own, higher, limit
so probes are never starved by traffic), and per key on the /v1 endpoints for keys
without an RPM of their own (a key's RPM is enforced globally, in Redis, by
`app.ratelimit`). The storage is in memory (`LoopMemoryStorage`), chosen explicitly so
a `RATELIMIT_STORAGE_URI` in `.env` cannot switch it: with a Redis storage the `limits`
library would make synchronous network calls on the event loop. A hit is a dictionary
update under a lock; `tests/unit/test_http_limits.py` checks that no I/O happens.

slowapi's decorators and middleware are not used: the hot endpoints are served before
FastAPI's routing (`app.api.fastpath`), and the per-key limit needs the key, known only
once the request is authenticated; so the limits are checked here, against slowapi's
limiter, by the same code for both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from slowapi import Limiter
from starlette.types import Scope

from app.config import Settings
from app.errors import RateLimitError
from app.ratelimit.headers import meter_headers, retry_headers
from app.ratelimit.quota import Meter

HEALTH_PREFIXES = ("/health", "/metrics")
SWEEP_S = 10.0
MAX_NAMES = 100_000
LOGIN_LIMIT = parse("10/minute")
log = logging.getLogger("flywheel.limits")


class LoopMemoryStorage(MemoryStorage):
    """limits' in-memory storage, without its expiry thread.

    MemoryStorage starts a timer thread 10 ms after any hit to drop expired windows: under
    load, a new thread a hundred times a second, each taking the GIL from the event loop
    (in `make bench`, cache hits served 12.7k/s with it against 14.7k/s without the HTTP
    limits; suppressing the thread recovered most of it). Here an expired window is
    dropped when its key is next read (as MemoryStorage does too), and `sweep` drops the
    rest, run in a thread every `SWEEP_S` by the gateway. Registered with limits under its
    own scheme, so slowapi builds it from a storage URI like any other.
    """

    STORAGE_SCHEME = ["flywheel-memory"]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **_: str) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self.timer.cancel()

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        self.get(key)  # a window that has expired starts again
        with self.locks[key]:
            self.storage[key] += amount
            if self.storage[key] == amount:
                self.expirations[key] = time.time() + expiry
        return self.storage.get(key, 0)

    def sweep(self) -> int:
        now = time.time()
        gone = [k for k, at in list(self.expirations.items()) if at <= now]
        for k in gone:
            self.get(k)  # drops it, under the same checks as a read
        return len(gone)


def _client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


@dataclass(frozen=True, slots=True)
class EndpointLimits:
    per_ip: RateLimitItem
    health: RateLimitItem
    per_key: dict[str, RateLimitItem]  # endpoint -> limit per key


class HttpLimits:
    def __init__(self, settings: Settings) -> None:
        self.slowapi = Limiter(
            key_func=lambda: "",  # keys are given at each check
            storage_uri="flywheel-memory://",
            strategy="fixed-window",
            key_prefix="http",
        )
        # Set after construction: slowapi would otherwise let RATELIMIT_ENABLED in the
        # environment or .env override FLYWHEEL_HTTP_LIMITS.
        self.slowapi.enabled = settings.flywheel_http_limits
        self.items = EndpointLimits(
            per_ip=parse(settings.flywheel_http_limit_ip),
            health=parse(settings.flywheel_http_limit_health),
            per_key={
                "chat.completions": parse(settings.flywheel_http_limit_chat),
                "embeddings": parse(settings.flywheel_http_limit_embeddings),
            },
        )
        self.refused = 0
        self._storage = self.slowapi.limiter.storage
        self._ip_names: dict[str, str] = {}
        self._health_names: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return self.slowapi.enabled

    async def sweep_forever(self) -> None:
        storage = self.slowapi.limiter.storage
        assert isinstance(storage, LoopMemoryStorage)
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                await asyncio.to_thread(storage.sweep)
            except Exception:  # a sweep failing must not end the sweeping
                log.exception("http limits: sweeping expired windows failed")

    def check_client(self, scope: Scope) -> RateLimitError | None:
        """The per-address limit for this request, or the 429 to answer with.

        Every request pays for this, so it does what the fixed-window strategy's `hit`
        does (one increment of the window's counter in slowapi's storage) with the
        counter's name kept per address rather than rebuilt: ~1.5 us instead of ~5.
        """
        if not self.slowapi.enabled:
            return None
        ip = _client_ip(scope)
        if scope["path"].startswith(HEALTH_PREFIXES):
            item, scope_name, names = self.items.health, "health", self._health_names
        else:
            item, scope_name, names = self.items.per_ip, "ip", self._ip_names
        name = names.get(ip)
        if name is None:
            if len(names) >= MAX_NAMES:
                names.clear()  # bounded: a flood of addresses only costs rebuilding names
            name = names[ip] = item.key_for(scope_name, ip)
        if self._storage.incr(name, item.get_expiry()) <= item.amount:
            return None
        self.refused += 1
        return _refusal(item, self._meter(item, scope_name, ip), "this address")

    def check_login(self, scope: Scope) -> None:
        """Dashboard logins per address: always on (FLYWHEEL_HTTP_LIMITS only switches
        the traffic limits), so the master key cannot be guessed at speed."""
        ip = _client_ip(scope)
        if self.slowapi.limiter.hit(LOGIN_LIMIT, "login", ip):
            return
        self.refused += 1
        raise _refusal(LOGIN_LIMIT, self._meter(LOGIN_LIMIT, "login", ip), "dashboard logins")

    def check_key(self, endpoint: str, key_id: str) -> Meter | None:
        """Count a request of a key without its own RPM; the meter for its headers.
        Raises 429 when the key is over the endpoint's default limit."""
        item = self.items.per_key.get(endpoint)
        if item is None or not self.slowapi.enabled:
            return None
        admitted = self.slowapi.limiter.hit(item, endpoint, key_id)
        meter = self._meter(item, endpoint, key_id)
        if admitted:
            return meter
        self.refused += 1
        error = _refusal(item, meter, "this API key")
        error.headers.update(meter_headers(meter, None))
        raise error

    def _meter(self, item: RateLimitItem, scope: str, key: str) -> Meter:
        stats = self.slowapi.limiter.get_window_stats(item, scope, key)
        return Meter(item.amount, stats.remaining, max(0.0, stats.reset_time - time.time()))


def _refusal(item: RateLimitItem, meter: Meter, who: str) -> RateLimitError:
    error = RateLimitError(
        f"Rate limit reached for {who}: {item.amount} requests per "
        f"{item.get_expiry()} s. Try again in {meter.reset_s:.0f} s.",
        code="rate_limit_exceeded",
    )
    error.headers.update(retry_headers(meter.reset_s))
    return error
