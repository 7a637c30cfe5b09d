"""The Letta endpoints the tracker drives, as thin aiohttp handlers over the Simulator."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from tracker.sim_agents import DEFAULT_MODEL
from tracker.sim_errors import agent_not_found
from tracker.sim_http import SIM_KEY, json_response
from tracker.sim_llm import is_answer
from tracker.sim_query import message_page, paginate, run_query
from tracker.sim_requests import (
    agent_id_errors,
    async_body_errors,
    json_body,
    object_body_errors,
    raise_if,
    run_ids_errors,
)
from tracker.sim_shapes import LETTA_VERSION, run_json, step_json, usage_json
from tracker.sim_store import SimRun

if TYPE_CHECKING:  # the simulator imports this module
    from tracker.simulator import Simulator


def add_v1_routes(router: web.UrlDispatcher) -> None:
    """Register Letta's /v1 routes (collection routes with and without the trailing slash)."""
    for path in ("/v1/health/", "/v1/health"):
        router.add_get(path, health)
    for path in ("/v1/agents/", "/v1/agents"):
        router.add_post(path, create_agent)
        router.add_get(path, list_agents)
    router.add_get("/v1/agents/{agent_id}", get_agent)
    router.add_post("/v1/agents/{agent_id}/messages/async", send_message_async)
    router.add_post("/v1/agents/{agent_id}/messages/cancel", cancel_runs)
    for path in ("/v1/runs/", "/v1/runs"):
        router.add_get(path, list_runs)
    router.add_get("/v1/runs/{run_id}", get_run)
    router.add_delete("/v1/runs/{run_id}", delete_run)
    router.add_get("/v1/runs/{run_id}/messages", list_run_messages)
    router.add_get("/v1/runs/{run_id}/usage", get_run_usage)
    router.add_get("/v1/runs/{run_id}/steps", list_run_steps)


async def health(request: web.Request) -> web.Response:
    """`GET /v1/health/`."""
    return json_response({"version": LETTA_VERSION, "status": "ok"})


async def create_agent(request: web.Request) -> web.Response:
    """`POST /v1/agents/`: name, model and agent_type are honoured, the rest ignored."""
    body, errors = await json_body(request)
    raise_if(errors or object_body_errors(body))
    agent = request.app[SIM_KEY].create_agent(
        name=body.get("name"),
        model=body.get("model") or DEFAULT_MODEL,
        agent_type=body.get("agent_type") or "letta_v1_agent",
    )
    return json_response(agent)


async def list_agents(request: web.Request) -> web.Response:
    """`GET /v1/agents/`, oldest first."""
    agents = request.app[SIM_KEY].store.agents.values()
    return json_response([a.json for a in agents])


async def get_agent(request: web.Request) -> web.Response:
    """`GET /v1/agents/{agent_id}`."""
    agent_id = request.match_info["agent_id"]
    raise_if(agent_id_errors(agent_id))
    agent = request.app[SIM_KEY].store.agents.get(agent_id)
    if agent is None:
        raise agent_not_found(agent_id)
    return json_response(agent.json)


async def send_message_async(request: web.Request) -> web.Response:
    """`POST /v1/agents/{agent_id}/messages/async`: the Run, status created."""
    agent_id = request.match_info["agent_id"]
    body, errors = await json_body(request)
    # FastAPI validates path and body together and reports both.
    raise_if(agent_id_errors(agent_id) + (errors or async_body_errors(body)))
    sim = request.app[SIM_KEY]
    raw, faults = await request.read(), sim.request_faults(request)
    if faults.accept_delay_s > 0:  # Letta goes on when its client leaves (uvicorn's way)
        run = await asyncio.shield(_accept_late(sim, agent_id, body, raw, faults.accept_delay_s))
    else:
        run = sim.submit(agent_id, body, raw)
    answer = json_response(run_json(run))  # the run as created, whatever it does meanwhile
    low, high = faults.answer_time_s
    if high > 0:  # the real server's time to answer (its run is already created)
        await asyncio.sleep(sim.rng.uniform(low, high))
    return answer


async def _accept_late(sim: Simulator, agent_id: str, body: dict, raw: bytes,
                       delay: float) -> SimRun:
    """The run created ``delay`` seconds late, as by a saturated server."""
    await asyncio.sleep(delay)
    return sim.submit(agent_id, body, raw)


async def cancel_runs(request: web.Request) -> web.Response:
    """`POST /v1/agents/{agent_id}/messages/cancel`: `{run_id: "cancelled" | "failed"}`."""
    agent_id = request.match_info["agent_id"]
    body, errors = await json_body(request, required=False)
    body = {} if body is None and not errors else body
    errors = errors or object_body_errors(body) or run_ids_errors(body)
    raise_if(agent_id_errors(agent_id) + errors)
    answer = await request.app[SIM_KEY].cancel(agent_id, body.get("run_ids"))
    return json_response(answer)


async def list_runs(request: web.Request) -> web.Response:
    """`GET /v1/runs/` with Letta's filters and chronological cursors."""
    query = run_query(request.query)
    runs = request.app[SIM_KEY].store.select(query)
    return json_response([run_json(r, listed=True) for r in runs])


async def get_run(request: web.Request) -> web.Response:
    """`GET /v1/runs/{run_id}`."""
    run = request.app[SIM_KEY].lookup_run(request.match_info["run_id"])
    return json_response(run_json(run))


async def delete_run(request: web.Request) -> web.Response:
    """`DELETE /v1/runs/{run_id}`; Letta answers null."""
    sim = request.app[SIM_KEY]
    run = sim.lookup_run(request.match_info["run_id"])
    sim.delete_run(run.id)
    return json_response(None)


async def list_run_messages(request: web.Request) -> web.Response:
    """`GET /v1/runs/{run_id}/messages`, oldest first by default."""
    page = message_page(request.query)
    run = request.app[SIM_KEY].lookup_run(request.match_info["run_id"])
    return json_response(run.visible(paginate(run.messages, page)))


async def list_run_steps(request: web.Request) -> web.Response:
    """`GET /v1/runs/{run_id}/steps`: the run's one step (newest first by default); none for
    an answer to a pause, whose (one) step Letta runs under the paused run's step id, logging
    no step of its own (letta_agent_v3.py, the approval branch)."""
    page = message_page(request.query, order="desc")
    run = request.app[SIM_KEY].lookup_run(request.match_info["run_id"])
    steps = [] if is_answer(run.inputs) else [step_json(run)]
    return json_response(steps[: max(page.limit, 0)])


async def get_run_usage(request: web.Request) -> web.Response:
    """`GET /v1/runs/{run_id}/usage`."""
    run = request.app[SIM_KEY].lookup_run(request.match_info["run_id"])
    return json_response(usage_json(run))
