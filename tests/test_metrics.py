"""Metrics: the hooks move the counters, the gauges follow the store, the text parses.

Unit tests drive each hook with the real component that fires it (Manager, LettaClient,
timing_middleware); the last test wires a whole tracker to the simulator the way ``app.py``
and ``api.py`` are meant to, and reads ``GET /metrics`` over HTTP.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import eventually, make_config
from tracker import clock
from tracker.config import load_config
from tracker.errors import NotFound, Unavailable
from tracker.letta import LettaClient
from tracker.manager import Manager, Observation
from tracker.metrics import (
    CONTENT_TYPE,
    LIVE_STATES,
    METRICS,
    Metrics,
    refusal_reason,
    render,
)
from tracker.middleware import InFlight, timing_middleware
from tracker.states import Source, State
from tracker.store import Event, NewRun

A1 = "agent-11111111-1111-4111-8111-111111111111"
A2 = "agent-22222222-2222-4222-8222-222222222222"
A3 = "agent-33333333-3333-4333-8333-333333333333"


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of the rendered text, parsed back: {(name, labels): value}."""
    text = render(metrics).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


async def queue(store, agent: str) -> str:
    run_id = f"run-{uuid.uuid4()}"
    await store.submit(NewRun(id=run_id, user_id="user-1", agent_id=agent, kind="message",
                              request={"messages": []}, request_config={}, callback_url=None),
                       Event("api", "submit"))
    return run_id


# --- counters ------------------------------------------------------------------------------

def test_each_metrics_has_its_own_registry():
    one, two = Metrics(), Metrics()  # the global registry would refuse the second
    one.submitted()
    assert value(one, "tracker_runs_submitted_total") == 1
    assert value(two, "tracker_runs_submitted_total") == 0


def test_text_parses_and_every_family_is_prefixed():
    m = Metrics()
    m.submitted()
    m.relay_outcome("delivered")
    m.polled(3)
    families = list(text_string_to_metric_families(render(m).decode()))
    ours = {f.name for f in families if not f.name.startswith("process_")}
    assert ours and all(name.startswith("tracker_") for name in ours)
    assert value(m, "tracker_relay_deliveries_total", outcome="delivered") == 1
    assert value(m, "tracker_polls_total") == 3
    assert CONTENT_TYPE.startswith("text/plain; version=")


async def test_applied_counts_transitions_and_completions_by_status_and_source(store, tmp_path):
    m = Metrics()
    manager = Manager(make_config(tmp_path), store, LettaClient("http://127.0.0.1:9"),
                      lambda run_id: f"http://t/callbacks/letta/{run_id}")
    manager.on_applied = m.applied
    user = await store.create_user("u", False, "whsec_x")
    for status, source in (("completed", Source.CALLBACK), ("failed", Source.POLL)):
        run, _ = await manager.submit(user, A1, {"messages": [{"role": "user", "content": "x"}]})
        assert run.state is State.SUBMITTING  # its lane was free: claimed with the submit
        await manager.mark_submitted(run, {"id": f"run-{uuid.uuid4()}"}, Source.DISPATCH)
        current = await store.get_run(run.id)
        await manager.apply_remote(current, Observation(current.letta_run_id, status), source)
    assert value(m, "tracker_runs_completed_total", status="completed", source="callback") == 1
    assert value(m, "tracker_runs_completed_total", status="failed", source="poll") == 1
    assert value(m, "tracker_run_transitions_total", state="done", source="callback") == 1


async def test_letta_client_calls_are_counted_by_endpoint_and_status(aiohttp_server):
    async def get_run(request: web.Request) -> web.Response:
        if request.match_info["run_id"] == "run-known":
            return web.json_response({"id": "run-known", "status": "running"})
        return web.json_response({"detail": "Run not found"}, status=404)

    fake = web.Application()
    fake.router.add_get("/v1/runs/{run_id}", get_run)
    server = await aiohttp_server(fake)
    m = Metrics()
    for base in (str(server.make_url("")), f"http://127.0.0.1:{_free_port()}"):
        letta = LettaClient(base)
        letta.on_call = m.letta_call
        await letta.start()
        try:
            await letta.get_run("run-known")
            with pytest.raises(NotFound):
                await letta.get_run("run-gone")
        except Exception as e:  # the second base has nothing listening
            assert "unreachable" in str(e)
        finally:
            await letta.close()
    assert value(m, "tracker_letta_calls_total", endpoint="get_run", status="200") == 1
    assert value(m, "tracker_letta_calls_total", endpoint="get_run", status="404") == 1
    assert value(m, "tracker_letta_calls_total", endpoint="get_run", status="unreachable") == 1


async def test_requests_are_labelled_by_route_pattern_not_raw_path(aiohttp_client):
    m = Metrics()
    app = web.Application(middlewares=[timing_middleware(m.request)])
    app.router.add_get("/v1/runs/{run_id}", lambda r: web.json_response({}))
    client = await aiohttp_client(app)
    for run_id in ("run-a", "run-b", "run-c"):
        assert (await client.get(f"/v1/runs/{run_id}")).status == 200
    assert (await client.get("/no/such/path")).status == 404
    assert (await client.request("PROPFIND", "/v1/runs/run-a")).status == 405
    route = "/v1/runs/{run_id}"
    got = samples(m)
    assert value(m, "tracker_http_requests_total", method="GET", route=route, status="200") == 3
    assert value(m, "tracker_http_request_duration_seconds_count", method="GET",
                 route=route) == 3
    assert value(m, "tracker_http_requests_total", method="GET", route="unmatched",
                 status="404") == 1
    # an unusual method is one label value, whatever the client sends
    assert value(m, "tracker_http_requests_total", method="other", route="unmatched",
                 status="405") == 1
    assert not any("run-a" in str(labels) for _, labels in got)


async def test_in_flight_knows_when_the_running_code_serves_the_only_request(aiohttp_client):
    in_flight, seen = InFlight(), {}
    held, other_in = asyncio.Event(), asyncio.Event()
    app = web.Application(middlewares=[timing_middleware(Metrics().request, in_flight)])

    async def lone() -> bool:
        return in_flight.lone()

    async def handler(request):
        name = request.query["n"]
        seen[name] = in_flight.lone()
        seen[f"{name}, a task it starts"] = await asyncio.create_task(lone())
        if name == "held":  # in flight until another request comes in
            held.set()
            await asyncio.wait_for(other_in.wait(), 5)
            seen["held, with another"] = in_flight.lone()
        elif name == "other":
            other_in.set()
            await asyncio.sleep(0.05)
        return web.json_response({})

    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    assert (await client.get("/?n=alone")).status == 200
    assert seen == {"alone": True, "alone, a task it starts": True}
    first = asyncio.create_task(client.get("/?n=held"))
    await asyncio.wait_for(held.wait(), 5)
    assert in_flight.n == 1 and not await asyncio.create_task(lone())  # not serving it
    assert (await client.get("/?n=other")).status == 200
    assert (await first).status == 200
    assert seen["held"] and not seen["other"] and not seen["held, with another"]
    assert not seen["other, a task it starts"]
    assert in_flight.n == 0


def test_callback_requests_count_received_and_refused_by_reason():
    m = Metrics()
    route = "/callbacks/letta/{token}"
    for status in (200, 401, 401, 404, 422):
        m.request("POST", route, status, 0.01)
    m.request("POST", "/v1/runs", 401, 0.01)  # not a callback: not counted as one
    assert value(m, "tracker_callbacks_received_total") == 5
    assert value(m, "tracker_callbacks_refused_total", reason="bad_token") == 2
    assert value(m, "tracker_callbacks_refused_total", reason="unknown_run") == 1
    assert value(m, "tracker_callbacks_refused_total", reason="invalid_body") == 1
    assert refusal_reason(418) == "error"


# --- gauges --------------------------------------------------------------------------------

class GaugeQueries:
    """Stand-in for the two store queries the gauges want (see the report): computed here
    from ``in_states`` over the real store, so the results are the real ones."""

    def __init__(self, store) -> None:
        self._store = store

    async def count_by_state(self, states) -> dict[str, int]:
        runs = await self._store.in_states(states)
        return {s: n for s in states if (n := sum(r.state == s for r in runs))}

    async def queued_by_agent(self, limit: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in await self._store.in_states((State.QUEUED,)):
            counts[r.agent_id] = counts.get(r.agent_id, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit])


@pytest.mark.parametrize("source", ["stats", "queries"])
async def test_gauges_follow_the_store_and_cap_the_lanes(store, source):
    gauges_from = store if source == "stats" else GaugeQueries(store)
    for agent in (A1, A1, A1, A2, A3):
        await queue(store, agent)
    [sending] = await store.claim(serial=True, now=clock.now(), agent_id=A3)
    m = Metrics(lanes=1)
    await m.refresh(gauges_from)
    assert value(m, "tracker_runs_queued") == 4
    assert value(m, "tracker_runs_in_flight") == 1
    assert value(m, "tracker_runs_live", state="submitting") == 1
    assert value(m, "tracker_queue_depth", agent_id=A1) == 3
    assert value(m, "tracker_queue_depth", agent_id="other") == 1  # A2's, past the cap
    assert value(m, "tracker_database_up") == 1
    assert {labels for name, labels in samples(m) if name == "tracker_runs_live"} == {
        frozenset({("state", str(s))}) for s in LIVE_STATES}


async def test_lanes_that_empty_disappear_from_the_gauge(store):
    runs = [await queue(store, A1), await queue(store, A2)]
    m = Metrics()
    await m.refresh(store)
    assert value(m, "tracker_queue_depth", agent_id=A2) == 1
    await store.transition(runs[1], State.CANCELLED, (State.QUEUED,), {}, Event("api", "c"))
    await m.refresh(store)
    assert value(m, "tracker_queue_depth", agent_id=A2) is None
    assert value(m, "tracker_queue_depth", agent_id=A1) == 1


async def test_a_database_fault_still_serves_counters():
    class Broken:
        async def stats(self, user_id):
            raise Unavailable("database read failed: disk I/O error")

    m = Metrics()
    m.submitted()
    await m.refresh(Broken())
    assert value(m, "tracker_database_up") == 0
    assert value(m, "tracker_runs_submitted_total") == 1


# --- the whole service, wired as proposed --------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_metrics_endpoint_of_a_running_tracker(tmp_path: Path, aiohttp_server,
                                                     aiohttp_client):
    from tracker.app import create_app
    from tracker.simulator import Faults, Simulator

    sim = Simulator(seed=1, faults=Faults(run_duration_s=(0.02, 0.05), callback_lag_s=0.01))
    heard = sim.create_agent("heard")["id"]
    unheard = sim.create_agent("unheard", Faults(run_duration_s=(0.02, 0.05),
                                                 callback_drop=1.0))["id"]
    letta = await aiohttp_server(sim.app())
    port = _free_port()
    cfg = make_config(tmp_path, letta={"base_url": str(letta.make_url("")).rstrip("/")},
                      server={"port": port}, auth={"required": False})
    app = create_app(cfg)
    metrics = app[METRICS]
    client = await aiohttp_client(await aiohttp_server(app, port=port))
    for agent in (heard, unheard):
        resp = await client.post(f"/v1/agents/{agent}/messages/async",
                                 json={"messages": [{"role": "user", "content": "hello"}]})
        assert resp.status == 200, await resp.text()

    async def completed() -> bool:
        await client.get("/metrics")
        return all(value(metrics, "tracker_runs_completed_total", status="completed",
                         source=source) == 1 for source in ("callback", "poll"))

    await eventually(completed)
    forged = await client.post(f"/callbacks/letta/run-{uuid.uuid4()}.forged", json={})
    assert forged.status == 401
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"] == CONTENT_TYPE
    text = await resp.text()
    assert {f.name for f in text_string_to_metric_families(text)} >= {
        "tracker_runs_completed", "tracker_letta_calls", "tracker_http_request_duration_seconds"}
    assert value(metrics, "tracker_letta_calls_total", endpoint="messages_async",
                 status="200") == 2
    assert value(metrics, "tracker_letta_calls_total", endpoint="run_usage", status="200") == 1
    assert value(metrics, "tracker_callbacks_received_total") == 2
    assert value(metrics, "tracker_callbacks_refused_total", reason="bad_token") == 1
    assert value(metrics, "tracker_http_requests_total", method="POST",
                 route="/v1/agents/{agent_id}/messages/async", status="200") == 2
    assert value(metrics, "tracker_runs_queued") == 0
    assert value(metrics, "tracker_runs_in_flight") == 0
    assert value(metrics, "tracker_runs_submitted_total") == 2
    assert value(metrics, "tracker_polls_total") >= 1


def test_config_has_the_logging_and_retention_keys_used_here():
    cfg = load_config(None, environ={"TRACKER_RETENTION__KEEP_DAYS": "30",
                                     "TRACKER_LOGGING__FORMAT": "json"})
    assert cfg.retention.keep_days == 30 and cfg.logging.format == "json"
