"""Who is calling /v1: the master key, a virtual key, or (where allowed) nobody in
particular. Decided from the Authorization header (or, for the operator dashboard, its
session cookie beside its header), never from Host or the URL."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from app.auth.resolver import KeyInfo, KeyLookupUnavailable
from app.auth.session_revocation import api_session
from app.cache.keys import tenant_of
from app.errors import AuthenticationError, PermissionDeniedError, ServiceUnavailableError
from app.state import AppState


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str  # what the cache and the records attribute the request to
    key: KeyInfo | None = None  # None: the master key or an anonymous caller
    master: bool = False

    @classmethod
    def of_key(cls, info: KeyInfo) -> Caller:
        # The key's id, not a hash of what was presented: records and cache keys name
        # the key without holding anything derived from its secret.
        return cls(f"key:{info.id}", key=info)

    @property
    def owner(self) -> str | None:
        """Who owns what this caller creates (files, batches): its key's id; None for
        the master key and anonymous callers (where keys are optional)."""
        return None if self.key is None else self.key.id

    def owns(self, owner: str | None) -> bool:
        """Whether this caller may see what `owner` made (the master key sees all)."""
        return self.master or owner == self.owner

    def check_route(self, route: str) -> None:
        if self.key is not None and not self.key.allows(route):
            raise PermissionDeniedError(
                f"this API key may not use the route {route!r}",
                param="model",
                code="route_not_allowed",
            )


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _invalid() -> AuthenticationError:
    # The key itself is never echoed: it would land in client logs and error trackers.
    return AuthenticationError(
        "Incorrect API key provided. Ask your Flywheel operator for a key.",
        code="invalid_api_key",
    )


async def authenticate(state: AppState, headers: Mapping[str, str]) -> Caller:
    header = headers.get("authorization")
    token = _bearer(header)
    required = state.settings.auth_required
    if token is None:
        if await api_session(state, headers):
            return Caller("master", master=True)  # the operator dashboard
        if required:
            raise AuthenticationError(
                "You didn't provide an API key: send it as `Authorization: Bearer <key>`.",
                code="missing_api_key",
            )
        return Caller(tenant_of(header))
    master = state.settings.flywheel_master_key
    if master is not None and secrets.compare_digest(
        token.encode(), master.get_secret_value().encode()
    ):
        return Caller("master", master=True)
    try:
        info = await state.keys.resolve(token)
    except KeyLookupUnavailable as e:
        if not required:
            return Caller(tenant_of(header))
        raise ServiceUnavailableError(
            "API keys cannot be checked right now; try again shortly",
            code="auth_unavailable",
        ) from e
    if info is None:
        if required:
            raise _invalid()
        return Caller(tenant_of(header))
    if not info.usable(time.time()):
        raise _invalid()  # revoked or expired: refused even where keys are optional
    return Caller.of_key(info)
