"""Domain errors that carry their HTTP status, answered by one JSON handler in the API."""
from __future__ import annotations


class ApiError(Exception):
    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ApiError):
    status = 400


class NoCapacity(BadRequest):
    """400, as the 2.0 API answers it: no node can take the request (every one full, drained, stale, or
    none in a strict region). Not the client's mistake: the lookup metrics count it apart."""


class Unauthorized(ApiError):
    """401: with the challenge HTTP asks of it (``WWW-Authenticate``, RFC 9110 section 11.6.1)."""

    status = 401

    def __init__(self, message: str, scheme: str = "Bearer"):
        super().__init__(message)
        self.challenge = f'{scheme} realm="streammanager"'


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class ServiceUnavailable(ApiError):
    status = 503
