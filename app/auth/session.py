"""Dashboard sessions: a signed, expiring cookie issued for the master key.

The browser never holds the master key: logging in trades it for a token that says
"master, until T", signed with a key derived from the master key. Nothing is stored
at login, so every replica accepts a session any replica issued, and a new master key
ends every session at once; a logout is kept in Redis until the session would have
expired (`app.auth.session_revocation`). The cookie is HttpOnly (page scripts cannot
read it) and SameSite=Strict (other sites' pages cannot send it). The API endpoints take
it only beside the `X-Flywheel-Dashboard` header: a custom header cannot be sent
cross-origin without a CORS preflight the gateway never grants, a second guard against
cross-site requests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping

from pydantic import SecretStr

COOKIE = "flywheel_session"
HEADER = "x-flywheel-dashboard"
VERSION = "v1"
_EXPIRY = re.compile(r"[0-9]{1,12}")


def _signing_key(master: SecretStr) -> bytes:
    # Derived, so the token's signature is no oracle for the master key itself.
    return hashlib.sha256(
        b"flywheel-dashboard-session\0" + master.get_secret_value().encode()
    ).digest()


def _sign(master: SecretStr, payload: str) -> str:
    mac = hmac.new(_signing_key(master), payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def issue(master: SecretStr, now: float, ttl_s: int) -> str:
    """A session token valid for `ttl_s` from `now`."""
    payload = f"{VERSION}.{int(now) + ttl_s}.{secrets.token_urlsafe(12)}"
    return f"{payload}.{_sign(master, payload)}"


def expires_at(token: str) -> int | None:
    parts = token.split(".")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if len(parts) != 4 or parts[0] != VERSION or not _EXPIRY.fullmatch(parts[1]):
        return None
    return int(parts[1])


def valid(token: str, master: SecretStr | None, now: float) -> bool:
    """Whether the token was signed with this master key and has not expired."""
    if master is None or len(token) > 200:
        return False
    ends = expires_at(token)
    if ends is None or ends <= now:
        return False
    payload, _, signature = token.rpartition(".")
    return hmac.compare_digest(signature.encode(), _sign(master, payload).encode())


def cookie_tokens(headers: Mapping[str, str]) -> list[str]:
    """Every value the Cookie header gives the session cookie.

    Split by hand rather than with http.cookies, which drops the whole header over one
    malformed cookie of another application on the same host (locking the operator
    out). All values are kept: a cookie planted for the same name from elsewhere must
    not hide the real one, and only a validly signed one is ever accepted.
    """
    raw = headers.get("cookie")
    if not raw or COOKIE not in raw:
        return []
    found = []
    for part in raw.split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip() == COOKIE:
            found.append(value.strip().strip('"'))
    return found


def session_tokens(headers: Mapping[str, str], master: SecretStr | None, now: float) -> list[str]:
    """The request's validly signed, unexpired session cookies (pages and their files);
    whether one was revoked at logout is `app.auth.session_revocation`'s to say."""
    return [token for token in cookie_tokens(headers)[:4] if valid(token, master, now)]


def api_session_tokens(
    headers: Mapping[str, str], master: SecretStr | None, now: float
) -> list[str]:
    """As `session_tokens`, for an API request: only beside the dashboard's own header
    (see the module's note on cross-site requests)."""
    if master is None or not headers.get(HEADER):
        return []
    return session_tokens(headers, master, now)
