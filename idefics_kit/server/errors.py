"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` and a status.

:class:`APIError` is what every route raises for a request it refuses;
:func:`from_sdk_error` turns the SDK's exceptions into one, in one place. No
message ever carries a traceback: a 500 says only that the server failed and
gives the request id that the server log records with the traceback.

Statuses and ``type`` values follow OpenAI's API:

====== ========================== ==========================================================
status type                       when
====== ========================== ==========================================================
400    ``invalid_request_error``  bad JSON, a bad field, role, image or conversation
401    ``invalid_request_error``  missing or wrong API key (code ``invalid_api_key``)
404    ``invalid_request_error``  unknown model (code ``model_not_found``) or path
405    ``invalid_request_error``  wrong HTTP method
413    ``invalid_request_error``  body over ``max_request_bytes`` (code ``request_too_large``)
500    ``server_error``           the model or the server failed (logged with the traceback)
503    ``server_error``           engine queue or server full (``overloaded``) or draining
                                  (``shutting_down``), with ``Retry-After``
504    ``server_error``           the request ran past the server's request timeout
====== ========================== ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from idefics_kit.errors import (
    ConversationError,
    GeneratorClosedError,
    IdeficsKitError,
    ImageLoadError,
    InvalidParameterError,
    OverloadedError,
    RequestTimeoutError,
    UsageError,
)

__all__ = [
    "MAX_MESSAGE_CHARS",
    "APIError",
    "capped",
    "error_body",
    "from_sdk_error",
    "internal_error",
    "overloaded",
    "shutting_down",
]

MAX_MESSAGE_CHARS = 1000
"""Longest message taken from an SDK exception; the rest is cut (a safety net: the SDK
quotes at most 100 characters of a value, but a message may name a path or a URL)."""

RETRY_AFTER_SECONDS = 1
"""``Retry-After`` sent with 503 when the engine queue is full."""


class APIError(Exception):
    """A refusal with an HTTP status and an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {...}}``."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def capped(text: str) -> str:
    """``text``, cut to :data:`MAX_MESSAGE_CHARS` characters and ``...`` when longer."""
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def internal_error(request_id: str) -> APIError:
    """The 500 a client sees for an unexpected failure; the log has the details."""
    return APIError(
        500,
        f"The server had an error while processing your request (request id {request_id}); "
        "its log has the details.",
        type="server_error",
        code="internal_error",
    )


def overloaded(message: str) -> APIError:
    """503 with ``Retry-After``: the engine queue is full."""
    return APIError(
        503,
        f"The server is overloaded, please retry shortly: {message}",
        type="server_error",
        code="overloaded",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def shutting_down() -> APIError:
    """503 with ``Retry-After`` while the server drains before exiting."""
    return APIError(
        503,
        "The server is shutting down and takes no new requests; retry on another instance.",
        type="server_error",
        code="shutting_down",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"},
    )


def from_sdk_error(
    exc: IdeficsKitError, request_id: str, parameters: Mapping[str, str] | None = None
) -> APIError:
    """The APIError for an SDK exception raised while answering a request.

    ``parameters`` maps SDK option names to the request field that set them
    (``max_new_tokens`` -> ``max_completion_tokens``), so ``param`` names what
    the client sent.
    """
    text = capped(str(exc))
    if isinstance(exc, OverloadedError):
        return overloaded(text)
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, f"The request timed out: {text}", type="server_error", code="timeout")
    if isinstance(exc, GeneratorClosedError):
        return shutting_down()
    if isinstance(exc, InvalidParameterError):
        param = (parameters or {}).get(exc.parameter, exc.parameter)
        return APIError(400, text, param=param, code="invalid_value")
    if isinstance(exc, ImageLoadError):
        return APIError(400, text, param="messages", code="invalid_image")
    if isinstance(exc, ConversationError):
        return APIError(400, text, param="messages", code="invalid_messages")
    if isinstance(exc, UsageError):
        return APIError(400, text)
    return internal_error(request_id)
