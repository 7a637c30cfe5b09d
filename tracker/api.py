"""The REST API: one route table, thin handlers over the manager and the store."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tracker import __version__, callbacks, clock, parsing
from tracker.errors import Forbidden, Invalid, LettaError, NotFound, TrackerError
from tracker.letta_request import AsyncMessageRequest
from tracker.metrics import METRICS, metrics_handler
from tracker.middleware import USER
from tracker.models import (
    CancelRequest,
    EventOut,
    HealthOut,
    LettaCallback,
    MessageListParams,
    RunDetailOut,
    RunGetParams,
    RunListParams,
    RunOut,
    UsageOut,
)
from tracker.relay_guard import RefusedDestination, check_url
from tracker.serialize import (
    delivery_out,
    encoded_response,
    event_out,
    json_response,
    page,
    run_out,
)
from tracker.states import State
from tracker.stats import summarize
from tracker.store import RunFilter, RunRecord, User
from tracker.wiring import SERVICES, Services


@dataclass(frozen=True)
class Route:
    """One route, with what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Any
    summary: str
    body: Any = None
    query: Any = None
    response: Any = None
    public: bool = False


def _svc(request: web.Request) -> Services:
    return request.app[SERVICES]


def _user(request: web.Request) -> User:
    return request[USER]


def _scope(request: web.Request) -> str | None:
    """Admins see every run; anyone else only their own."""
    user = _user(request)
    return None if user.is_admin else user.id


async def _run_or_404(request: web.Request, full: bool = False) -> RunRecord:
    run_id = parsing.run_id(request)
    run = await _svc(request).store.get_run(run_id, _scope(request), full=full)
    if run is None:
        raise NotFound(f"Run not found with id={run_id}")
    return run


# --- submit and cancel ---------------------------------------------------------------------

async def submit(request: web.Request) -> web.Response:
    agent_id = parsing.agent_id(request)
    svc = _svc(request)
    body = await parsing.read_json(request, svc.cfg.server.max_body_bytes)
    parsing.validate(AsyncMessageRequest, body)
    _check_callback_url(body, svc.cfg.relay.allow_private)
    key = parsing.idempotency_key(request)
    run, created = await svc.manager.submit(_user(request), agent_id, body, key)
    if created:
        request.app[METRICS].submitted()
        run = await svc.dispatcher.dispatch_inline(run)
    if run.state is State.REJECTED:
        raise LettaError(run.error_code or 400, _detail(run.error))
    return json_response(run_out(run))


def _check_callback_url(body: dict, allow_private: bool) -> None:
    """The user's callback_url gets our relay's POST: it must be a URL we may deliver to."""
    url = body.get("callback_url")
    if url is None:
        return
    try:
        check_url(url, allow_private)
    except RefusedDestination as e:
        raise Invalid([{"loc": ["body", "callback_url"], "msg": str(e),
                        "type": "url_refused"}]) from None


def _detail(text: str | None) -> Any:
    try:
        return json.loads(text or "")
    except ValueError:
        return text


async def cancel(request: web.Request) -> web.Response:
    agent_id = parsing.agent_id(request)
    data = await parsing.read_json(request, _svc(request).cfg.server.max_body_bytes,
                                   optional=True)
    # no body (or null) is Letta's "every active run of the agent"; any other value that is no
    # object ([], 0, false, "") is a 422 and cancels nothing
    body = parsing.validate(CancelRequest, {} if data is None else data)
    answers = await _svc(request).manager.cancel(_user(request), agent_id, body.run_ids)
    return json_response(answers)


# --- history -------------------------------------------------------------------------------

def run_filter(request: web.Request, p: RunListParams) -> RunFilter:
    scope = _scope(request)
    if p.user_id and scope and p.user_id != scope:
        raise NotFound("no such user")
    return RunFilter(
        user_id=scope or p.user_id, agent_id=p.agent_id, agent_ids=p.agent_ids or (),
        statuses=p.statuses or (), states=[s.value for s in p.state or ()],
        stop_reason=p.stop_reason, conversation_id=p.conversation_id, background=p.background,
        active=p.active, completed_via=p.completed_via, callback_missed=p.callback_missed,
        created_after=_iso(p.created_after, "created_after"),
        created_before=_iso(p.created_before, "created_before"),
        before=p.before, after=p.after, limit=p.limit,
        ascending=p.ascending if p.ascending is not None else p.order == "asc")


#: a bound from year 10000 UTC on would be written with five digits, sorting before every
#: stored time; as the last instant of 9999 it bounds the same runs
YEAR_10000, LAST_INSTANT = 253_402_300_800.0, "9999-12-31T23:59:59.999999Z"


def _iso(value: str | None, name: str) -> str | None:
    try:
        ts = clock.epoch(value) if value else None
    except ValueError:
        raise Invalid([{"loc": ["query", name], "msg": "Input should be an ISO 8601 datetime",
                        "type": "datetime_parsing"}]) from None
    if ts is None:
        return None
    return LAST_INSTANT if ts >= YEAR_10000 else clock.iso(ts)


async def list_runs(request: web.Request) -> web.Response:
    flt = run_filter(request, parsing.query(request, RunListParams))
    return encoded_response(await _svc(request).store.list_runs_json(flt))


async def get_run(request: web.Request) -> web.Response:
    include = parsing.query(request, RunGetParams).include or ()
    run = await _run_or_404(request)
    relay = await _svc(request).store.delivery_state(run.id) if run.callback_url else None
    out = run_out(run, relay)
    if "events" in include:
        # the run and its timeline in one round trip (`tracker runs show` shows both)
        out["events"] = await _events_out(request, run)
    return json_response(out)


async def _events_out(request: web.Request, run: RunRecord) -> list[dict[str, Any]]:
    return [event_out(e) for e in await _svc(request).store.events(run.id)]


async def run_messages(request: web.Request) -> web.Response:
    p = parsing.query(request, MessageListParams)
    run = await _run_or_404(request, full=True)
    return json_response(page(run.messages or [], p.before, p.after, p.limit, p.order == "asc"))


async def run_usage(request: web.Request) -> web.Response:
    run = await _run_or_404(request, full=True)
    usage = run.usage or {"completion_tokens": 0, "prompt_tokens": 0, "total_tokens": 0,
                          "prompt_tokens_details": None, "completion_tokens_details": None}
    return json_response(usage)


async def run_events(request: web.Request) -> web.Response:
    return json_response(await _events_out(request, await _run_or_404(request)))


async def run_deliveries(request: web.Request) -> web.Response:
    run = await _run_or_404(request)
    return json_response([delivery_out(d) for d in await _svc(request).store.deliveries(run.id)])


async def redeliver(request: web.Request) -> web.Response:
    run = await _run_or_404(request)
    delivery = await _svc(request).store.redeliver(run.id, clock.now())
    if delivery is None:
        raise NotFound("this run has no delivery to send again")
    _svc(request).manager.relay_wakeup.set()
    return json_response(delivery_out(delivery), status=202)


async def stats(request: web.Request) -> web.Response:
    return json_response(summarize(await _svc(request).store.stats(_scope(request))))


# --- Letta's callback and operations -------------------------------------------------------

async def letta_callback(request: web.Request) -> web.Response:
    svc = _svc(request)
    run_id = await callbacks.receive(request, svc.signer, svc.store, svc.letta, svc.applier,
                                     svc.cfg.callbacks.max_body_bytes)
    return callbacks.accepted(run_id)


async def healthz(request: web.Request) -> web.Response:
    svc = _svc(request)
    try:
        # reachable for reads, and takes writes (full disk, read-only file)
        ok = await svc.store.ping()
    except TrackerError:
        ok = False
    body: dict[str, Any] = {"status": "ok" if ok and not svc.stopped else "degraded",
                            "database": ok, "version": __version__}
    if svc.stopped:  # a background loop stopped by an error, restarting (see app.py)
        body["stopped"] = sorted(svc.stopped)
    return json_response(body, status=200 if body["status"] == "ok" else 503)


async def metrics(request: web.Request) -> web.StreamResponse:
    # counts and queue depths span every user's runs: admins only (Prometheus sends the key
    # as a bearer token, `authorization` in its scrape config)
    if not _user(request).is_admin:
        raise Forbidden("an admin key is needed for /metrics")
    return await metrics_handler(request)


async def openapi(request: web.Request) -> web.Response:
    from tracker.openapi import document

    return json_response(document(ROUTES))


RUN = "/v1/runs/{run_id}"
ROUTES: list[Route] = [
    Route("POST", "/v1/agents/{agent_id}/messages/async", submit,
          "Submit a message (Letta's body); returns the run", body=AsyncMessageRequest,
          response=RunOut),
    Route("POST", "/v1/agents/{agent_id}/messages/cancel", cancel,
          "Cancel runs (Letta's shape)", body=CancelRequest, response=dict[str, str]),
    Route("GET", "/v1/runs", list_runs, "List runs", query=RunListParams, response=list[RunOut]),
    Route("GET", "/v1/runs/", list_runs, "List runs", query=RunListParams,
          response=list[RunOut]),
    Route("GET", RUN, get_run, "One run, by tracker or Letta run id; with ?include=events,"
          " its timeline too", query=RunGetParams, response=RunDetailOut),
    Route("GET", RUN + "/messages", run_messages, "The run's result messages",
          query=MessageListParams, response=list[dict[str, Any]]),
    Route("GET", RUN + "/usage", run_usage, "The run's token usage", response=UsageOut),
    Route("GET", RUN + "/events", run_events, "The run's timeline", response=list[EventOut]),
    Route("GET", RUN + "/deliveries", run_deliveries, "Relay deliveries of the run",
          response=list[dict[str, Any]]),
    Route("POST", RUN + "/deliveries/redeliver", redeliver, "Send the run's delivery again",
          response=dict[str, Any]),
    Route("GET", "/v1/stats", stats, "Counts, percentiles and completion sources",
          response=dict[str, Any]),
    Route("POST", callbacks.PATH, letta_callback, "Letta's completion callback lands here",
          body=LettaCallback, response=dict[str, Any], public=True),
    Route("GET", "/healthz", healthz, "Liveness and database check", response=HealthOut,
          public=True),
    Route("GET", "/metrics", metrics, "Prometheus metrics (text format; admin key)",
          response=str),
    Route("GET", "/openapi.json", openapi, "This document", response=dict[str, Any],
          public=True),
]


def add_routes(app: web.Application) -> None:
    for r in ROUTES:
        if r.method == "GET":  # and HEAD, as HTTP asks (a probe may send one to /healthz)
            app.router.add_get(r.path, r.handler)
        else:
            app.router.add_route(r.method, r.path, r.handler)


def is_public(path: str) -> bool:
    return path in ("/healthz", "/openapi.json") or path.startswith("/callbacks/")
