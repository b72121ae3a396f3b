"""Everything with a lifetime, built once in the lifespan and reached by dependencies."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cache.service import ResponseCache
from app.config import Settings
from app.providers.registry import ProviderRegistry
from app.routing.config import RoutesFile
from app.routing.dispatch import Dispatcher
from app.routing.router import Router
from app.store.records import Recorder


@dataclass(slots=True)
class AppState:
    settings: Settings
    routes: RoutesFile
    router: Router
    dispatcher: Dispatcher
    providers: ProviderRegistry
    http: aiohttp.ClientSession
    redis: Redis | None
    engine: AsyncEngine
    recorder: Recorder
    started_at: float
    metrics: CollectorRegistry
    cache: ResponseCache
