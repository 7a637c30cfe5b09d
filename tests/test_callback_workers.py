"""Callback workers (``callbacks.workers``): processes that take Letta's callbacks on a port
of their own, file them, and report to the service, which applies them and counts them.

The last tests start real worker processes beside a tracker on the simulator."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import eventually, make_config
from tracker import clock
from tracker.app import WORKERS, create_app
from tracker.applier import BUSY_S, FLOOD_PER_S, FLOOD_PER_WINDOW, FLOOD_WINDOW_S, SATURATED
from tracker.callbacks import PATH
from tracker.config import load_config
from tracker.errors import ConfigError
from tracker.metrics import LATENCY_BUCKETS, Metrics, Tally, render
from tracker.store import InboxItem
from tracker.workers import WorkerFailed

# --- config ---------------------------------------------------------------------------------


def test_workers_default_to_the_api_port_plus_one():
    cfg = load_config(None, environ={"TRACKER_CALLBACKS__WORKERS": "2",
                                     "TRACKER_SERVER__PORT": "9000"})
    assert cfg.callback_port() == 9001
    assert cfg.callback_base() == "http://127.0.0.1:9001"
    # without workers, Letta calls back on the API's port, whatever callbacks.port says
    cfg = load_config(None, environ={"TRACKER_CALLBACKS__PORT": "9005"})
    assert cfg.callback_base() == cfg.public_base() == "http://127.0.0.1:8080"
    cfg = load_config(None, environ={"TRACKER_CALLBACKS__WORKERS": "1",
                                     "TRACKER_SERVER__PUBLIC_URL": "https://t.example/",
                                     "TRACKER_CALLBACKS__PUBLIC_URL": "https://cb.example/"})
    assert cfg.callback_base() == "https://cb.example"


@pytest.mark.parametrize("env, says", [
    ({"TRACKER_CALLBACKS__PORT": "8080"}, "must differ from server.port"),
    ({"TRACKER_SERVER__PUBLIC_URL": "https://t.example"}, "callbacks.public_url is needed"),
    ({"TRACKER_DATABASE__URL": "sqlite:///:memory:"}, "needs a database file"),
    ({"TRACKER_SERVER__PORT": "0"}, "callbacks.port is needed"),
])
def test_workers_config_that_cannot_work_is_refused(env, says):
    with pytest.raises(ConfigError, match=says) as e:
        load_config(None, environ={"TRACKER_CALLBACKS__WORKERS": "2", **env})
    assert "invalid config (" in str(e.value)  # a rule across keys, named as such


# --- metrics ---------------------------------------------------------------------------------

REQUESTS = st.lists(st.tuples(
    st.sampled_from(["POST", "GET", "BREW"]),
    st.sampled_from([PATH, "unmatched"]),
    st.sampled_from([200, 400, 401, 404, 409, 413, 422, 500, 503]),
    st.one_of(st.sampled_from(LATENCY_BUCKETS),  # exactly on a bound: counted in that bucket
              st.floats(0, 20, allow_nan=False))), max_size=40)
CALLS = st.lists(st.tuples(st.sampled_from(["get_run", "list_runs"]),
                           st.sampled_from([200, 404, "unreachable"])), max_size=10)


def samples(m: Metrics) -> dict:
    """Every sample but the creation times and the process's own figures."""
    text = render(m).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created") and not s.name.startswith("process_")}


@settings(max_examples=60, deadline=None)
@given(REQUESTS, REQUESTS, CALLS)
def test_a_workers_tally_counts_as_if_served_here(before, requests, calls):
    here, merged = Metrics(), Metrics()
    for r in before:  # the service's own requests, counted in both
        here.request(*r)
        merged.request(*r)
    tally = Tally()
    for r in requests:
        here.request(*r)
        tally.request(*r)
    for c in calls:
        here.letta_call(*c)
        tally.letta_call(*c)
    merged.add(tally)
    got, want = samples(merged), samples(here)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k


async def test_a_worker_answers_on_while_its_report_waits_for_a_full_pipe():
    """The pipe to the service holds ~64 KB: while the service's loop stalls, a report's send
    blocks. Sent on the worker's loop, it stopped every answer to Letta (timed out at 5 s)."""
    from tracker.callback_worker import Reporter

    class FullPipe:
        def __init__(self) -> None:
            self.drained, self.got = threading.Event(), []

        def send(self, report) -> None:
            self.drained.wait(5)  # the service not reading
            self.got.append(report)

    pipe = FullPipe()
    reporter = Reporter(0, pipe)
    task = asyncio.create_task(reporter.run())
    started = time.monotonic()
    reporter.received("run-a")
    await asyncio.sleep(0.1)  # its report now waits on the pipe; the loop turns meanwhile
    assert time.monotonic() - started < 1.0 and not pipe.got
    reporter.received("run-b")
    pipe.drained.set()
    await eventually(lambda: [r for report in pipe.got for r in report[2]] == ["run-a", "run-b"])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# --- the applier hears the workers' reports -------------------------------------------------

def test_two_reports_never_share_the_pipe_at_once():
    """The last report, sent at the worker's stop, could meet one still being sent from its
    thread: two writers on one pipe, and two large reports interleaved."""
    import threading
    import time

    from tracker.callback_worker import Reporter

    class Pipe:
        writing, overlapped, sent = 0, False, 0

        def send(self, report):
            self.writing += 1
            self.overlapped |= self.writing > 1
            time.sleep(0.05)  # a large report, the service slow to read it
            self.writing -= 1
            self.sent += 1

    pipe = Pipe()
    reporter = Reporter(0, pipe)
    threads = [threading.Thread(target=reporter._post, args=(("report",),)) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert pipe.sent == 4 and not pipe.overlapped


async def test_workers_reports_hold_the_applier_and_mark_runs_filed(start_tracker):
    t = await start_tracker()
    applier = t.svc.applier
    fresh = InboxItem(1, "run-x", clock.now(), b"{}")
    assert not applier._hold(fresh)
    applier.reported(0, SATURATED - 1, [])
    assert not applier._hold(fresh)
    applier.reported(1, 1, [])  # saturated across the workers, not in any one of them
    assert applier._hold(fresh)
    applier.reported(1, 0, [])
    assert not applier._hold(fresh)
    # runs reported filed are left to the applier by the poller; once the inbox is seen
    # empty after their report, they were applied (or gone): nothing is kept for them
    applier.reported(0, 0, ["run-reported-1", "run-reported-2"])
    assert {"run-reported-1", "run-reported-2"} <= t.svc.manager.callback_filed
    await eventually(lambda: not t.svc.manager.callback_filed and not applier._reported)


async def test_a_flood_is_told_by_the_rate_callbacks_are_filed_not_by_two_at_once(
        start_tracker):
    # the store's checkpoints leave the writes be in a flood: two callbacks being received
    # at once (the applier's hold) happens at steady rates too, and must not count
    t = await start_tracker()
    applier, flooding = t.svc.applier, t.svc.store.flooding
    assert not flooding()

    async def reports(per_report: int, seconds: float, receiving: int = 0) -> None:
        end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < end:
            applier.reported(0, receiving, [f"run-{uuid.uuid4()}" for _ in range(per_report)])
            await asyncio.sleep(0.02)

    await reports(2, 0.6, receiving=SATURATED)  # ~100 a second, two at once
    assert applier._hold(InboxItem(1, "run-x", clock.now(), b"{}")) and not flooding()
    await reports(100, 0.6)  # ~5,000 a second, from a worker
    assert flooding()
    await reports(2, 0.6)  # eased off
    assert not flooding()
    for _ in range(4):  # a flood in this process, five times the rate
        for _ in range(FLOOD_PER_S // 2):
            applier.received(f"run-{uuid.uuid4()}")
        await asyncio.sleep(0.1)
    assert flooding()
    await asyncio.sleep(BUSY_S + 0.05)  # stopped
    assert not flooding()


async def test_a_flood_is_told_as_soon_as_a_windows_worth_has_come(start_tracker):
    # not a quarter second into it, once its first window ends: the checkpoints would hold
    # the flood's first answers meanwhile
    t = await start_tracker()
    applier, flooding = t.svc.applier, t.svc.store.flooding
    await asyncio.sleep(FLOOD_WINDOW_S)  # idle: the next callback begins a new window
    for _ in range(FLOOD_PER_WINDOW - 1):
        applier.received(f"run-{uuid.uuid4()}")
    assert not flooding()  # fewer than a flood's rate would bring in a whole window
    applier.reported(0, 0, [f"run-{uuid.uuid4()}"])  # the last one from a worker
    assert flooding()
    await asyncio.sleep(BUSY_S + 0.05)  # stopped
    assert not flooding()


# --- real worker processes -------------------------------------------------------------------

def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def workers_tracker(start_tracker, unused_tcp_port_factory):
    async def start(n: int = 2, **sections):
        port = unused_tcp_port_factory()
        t = await start_tracker(callbacks={"workers": n, "port": port},
                                dispatch={"per_agent": "parallel"}, **sections)
        t.callback_port = port
        return t
    return start


async def test_callbacks_land_on_the_workers_and_complete_runs(workers_tracker, sim):
    # the poller kept away: a poll more than callback_wait_s (0.3 s in the tests) after
    # Letta sent the callback, and before the worker's report of it, records the run itself
    # (failed once in a full run on a loaded machine, likely so)
    t = await workers_tracker(2, polling={"grace_s": 30.0, "callback_wait_s": 30.0})
    assert len(t.app[WORKERS].pids()) == 2
    agents = [sim.create_agent(f"w{i}")["id"] for i in range(3)]
    runs = [await t.submit(a, f"m{i}") for i in range(2) for a in agents]
    for r in runs:
        done = await t.wait_state(r["id"], "done")
        assert done["tracker"]["completed_via"] == "callback"
        letta_run = sim.store.get(done["tracker"]["letta_run_id"])
        # Letta was handed the workers' port, and the worker answered it
        assert letta_run.callback_url.startswith(f"http://127.0.0.1:{t.callback_port}/")
        assert letta_run.callback_status_code == 200
    # the main process took none of them, yet /metrics counts them all (from the reports;
    # a request is counted once answered, so its count may come a report after its run)
    await eventually(lambda: t.svc.applier.remote.keys() == {0, 1})

    async def counted() -> str | None:
        text = await (await t.get("/metrics")).text()
        return text if 'tracker_callbacks_received_total 6.0' in text else None

    text = await eventually(counted)
    assert 'route="/callbacks/letta/{token}",status="200"} 6.0' in text


async def test_a_worker_refuses_what_the_service_refuses(workers_tracker):
    t = await workers_tracker(1)
    url = f"http://127.0.0.1:{t.callback_port}/callbacks/letta/run-x.forged"
    async with t.client.session.post(url, data=b"{}") as r:
        assert r.status == 401
        assert (await r.json())["detail"] == "invalid callback token"
    async with t.client.session.get(f"http://127.0.0.1:{t.callback_port}/v1/runs") as r:
        assert r.status == 404  # the API is on its own port only

    async def refused() -> bool:
        text = await (await t.get("/metrics")).text()
        return 'tracker_callbacks_refused_total{reason="bad_token"} 1.0' in text
    await eventually(refused)


async def test_a_worker_that_dies_is_restarted(workers_tracker, agent):
    """And /healthz is degraded, naming it, until it is back (callbacks to its port may find
    no worker meanwhile)."""
    t = await workers_tracker(1)
    [pid] = t.app[WORKERS].pids()
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: t.svc.stopped)
    resp = await t.client.get("/healthz")
    assert resp.status == 503 and (await resp.json())["stopped"] == ["callback-worker-0"]
    await eventually(lambda: t.app[WORKERS].pids() not in ([pid], []), timeout=15)
    [new] = t.app[WORKERS].pids()
    assert alive(new) and not alive(pid)
    await eventually(lambda: not t.svc.stopped)  # once it listens
    assert (await t.client.get("/healthz")).status == 200
    await eventually(lambda: 0 in t.svc.applier.remote)  # it reports again
    run = await t.submit(agent)
    done = await t.wait_state(run["id"], "done")
    assert done["tracker"]["completed_via"] == "callback"


async def test_a_restart_the_system_refuses_is_tried_again(workers_tracker, monkeypatch):
    """Making the worker's pipe or process can fail (EMFILE, EAGAIN): the restart caught only
    a worker's own failure to start, so that ended it silently, the worker never back and
    /healthz degraded for good."""
    from tracker import workers as workers_module

    monkeypatch.setattr(workers_module, "RESTART_S", 0.05)
    t = await workers_tracker(1)
    pool = t.app[WORKERS]
    [pid] = pool.pids()
    real, tries = pool._start, []

    async def start(index):
        tries.append(index)
        if len(tries) == 1:
            raise OSError(24, "Too many open files")
        await real(index)

    pool._start = start
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: len(tries) >= 2 and not t.svc.stopped, timeout=15)
    assert pool.pids() != [pid] and alive(pool.pids()[0])


async def test_a_worker_slow_to_exit_holds_up_nothing(workers_tracker, agent):
    """A worker gone (its pipe closed) was joined on the event loop, for up to a second:
    every request and callback of the service waited meanwhile."""
    import time

    t = await workers_tracker(1)
    pool = t.app[WORKERS]
    [w] = pool._workers.values()
    join = w.process.join

    def slow_join(timeout=None):
        time.sleep(0.8)  # a worker whose exit takes a while after its pipe closed
        return join(timeout)

    w.process.join = slow_join
    gaps, last = [], time.monotonic()
    os.kill(w.process.pid, signal.SIGKILL)
    for _ in range(60):
        await asyncio.sleep(0.02)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    assert max(gaps) < 0.4, max(gaps)
    await eventually(lambda: pool.pids() not in ([w.process.pid], []), timeout=15)
    await eventually(lambda: 0 in t.svc.applier.remote)  # restarted, and reporting
    run = await t.submit(agent)
    assert (await t.wait_state(run["id"], "done"))["tracker"]["completed_via"] == "callback"


async def test_a_restart_that_fails_does_not_start_a_second_restart(workers_tracker,
                                                                      monkeypatch):
    """A restarted worker that cannot listen (its port taken meanwhile) ends; that end must
    not start another restart loop beside the one trying again, or the loops multiply and,
    once the port is free, start several workers for one index, the extra ones never
    stopped."""
    from tracker import workers as workers_module

    monkeypatch.setattr(workers_module, "RESTART_S", 0.2)
    t = await workers_tracker(1)
    pool = t.app[WORKERS]
    [pid] = pool.pids()
    with socket.socket() as taken:
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: not alive(pid))
        taken.bind(("127.0.0.1", t.callback_port))  # no SO_REUSEPORT: nobody can share it
        taken.listen()
        for _ in range(30):  # through three failed restarts (0.2, 0.4, 0.8 s apart)
            assert len(pool._restarts) <= 1
            await asyncio.sleep(0.05)
    await eventually(lambda: not pool._restarts, timeout=20)  # restarted, and listening
    await asyncio.sleep(1.0)  # a second loop would have started its worker by now
    named = [p for p in multiprocessing.active_children() if p.name == "tracker-callbacks-0"]
    assert len(named) == 1 and not pool._restarts and pool.pids() != [pid]


async def test_what_a_dying_worker_filed_is_applied_without_waiting_for_another(
        workers_tracker, sim, agent):
    """A worker killed after committing a callback to the inbox, before its report of it:
    the callback is applied when the worker's end is seen, not when some other callback
    next wakes the applier (on a quiet service, never; then only the poll, without the
    callback's result)."""
    import json

    from tracker.sim_shapes import callback_json, utcnow

    t = await workers_tracker(1, polling={"grace_s": 30.0, "callback_wait_s": 30.0})
    sim.set_faults(callback_drop=1.0)
    run = await t.submit(agent, "[[delay=0.1]] hello")
    letta_id = (await t.run(run["id"]))["tracker"]["letta_run_id"]
    await eventually(lambda: sim.store.get(letta_id).status == "completed")
    body = callback_json(sim.store.get(letta_id), "completed", "end_turn", utcnow())
    # filed as the worker files it, and not reported: the worker dies right after
    await t.svc.store.accept_callback(run["id"], letta_id, json.dumps(body).encode())
    await asyncio.sleep(0.3)
    assert (await t.run(run["id"]))["tracker"]["state"] == "submitted"  # nothing woke it
    [pid] = t.app[WORKERS].pids()
    os.kill(pid, signal.SIGKILL)
    done = await t.wait_state(run["id"], "done", timeout=3)
    assert done["tracker"]["completed_via"] == "callback"


async def test_a_worker_ended_while_the_service_stops_is_not_started_again(
        workers_tracker, monkeypatch):
    """A SIGTERM to the whole process group (systemd's default) ends the workers as the
    service begins its stop; while it waited for its requests in flight, each was started
    again, "exited; restarting it" logged as an error."""
    from tracker import workers as workers_module

    monkeypatch.setattr(workers_module, "RESTART_S", 0.05)
    t = await workers_tracker(1)
    [w] = t.app[WORKERS]._workers.values()
    await t.app.shutdown()  # the stop's start: on_shutdown, before the requests' wait
    os.kill(w.process.pid, signal.SIGTERM)
    await eventually(lambda: w.conn.closed)  # its end seen
    await asyncio.sleep(1.0)
    named = [p for p in multiprocessing.active_children() if p.name == "tracker-callbacks-0"]
    assert named == [] and not t.app[WORKERS]._restarts


async def test_stopping_the_tracker_stops_its_workers(workers_tracker):
    t = await workers_tracker(2)
    pids = t.app[WORKERS].pids()
    assert all(alive(p) for p in pids)
    await t.client.close()  # the app's cleanup
    assert not any(alive(p) for p in pids)


def database_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate()
            if "connection_worker" in t.name or t.name.startswith("sqlite-writer")}


async def test_a_worker_that_cannot_listen_stops_the_start(tmp_path, unused_tcp_port_factory):
    port = unused_tcp_port_factory()
    app = create_app(make_config(tmp_path, callbacks={"workers": 2, "port": port}))
    runner = web.AppRunner(app)
    threads = database_threads()
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: nobody can share it
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(WorkerFailed, match=f"cannot listen on 127.0.0.1:{port}"):
            await runner.setup()  # the app's start-up, as run_app does it
    # none left running: the ones that started were stopped with the failed start
    assert not [p for p in multiprocessing.active_children()
                if p.name.startswith("tracker-callbacks")]
    # and the database was closed: its threads would keep a failed process from exiting
    await eventually(lambda: database_threads() <= threads)


async def test_a_stop_that_fails_does_not_keep_the_database_open(tmp_path, monkeypatch):
    """Leaving the app, one step's stop raising (the relay's, say) must not skip the steps
    after it: the store left open keeps its threads, and the process from exiting."""
    from tracker.relay import Relay
    from tracker.wiring import SERVICES

    async def broken_stop(self, grace_s: float = 0) -> None:
        raise RuntimeError("the relay's stop failed")

    monkeypatch.setattr(Relay, "stop", broken_stop)
    app = create_app(make_config(tmp_path))
    runner = web.AppRunner(app)
    threads = database_threads()
    await runner.setup()
    store = app[SERVICES].store
    with pytest.raises(BaseException, match="the relay's stop failed"):
        await runner.cleanup()
    assert store._db is None  # closed all the same
    await eventually(lambda: database_threads() <= threads)
