"""OpenAI-style error bodies, `{"error": {message, type, param, code}}`, for every failure path.

Clients (the openai SDK included) read `error.message`; FastAPI's defaults (422 with pydantic's `loc`/`ctx`/
docs URLs, `{"detail": ...}` bodies) would break them and leak internals, so every handler is replaced.
"""
from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    """An error the server reports to the client on purpose, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(max_model_len: int, prompt_tokens: int, completion_tokens: int, where: str) -> APIError:
    """`where` is "messages" (chat) or "prompt" (completions): the part of the request the client must shorten."""
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the {where}, {completion_tokens} in the "
        f"completion). Please reduce the length of the {where} or completion.",
        param=where,
        code="context_length_exceeded",
    )


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", type="NotFoundError", param="model",
                    code="model_not_found")


def not_ready(reason: str | None = None, retry_after: int = 5) -> APIError:
    """503 for a server that is loading, warming up, draining or unhealthy: retry here later, or elsewhere."""
    return APIError(503, reason or "The server is not ready yet (the engine is loading or shutting down); retry "
                    "shortly.", type="ServiceUnavailableError", code="service_unavailable",
                    headers={"Retry-After": str(retry_after)})


def overloaded(message: str, retry_after: int = 1) -> APIError:
    """503 + Retry-After when the admission queue is full (vLLM and Dynamo also answer 503; TGI uses 429)."""
    return APIError(503, message, type="server_overloaded", code="queue_full",
                    headers={"Retry-After": str(retry_after)})


def shutting_down(message: str) -> APIError:
    """An accepted request cut off by the shutdown timeout: the client may retry on another replica."""
    return APIError(503, message, type="ServiceUnavailableError", code="shutting_down", headers={"Retry-After": "1"})


def request_timeout(message: str) -> APIError:
    return APIError(504, message, type="timeout", code="request_timeout")


def request_too_large(limit: int, size: int | None = None) -> APIError:
    got = f" ({size} bytes)" if size is not None else ""
    return APIError(413, f"The request body is too large{got}; the limit is {limit} bytes.",
                    code="request_too_large")


def engine_error(message: str) -> APIError:
    return APIError(500, message, type="InternalServerError", code="internal_error")


def unauthorized(message: str = "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.") -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def describe_validation_errors(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One human sentence per error, e.g. "temperature: Input should be less than or equal to 2", and the
    first offending field as `param`. Only pydantic's `msg` and the field path are used: never `ctx`, `url`
    or the input, which may be large or reveal internals."""
    parts: list[str] = []
    first_param: str | None = None
    for err in errors[:5]:
        loc = list(err.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        kind = err.get("type", "")
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"The request body is not valid JSON ({detail})." if detail else "The request body is not valid JSON.")
            continue
        msg = str(err.get("msg", "Invalid value")).removeprefix("Value error, ")
        param = ".".join(str(p) for p in loc) or None
        if param is None and kind == "missing":
            parts.append("The request body is missing; send a JSON object.")
            continue
        first_param = first_param or param
        parts.append(f"{param}: {msg}" if param else msg)
    if len(errors) > 5:
        parts.append(f"({len(errors) - 5} more errors)")
    return "; ".join(parts) or "Invalid request.", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(exc.errors())
        return invalid_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif isinstance(exc.detail, str):
            message = exc.detail
        else:
            message = HTTPStatus(exc.status_code).phrase
        # A 422 must never pass through with FastAPI's shape: the API promises 400 for bad input.
        status = 400 if exc.status_code == 422 else exc.status_code
        kind = INVALID_REQUEST if status < 500 else "InternalServerError"
        return JSONResponse(error_body(message, kind), status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response is sent, so the traceback still reaches the server log.
        return engine_error(f"Internal server error: {type(exc).__name__}: {exc}").response()
