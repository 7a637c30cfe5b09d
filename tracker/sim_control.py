"""`/_sim/*`: controls and inspection for tests that run the simulator as a subprocess.

These routes need no auth and stay up while the simulated server is down.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tracker.sim_errors import detail
from tracker.sim_faults import Faults
from tracker.sim_http import SIM_KEY, json_response
from tracker.sim_requests import json_body


def add_control_routes(router: web.UrlDispatcher) -> None:
    """Register the /_sim routes."""
    router.add_get("/_sim/runs", runs)
    router.add_delete("/_sim/runs/{run_id}", delete_run)
    router.add_get("/_sim/stats", stats)
    router.add_post("/_sim/faults", set_faults)
    router.add_post("/_sim/agents", create_agents)
    router.add_post("/_sim/restart", restart)


async def runs(request: web.Request) -> web.Response:
    """Every run: id, agent, status, otids and callback outcome."""
    sim = request.app[SIM_KEY]
    return json_response([sim.describe(r) for r in sim.store.runs()])


async def delete_run(request: web.Request) -> web.Response:
    """Delete a run, so Letta answers 404 for it."""
    found = request.app[SIM_KEY].delete_run(request.match_info["run_id"])
    return json_response({"deleted": found}, 200 if found else 404)


async def stats(request: web.Request) -> web.Response:
    """API call counts, otid duplicates and run counts."""
    return json_response(request.app[SIM_KEY].stats())


async def set_faults(request: web.Request) -> web.Response:
    """Change faults: any Faults field, plus `agent_id` (that agent only) and `down_for_s`."""
    sim = request.app[SIM_KEY]
    changes = await _object(request)
    agent_id = changes.pop("agent_id", None)
    down_for = changes.pop("down_for_s", None)
    try:
        faults = sim.set_faults(agent_id, **changes)
        if down_for is not None:
            sim.down_for(float(down_for))
            faults = sim.faults
    except (ValueError, TypeError, KeyError) as exc:
        raise detail(400, str(exc)) from exc
    return json_response(faults.as_dict())


async def create_agents(request: web.Request) -> web.Response:
    """Create one agent (`{"name", "faults"}`), or `count` of them as a list."""
    sim = request.app[SIM_KEY]
    spec = await _object(request)
    try:
        faults = Faults().merged(spec["faults"]) if spec.get("faults") else None
        count = int(spec.get("count", 0))
    except (ValueError, TypeError) as exc:
        raise detail(400, str(exc)) from exc
    made = [sim.create_agent(spec.get("name"), faults) for _ in range(max(count, 1))]
    return json_response(made if "count" in spec else made[0])


async def restart(request: web.Request) -> web.Response:
    """Simulate a Letta restart: in-flight runs stay `created` forever."""
    request.app[SIM_KEY].restart()
    return json_response({"restarted": True})


async def _object(request: web.Request) -> dict[str, Any]:
    body, errors = await json_body(request, required=False)
    if errors or not isinstance(body, dict):
        raise detail(400, "expected a JSON object")
    return body
