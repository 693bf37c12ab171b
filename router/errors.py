"""Errors the router raises on purpose. One handler in app.py maps them to TGI's
{"error": ..., "error_type": ...} bodies and status codes."""

from __future__ import annotations


class RouterError(Exception):
    status_code: int = 500
    error_type: str = "internal"


class ValidationError(RouterError):
    status_code = 422
    error_type = "validation"


class OverloadedError(RouterError):
    status_code = 429
    error_type = "overloaded"


class GenerationError(RouterError):
    """The shard failed while generating (gRPC error, shard died)."""

    status_code = 424
    error_type = "generation"


class UnhealthyError(RouterError):
    status_code = 503
    error_type = "unhealthy"


class PayloadTooLargeError(RouterError):
    status_code = 413
    error_type = "payload_too_large"


class AuthError(RouterError):
    status_code = 401
    error_type = "authentication"


class NotFoundError(RouterError):
    status_code = 404
    error_type = "not_found"
