"""Prometheus metrics: counters fed by the service's hooks, queue gauges read at scrape time.

Each ``Metrics`` owns its own ``CollectorRegistry``, so several apps (tests, benchmarks) can
live in one process without colliding on the global registry. Label values are bounded: routes
by their canonical pattern, never the raw path; agent lanes capped at the deepest ``lanes``.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import Counter as Tallies
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from tracker.callbacks import PATH as CALLBACK_ROUTE
from tracker.errors import TrackerError
from tracker.states import FINAL, LANE_BUSY, REPORTED, State
from tracker.wiring import SERVICES

log = logging.getLogger("tracker.metrics")

#: agent lanes shown one by one; the rest are summed under agent_id="other"
LANES = 100
#: the methods the API serves; anything else a client sends is counted as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: request latency buckets (seconds): submit answers in milliseconds, history pages in tens
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: why a Letta callback was refused, from the status it was answered with
CALLBACK_REFUSALS = {400: "bad_json", 401: "bad_token", 404: "unknown_run", 409: "wrong_run",
                     413: "too_large", 422: "invalid_body", 503: "unavailable"}
#: the states a run can be in before it is final (one gauge series each)
LIVE_STATES = tuple(s for s in State if s not in FINAL)


def refusal_reason(status: int) -> str:
    """The bounded ``reason`` label for a callback answered with ``status``."""
    return CALLBACK_REFUSALS.get(status, "error")


@dataclass
class QueueView:
    """What the gauges show: live runs per state, and queued runs per agent lane."""

    by_state: dict[str, int] = field(default_factory=dict)
    lanes: dict[str, int] = field(default_factory=dict)
    inbox: int = 0


class Metrics:
    """The tracker's metrics, on a registry of their own."""

    def __init__(self, lanes: int = LANES) -> None:
        self.lanes = lanes
        self.registry = CollectorRegistry()
        #: labelled series already looked up: labels() checks and locks each time, ~4 µs of
        #: the ~5 a count costs, paid on every request, Letta call and applied callback
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        ProcessCollector(registry=self.registry)
        self._runs()
        self._letta()
        self._http()
        self._gauges()

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def _series(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered (up to a bound, like the labels' own)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < 10_000:
                self._children[key] = child
        return child

    def _runs(self) -> None:
        self.runs_submitted = self._counter(
            "tracker_runs_submitted", "Runs accepted at submit and queued")
        self.runs_completed = self._counter(
            "tracker_runs_completed", "Runs whose outcome was recorded (paused or final), by "
            "Letta status and by how the tracker learnt it; each run once (a cancelled run "
            "that Letta then completes stays counted as cancelled)", ("status", "source"))
        self.run_transitions = self._counter(
            "tracker_run_transitions", "State changes applied to runs, by new state and source",
            ("state", "source"))
        self.callbacks_received = self._counter(
            "tracker_callbacks_received", "Letta completion callbacks received (refused included)")
        self.callbacks_refused = self._counter(
            "tracker_callbacks_refused", "Letta callbacks refused, by reason", ("reason",))
        self.relay_deliveries = self._counter(
            "tracker_relay_deliveries", "Relay delivery attempts to users' callback_url, by "
            "outcome", ("outcome",))

    def _letta(self) -> None:
        self.polls = self._counter("tracker_polls", "Watched runs checked by the poller")
        self.letta_calls = self._counter(
            "tracker_letta_calls", "Calls to the Letta API, by endpoint and status code "
            "(or unreachable/error)", ("endpoint", "status"))

    def _http(self) -> None:
        self.http_requests = self._counter(
            "tracker_http_requests", "HTTP requests served, by method, route and status",
            ("method", "route", "status"))
        # no status label here: it would multiply every bucket series by each status seen
        self.http_latency = Histogram(
            "tracker_http_request_duration_seconds", "HTTP request latency by method and route",
            ("method", "route"), buckets=LATENCY_BUCKETS, registry=self.registry)

    def _gauges(self) -> None:
        self.queued = self._gauge("tracker_runs_queued", "Runs waiting in the queue")
        self.in_flight = self._gauge(
            "tracker_runs_in_flight", "Runs being sent to or worked on by Letta")
        self.live = self._gauge("tracker_runs_live", "Runs not yet final, by state", ("state",))
        self.queue_depth = self._gauge(
            "tracker_queue_depth", "Queued runs per agent lane (the deepest lanes; the rest "
            "summed as agent_id=\"other\")", ("agent_id",))
        self.inbox = self._gauge(
            "tracker_callback_inbox", "Letta callbacks received and committed, not yet applied")
        self.database_up = self._gauge(
            "tracker_database_up", "1 when the last scrape could read the database, else 0")

    # --- hooks -----------------------------------------------------------------------------

    def submitted(self) -> None:
        """A new run was queued (not an idempotent repeat)."""
        self.runs_submitted.inc()

    def applied(self, run: Any, source: str) -> None:
        """``Manager.on_applied``: a run changed state because of ``source``."""
        self._series(self.run_transitions, str(run.state), str(source)).inc()
        if run.state in REPORTED:
            self._series(self.runs_completed, str(run.status), str(source)).inc()

    def letta_call(self, endpoint: str, status: int | str) -> None:
        """``LettaClient.on_call``: one call to Letta and how it ended."""
        self._series(self.letta_calls, endpoint, str(status)).inc()

    def polled(self, runs: int = 1) -> None:
        """The poller checked ``runs`` watched runs."""
        self.polls.inc(runs)

    def relay_outcome(self, outcome: str) -> None:
        """The relay finished one delivery attempt (delivered, retrying, failed...)."""
        self._series(self.relay_deliveries, outcome).inc()

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """``timing_middleware``'s observer: one request served (Letta's callbacks counted)."""
        m = method if method in METHODS else "other"
        self._served(m, route, status)
        self._series(self.http_latency, m, route).observe(seconds)

    def _served(self, method: str, route: str, status: int, n: int = 1) -> None:
        self._series(self.http_requests, method, route, str(status)).inc(n)
        # seen here, every refusal is counted, even one answered before the handler runs
        if route == CALLBACK_ROUTE:
            self.callbacks_received.inc(n)
            if status >= 400:
                self._series(self.callbacks_refused, refusal_reason(status)).inc(n)

    def add(self, tally: Tally) -> None:
        """Count what a callback worker process counted (``Tally``), as if served here."""
        for (method, route, status), n in tally.requests.items():
            self._served(method, route, status, n)
        for (method, route), counts in tally.latency.items():
            child = self._series(self.http_latency, method, route)
            # a bucket's own count, as Histogram.observe adds it (exported cumulated)
            for bucket, n in zip(child._buckets, counts[:-1], strict=True):
                if n:
                    bucket.inc(n)
            child._sum.inc(counts[-1])
        for (endpoint, status), n in tally.letta.items():
            self._series(self.letta_calls, endpoint, status).inc(n)

    # --- gauges ----------------------------------------------------------------------------

    async def refresh(self, store: Any) -> None:
        """Read the queue gauges from ``store``; on a database fault keep serving counters."""
        try:
            view = await queue_view(store, self.lanes)
        except TrackerError as e:
            log.warning("metrics: cannot read queue gauges: %s", e)
            self.database_up.set(0)
            return
        self.database_up.set(1)
        self.show(view)

    def show(self, view: QueueView) -> None:
        """Set the gauges to ``view`` (lanes that emptied disappear)."""
        for state in LIVE_STATES:
            self.live.labels(str(state)).set(view.by_state.get(state, 0))
        self.queued.set(view.by_state.get(State.QUEUED, 0))
        self.in_flight.set(sum(view.by_state.get(s, 0) for s in LANE_BUSY))
        self.inbox.set(view.inbox)
        self.queue_depth.clear()
        for agent, n in view.lanes.items():
            self.queue_depth.labels(agent).set(n)


class Tally:
    """What a callback worker process counts between two reports: ``Metrics.add`` adds it
    to the service's metrics, so that /metrics counts every callback, whoever took it."""

    def __init__(self) -> None:
        self.requests: Tallies[tuple[str, str, int]] = Tallies()
        #: per method and route: each latency bucket's count (+Inf last), then their sum
        self.latency: dict[tuple[str, str], list[float]] = {}
        self.letta: Tallies[tuple[str, str]] = Tallies()

    def __bool__(self) -> bool:
        return bool(self.requests or self.letta)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """``timing_middleware``'s observer, as ``Metrics.request``."""
        m = method if method in METHODS else "other"
        self.requests[m, route, status] += 1
        counts = self.latency.get((m, route))
        if counts is None:
            counts = self.latency[m, route] = [0] * (len(LATENCY_BUCKETS) + 2)
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bound >= seconds
        counts[-1] += seconds

    def letta_call(self, endpoint: str, status: int | str) -> None:
        """``LettaClient.on_call``, as ``Metrics.letta_call``."""
        self.letta[endpoint, str(status)] += 1


async def queue_view(store: Any, lanes: int) -> QueueView:
    """Live counts per state and the deepest ``lanes`` agent queues, the rest as "other"."""
    if hasattr(store, "count_by_state") and hasattr(store, "queued_by_agent"):
        by_state = await store.count_by_state(LIVE_STATES)
        top = await store.queued_by_agent(lanes)
    else:
        # until the store has the two cheap queries: derive both from the /v1/stats counts
        by_state, top = _from_stats(await store.stats(None), lanes)
    rest = by_state.get(State.QUEUED, 0) - sum(top.values())
    inbox = await store.inbox_depth() if hasattr(store, "inbox_depth") else 0
    return QueueView(by_state=by_state, lanes={**top, **({"other": rest} if rest > 0 else {})},
                     inbox=inbox)


def _from_stats(raw: dict[str, Any], lanes: int) -> tuple[dict[str, int], dict[str, int]]:
    by_state: dict[str, int] = {}
    queued: dict[str, int] = {}
    for row in raw["counts"]:
        by_state[row["state"]] = by_state.get(row["state"], 0) + row["n"]
        if row["state"] == State.QUEUED:
            queued[row["agent_id"]] = queued.get(row["agent_id"], 0) + row["n"]
    deepest = sorted(queued.items(), key=lambda kv: (-kv[1], kv[0]))[:lanes]
    return by_state, dict(deepest)


def render(metrics: Metrics) -> bytes:
    """The Prometheus text exposition of ``metrics`` (serve it as ``CONTENT_TYPE``)."""
    return generate_latest(metrics.registry)


CONTENT_TYPE = CONTENT_TYPE_LATEST

METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """``GET /metrics``: refresh the gauges from the store, then serve the text format."""
    metrics = request.app[METRICS]
    await metrics.refresh(request.app[SERVICES].store)
    return web.Response(body=render(metrics), headers={"Content-Type": CONTENT_TYPE})
