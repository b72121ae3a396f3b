"""One error hierarchy, rendered in one place as OpenAI-shaped JSON.

Provider and transport exceptions are translated into these at the provider boundary;
nothing else reaches the client.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status = 403
    type = "permission_error"


class NotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class PayloadTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailableError(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamError(GatewayError):
    """The upstream failed: connection trouble, a 5xx or an unreadable answer (502)."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status; 4xx are passed back as they came."""

    def __init__(
        self,
        upstream_status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        status = upstream_status if 400 <= upstream_status < 500 else 502
        headers = {"Retry-After": _retry_after_value(retry_after)} if retry_after else None
        super().__init__(message, param=param, code=code, status=status, headers=headers)
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        if 400 <= upstream_status < 500:
            self.type = _TYPE_FOR_STATUS.get(upstream_status, "invalid_request_error")


_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def _retry_after_value(seconds: float) -> str:
    return str(max(1, round(seconds)))


# Anything that looks like a credential is cut from upstream messages before they are
# passed on: provider keys, bearer tokens, and `key=` query parameters.
_SECRET_PATTERNS = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,}|fw-[A-Za-z0-9_\-]{32,}|AIza[0-9A-Za-z_\-]{20,}|gsk_[A-Za-z0-9]{8,}"
    r"|Bearer\s+[A-Za-z0-9._\-]+|(?<=key=)[^&\s\"']+)"
)


def sanitise(message: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    message = _SECRET_PATTERNS.sub("***", message)
    return message[:2000]


def error_response(exc: GatewayError, request_id: str | None = None) -> Response:
    headers = dict(exc.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return Response(
        orjson.dumps(exc.body()),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_error(errors: list[Mapping[str, Any]]) -> InvalidRequestError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param_from_loc(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid request"))
    if param:
        message = f"{param}: {message}"
    return InvalidRequestError(message, param=param, code="invalid_value")


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(list(exc.errors())))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    err: GatewayError
    if exc.status_code == 404:
        err = NotFoundError(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 413:
        err = PayloadTooLargeError(str(exc.detail))
    elif exc.status_code == 405:
        err = InvalidRequestError(
            f"method {request.method} not allowed on {request.url.path}",
            code="method_not_allowed",
            status=405,
        )
    else:
        err = GatewayError(str(exc.detail), status=exc.status_code)
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(err)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
