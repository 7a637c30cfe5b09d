"""The simulator's HTTP edge: call counting, downtime, auth, API faults and error bodies."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

from aiohttp import web

from tracker.sim_errors import SimError
from tracker.sim_faults import Faults, chance

if TYPE_CHECKING:
    from tracker.simulator import Simulator

SIM_KEY: web.AppKey[Simulator] = web.AppKey("letta_simulator")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_5XX = ((500, "Internal Server Error"), (502, "Bad Gateway"), (503, "Service Unavailable"))


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer encoded the way Starlette does: compact UTF-8, no charset parameter."""
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return web.Response(body=data, status=status, headers=headers, content_type="application/json")


async def uvicorn_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Answer as `server: uvicorn`, like the real server (an on_response_prepare signal)."""
    response.headers["Server"] = "uvicorn"


def drop_connection(request: web.Request) -> NoReturn:
    """Close the connection without an answer, as a dead server does.

    Clients see aiohttp's ServerDisconnectedError (a ClientConnectionError). Raising
    CancelledError is what makes aiohttp abandon the request quietly instead of trying
    to write a 500 to the closed transport.
    """
    if request.transport is not None:
        request.transport.close()
    raise asyncio.CancelledError


@web.middleware
async def front_door(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Everything a /v1 request meets before Letta's code: downtime, auth, rate limits."""
    if not request.path.startswith("/v1"):
        return await handler(request)  # control endpoints: always up, no auth
    sim = request.app[SIM_KEY]
    sim.calls[(request.method, _route(request))] += 1
    faults = sim.request_faults(request)
    if sim.faults.down or faults.down:
        drop_connection(request)
    if not request.path.startswith("/v1/health") and not sim.authorized(request):
        return json_response({"detail": "Unauthorized"}, 401)
    refusal = _api_fault(sim, faults)
    if refusal is not None:
        return refusal
    response = await handler(request)
    if chance(sim.rng, faults.response_drop):
        drop_connection(request)  # the work is done; only the answer is lost
    return response


@web.middleware
async def letta_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn SimError and aiohttp's routing errors into Letta's JSON error bodies."""
    try:
        return await handler(request)
    except SimError as exc:
        return json_response(exc.body, exc.status, exc.headers)
    except web.HTTPNotFound:
        return json_response({"detail": "Not Found"}, 404)
    except web.HTTPMethodNotAllowed:
        return json_response({"detail": "Method Not Allowed"}, 405)


def _api_fault(sim: Simulator, faults: Faults) -> web.Response | None:
    if chance(sim.rng, faults.api_429_rate):
        retry_after = str(max(0, math.ceil(faults.retry_after_s)))
        headers = {"Retry-After": retry_after}
        return json_response({"detail": "Rate limit exceeded"}, 429, headers)
    if chance(sim.rng, faults.api_5xx_rate):
        # What a crashing app or its proxy sends: a plain-text body, not JSON.
        status, reason = sim.rng.choice(_5XX)
        return web.Response(text=reason, status=status)
    return None


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    pattern = resource.canonical if resource is not None else request.path
    # /v1/runs and /v1/runs/ are one Letta route.
    return pattern.rstrip("/") or "/"
