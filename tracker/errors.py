"""One root error; each subclass carries the HTTP status the API middleware answers with."""

from __future__ import annotations

from typing import Any


class TrackerError(Exception):
    """Root of every error the tracker raises on purpose."""

    status = 500

    def __init__(self, detail: Any = "Internal Server Error") -> None:
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.detail = detail


class ConfigError(TrackerError):
    """The configuration is invalid; start-up stops with this one line."""


class BadRequest(TrackerError):
    status = 400


class Unauthorized(TrackerError):
    status = 401


class Forbidden(TrackerError):
    status = 403


class NotFound(TrackerError):
    status = 404


class Conflict(TrackerError):
    status = 409


class Invalid(TrackerError):
    """Request validation failed; ``detail`` is FastAPI's list of {loc, msg, type}."""

    status = 422


class Unavailable(TrackerError):
    """The database cannot take writes right now (disk full, read-only...)."""

    status = 503


class LettaError(TrackerError):
    """Letta answered with an error the caller should see as-is (a 4xx at submit)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status


class LettaUnavailable(TrackerError):
    """Letta is down, timed out, answered 5xx, 429 or a 4xx with Retry-After: try again later."""

    status = 503

    def __init__(self, detail: str, retry_after: float | None = None, sent: bool = True,
                 answered: bool = True) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        # False when the request surely never reached Letta (connection refused)
        self.sent = sent
        # False when no answer came (a timeout, a connection lost after sending): Letta may
        # still be working on the request, and may create its run a while later
        self.answered = answered


def error_body(status: int, detail: Any) -> dict:
    """Letta's (FastAPI's) error shape."""
    return {"detail": detail}
