"""The relay against real SQLite and real HTTP receivers: shape, signatures, retries, safety,
restart, isolation of slow destinations."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests import samples
from tests.conftest import eventually, make_config
from tracker import clock
from tracker import relay as relay_module
from tracker.auth import new_webhook_secret
from tracker.clock import parse_retry_after
from tracker.relay import Relay, rotate_secret
from tracker.relay_guard import RefusedDestination, check_url, refusal
from tracker.relay_policy import (
    MAX_RETRY_AFTER_S,
    DeliveryState,
    Outcome,
    jittered,
    next_step,
)
from tracker.serialize import run_out
from tracker.states import State
from tracker.store import Event, NewRun, open_store

LETTA_CALLBACK = samples.body("async_basic__callback")
LETTA_RESULT = LETTA_CALLBACK["metadata"]["result"]
USAGE = {k: v for k, v in LETTA_RESULT["usage"].items() if k != "message_type"}


# --- receivers ---------------------------------------------------------------------------------


@dataclass
class Reply:
    """How a receiver answers one request."""

    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """A scripted webhook endpoint: request n gets reply n (the last reply repeats)."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies) or [Reply()]
        self.seen: list[Seen] = []
        self.active = self.max_active = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.path, dict(request.headers), await request.read(),
                              time.monotonic()))
        reply = self.replies[min(len(self.seen), len(self.replies)) - 1]
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(reply.delay)
        finally:
            self.active -= 1
        return web.Response(status=reply.status, headers=reply.headers)


@pytest.fixture
def serve(aiohttp_server):
    """Serve a Receiver; returns its callback URL on 127.0.0.1."""
    async def _serve(receiver: Receiver, host: str = "127.0.0.1") -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", receiver.handle)
        server = await aiohttp_server(app)
        return f"http://{host}:{server.port}/hook"
    return _serve


# --- runs and relays ---------------------------------------------------------------------------


@pytest.fixture
async def user(store):
    return await store.create_user("alice", False, new_webhook_secret())


async def final_run(store, user, url):
    """A run with ``callback_url`` that reached ``done``: the outbox row is written with it."""
    agent = f"agent-{uuid.uuid4()}"
    new = NewRun(id=f"run-{uuid.uuid4()}", user_id=user.id, agent_id=agent, kind="message",
                 request={"messages": [{"role": "user", "content": "hi"}]}, request_config={},
                 callback_url=url)
    await store.submit(new, Event("api", "submit"))
    await store.claim(serial=False, now=clock.now(), agent_id=agent)
    return await store.transition(new.id, State.DONE, (State.SUBMITTING,), {
        "status": "completed", "stop_reason": "end_turn", "letta_run_id": f"run-{uuid.uuid4()}",
        "completed_at": clock.iso(), "recorded_at": clock.iso(), "completed_via": "callback",
        "metadata": {"run_type": "send_message_async", "lettuce": None},
        "messages": LETTA_RESULT["messages"], "usage": USAGE,
    }, Event("callback", "completed"), relay=True)


@pytest.fixture
async def relays():
    """Start Relays running their loop; every one is stopped at teardown."""
    running: list[tuple[Relay, asyncio.Task]] = []

    async def _start(cfg, store, resolver=None) -> Relay:
        relay = Relay(cfg, store, asyncio.Event(), resolver)
        await relay.start()
        running.append((relay, asyncio.create_task(relay.run())))
        return relay

    yield _start
    for relay, task in running:
        task.cancel()
        await relay.stop(grace_s=0)


def cfg_with(tmp_path, **relay):
    return make_config(tmp_path, relay=relay)


async def finished(store, run_id):
    """The run's delivery once it is no longer pending."""
    [d] = await store.deliveries(run_id)
    return d if d.state != DeliveryState.PENDING else None


# --- what is sent ------------------------------------------------------------------------------


async def test_body_keeps_lettas_callback_shape_plus_tracker_object(store, user, serve, relays,
                                                                    tmp_path):
    rx = Receiver()
    run = await final_run(store, user, await serve(rx))
    await relays(cfg_with(tmp_path), store)
    d = await eventually(lambda: finished(store, run.id))
    body = rx.seen[0].json()
    tracker = body.pop("tracker")
    samples.assert_same_shape(body, LETTA_CALLBACK)
    assert body["run_id"] == run.id and body["status"] == "completed"
    assert body["metadata"]["result"] == LETTA_RESULT
    assert tracker["state"] == "done" and tracker["letta_run_id"] == run.letta_run_id
    assert d.state == "delivered" and d.attempts == 1
    [attempt] = d.attempt_log
    assert attempt["status_code"] == 200 and attempt["error"] is None
    assert attempt["latency_ms"] > 0


async def test_signature_verifies_with_the_standardwebhooks_package(store, user, serve, relays,
                                                                     tmp_path):
    rx = Receiver()
    run = await final_run(store, user, await serve(rx))
    await relays(cfg_with(tmp_path), store)
    await eventually(lambda: finished(store, run.id))
    seen = rx.seen[0]
    assert Webhook(user.webhook_secret).verify(seen.body, seen.headers)["run_id"] == run.id
    assert seen.headers["webhook-id"].startswith("msg_")
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(seen.body, seen.headers)


async def test_rotation_sends_both_signatures_and_each_verifies(store, user, serve, relays,
                                                                tmp_path):
    old = user.webhook_secret
    new = await rotate_secret(store, user.id)
    rx = Receiver()
    run = await final_run(store, user, await serve(rx))
    await relays(cfg_with(tmp_path), store)
    await eventually(lambda: finished(store, run.id))
    seen = rx.seen[0]
    assert len(seen.headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        Webhook(secret).verify(seen.body, seen.headers)


# --- retries -----------------------------------------------------------------------------------


async def test_failures_are_retried_under_one_webhook_id(store, user, serve, relays, tmp_path):
    rx = Receiver(Reply(500), Reply(503), Reply(200))
    run = await final_run(store, user, await serve(rx))
    await relays(cfg_with(tmp_path), store)
    d = await eventually(lambda: finished(store, run.id))
    assert d.state == "delivered"
    assert [a["status_code"] for a in d.attempt_log] == [500, 503, 200]
    assert {s.headers["webhook-id"] for s in rx.seen} == {d.id}
    for seen in rx.seen:
        Webhook(user.webhook_secret).verify(seen.body, seen.headers)


async def test_after_the_last_attempt_the_delivery_is_failed(store, user, serve, relays,
                                                             tmp_path):
    rx = Receiver(Reply(500))
    run = await final_run(store, user, await serve(rx))
    await relays(cfg_with(tmp_path), store)
    d = await eventually(lambda: finished(store, run.id))
    await asyncio.sleep(0.5)
    assert d.state == "failed" and d.attempts == 3 and len(rx.seen) == 3


async def test_one_users_hung_receivers_do_not_hold_every_slot(store, user, serve, relays,
                                                             tmp_path):
    """Limited per destination only, one user's receivers on a few ports (or names) that
    hang took every slot, and every other user's deliveries waited for that backlog."""
    hung_a, hung_b = Receiver(Reply(delay=1.0)), Receiver(Reply(delay=1.0))
    url_a, url_b = await serve(hung_a), await serve(hung_b)  # one host, two ports
    for _ in range(10):
        await final_run(store, user, url_a)
        await final_run(store, user, url_b)
    bob = await store.create_user("bob", False, new_webhook_secret())
    run = await final_run(store, bob, await serve(Receiver()))
    cfg = cfg_with(tmp_path, concurrency=2, per_destination=1, per_user=1, timeout_s=0.3,
                   retry_schedule_s=[0, 60])
    started = time.monotonic()
    await relays(cfg, store)
    await eventually(lambda: finished(store, run.id), timeout=30)
    assert time.monotonic() - started < 1.0  # ~3 s behind alice's 20 hung attempts


async def hung_names(store, user, monkeypatch) -> None:
    """8 deliveries of ``user``'s to names whose server never answers (each lookup 3 s)."""
    real = socket.getaddrinfo

    def tarpit(host, *args, **kwargs):
        if str(host).endswith(".tarpit.test"):
            time.sleep(3)  # a name server that never answers
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", tarpit)
    for i in range(8):
        await final_run(store, user, f"http://h{i}.tarpit.test/hook")


async def test_one_users_hung_names_hold_no_other_users_lookup(
        store, user, serve, relays, tmp_path, monkeypatch):
    """The relay looked names up on 4 threads, and a user may have 8 attempts in flight:
    one user's callback_urls on names whose server never answers held every thread, and
    another user's lookup waited behind them, its attempt timing out."""
    await hung_names(store, user, monkeypatch)
    bob = await store.create_user("bob", False, new_webhook_secret())
    url = (await serve(Receiver())).replace("127.0.0.1", "localhost")  # a name to look up
    run = await final_run(store, bob, url)
    await relays(cfg_with(tmp_path, timeout_s=2.0, retry_schedule_s=[0, 60]), store)
    started = time.monotonic()
    d = await eventually(lambda: finished(store, run.id), timeout=10)
    assert d.state == "delivered" and time.monotonic() - started < 1.5


async def test_a_name_whose_lookup_hangs_holds_none_of_the_loops_threads(
        store, user, serve, relays, tmp_path, monkeypatch):
    """Looked up on the loop's default executor, a callback_url's name whose server never
    answers held a thread for the C library's whole timeout: a few such deliveries took
    every thread, and the lookup of Letta's host (and the checkpointer's syncs) waited."""
    await hung_names(store, user, monkeypatch)
    await relays(cfg_with(tmp_path, timeout_s=1.0, retry_schedule_s=[0, 0.5, 0.5]), store)
    await asyncio.sleep(1.5)  # the first attempts timed out; their lookups still run
    started = time.monotonic()
    await asyncio.get_running_loop().getaddrinfo("localhost", 8283)  # Letta's host, say
    assert time.monotonic() - started < 0.5


async def test_an_attempt_that_cannot_be_recorded_is_not_made_again(
        store, user, serve, relays, tmp_path, monkeypatch):
    """With the store failing, an attempt went unrecorded and the delivery stayed due: it was
    sent again (each time after the receiver's 2xx), and once the store worked, the attempt
    recorded was an "internal error", counted against the schedule. The receiver's answer is
    kept and recorded once the store works; nothing is sent again meanwhile."""
    from tracker.errors import Unavailable

    monkeypatch.setattr(relay_module, "ERROR_PAUSE_S", 0.1)
    rx = Receiver(Reply(200))
    run = await final_run(store, user, await serve(rx))
    real, failures = store.record_attempt, []

    async def failing(*args, **kwargs):
        if len(failures) < 3:
            failures.append(args)
            raise Unavailable("database write failed: disk full")
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "record_attempt", failing)
    await relays(cfg_with(tmp_path), store)
    d = await eventually(lambda: finished(store, run.id), timeout=5)
    assert len(failures) == 3 and len(rx.seen) == 1
    assert d.state == "delivered" and [a["status_code"] for a in d.attempt_log] == [200]
    [(body,)] = await store._read("SELECT body FROM deliveries WHERE id = ?", (d.id,))
    assert body is not None  # the message sent, kept with the attempt's record


async def test_a_hold_whose_delivery_went_meanwhile_is_forgotten(
        store, user, serve, relays, tmp_path, monkeypatch):
    """A delivery held back (its attempt unrecorded) that is not attempted again (pruned with
    its run) kept its entry in memory for as long as the service ran. It goes a longest
    pause after its hold ended."""
    from tracker.errors import Unavailable

    for name, value in (("ERROR_PAUSE_S", 0.1), ("HELD_MAX_S", 0.3), ("IDLE_S", 0.1)):
        monkeypatch.setattr(relay_module, name, value)
    rx = Receiver(Reply(200))
    await final_run(store, user, await serve(rx))

    async def failing(*args, **kwargs):
        raise Unavailable("database write failed: disk full")

    monkeypatch.setattr(store, "record_attempt", failing)
    relay = await relays(cfg_with(tmp_path), store)
    await eventually(lambda: relay._held)

    async def none_due(*args, **kwargs):  # the delivery pruned with its run
        return []

    monkeypatch.setattr(store, "due_deliveries", none_due)
    await eventually(lambda: not relay._held, timeout=3)


async def test_slow_receiver_times_out_and_is_retried(store, user, serve, relays, tmp_path):
    rx = Receiver(Reply(delay=1.0), Reply())
    run = await final_run(store, user, await serve(rx))
    await relays(cfg_with(tmp_path, timeout_s=0.3), store)
    d = await eventually(lambda: finished(store, run.id))
    first, second = d.attempt_log
    assert first["status_code"] is None and "no answer within 0.3s" in first["error"]
    assert 250 < first["latency_ms"] < 900
    assert second["status_code"] == 200 and d.state == "delivered"


async def test_410_gone_stops_retries(store, user, serve, relays, tmp_path):
    rx = Receiver(Reply(410))
    run = await final_run(store, user, await serve(rx))
    await relays(cfg_with(tmp_path), store)
    d = await eventually(lambda: finished(store, run.id))
    await asyncio.sleep(0.5)
    assert d.state == "failed" and d.attempts == 1 and len(rx.seen) == 1


async def test_retry_after_is_honoured(store, user, serve, relays, tmp_path):
    rx = Receiver(Reply(503, headers={"Retry-After": "1"}), Reply())
    run = await final_run(store, user, await serve(rx))
    await relays(cfg_with(tmp_path), store)
    await eventually(lambda: finished(store, run.id))
    # the schedule alone would have waited 0.2 s +/- 20%
    assert rx.seen[1].at - rx.seen[0].at >= 0.95


async def test_redirect_is_not_followed(store, user, serve, relays, tmp_path):
    rx = Receiver(Reply(302, headers={"Location": "/elsewhere"}))
    run = await final_run(store, user, await serve(rx))
    await relays(cfg_with(tmp_path), store)
    d = await eventually(lambda: finished(store, run.id))
    assert d.state == "failed" and [s.path for s in rx.seen] == ["/hook"] * 3
    assert d.attempt_log[0]["status_code"] == 302
    assert "not followed" in d.attempt_log[0]["error"]


async def test_redeliver_sends_again_under_the_same_webhook_id(store, user, serve, relays,
                                                               tmp_path):
    rx = Receiver()
    run = await final_run(store, user, await serve(rx))
    relay = await relays(cfg_with(tmp_path), store)
    await eventually(lambda: finished(store, run.id))
    await store.redeliver(run.id, clock.now())
    relay.wakeup.set()
    await eventually(lambda: len(rx.seen) == 2)
    d = await eventually(lambda: finished(store, run.id))
    assert d.state == "delivered" and d.attempts == 2
    assert rx.seen[0].headers["webhook-id"] == rx.seen[1].headers["webhook-id"]


async def test_every_attempt_under_one_webhook_id_sends_the_same_body(store, user, serve,
                                                                      relays, tmp_path):
    """Standard Webhooks: one webhook-id, one message. Built again at each attempt, the body
    changed with the run (reported paused, then done) and with its own record of the first
    attempt: a receiver deduplicating by id dropped the change, or saw two messages."""
    rx = Receiver(Reply(500), Reply(200))
    run = await final_run(store, user, await serve(rx))
    relay = await relays(cfg_with(tmp_path, retry_schedule_s=[0, 0.5]), store)
    await eventually(lambda: rx.seen)
    await store.transition(run.id, None, (State.DONE,), {"stop_reason": "cancelled"}, None)
    relay.wakeup.set()
    d = await eventually(lambda: finished(store, run.id))
    assert d.state == "delivered" and len(rx.seen) == 2
    assert rx.seen[0].headers["webhook-id"] == rx.seen[1].headers["webhook-id"]
    assert rx.seen[0].body == rx.seen[1].body
    assert json.loads(rx.seen[1].body)["metadata"]["result"]["stop_reason"]["stop_reason"] \
        == "end_turn"


async def test_a_redeliver_asked_for_during_an_attempt_is_not_lost(store, user, serve, relays,
                                                                  tmp_path):
    """The attempt in flight, ending, recorded its own verdict over the redeliver's "send
    now": after the schedule's last attempt the delivery ended failed, never sent again."""
    rx = Receiver(Reply(500, delay=0.5), Reply(200))
    run = await final_run(store, user, await serve(rx))
    relay = await relays(cfg_with(tmp_path, retry_schedule_s=[0]), store)
    await eventually(lambda: rx.seen)  # the one attempt the schedule allows, in flight
    await store.redeliver(run.id, clock.now())
    relay.wakeup.set()
    d = await eventually(lambda: finished(store, run.id))
    assert d.state == "delivered" and len(rx.seen) == 2
    assert [a["status_code"] for a in d.attempt_log] == [500, 200]


async def test_a_delivery_failing_unexpectedly_counts_its_attempts_and_ends(
        store, user, relays, tmp_path, monkeypatch):
    """An error no attempt expects (a bug; a host name the checks let by, whose lookup
    raised) was retried every 5 s forever, unrecorded, holding its slot."""
    run = await final_run(store, user, "http://receiver.example/hook")

    async def broken(self, d):
        raise UnicodeError("encoding with 'idna' codec failed")

    monkeypatch.setattr(Relay, "_attempt", broken)
    await relays(cfg_with(tmp_path, retry_schedule_s=[0, 0.1]), store)
    d = await eventually(lambda: finished(store, run.id))
    assert d.state == "failed" and d.attempts == 2
    assert "internal error" in d.attempt_log[0]["error"]


async def test_an_attempt_on_a_delivery_deleted_during_its_post_leaves_no_row(store, user, serve,
                                                                             relays, tmp_path):
    """A POST can take 15 s: the run and its delivery deleted meanwhile (as prune deletes
    them), the attempt's row would belong to nothing, and nothing would ever remove it."""
    rx = Receiver(Reply(delay=0.5))
    run = await final_run(store, user, await serve(rx))
    relay = await relays(cfg_with(tmp_path), store)
    outcomes: list[str] = []
    relay.on_outcome = outcomes.append
    await eventually(lambda: rx.seen)
    await store._write(lambda db: store._delete_runs(db, [run.id]))
    await eventually(lambda: outcomes)  # the attempt ended and was recorded
    counts = await store.table_counts()
    assert (counts["deliveries"], counts["delivery_attempts"]) == (0, 0)


# --- the run's callback fields -----------------------------------------------------------------

#: Letta's run after a callback that got no answer: the run's fields are set in its formats
LETTA_UNREACHABLE = samples.body("callback_unreachable__run_after")
LETTA_ERROR = "Failed to dispatch callback for run {} to {}: "


def callback_fields(run: dict) -> tuple:
    return run["callback_sent_at"], run["callback_status_code"], run["callback_error"]


async def test_a_delivery_no_answer_came_to_shows_why_on_the_run(store, user, relays, tmp_path):
    url = "http://127.0.0.1:9/hook"  # nothing listens there
    run = await final_run(store, user, url)
    await relays(cfg_with(tmp_path), store)
    d = await eventually(lambda: finished(store, run.id))
    last = d.attempt_log[-1]
    sent_at, code, error = callback_fields(run_out(await store.get_run(run.id)))
    sample = LETTA_UNREACHABLE
    assert sample["callback_error"].startswith(LETTA_ERROR.format(sample["id"],
                                                                  sample["callback_url"]))
    assert (code, error) == (None, LETTA_ERROR.format(run.id, url) + last["error"])
    assert sent_at == last["at"].removesuffix("Z")
    assert samples.string_format(sent_at) == samples.string_format(
        sample["callback_sent_at"]) == "naive timestamp"


async def test_the_run_shows_its_latest_attempt(store, user, serve, relays, tmp_path):
    rx = Receiver(Reply(delay=1.0), Reply(201))
    run = await final_run(store, user, await serve(rx))
    await relays(cfg_with(tmp_path, timeout_s=0.3), store)
    d = await eventually(lambda: finished(store, run.id))
    assert [a["status_code"] for a in d.attempt_log] == [None, 201]
    shown = run_out(await store.get_run(run.id))
    assert callback_fields(shown) == (d.attempt_log[-1]["at"].removesuffix("Z"), 201, None)


async def test_the_users_delivery_is_shown_not_lettas_to_the_tracker(start_tracker, sim, agent,
                                                                     serve):
    """Letta's callback to the tracker is missed (the run is learnt by polling, and Letta's run
    holds the failure); the user's receiver answers 500: the run shows that 500 without an
    error, as Letta's shows a receiver's 500 (callback_receiver_500)."""
    t = await start_tracker()
    sim.set_faults(callback_drop=1.0)
    url = await serve(Receiver(Reply(500)))
    run = await t.submit(agent, callback_url=url)

    async def relayed():
        return (await t.run(run["id"]))["tracker"]["relay"] == "failed"

    await eventually(relayed)
    done = await t.run(run["id"])
    assert done["tracker"]["completed_via"] == "poll"
    assert sim.store.get(done["tracker"]["letta_run_id"]).callback_error  # Letta's, to us
    [d] = await t.svc.store.deliveries(run["id"])
    [listed] = await (await t.get("/v1/runs")).json()
    for shown in (done, listed):
        assert shown["callback_url"] == url
        assert callback_fields(shown) == (d.attempt_log[-1]["at"].removesuffix("Z"), 500, None)


# --- durability and isolation ------------------------------------------------------------------


async def test_pending_delivery_is_sent_after_a_restart(store, user, serve, relays, tmp_path):
    rx = Receiver(Reply(503), Reply())
    run = await final_run(store, user, await serve(rx))
    cfg = cfg_with(tmp_path, retry_schedule_s=[0, 0.5, 0.5])
    first = await relays(cfg, store)
    await eventually(lambda: len(rx.seen) == 1)
    await first.stop(grace_s=0)
    await store.close()
    reopened = open_store(f"sqlite:///{store.path}")
    await reopened.open()
    try:
        [pending] = await reopened.deliveries(run.id)
        assert pending.state == "pending" and pending.attempts == 1
        await relays(cfg, reopened)
        d = await eventually(lambda: finished(reopened, run.id))
        assert [a["status_code"] for a in d.attempt_log] == [503, 200]
        assert rx.seen[0].headers["webhook-id"] == rx.seen[1].headers["webhook-id"]
    finally:
        await reopened.close()


async def test_delivery_in_flight_is_not_picked_up_twice(store, user, serve, relays, tmp_path):
    rx = Receiver(Reply(delay=0.5))
    run = await final_run(store, user, await serve(rx))
    relay = await relays(cfg_with(tmp_path), store)
    await eventually(lambda: rx.seen)
    for _ in range(20):  # every wakeup is a loop that sees the row still pending and due
        relay.wakeup.set()
        await asyncio.sleep(0.01)
    await eventually(lambda: finished(store, run.id))
    assert len(rx.seen) == 1


async def test_slow_destination_does_not_delay_a_fast_one(store, user, serve, relays, tmp_path):
    slow, fast = Receiver(Reply(delay=1.0)), Receiver()
    slow_url, fast_url = await serve(slow), await serve(fast)
    # the slow destination's deliveries are older, so they come first in the outbox
    slow_runs = [await final_run(store, user, slow_url) for _ in range(6)]
    fast_runs = [await final_run(store, user, fast_url) for _ in range(5)]
    started = time.monotonic()
    await relays(cfg_with(tmp_path, concurrency=4, per_destination=2, timeout_s=5), store)
    for run in fast_runs:
        await eventually(lambda run=run: finished(store, run.id))
    fast_done = time.monotonic() - started
    print(f"\nfast destination: 5 deliveries in {fast_done * 1000:.0f} ms while the slow one"
          f" (1 s per answer) held {slow.max_active} of 4 slots")
    assert fast_done < 0.5
    assert slow.max_active == 2 and len(slow.seen) == 2
    assert [await finished(store, r.id) for r in slow_runs] == [None] * 6


async def behind_a_hung_backlog(store, user, serve, n: int):
    """``n`` due deliveries to a webhook that never answers in time, then one to a healthy
    webhook, made after them: the hung receiver, and the healthy delivery's run."""
    dead, healthy = Receiver(Reply(delay=1.0)), Receiver()
    dead_url, healthy_url = await serve(dead), await serve(healthy)
    for _ in range(n):
        await final_run(store, user, dead_url)
    return dead, await final_run(store, user, healthy_url)


async def delivered_after(store, relays, cfg, run) -> float:
    """Seconds from the relay's start until ``run``'s delivery is made."""
    started = time.monotonic()
    await relays(cfg, store)
    d = await eventually(lambda: finished(store, run.id), timeout=30)
    assert d.state == "delivered"
    return time.monotonic() - started


async def test_a_dead_destinations_backlog_does_not_hold_up_the_others(store, user, serve,
                                                                        relays, tmp_path):
    # a burst of runs finishing for a user whose webhook hangs: more of its deliveries are due
    # than the relay reads in one page, all older than another user's
    dead, run = await behind_a_hung_backlog(store, user, serve, 60)
    cfg = cfg_with(tmp_path, concurrency=2, per_destination=1, timeout_s=0.3,
                   retry_schedule_s=[0, 60])  # page of 1 + 2 * 16 rows; 60 * 0.3 s to drain
    assert await delivered_after(store, relays, cfg, run) < 1.0
    assert dead.max_active == 1 and len(dead.seen) <= 4


async def test_a_backlog_longer_than_a_loops_pages_is_crossed_over_loops(store, user, serve,
                                                                         relays, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(relay_module, "SCAN_PAGES_PER_LOOP", 2)  # 66 rows a loop, not 264
    _, run = await behind_a_hung_backlog(store, user, serve, 150)
    cfg = cfg_with(tmp_path, concurrency=2, per_destination=1, timeout_s=0.2,
                   retry_schedule_s=[0, 60])
    # each loop (here one per timed-out attempt) reads a page further on; from the oldest page
    # each time, the healthy delivery would wait for 85 of those attempts, 17 s
    assert await delivered_after(store, relays, cfg, run) < 3.0


async def test_due_deliveries_pages_by_key_through_equal_due_times(store, user):
    runs = [await final_run(store, user, "http://127.0.0.1:9/hook") for _ in range(5)]
    now = clock.now()
    for run in runs:  # all due at the same instant: only the insertion order tells them apart
        await store.redeliver(run.id, now)
    pages, after = [], None
    while page := await store.due_deliveries(now, 2, after):
        pages.append([d.run_id for d in page])
        after = page[-1]
    assert pages == [[r.id for r in runs[i:i + 2]] for i in (0, 2, 4)]
    assert await store.due_deliveries(now - 1, 10) == []


# --- SSRF guard --------------------------------------------------------------------------------


async def test_private_destination_is_refused_by_default(store, user, serve, relays, tmp_path):
    rx = Receiver()
    literal = await serve(rx)
    by_name = literal.replace("127.0.0.1", "localhost")  # checked on the resolved address
    runs = [await final_run(store, user, url) for url in (literal, by_name)]
    await relays(make_config(tmp_path, relay={"allow_private": False}), store)
    for run in runs:
        d = await eventually(lambda run=run: finished(store, run.id))
        assert d.state == "failed" and d.attempts == 1
        assert "destination refused" in d.attempt_log[0]["error"]
    assert rx.seen == []


class FixedResolver:
    """DNS that answers 127.0.0.1 for every name (what a rebinding attacker's DNS does)."""

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": 0}]

    async def close(self):
        pass


@pytest.mark.parametrize("allow_private", [False, True])
async def test_the_address_dialled_is_the_address_checked(store, user, serve, relays, tmp_path,
                                                          allow_private):
    rx = Receiver()
    run = await final_run(store, user, await serve(rx, host="hooks.example.com"))
    cfg = make_config(tmp_path, relay={"allow_private": allow_private})
    await relays(cfg, store, resolver=FixedResolver())
    d = await eventually(lambda: finished(store, run.id))
    if allow_private:
        assert d.state == "delivered" and len(rx.seen) == 1
    else:
        assert d.state == "failed" and rx.seen == []
        assert "127.0.0.1 is private" in d.attempt_log[0]["error"]


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
    "::1", "fc00::1", "::ffff:127.0.0.1", "2002:7f00:1::1", "240.0.0.1",
])
def test_private_addresses_are_refused_unless_allowed(address):
    assert refusal(address, allow_private=False)
    assert refusal(address, allow_private=True) is None


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "0.0.0.0", "::",
                                     "224.0.0.1", "ff02::1",
                                     # link-local, where the metadata services live (AWS ECS's
                                     # task credentials at 169.254.170.2)
                                     "169.254.170.2", "169.254.10.10", "fe80::1",
                                     "::ffff:169.254.170.2"])
def test_metadata_unspecified_multicast_and_link_local_are_always_refused(address):
    assert refusal(address, allow_private=True)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address):
    assert refusal(address, allow_private=False) is None


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "example.com/x",
                                 "http:///nohost", "http://169.254.169.254/latest/meta-data",
                                 # names no lookup can encode: an empty label, one too long
                                 "http://a..example.com/hook",
                                 f"http://{'a' * 64}.example.com/hook"])
def test_bad_callback_urls_are_refused(url):
    with pytest.raises(RefusedDestination):
        check_url(url, allow_private=True)


@pytest.mark.parametrize("host", ["2130706433", "0177.0.0.1", "127.1", "0", "0x7f.1",
                                  "3232235521", "2852039166"])
def test_ipv4_addresses_in_legacy_forms_are_refused(host):
    """The C library dials 2130706433 as 127.0.0.1 and 2852039166 as 169.254.169.254, while
    ipaddress reads them as no address: they passed as names (safe only on an aiohttp that
    refuses them itself, 3.14.5 on)."""
    with pytest.raises(RefusedDestination, match="legacy form"):
        check_url(f"http://{host}:8080/hook", allow_private=False)
    check_url("http://deadbeef.example:8080/hook", allow_private=False)  # a name stays one


async def test_an_attempts_error_leaves_the_url_out(tmp_path, caplog):
    """aiohttp's error for a malformed answer quotes the whole URL, whose path or query may
    be the receiver's secret (chat services' hook URLs): it went to the log and the record."""
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    relay = Relay(cfg_with(tmp_path, timeout_s=2.0), store=None, wakeup=asyncio.Event())
    await relay.start()
    try:
        url = f"http://127.0.0.1:{port}/services/T0001/SeCrEtHoOkToKeN?sig=abc123"
        outcome = await relay._post(url, b"{}", {})
    finally:
        await relay.stop()
        server.close()
    assert outcome.error and outcome.error.startswith("ClientResponseError: 400")
    assert "SeCrEtHoOkToKeN" not in outcome.error and len(outcome.error) <= 300


# --- retry policy ------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [[], [5, 10], [0, -1]])
def test_a_retry_schedule_that_cannot_be_kept_is_refused(tmp_path, schedule):
    """The first attempt goes as the outcome is recorded: a first delay, ignored, is refused."""
    with pytest.raises(ValueError, match="first 0"):
        cfg_with(tmp_path, retry_schedule_s=schedule)


def test_retry_after_seconds_and_http_date():
    now = time.time()
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert parse_retry_after("30", now) == 30.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert 110 < parse_retry_after(later, now) <= 121
    for bad in ("soon", None, "-3", "inf", "nan", "1e9"):
        assert parse_retry_after(bad, now) is None, bad


def test_jitter_stays_within_20_percent_and_never_negative():
    rng = random.Random(1)
    delays = [jittered(10.0, rng) for _ in range(1000)]
    assert 8.0 <= min(delays) < 8.2 and 11.8 < max(delays) <= 12.0
    assert jittered(0.0, rng) == 0.0


def test_next_step_follows_the_schedule():
    schedule = [0, 5, 300]
    assert next_step(1, Outcome(status_code=204), schedule, 0) == ("delivered", None)
    state, at = next_step(1, Outcome(status_code=500), schedule, 1000)
    assert state == "pending" and 1004 <= at <= 1006
    assert next_step(3, Outcome(status_code=500), schedule, 0) == ("failed", None)
    assert next_step(1, Outcome(status_code=410, final=True), schedule, 0) == ("failed", None)
    _, at = next_step(1, Outcome(status_code=503, retry_after=60), schedule, 0)
    assert at == 60
    _, at = next_step(1, Outcome(status_code=503, retry_after=1e9), schedule, 0)
    assert at == MAX_RETRY_AFTER_S
