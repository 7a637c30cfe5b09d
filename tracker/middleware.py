"""HTTP middlewares: errors in Letta's shape (never a traceback), and access by API key."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from aiohttp import web

from tracker.errors import LettaUnavailable, TrackerError, Unauthorized, error_body
from tracker.serialize import json_response

log = logging.getLogger("tracker.api")

USER: web.RequestKey = web.RequestKey("user", object)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: True in a task serving a request, and in the tasks it starts (an inline send)
SERVING: ContextVar[bool] = ContextVar("tracker_serving", default=False)


class InFlight:
    """The requests being handled now (counted by ``timing_middleware``)."""

    def __init__(self) -> None:
        self.n = 0

    def lone(self) -> bool:
        """Whether the running code serves the only request in flight: its writes have no
        other request's to share a commit with (``GroupCommit._batched``)."""
        return self.n == 1 and SERVING.get()


def _json_error(status: int, detail: object) -> web.Response:
    return json_response(error_body(status, detail), status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every error to its status and a ``{"detail": ...}`` body."""
    try:
        return await handler(request)
    except TrackerError as e:
        if e.status >= 500:
            # Letta down or erring is Letta's outage, answered as designed (the caller tries
            # again, the run is looked up later): a warning; the tracker's own fault (its
            # database) is an error
            level = logging.WARNING if isinstance(e, LettaUnavailable) else logging.ERROR
            log.log(level, "%s %s: %s", request.method, request.path, e)
        return _json_error(e.status, e.detail)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        detail = "Request Entity Too Large" if e.status == 413 else e.reason
        return _json_error(e.status, detail)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _json_error(500, "Internal Server Error")


def bearer(request: web.Request) -> str | None:
    """The key from ``Authorization: Bearer <key>`` (also accepted: ``X-API-Key``)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-API-Key") or None


def make_auth_middleware(authenticate: Callable, public: Callable[[str], bool]):
    """Resolve the caller's user from the key; public paths need none."""

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if public(request.path):
            return await handler(request)
        user = await authenticate(bearer(request))
        if user is None:
            raise Unauthorized("Unauthorized")
        request[USER] = user
        return await handler(request)

    return auth_middleware


def timing_middleware(observe: Callable[[str, str, int, float], None],
                      in_flight: InFlight | None = None):
    """Report each request's route, status and latency to ``observe`` (metrics), and count
    the requests in flight in ``in_flight``."""
    counted = in_flight or InFlight()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        counted.n += 1
        SERVING.set(True)  # each request has a task of its own: nothing to reset after
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            counted.n -= 1
            route = request.match_info.route.resource
            name = route.canonical if route is not None else "unmatched"
            observe(request.method, name, status, time.perf_counter() - start)

    return middleware
