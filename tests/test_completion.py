"""Completion: Letta's callback, the polling fallback, and recovery after a crash."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import sqlite3
import uuid
from types import SimpleNamespace

import pytest

from tests.conftest import eventually
from tracker import clock
from tracker.callbacks import CallbackSigner
from tracker.errors import LettaError, LettaUnavailable, NotFound, Unavailable
from tracker.reconcile import find_in_letta
from tracker.sim_shapes import callback_json, utcnow
from tracker.states import WATCHED, State

#: a run's fields that tell of the callback to the user's callback_url
CALLBACK_FIELDS = ("callback_url", "callback_sent_at", "callback_status_code", "callback_error")


def via(runs: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in runs:
        out[r["tracker"]["completed_via"]] = out.get(r["tracker"]["completed_via"], 0) + 1
    return out


async def kinds(t, run_id: str) -> list[str]:
    return [e["kind"] for e in await (await t.get(f"/v1/runs/{run_id}/events")).json()]


@pytest.mark.parametrize("drop", [0.0, 0.5, 1.0])
async def test_every_run_is_recorded_whatever_the_callbacks(start_tracker, sim, drop):
    # with every callback sent, the first poll waits as long as by default: the tests' 0.3 s
    # grace races the callback (~0.2 s after the submit here) on a loaded machine
    grace = {"grace_s": 2.0} if drop == 0.0 else {}
    t = await start_tracker(dispatch={"per_agent": "parallel"}, polling=grace)
    sim.set_faults(callback_drop=drop)
    agents = [sim.create_agent(f"a{i}")["id"] for i in range(4)]
    runs = [await t.submit(a, f"m{i}") for i in range(3) for a in agents]
    done = [await t.wait_state(r["id"], "done") for r in runs]
    for r in done:
        assert r["status"] == "completed" and r["stop_reason"] == "end_turn"
        messages = await (await t.get(f"/v1/runs/{r['id']}/messages")).json()
        assert [m["message_type"] for m in messages] == ["user_message", "assistant_message"]
        usage = await (await t.get(f"/v1/runs/{r['id']}/usage")).json()
        assert usage["total_tokens"] > 0
    counts = via(done)
    if drop == 0.0:
        assert counts == {"callback": 12}
    elif drop == 1.0:
        assert counts == {"poll": 12}
        # Letta's failed callback was to the tracker: these runs have no callback_url
        assert {tuple(r[k] for k in CALLBACK_FIELDS) for r in done} == {(None,) * 4}
    else:
        assert counts.get("callback") and counts.get("poll")


async def test_lettas_callback_to_the_tracker_is_not_shown_as_the_users(start_tracker, sim,
                                                                         agent):
    """Letta's run tells of Letta's callback, which goes to the tracker; the tracker's run tells
    of the one to the user's callback_url. Without one, it shows none, as Letta's run would,
    however Letta's callback to the tracker fared."""
    t = await start_tracker()
    sim.set_faults(callback_drop=1.0)
    run = await t.submit(agent)
    done = await t.wait_state(run["id"], "done")
    assert done["tracker"]["completed_via"] == "poll"
    letta_run = sim.store.get(done["tracker"]["letta_run_id"])
    assert letta_run.callback_sent_at and "/callbacks/letta/" in letta_run.callback_error
    [listed] = await (await t.get("/v1/runs")).json()
    for shown in (done, listed, await t.run(run["id"])):
        assert {k: shown[k] for k in CALLBACK_FIELDS} == dict.fromkeys(CALLBACK_FIELDS)
    # why Letta's callback did not arrive stays in the timeline, the token's MAC hidden
    events = await (await t.get(f"/v1/runs/{run['id']}/events")).json()
    [why] = [e["detail"]["letta_callback_error"] for e in events
             if (e.get("detail") or {}).get("letta_callback_error")]
    token = t.svc.signer.token(run["id"])
    assert f"/callbacks/letta/{token.rpartition('.')[0]}.***" in why
    assert token.rpartition(".")[2] not in why


async def test_poll_before_a_late_callback_is_no_error(start_tracker, sim, agent):
    t = await start_tracker()
    sim.set_faults(callback_delay_s=1.2)
    run = await t.submit(agent)
    done = await t.wait_state(run["id"], "done")
    assert done["tracker"]["completed_via"] == "poll"
    # the callback that follows confirms the same outcome: an event, no change
    await eventually(lambda: _has(t, run["id"], "confirmed"), timeout=5)
    after = await t.run(run["id"])
    assert after["status"] == "completed" and after["tracker"]["completed_via"] == "poll"


async def test_a_callback_the_tracker_took_is_left_to_the_applier_a_moment(
        start_tracker, sim, agent, monkeypatch):
    """Letta shows the callback answered 2xx: it is filed, and the applier records it. With
    callback workers the main process hears of it a few ms later; a poll meanwhile waits
    ``callback_wait_s`` from the callback, as for one not sent yet, before recording the run
    itself (here nothing is filed, so it does, once that moment has passed)."""
    sent: list[float] = []

    def taken(letta_run) -> None:  # as the run ends: answered 2xx, but not filed here
        letta_run.callback_sent_at, letta_run.callback_status_code = utcnow(), 200
        sent.append(clock.now())

    monkeypatch.setattr(sim.engine, "_schedule_callback", taken)
    t = await start_tracker(polling={"callback_wait_s": 1.5})
    run = await t.submit(agent, "[[delay=0.3]] hello")
    done = await t.wait_state(run["id"], "done")
    assert done["tracker"]["completed_via"] == "poll"
    assert clock.epoch(done["tracker"]["recorded_at"]) - sent[0] >= 1.4


async def _has(t, run_id, kind):
    return kind in await kinds(t, run_id)


async def test_duplicate_and_replayed_callbacks_change_nothing(start_tracker, sim, agent):
    t = await start_tracker()
    run = await t.submit(agent)
    done = await t.wait_state(run["id"], "done")
    letta_run = sim.store.get(done["tracker"]["letta_run_id"])
    url = letta_run.callback_url.split("127.0.0.1", 1)[1].split("/", 1)[1]
    body = {"run_id": letta_run.id, "status": "failed", "completed_at": "2026-01-01T00:00:00",
            "metadata": {"result": {"messages": [], "stop_reason": {"stop_reason": "error"}}}}
    for _ in range(2):
        resp = await t.client.post("/" + url, json=body)
        assert resp.status == 200
    await t.callbacks_applied()
    after = await t.run(run["id"])
    assert after["status"] == "completed" and after["stop_reason"] == "end_turn"
    assert (await kinds(t, run["id"])).count("ignored") == 2


@pytest.mark.parametrize("secret", ["s", "k" * 32, "x" * 64, "y" * 65, "é" * 100],
                         ids=["1 byte", "32 bytes", "64 bytes", "65 bytes", "200 bytes"])
def test_a_callback_token_is_the_hmac_sha256_of_its_run_id(secret):
    # the signer keys its HMAC once and copies it: the same MAC as hmac.digest's, for keys
    # shorter than, as long as and longer than SHA-256's block (hashed first)
    signer = CallbackSigner(secret, "http://tracker")
    for run_id in ("run-1", f"run-{uuid.uuid4()}"):
        mac = hmac.digest(secret.encode(), run_id.encode(), "sha256")[:24]
        assert signer.token(run_id) == f"{run_id}.{base64.urlsafe_b64encode(mac).decode()}"
        assert signer.run_id(signer.token(run_id)) == run_id


async def test_forged_callbacks_are_refused(start_tracker, sim, agent):
    t = await start_tracker()
    a = await t.wait_state((await t.submit(agent, "a"))["id"], "done")
    b = await t.wait_state((await t.submit(agent, "b"))["id"], "done")
    signer = t.svc.signer
    body = {"run_id": a["tracker"]["letta_run_id"], "status": "failed"}
    bad_mac = signer.token(a["id"])[:-4] + "AAAA"
    assert (await t.client.post(f"/callbacks/letta/{bad_mac}", json=body)).status == 401
    assert (await t.client.post("/callbacks/letta/nonsense", json=body)).status == 404
    # a valid token for run b, with a body naming run a's Letta run
    resp = await t.client.post(f"/callbacks/letta/{signer.token(b['id'])}", json=body)
    assert resp.status == 409
    resp = await t.client.post(f"/callbacks/letta/{signer.token(a['id'])}", data=b"{x")
    assert resp.status == 400
    resp = await t.client.post(f"/callbacks/letta/{signer.token(a['id'])}",
                               json={"run_id": a["tracker"]["letta_run_id"], "status": "done"})
    assert resp.status == 422
    for r in (a, b):
        now = await t.run(r["id"])
        assert now["status"] == "completed" and now["tracker"]["state"] == "done"


async def test_a_cancel_reported_before_the_submits_answer_still_gets_a_deadline(
        start_tracker, sim, agent):
    """A cancelled callback come before Letta's answer to the send moved the run to
    confirming; the answer then recorded no deadline, and a cancel's confirmation stops
    waiting for a step Letta lost (a restart) only past the deadline: it waited for ever,
    the agent's lane held."""
    from tracker.states import State

    t = await start_tracker(polling={"cancel_confirm_s": 30})
    manager, store = t.svc.manager, t.svc.store
    original = manager.mark_submitted

    async def cancelled_first(run, letta_run, *args, **kwargs):
        await manager.letta.cancel(run.agent_id, [letta_run["id"]])

        async def confirming() -> bool:
            return (await store.get_run(run.id)).state is State.CONFIRMING

        await eventually(confirming)  # the cancelled callback, applied
        return await original(run, letta_run, *args, **kwargs)

    manager.mark_submitted = cancelled_first
    run = await t.submit(agent, "[[delay=2]] hi")
    stored = await store.get_run(run["id"])
    assert stored.state is State.CONFIRMING and stored.deadline_at is not None


async def test_callback_before_the_submit_is_recorded(start_tracker, sim, agent):
    t = await start_tracker()
    sim.set_faults(run_duration_s=(0.0, 0.0), callback_lag_s=0.0)
    manager = t.svc.manager
    original = manager.mark_submitted

    async def slow(*args, **kwargs):
        await asyncio.sleep(0.4)  # Letta's answer reaches our database after its callback
        return await original(*args, **kwargs)

    manager.mark_submitted = slow
    run = await t.submit(agent)
    after = await t.run(run["id"])
    assert after["tracker"]["state"] == "done" and after["tracker"]["completed_via"] == "callback"
    assert after["tracker"]["letta_run_id"] and after["tracker"]["submitted_at"]


async def test_a_callback_before_the_submit_is_vouched_for_past_a_letta_error(
        start_tracker, sim, agent):
    """The GET that vouches for such a callback met a 5xx of a moment: the callback, which
    Letta never sends again, was answered 503 and lost. Letta is asked again."""
    t = await start_tracker(polling={"grace_s": 30.0, "callback_wait_s": 30.0})
    sim.set_faults(run_duration_s=(0.0, 0.0), callback_lag_s=0.0)
    manager, letta = t.svc.manager, t.svc.letta
    original, get_run = manager.mark_submitted, letta.get_run
    asked: list[str] = []

    async def slow(*args, **kwargs):
        await asyncio.sleep(0.6)
        return await original(*args, **kwargs)

    async def erring_once(letta_run_id: str) -> dict:
        asked.append(letta_run_id)
        if len(asked) == 1:
            raise LettaUnavailable("Letta answered 502: Bad Gateway")
        return await get_run(letta_run_id)

    manager.mark_submitted, letta.get_run = slow, erring_once
    run = await t.submit(agent)
    after = await t.wait_state(run["id"], "done", timeout=5)
    assert after["tracker"]["completed_via"] == "callback" and len(asked) == 2
    assert sim.store.get(asked[0]).callback_status_code == 200


async def test_stuck_run_is_flagged_and_can_be_cancelled(start_tracker, sim, agent):
    t = await start_tracker(polling={"deadline_s": 0.5})
    run = await t.submit(agent, "[[never]] forever")
    stuck = await t.wait_state(run["id"], "stuck")
    assert stuck["status"] == "created"  # Letta's status is not invented
    polls = stuck["tracker"]["poll_count"]
    behind = await t.submit(agent, "next")  # Letta may yet be at work: the lane is held
    await asyncio.sleep(1.5)
    polled = (await t.run(run["id"]))["tracker"]["poll_count"]
    assert polled > polls
    # a poll that finds Letta's status as it was adds no event: one a poll (288 a day at
    # polling.max_interval_s) filled the timeline of a run stuck for good
    assert (await kinds(t, run["id"])).count("still_active") < polled - 1
    assert (await t.run(behind["id"]))["tracker"]["state"] == "queued" and len(sim.received) == 1
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert await resp.json() == {run["id"]: "cancelled"}
    final = await t.wait_state(run["id"], "done", timeout=10)
    assert final["status"] == "cancelled"
    await t.wait_state(behind["id"], "done")  # the cancel let it go


async def test_run_deleted_upstream_is_lost(start_tracker, sim, agent):
    t = await start_tracker()
    sim.set_faults(callback_drop=1.0)
    run = await t.submit(agent, "[[delay=1]] slow")
    sim.delete_run(run["tracker"]["letta_run_id"])
    lost = await t.wait_state(run["id"], "lost")
    assert "no longer knows" in lost["tracker"]["error"]


async def test_cancelled_then_overwritten_settles_on_completed(start_tracker, sim, agent):
    t = await start_tracker()
    run = await t.submit(agent, "[[delay=0.8]] slow")
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert (await resp.json()) == {run["id"]: "cancelled"}
    await t.wait_state(run["id"], "confirming")
    final = await t.wait_state(run["id"], "done", timeout=10)
    assert final["status"] == "completed" and final["stop_reason"] == "end_turn"
    timeline = await kinds(t, run["id"])
    assert "cancel_seen" in timeline and "completed" in timeline


async def test_two_reports_that_read_the_run_cancelled_overwrite_it_once(
        start_tracker, sim, agent):
    """A callback and a poll that both read the run cancelled before either recorded
    Letta's overwrite to completed each recorded it: two `overwritten` events, and two
    deliveries to the user's callback_url, each with its own webhook id."""
    from tracker.manager import Observation

    t = await start_tracker()
    run = await t.submit(agent, "hi")
    await t.wait_state(run["id"], "done")
    store, manager = t.svc.store, t.svc.manager
    await store.transition(run["id"], None, (State.DONE,), {"status": "cancelled"}, None)
    stale = await store.get_run(run["id"])
    obs = Observation(letta_run_id=stale.letta_run_id, status="completed",
                      stop_reason="end_turn")
    first = await manager._settled(stale, obs, "callback", {})
    assert first.status == "completed"
    real_get = store.get_run
    store.get_run = lambda *a, **k: _as_read(stale)  # the second read the run before it
    try:
        await manager._settled(stale, obs, "poll", {})
    finally:
        store.get_run = real_get
    assert (await kinds(t, run["id"])).count("overwritten") == 1


async def _as_read(run):
    return run


async def test_a_cancel_polled_within_the_confirm_window_is_not_final(
        start_tracker, sim, agent, webhook):
    """Letta's cancel does not stop the step: polls that see the run `cancelled` before
    cancel_confirm_s has passed keep it confirming. The step ends, Letta overwrites the run
    completed, and that is the one outcome recorded and delivered to the callback_url: never
    a `cancelled` first, overwritten after."""
    url, delivered = webhook
    sim.set_faults(callback_drop=1.0)  # polls alone see the run: every look is one
    t = await start_tracker(polling={"min_interval_s": 0.1, "max_interval_s": 0.3,
                                     "cancel_confirm_s": 5.0})
    run = await t.submit(agent, "[[delay=1]] slow", callback_url=url)
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert await resp.json() == {run["id"]: "cancelled"}
    final = await t.wait_state(run["id"], "done")
    assert (final["status"], final["stop_reason"]) == ("completed", "end_turn")
    events = await (await t.get(f"/v1/runs/{run['id']}/events")).json()
    # seen cancelled by a poll while confirming, within the window: no outcome yet
    assert [e for e in events if (e["source"], e["kind"]) == ("poll", "confirmed") and (
        e["detail"]["status"], e["detail"]["state"]) == ("cancelled", "confirming")], events
    assert "overwritten" not in [e["kind"] for e in events]
    await eventually(lambda: delivered)
    assert [d["status"] for d in delivered] == ["completed"]


async def test_a_cancel_letta_overwrites_is_one_outcome_in_the_metrics(start_tracker, sim,
                                                                         agent):
    """Letta turns a cancelled run completed when its step ends; seen after the tracker
    recorded it cancelled, the overwrite is recorded, but the run is counted once in
    tracker_runs_completed (it was counted under both statuses)."""
    from tracker.manager import Observation

    # a step Letta lost (never ends): the cancel is final at the run's deadline
    t = await start_tracker(polling={"cancel_confirm_s": 0.3, "deadline_s": 0.5})
    run = await t.submit(agent, "[[never]] slow")
    await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    done = await t.wait_state(run["id"], "done")
    assert done["status"] == "cancelled"
    record = await t.svc.store.get_run(run["id"])
    late = Observation(letta_run_id=record.letta_run_id, status="completed",
                       stop_reason="end_turn", completed_at=clock.iso())
    updated = await t.svc.manager.apply_remote(record, late, "poll")
    assert updated.status == "completed" and "overwritten" in await kinds(t, run["id"])
    text = await (await t.get("/metrics")).text()
    counted = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tracker_runs_completed_total{")]
    assert sum(counted) == 1, counted


async def test_cancel_of_a_run_whose_step_letta_lost_settles_at_its_deadline(
        start_tracker, sim, agent):
    """A step Letta lost (a restart) stays `pending` for ever: the cancel waits for it no
    longer than the run's deadline, then is final."""
    t = await start_tracker(polling={"cancel_confirm_s": 0.3, "deadline_s": 1.5})
    run = await t.submit(agent, "[[never]] forever")
    await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    await asyncio.sleep(1.0)
    assert (await t.run(run["id"]))["tracker"]["state"] == "confirming"
    final = await t.wait_state(run["id"], "done", timeout=10)
    assert final["status"] == "cancelled"


async def test_a_cancel_whose_step_outlives_the_window_waits_for_its_end(
        start_tracker, sim, agent):
    """A cancel does not stop Letta's step. Taken for final once cancel_confirm_s had passed,
    the run kept `cancelled` while Letta, at the step's end, overwrote it to completed (no
    callback, no poll after), and the lane let the agent's next message go while the step
    still ran: two at once at Letta. The cancel now waits for Letta's step to end."""
    t = await start_tracker(polling={"cancel_confirm_s": 0.3})
    run = await t.submit(agent, "[[delay=2]] a long step")
    behind = await t.submit(agent, "next")
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert await resp.json() == {run["id"]: "cancelled"}
    await asyncio.sleep(1.2)  # the window long past, the step still running
    assert (await t.run(run["id"]))["tracker"]["state"] == "confirming"
    assert len(sim.received) == 1
    final = await t.wait_state(run["id"], "done")
    assert (final["status"], final["stop_reason"]) == ("completed", "end_turn")
    await t.wait_state(behind["id"], "done")
    first, second = sim.received
    assert second.at - first.at >= 2.0  # sent once the step had ended


async def test_letta_down_makes_the_poller_back_off_then_finish(start_tracker, sim, agent):
    """While Letta is down, each failed poll pauses polling longer (0.2, 0.4, 0.8 s here): a
    few polls in the second it is down, not one every turn of the poller's loop."""
    t = await start_tracker()
    sim.set_faults(callback_drop=1.0)
    run = await t.submit(agent, "[[delay=0.3]] x")
    letta, get_run = t.svc.letta, t.svc.letta.get_run
    while_down = []

    async def counted(letta_run_id):
        if sim.faults.down:
            while_down.append(letta_run_id)
        return await get_run(letta_run_id)

    letta.get_run = counted
    sim.down_for(1.0)
    done = await t.wait_state(run["id"], "done", timeout=10)
    assert done["tracker"]["completed_via"] == "poll"
    assert 1 <= len(while_down) <= 8, while_down


async def test_a_poll_letta_refuses_is_tried_again_later_not_at_once(start_tracker, sim, agent):
    """Letta refusing a run's GET (a 403, not a 5xx) ends that poll rescheduled by the usual
    backoff: the run was left due, and the poller asked again ~50 times a second."""
    t = await start_tracker()
    sim.set_faults(callback_drop=1.0)
    run = await t.submit(agent, "[[never]] forever")
    calls = []

    async def refuse(letta_run_id):
        calls.append(letta_run_id)
        raise LettaError(403, "Forbidden")

    t.svc.letta.get_run = refuse
    await asyncio.sleep(1.5)  # polls every 0.2-1 s here
    assert 1 <= len(calls) <= 8
    rec = await t.svc.store.get_run(run["id"])
    assert rec.state is State.SUBMITTED and rec.next_check_at > clock.now()


async def test_the_checks_of_one_tick_failing_together_back_off_once(start_tracker):
    """A tick's checks run at once: one Letta blip fails them all, and that is one failure
    of the backoff, not one a run (nine paused polling 2^8 intervals)."""
    t = await start_tracker()
    poller, interval = t.svc.poller, t.svc.cfg.polling.min_interval_s
    for _ in range(9):
        poller._back_off(LettaUnavailable("502 Bad Gateway"))
    assert poller._paused_until - clock.now() <= interval
    poller._paused_until = clock.now()  # the pause is over, and the next tick fails again
    poller._back_off(LettaUnavailable("502 Bad Gateway"))
    assert interval < poller._paused_until - clock.now() <= 2 * interval


def test_a_callbacks_metadata_is_kept_as_letta_sent_it():
    """The run's metadata is what Letta's callback held, less its result (kept apart), with
    nothing the model adds (it added "error": null)."""
    from tests import samples
    from tracker.manager import Observation
    from tracker.models import LettaCallback

    sent = samples.body("async_basic__callback")
    obs = Observation.from_callback(LettaCallback.model_validate(sent))
    assert obs.fields["metadata"] == {k: v for k, v in sent["metadata"].items() if k != "result"}


async def test_callback_wakes_the_next_message_of_the_lane(start_tracker, sim, agent,
                                                             monkeypatch):
    """The dispatcher sleeps while the lane is busy (the queued run counted as due, it
    claimed every 10 ms, ~100 times here), and the first run's callback wakes it."""
    t = await start_tracker(polling={"grace_s": 30})
    claims = 0
    claim = t.svc.store.claim

    async def counted(*args, **kwargs):
        nonlocal claims
        claims += 1
        return await claim(*args, **kwargs)

    monkeypatch.setattr(t.svc.store, "claim", counted)
    first = await t.submit(agent, "[[delay=1]] one")
    second = await t.submit(agent, "two")
    await t.wait_state(second["id"], "done", timeout=5)
    a = sim.store.get((await t.run(first["id"]))["tracker"]["letta_run_id"])
    b = sim.store.get((await t.run(second["id"]))["tracker"]["letta_run_id"])
    assert (b.created_at - a.completed_at).total_seconds() < 0.5
    assert claims <= 10


async def hang(*args, **kwargs):
    await asyncio.Event().wait()  # the process "dies" here: nothing after it ever runs


async def _died_after_letta_got_it(start_tracker, sim, agent) -> dict:
    """A run Letta took, the tracker dying before it recorded Letta's answer: `submitting`."""
    t = await start_tracker(letta={"timeout_s": 0.5}, dispatch={"inline_timeout_s": 0.3})
    t.svc.manager.mark_submitted = hang
    sim.set_faults(callback_drop=1.0)  # a dead tracker hears no callback either
    run = await t.submit(agent)
    assert (await t.run(run["id"]))["tracker"]["state"] == "submitting"
    await t.client.close()
    return run


async def _found_not_resent(t, sim, run: dict) -> None:
    done = await t.wait_state(run["id"], "done")
    assert len(sim.received) == 1 and max(sim.otid_counts().values()) == 1
    assert done["tracker"]["letta_run_id"] == sim.received[0].run_id
    assert "found_in_letta" in await kinds(t, run["id"])


async def test_crash_between_letta_answer_and_our_write(start_tracker, sim, agent):
    run = await _died_after_letta_got_it(start_tracker, sim, agent)
    await _found_not_resent(await start_tracker(), sim, run)


async def test_a_run_cut_off_mid_send_is_looked_up_though_letta_refuses_the_start_up_look(
        start_tracker, sim, agent):
    """Letta got the message, and the tracker died before recording its answer; as it starts
    again Letta refuses the look for it (a 429, which says the call was not taken: a send
    refused so would not mark the run to be looked up). The run waits to be looked up, not to
    be sent: once Letta answers, it is found there, never sent a second time."""
    run = await _died_after_letta_got_it(start_tracker, sim, agent)
    sim.set_faults(api_429_rate=1.0, retry_after_s=0.2)
    t2 = await start_tracker()  # reconcile met the 429
    sim.set_faults(api_429_rate=0.0)
    await _found_not_resent(t2, sim, run)


async def test_a_fault_recording_lettas_answer_looks_the_run_up_before_sending_it_again(
        start_tracker, sim, agent):
    """Letta took the run, and the write recording its answer failed (the database refusing
    writes a moment; the requeue after it went through): the run is queued to be looked up
    at Letta before any resend, found there and attached, never sent twice."""
    t = await start_tracker()
    sim.set_faults(callback_drop=1.0)  # no callback records the run meanwhile
    store = t.svc.store
    transition, failed = store.transition, []

    async def refused_once(run_id, target, *args, **kwargs):
        if target is not State.SUBMITTED or failed:
            return await transition(run_id, target, *args, **kwargs)
        failed.append(run_id)
        store._db.execute("PRAGMA query_only = 1")  # SQLite's own fault, on this write alone
        try:
            return await transition(run_id, target, *args, **kwargs)
        finally:
            store._db.execute("PRAGMA query_only = 0")

    store.transition = refused_once
    run = await t.submit(agent)
    done = await t.wait_state(run["id"], "done")
    assert failed == [run["id"]]
    assert len(sim.received) == 1 and max(sim.otid_counts().values()) == 1
    assert done["tracker"]["letta_run_id"] == sim.received[0].run_id
    events = await (await t.get(f"/v1/runs/{run['id']}/events")).json()
    [retry] = [e for e in events if e["kind"] == "retry"]  # the send's own requeue, no rescue
    assert "readonly" in retry["detail"]["error"]
    assert "found_in_letta" in [e["kind"] for e in events]


async def test_a_callback_answered_before_a_crash_is_applied_on_the_next_start(
        start_tracker, sim, agent):
    """Letta's callback is answered once it is in the inbox; if the process dies before the
    applier gets to it, the next start applies it (Letta will not send it again)."""
    sim.set_faults(callback_drop=1.0)
    t = await start_tracker()
    t.svc.applier.apply = hang  # the process "dies" before applying what it answered
    run = await t.submit(agent, "[[delay=0.2]] hello")
    letta_id = (await t.run(run["id"]))["tracker"]["letta_run_id"]
    await eventually(lambda: sim.store.get(letta_id).status == "completed")
    body = callback_json(sim.store.get(letta_id), "completed", "end_turn", utcnow())
    resp = await t.client.post(f"/callbacks/letta/{t.svc.signer.token(run['id'])}", json=body)
    assert resp.status == 200 and await t.svc.store.inbox_depth() == 1
    assert resp.content_type == "application/json" and resp.charset == "utf-8"
    assert await resp.json() == {"run_id": run["id"], "accepted": True}
    assert (await t.run(run["id"]))["tracker"]["state"] == "submitted"
    await t.client.close()
    # Letta is out of reach after the restart: only the inbox can tell the outcome
    t2 = await start_tracker(letta={"base_url": "http://127.0.0.1:9"})
    done = await t2.wait_state(run["id"], "done")
    assert done["status"] == "completed" and done["tracker"]["completed_via"] == "callback"
    messages = await (await t2.get(f"/v1/runs/{run['id']}/messages")).json()
    assert [m["message_type"] for m in messages] == ["user_message", "assistant_message"]
    await t2.callbacks_applied()


def _long_result(sim, letta_id: str, extra: int) -> list[dict]:
    """Letta's run ``letta_id`` given ``extra`` more stored messages (a long tool-using turn),
    its answer still last; returns them all."""
    letta_run = sim.store.get(letta_id)
    first, answer = letta_run.messages[0], letta_run.messages[-1]
    steps = [dict(first, id=f"message-{uuid.uuid4()}", message_type="tool_return_message",
                  content=f"step {i}") for i in range(extra)]
    letta_run.messages = [first, *steps, answer]
    return letta_run.messages


async def test_a_callback_past_its_own_limit_is_refused_on_the_services_port(
        start_tracker, sim, agent):
    """The service's port takes bodies up to the larger of server.max_body_bytes and
    callbacks.max_body_bytes: with the first the larger, callbacks past their own documented
    limit were taken there (a worker's port refused them)."""
    t = await start_tracker(server={"max_body_bytes": 4 * 2**20},
                            callbacks={"max_body_bytes": 2**20})
    run = await t.submit(agent, "[[delay=5]] x")
    url = f"/callbacks/letta/{t.svc.signer.token(run['id'])}"
    big = {"run_id": run["tracker"]["letta_run_id"], "status": "completed",
           "pad": "x" * (2 * 2**20)}
    resp = await t.client.post(url, json=big)
    assert resp.status == 413
    chunked = await t.client.post(url, data=_chunks(json.dumps(big).encode()),
                                  headers={"Content-Type": "application/json"})
    assert chunked.status == 413


async def _chunks(data: bytes):
    for i in range(0, len(data), 65536):
        yield data[i:i + 65536]


async def test_a_callback_larger_than_a_submit_may_be_is_taken(start_tracker, sim, agent):
    """A callback carries up to 100 of a run's messages (a tool return up to 50,000
    characters, twice): bound by the submit's 1 MiB, a large one was refused 413, and Letta
    never sends it again. A submit that large is still refused."""
    sim.set_faults(callback_drop=1.0)
    t = await start_tracker(polling={"grace_s": 30})
    run = await t.submit(agent, "[[delay=0.1]] a big one")
    letta_id = (await t.run(run["id"]))["tracker"]["letta_run_id"]
    await eventually(lambda: sim.store.get(letta_id).status == "completed")
    letta_run = sim.store.get(letta_id)
    letta_run.messages[-1]["content"] = "x" * 2_000_000
    body = callback_json(letta_run, "completed", "end_turn", utcnow())
    resp = await t.client.post(f"/callbacks/letta/{t.svc.signer.token(run['id'])}", json=body)
    assert resp.status == 200, await resp.text()
    await t.callbacks_applied()
    done = await t.wait_state(run["id"], "done")
    assert done["tracker"]["completed_via"] == "callback"
    got = await (await t.get(f"/v1/runs/{run['id']}/messages")).json()
    assert len(got[-1]["content"]) == 2_000_000
    resp = await t.post(f"/v1/agents/{agent}/messages/async", {"input": "x" * 2_000_000})
    assert resp.status == 413


async def test_a_long_result_of_hidden_kinds_is_read_whole_and_filtered_here(
        start_tracker, sim, agent):
    """Letta applies include_return_message_types to each page of a run's stored messages:
    given it, Letta answered a first page of 1,000 tool steps with nothing, which ended the
    paging, and the answer after them was never read (recorded: no messages). The tracker
    keeps it from Letta and filters what it records."""
    sim.set_faults(callback_drop=1.0)
    t = await start_tracker(polling={"grace_s": 1.0})
    run = await t.submit(agent, "[[delay=0.1]] a long one",
                         include_return_message_types=["assistant_message"])
    assert "include_return_message_types" not in sim.received[0].body
    letta_id = (await t.run(run["id"]))["tracker"]["letta_run_id"]
    await eventually(lambda: sim.store.get(letta_id).status == "completed")
    messages = _long_result(sim, letta_id, 1500)  # before the first poll
    done = await t.wait_state(run["id"], "done")
    assert done["request_config"]["include_return_message_types"] == ["assistant_message"]
    got = await (await t.get(f"/v1/runs/{run['id']}/messages", limit=1000)).json()
    assert [m["id"] for m in got] == [messages[-1]["id"]]
    assert got[0]["message_type"] == "assistant_message"


@pytest.mark.parametrize("letta_up", [True, False])
async def test_a_callback_cut_short_by_letta_is_completed_from_lettas_messages(
        start_tracker, sim, agent, letta_up):
    """Letta's callback carries the run's first 100 stored messages only: recorded as they
    came, a longer run lost its last ones, its answer among them. They are read from Letta
    instead, or, Letta out of reach, the run is polled (which reads them all) once it is
    back."""
    sim.set_faults(callback_drop=1.0)
    t = await start_tracker(polling={"grace_s": 30})
    run = await t.submit(agent, "[[delay=0.1]] a long one")
    letta_id = (await t.run(run["id"]))["tracker"]["letta_run_id"]
    await eventually(lambda: sim.store.get(letta_id).status == "completed")
    messages = _long_result(sim, letta_id, 148)
    body = callback_json(sim.store.get(letta_id), "completed", "end_turn", utcnow())
    assert len(body["metadata"]["result"]["messages"]) == 100  # as Letta cuts it
    if not letta_up:
        sim.set_faults(api_5xx_rate=1.0)
    resp = await t.client.post(f"/callbacks/letta/{t.svc.signer.token(run['id'])}", json=body)
    assert resp.status == 200
    await t.callbacks_applied()
    if not letta_up:
        assert (await t.run(run["id"]))["tracker"]["state"] == "submitted"
        sim.set_faults(api_5xx_rate=0.0)
    done = await t.wait_state(run["id"], "done")
    assert done["tracker"]["completed_via"] == ("callback" if letta_up else "poll")
    got = await (await t.get(f"/v1/runs/{run['id']}/messages", limit=1000)).json()
    assert [m["id"] for m in got] == [m["id"] for m in messages]


async def test_the_live_runs_letta_ids_are_loaded_at_start_up_not_by_the_first_callback(
        start_tracker, sim, agent):
    """Filing a callback checks its Letta run against the run's, kept in memory for live runs.
    The service loads them as it starts: a load at the first callback made every callback of
    the first moments wait for it (p99 ~170 ms in benchmark 1)."""
    sim.set_faults(callback_drop=1.0)
    t = await start_tracker()
    run = await t.submit(agent, "[[delay=0.3]] hello")
    letta_id = (await t.run(run["id"]))["tracker"]["letta_run_id"]
    await t.client.close()
    t2 = await start_tracker(letta={"base_url": "http://127.0.0.1:9"})
    store = t2.svc.store
    await asyncio.sleep(0.2)  # start-up's load has begun (it may still be reading)
    reads: list[str] = []
    # the load, or the lookup of a run not in memory (the poller reads runs meanwhile)
    trace = lambda sql: reads.append(sql) if "letta_run_id FROM runs" in sql else None  # noqa: E731
    store._db.set_trace_callback(trace)
    await store._r.set_trace_callback(trace)
    await eventually(lambda: sim.store.get(letta_id).status == "completed")
    body = callback_json(sim.store.get(letta_id), "completed", "end_turn", utcnow())
    resp = await t2.client.post(f"/callbacks/letta/{t2.svc.signer.token(run['id'])}",
                                json=body)
    assert resp.status == 200 and not reads
    assert (await t2.wait_state(run["id"], "done"))["tracker"]["completed_via"] == "callback"


async def ended_while_down(t, sim, agent: str, n: int, text: str = "[[delay=0.2]] hello"
                           ) -> tuple[list[dict], list[str]]:
    """``n`` runs submitted, finished at Letta with no callback heard, and the tracker
    stopped: its runs and their Letta ids."""
    runs = [await t.submit(agent, text) for _ in range(n)]
    letta_ids = [(await t.run(r["id"]))["tracker"]["letta_run_id"] for r in runs]
    await eventually(lambda: all(sim.store.get(i).status == "completed" for i in letta_ids))
    await t.client.close()
    return runs, letta_ids


@pytest.mark.parametrize("letta_down_s", [0.0, 1.0])
async def test_a_restart_checks_every_watched_run_whatever_its_next_check(
        start_tracker, sim, agent, letta_down_s):
    """What Letta did while the tracker was down is unknown: at start-up the poller sweeps
    every watched run, though none is due for ten minutes (with Letta down as it starts,
    after its pause: the outage drops none of the sweep's runs)."""
    sim.set_faults(callback_drop=1.0)
    slow = {"grace_s": 600, "min_interval_s": 600, "max_interval_s": 600}
    t = await start_tracker(polling=slow, dispatch={"per_agent": "parallel"})
    runs, _ = await ended_while_down(t, sim, agent, 5)
    if letta_down_s:
        sim.down_for(letta_down_s)
    # the runs' next checks stay ten minutes off; the pause after a failed call is short
    t2 = await start_tracker(polling={**slow, "min_interval_s": 0.5, "sweep_min": 3})
    for r in runs:
        done = await t2.wait_state(r["id"], "done", timeout=5 + letta_down_s)
        assert done["status"] == "completed" and done["tracker"]["completed_via"] == "poll"


async def test_the_restart_sweep_lists_lettas_active_runs_once(start_tracker, sim, agent,
                                                               monkeypatch):
    """Letta's active runs are listed once for the whole sweep, not once a chunk (with
    250,000 runs in flight, a listing is 250 calls): the runs that ended while the tracker
    was down are recorded, the ones still running are left to their callback."""
    import tracker.poller
    from tracker.letta import LettaClient

    sim.set_faults(callback_drop=1.0)
    slow = {"grace_s": 600, "min_interval_s": 600, "max_interval_s": 600}
    t = await start_tracker(polling=slow, dispatch={"per_agent": "parallel"})
    running = [await t.submit(agent, "[[delay=60]] hello") for _ in range(3)]
    ended, _ = await ended_while_down(t, sim, agent, 3)
    listings = []
    listed = LettaClient.active_run_ids

    async def counted(self):
        listings.append(1)
        return await listed(self)

    monkeypatch.setattr(LettaClient, "active_run_ids", counted)
    monkeypatch.setattr(tracker.poller, "BATCH", 2)  # three chunks
    # no wait for a callback on its way: each ended run is checked by the sweep alone
    t2 = await start_tracker(polling={**slow, "sweep_min": 1, "callback_wait_s": 0})
    for r in ended:
        assert (await t2.wait_state(r["id"], "done"))["tracker"]["completed_via"] == "poll"
    await eventually(lambda: not t2.svc.poller._sweeping())
    assert len(listings) == 1
    for r in running:
        assert (await t2.run(r["id"]))["tracker"]["state"] == "submitted"


@pytest.mark.parametrize("overdue", [False, True], ids=["not due", "overdue"])
async def test_the_restart_sweep_lists_each_page_of_finished_runs_once(
        start_tracker, sim, agent, monkeypatch, tmp_path, overdue):
    """The sweep's chunks go newest first, as Letta lists its finished runs, and each
    chunk's paging goes on where the last one's stopped: every ended run is found in the
    listing, none takes a call of its own. (Each chunk paging afresh from the newest, with a
    few pages at most, the oldest chunks' runs were fetched one call each.) Runs overdue at
    the restart wait for the sweep too: a tick before it took them oldest first."""
    import tracker.letta
    import tracker.poller
    from tracker.letta import LettaClient

    sim.set_faults(callback_drop=1.0)
    slow = {"grace_s": 600, "min_interval_s": 600, "max_interval_s": 600}
    t = await start_tracker(polling=slow, dispatch={"per_agent": "parallel"})
    ended, letta_ids = await ended_while_down(t, sim, agent, 12)
    if overdue:  # their checks came due while the tracker was down
        with contextlib.closing(sqlite3.connect(tmp_path / "tracker.db")) as db, db:
            db.execute("UPDATE runs SET next_check_at = 0")
    calls: list[str] = []
    for name in ("get_run", "recent_terminal"):
        def counted(original, name=name):
            async def call(self, *args):
                calls.append(name)
                return await original(self, *args)
            return call
        monkeypatch.setattr(LettaClient, name, counted(getattr(LettaClient, name)))
    for module in (tracker.letta, tracker.poller):
        monkeypatch.setattr(module, "PAGE", 2)  # six pages of finished runs
    monkeypatch.setattr(tracker.poller, "BATCH", 2)  # six chunks of two runs
    t2 = await start_tracker(polling={**slow, "sweep_min": 1, "callback_wait_s": 0})
    for r in ended:
        assert (await t2.wait_state(r["id"], "done"))["tracker"]["completed_via"] == "poll"
    await eventually(lambda: not t2.svc.poller._sweeping())
    assert calls.count("get_run") == 0
    assert calls.count("recent_terminal") <= 7  # six pages, and one to see the end


async def test_a_callback_does_not_wait_for_the_start_up_load_of_the_letta_ids(
        start_tracker, sim, agent, monkeypatch):
    """With many runs in flight the load takes a while (a second for 250,000): a callback
    arriving meanwhile is checked against the database, not held until the load ends."""
    from tracker.sqlite_inbox import CallbackInbox

    sim.set_faults(callback_drop=1.0)
    t = await start_tracker(dispatch={"per_agent": "parallel"})
    runs, letta_ids = await ended_while_down(t, sim, agent, 2)
    monkeypatch.setattr(CallbackInbox, "_load_letta_ids", hang)  # the load never ends
    t2 = await start_tracker(letta={"base_url": "http://127.0.0.1:9"})
    url = f"/callbacks/letta/{t2.svc.signer.token(runs[0]['id'])}"
    other = callback_json(sim.store.get(letta_ids[1]), "completed", "end_turn", utcnow())
    resp = await asyncio.wait_for(t2.client.post(url, json=other), 5)
    assert resp.status == 409  # still checked: the body names the other run's Letta run
    body = callback_json(sim.store.get(letta_ids[0]), "completed", "end_turn", utcnow())
    resp = await asyncio.wait_for(t2.client.post(url, json=body), 5)
    assert resp.status == 200 and (await resp.json())["accepted"] is True
    done = await t2.wait_state(runs[0]["id"], "done")
    assert done["tracker"]["completed_via"] == "callback"


async def test_crash_before_letta_got_it_is_sent_again(start_tracker, sim, agent):
    t = await start_tracker(letta={"timeout_s": 0.5}, dispatch={"inline_timeout_s": 0.3})
    t.svc.letta.send_async = hang
    run = await t.submit(agent)
    assert (await t.run(run["id"]))["tracker"]["state"] == "submitting"
    await t.client.close()
    t2 = await start_tracker()
    await t2.wait_state(run["id"], "done")
    assert len(sim.received) == 1 and max(sim.otid_counts().values()) == 1
    # start-up's reconcile queued it to be looked for at Letta, the look (lookup_after_s
    # later) found nothing, and it was sent once
    events = await (await t2.get(f"/v1/runs/{run['id']}/events")).json()
    timeline = [(e["source"], e["kind"]) for e in events]
    assert timeline[:4] == [("api", "submit"), ("reconcile", "cut_off"),
                            ("dispatch", "not_found_in_letta"), ("dispatch", "submitted")], \
        timeline
    assert [kind for _, kind in timeline].count("submitted") == 1, timeline


async def test_a_look_that_misses_a_run_whose_callback_came_looks_again(
        start_tracker, sim, agent):
    """A callback Letta could not vouch for came while the run's look was under way
    (``Manager.called_back``), and the look missed the run (a listing behind, say): taken
    for never sent, it was sent a second time. It is looked for again first."""
    t = await start_tracker(letta={"timeout_s": 0.5}, dispatch={"inline_timeout_s": 0.3})
    t.svc.letta.send_async = hang
    run = await t.submit(agent)
    await t.client.close()
    t2 = await start_tracker(dispatch={"lookup_after_s": 1.0})
    t2.svc.manager.called_back.add(run["id"])  # as look_now notes it, the run not at Letta
    await t2.wait_state(run["id"], "done")
    assert len(sim.received) == 1
    events = await (await t2.get(f"/v1/runs/{run['id']}/events")).json()
    missed = [e["detail"]["error"] for e in events if e["kind"] == "not_found_in_letta"]
    assert missed[0] == "not found in Letta, but its callback came: looked for again", missed
    assert missed[1:] == [None]  # the note spent with that look: the next one concludes
    assert not t2.svc.manager.called_back


async def test_a_cancel_whose_look_misses_a_run_whose_callback_came_fails(
        start_tracker, sim, agent):
    """The same miss in a queued run's cancel: taken for never sent, the run was marked
    cancelled while Letta ran it, and the agent's next message went beside it. The cancel
    fails; the run stays queued for another look."""
    t = await start_tracker(letta={"timeout_s": 0.5}, dispatch={"inline_timeout_s": 0.3})
    t.svc.letta.send_async = hang
    run = await t.submit(agent)
    await t.client.close()
    t2 = await start_tracker(dispatch={"lookup_after_s": 30})
    # its look due (the dispatcher, asleep for 30 s, not told), and the note of a callback
    await t2.svc.store.reschedule([(run["id"], clock.now() - 1, 0)])
    t2.svc.manager.called_back.add(run["id"])
    resp = await t2.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert await resp.json() == {run["id"]: "failed"}
    assert (await t2.run(run["id"]))["tracker"]["state"] == "queued"
    assert "cancel_too_soon" in await kinds(t2, run["id"])
    assert not t2.svc.manager.called_back and not sim.received


async def test_a_send_cut_off_by_a_crash_is_looked_up_only_once_it_could_have_landed(
        start_tracker, sim, agent):
    """A Letta slow to take the message creates its run after a quick restart: looked up at
    once by start-up's reconcile, it was taken for never sent, and sent a second time."""
    t = await start_tracker(letta={"timeout_s": 5}, dispatch={"inline_timeout_s": 0.2})
    sim.set_faults(accept_delay_s=0.8)
    run = await t.submit(agent)
    assert (await t.run(run["id"]))["tracker"]["state"] == "submitting"

    async def killed() -> None:  # not stopped: the send in flight is cut off
        for task in list(t.svc.dispatcher._tasks):
            task.cancel()

    t.svc.dispatcher.stop = killed
    await t.client.close()
    t2 = await start_tracker(dispatch={"lookup_after_s": 1.5})
    done = await t2.wait_state(run["id"], "done")
    assert len(sim.received) == 1 and done["tracker"]["letta_run_id"] == sim.received[0].run_id
    assert "found_in_letta" in await kinds(t2, run["id"])


async def test_start_up_reconcile_leaves_a_submit_sending_since(start_tracker, sim, agent):
    """Reconcile runs beside the API: a submit claimed and sending as it read the runs cut
    off mid-send was requeued as one of them (its send's outcome then lost, the run looked
    up lookup_after_s later)."""
    from tracker.reconcile import reconcile

    t = await start_tracker()
    store, original = t.svc.store, t.svc.store.submit

    async def submit_as_reconcile_reads(*args, **kwargs):
        result = await original(*args, **kwargs)
        await reconcile(t.svc.manager, t.svc.poller)
        return result

    store.submit = submit_as_reconcile_reads
    run = await t.submit(agent, "as it starts")
    done = await t.wait_state(run["id"], "done")
    assert "cut_off" not in await kinds(t, run["id"]) and done["status"] == "completed"
    assert len(sim.received) == 1


async def test_a_slow_submit_is_not_rescued_as_stranded(start_tracker, sim, agent, monkeypatch):
    """A run claimed by its submit is `submitting` before the submit gets to send it; however
    slow that gap, the rescue of stranded runs must not requeue it (that sent it twice)."""
    from tracker import dispatcher

    monkeypatch.setattr(dispatcher, "RESCUE_EVERY_S", 0.05)
    t = await start_tracker()
    store, original = t.svc.store, t.svc.store.submit

    async def slow_submit(*args, **kwargs):
        result = await original(*args, **kwargs)
        for _ in range(10):  # e.g. a read-back stuck behind a busy database, while
            t.svc.manager.dispatch_wakeup.set()  # callbacks keep waking the dispatcher
            await asyncio.sleep(0.05)
        return result

    store.submit = slow_submit
    run = await t.submit(agent, "slow")
    await t.wait_state(run["id"], "done")
    await asyncio.sleep(0.3)
    assert len(sim.received) == 1 and max(sim.otid_counts().values()) == 1
    assert "rescued" not in await kinds(t, run["id"])


async def _stranded(t, agent: str) -> dict:
    """A run left `submitting` with no send of ours behind it: its send dies before Letta got
    anything (a fault that hit both its write and its requeue leaves it so, and a crash)."""
    d, letta, send = t.svc.dispatcher, t.svc.letta, t.svc.letta.send_async
    letta.send_async = hang
    run = await t.submit(agent)
    [(_, sending)] = d._inflight.values()
    letta.send_async = send
    sending.cancel()
    await eventually(lambda: not d._inflight and run["id"] not in t.svc.manager.sending)
    return run


async def test_a_stranded_run_is_rescued_at_its_second_sighting_not_its_first(
        start_tracker, sim, agent, monkeypatch):
    """A run `submitting` with no send of ours behind it may be a claim whose send is just
    starting: the rescue requeues it only when its next look, RESCUE_EVERY_S later, finds it
    so again. Then it is looked up at Letta, not found, and sent, once."""
    from tracker import dispatcher

    monkeypatch.setattr(dispatcher, "RESCUE_EVERY_S", 0.2)
    t = await start_tracker(letta={"timeout_s": 0.5}, dispatch={"inline_timeout_s": 0.1})
    store, manager = t.svc.store, t.svc.manager
    run = await _stranded(t, agent)
    sightings, rescued_at = [], []
    in_states, requeue = store.in_states, manager.requeue

    async def look(*args, **kwargs):  # the rescue's look for runs left `submitting`
        found = await in_states(*args, **kwargs)
        sightings.extend(r.id for r in found if r.id == run["id"])
        return found

    async def counted(r, *args, **kwargs):
        if kwargs.get("kind") == "rescued":
            rescued_at.append(len(sightings))
        return await requeue(r, *args, **kwargs)

    monkeypatch.setattr(store, "in_states", look)
    monkeypatch.setattr(manager, "requeue", counted)
    await t.wait_state(run["id"], "done")
    assert rescued_at == [2]
    assert len(sim.received) == 1
    timeline = await kinds(t, run["id"])
    assert timeline[1:4] == ["rescued", "not_found_in_letta", "submitted"], timeline


async def test_a_stranded_run_whose_callback_came_is_looked_up_at_once(
        start_tracker, sim, agent, monkeypatch):
    """Its rescue queued the look dispatch.lookup_after_s later, as for a send that may still
    land; a callback Letta could not vouch for (``Manager.called_back``) says it has."""
    from tracker import dispatcher

    monkeypatch.setattr(dispatcher, "RESCUE_EVERY_S", 0.2)
    t = await start_tracker(letta={"timeout_s": 0.5},
                            dispatch={"inline_timeout_s": 0.1, "lookup_after_s": 30})
    manager = t.svc.manager
    run = await _stranded(t, agent)
    manager.called_back.add(run["id"])
    await t.wait_state(run["id"], "done", timeout=8)
    assert len(sim.received) == 1 and not manager.called_back


async def test_start_up_reconcile_looks_at_once_for_a_run_whose_callback_came(
        start_tracker, sim, agent):
    """A run cut off mid-send is looked up dispatch.lookup_after_s after start-up, as it may
    still land at Letta; a callback Letta could not vouch for, come as the service started
    (``Manager.called_back``), says it has: the look goes at once."""
    from tracker.reconcile import reconcile

    t = await start_tracker(letta={"timeout_s": 0.5},
                            dispatch={"inline_timeout_s": 0.1, "lookup_after_s": 30})
    manager = t.svc.manager
    run = await _stranded(t, agent)  # cut off mid-send, as by a crash
    manager.called_back.add(run["id"])
    assert (await reconcile(manager, t.svc.poller))["requeued"] == 1
    await t.wait_state(run["id"], "done", timeout=8)
    assert len(sim.received) == 1 and not manager.called_back
    assert "cut_off" in await kinds(t, run["id"])


async def _sent_but_unanswered(start_tracker, sim, agent, text: str, **sections):
    """A run whose send timed out although Letta took it: queued again, to be looked up
    before any resend (``needs_lookup``), the next try a minute away."""
    t = await start_tracker(letta={"timeout_s": 0.3}, dispatch={
        "inline_timeout_s": 0.2, "retry_min_s": 60, "retry_max_s": 60}, **sections)
    sim.set_faults(answer_time_s=(0.6, 0.6))
    run = await t.submit(agent, text)

    async def requeued():
        rec = await t.svc.store.get_run(run["id"])
        return rec.state is State.QUEUED and rec.needs_lookup

    await eventually(requeued)
    sim.set_faults(answer_time_s=(0.0, 0.0))
    assert len(sim.received) == 1
    return t, run


async def test_cancel_of_a_run_a_failed_send_may_have_delivered_stops_it_at_letta(
        start_tracker, sim, agent):
    """Cancelled while queued to be looked up, the run is looked for first: found at
    Letta, it is cancelled there, not marked cancelled here while Letta works on."""
    # a step that never ends: the cancel is final at the run's deadline
    t, run = await _sent_but_unanswered(start_tracker, sim, agent, "[[never]] forever",
                                        polling={"deadline_s": 1.0})
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert await resp.json() == {run["id"]: "cancelled"}
    [letta_run] = list(sim.store.runs())
    assert letta_run.status == "cancelled"  # stopped at Letta
    final = await t.wait_state(run["id"], "done")
    assert final["status"] == "cancelled" and final["tracker"]["letta_run_id"] == letta_run.id
    assert "found_in_letta" in await kinds(t, run["id"])
    assert len(sim.received) == 1


async def test_cancel_of_a_queued_run_that_never_went_cancels_it_here(start_tracker, sim, agent):
    t = await start_tracker()
    ahead = await t.submit(agent, "[[never]] holds the lane")
    run = await t.submit(agent, "never sent")
    assert run["tracker"]["state"] == "queued"
    resp = await t.post(f"/v1/agents/{agent}/messages/cancel", {"run_ids": [run["id"]]})
    assert await resp.json() == {run["id"]: "cancelled"}
    final = await t.run(run["id"])
    assert final["tracker"]["state"] == "cancelled" and final["status"] == "cancelled"
    assert (await t.run(ahead["id"]))["tracker"]["state"] == "submitted"
    assert len(sim.received) == 1


@pytest.mark.parametrize("refusal", [LettaError(401, "Unauthorized"), NotFound("Not Found")])
async def test_a_refused_look_at_letta_is_tried_again_not_a_rejection(start_tracker, sim, agent,
                                                                       refusal):
    """Letta refusing the look (a 401 as keys rotate, say; a 404 from its listing, which
    rejected the run though it may be at Letta) says nothing about the run: it is looked for
    again later, never rejected for it (nor sent twice)."""
    t = await start_tracker(letta={"timeout_s": 0.3}, dispatch={
        "inline_timeout_s": 0.2, "retry_min_s": 0.2, "retry_max_s": 0.2})
    letta, original = t.svc.letta, t.svc.letta.agent_runs
    refused = []

    async def refuse_once(*args, **kwargs):
        if not refused:
            refused.append(1)
            sim.set_faults(answer_time_s=(0.0, 0.0))
            raise refusal
        return await original(*args, **kwargs)

    letta.agent_runs = refuse_once
    sim.set_faults(answer_time_s=(0.6, 0.6))  # the send times out, but Letta has the run
    run = await t.submit(agent, "[[delay=1]] ends after the looks")
    final = await t.wait_state(run["id"], "done", "rejected")
    assert refused and final["tracker"]["state"] == "done"
    assert "found_in_letta" in await kinds(t, run["id"])
    assert len(sim.received) == 1


async def test_a_candidate_deleted_during_the_look_is_passed_over():
    """Letta lists a run, then it is deleted before its messages are read (404): the look
    goes on to the other candidates instead of failing the run."""
    now = clock.iso()

    class Letta:
        async def agent_runs(self, agent_id, limit):
            return [{"id": "run-gone", "created_at": now}, {"id": "run-ours", "created_at": now}]

        async def run_messages(self, run_id):
            if run_id == "run-gone":
                raise NotFound("run not found")
            return [{"otid": "otid-1"}]

    manager = SimpleNamespace(letta=Letta(), callback_url=lambda run_id: "http://t/cb")
    run = SimpleNamespace(id="run-1", agent_id="agent-1", created_at=now,
                          request={"messages": [{"role": "user", "otid": "otid-1"}]})
    assert (await find_in_letta(manager, run))["id"] == "run-ours"


async def test_a_run_is_found_by_its_token_whatever_our_url_was_then():
    """Sent before a restart that changed the callback URL's base (callback workers turned on,
    another port, another public URL): found by its token, not taken for unsent and sent
    again, even with no otid to go by."""
    now = clock.iso()
    token = "run-1.mac"

    class Letta:
        async def agent_runs(self, agent_id, limit):
            return [{"id": "run-other", "created_at": now, "callback_url": "http://a:8000/x"},
                    {"id": "run-ours", "created_at": now,
                     "callback_url": f"http://a:8000/callbacks/letta/{token}"}]

        async def run_messages(self, run_id):
            return []

    manager = SimpleNamespace(letta=Letta(),
                              callback_url=lambda run_id: f"http://a:8001/callbacks/letta/{token}")
    run = SimpleNamespace(id="run-1", agent_id="agent-1", created_at=now, request={})
    assert (await find_in_letta(manager, run))["id"] == "run-ours"


@contextlib.asynccontextmanager
async def flood(t, n: int = 10):
    """``n`` callbacks stuck mid-body: to the tracker, callbacks arriving faster than it
    answers them (each is being received until its body is complete)."""
    from tracker.applier import SATURATED

    assert n >= SATURATED
    writers = []
    try:
        for _ in range(n):
            token = t.svc.signer.token(f"run-{uuid.uuid4()}")
            _, w = await asyncio.open_connection("127.0.0.1", t.client.port)
            writers.append(w)
            w.write(f"POST /callbacks/letta/{token} HTTP/1.1\r\nHost: x\r\n"
                    "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
                    .encode())
            await w.drain()
        await eventually(lambda: t.svc.applier.receiving == n)
        yield
    finally:
        for w in writers:
            w.close()


async def _answered_callback(t, sim, agent) -> dict:
    """A finished run whose callback (dropped by Letta) is then answered by the tracker."""
    sim.set_faults(callback_drop=1.0)
    run = await t.submit(agent, "[[delay=0.1]] hello")
    letta_id = (await t.run(run["id"]))["tracker"]["letta_run_id"]
    await eventually(lambda: sim.store.get(letta_id).status == "completed")
    body = callback_json(sim.store.get(letta_id), "completed", "end_turn", utcnow())
    resp = await t.client.post(f"/callbacks/letta/{t.svc.signer.token(run['id'])}", json=body)
    assert resp.status == 200
    return run


async def test_a_callback_flood_defers_applying_until_it_eases(start_tracker, sim, agent):
    """While callbacks arrive faster than they are answered, applying them waits (answering
    Letta comes first), and the poller leaves an answered one alone; once the flood eases,
    it is applied, as a callback."""
    t = await start_tracker(polling={"grace_s": 0.3, "min_interval_s": 0.2})
    async with flood(t):
        run = await _answered_callback(t, sim, agent)
        await asyncio.sleep(1.0)  # the poller's first look was due after 0.3 s
        assert (await t.run(run["id"]))["tracker"]["state"] == "submitted"
        assert await t.svc.store.inbox_depth() == 1
    done = await t.wait_state(run["id"], "done", timeout=5)
    assert done["tracker"]["completed_via"] == "callback"
    assert "completed" in await kinds(t, run["id"])
    assert not t.svc.manager.callback_filed


async def test_a_flood_defers_applying_no_longer_than_the_max_lag(start_tracker, sim, agent):
    t = await start_tracker(callbacks={"apply_max_lag_s": 0.5}, polling={"grace_s": 30.0})
    async with flood(t):
        run = await _answered_callback(t, sim, agent)
        answered = asyncio.get_running_loop().time()
        done = await t.wait_state(run["id"], "done", timeout=5)
        waited = asyncio.get_running_loop().time() - answered
        assert 0.4 < waited < 2.0 and t.svc.applier.receiving == 10  # the flood still on
    assert done["tracker"]["completed_via"] == "callback"


async def test_a_submit_wakes_the_poller_only_if_it_would_look_too_late(
        start_tracker, sim, agent, monkeypatch):
    """Each round the poller checks what is due, reads when the next run is due, then naps
    until then (5 s at most). A submit wakes it while that nap would end after the new run's
    first check, or while the read is under way, but not while it checks: the read after
    sees the run. Under a stream of submits it would otherwise never nap."""
    t = await start_tracker(polling={"grace_s": 60}, dispatch={"per_agent": "parallel"})
    manager, poller = t.svc.manager, t.svc.poller
    during: dict[str, list[float]] = {"tick": [], "read": []}
    tick, next_due = poller.tick, poller.store.next_due

    async def watched_tick():
        during["tick"].append(manager.poll_wake_before)
        return await tick()

    async def watched_read(states):
        if states == WATCHED:  # the poller's (the dispatcher reads the queue's)
            during["read"].append(manager.poll_wake_before)
        return await next_due(states)

    monkeypatch.setattr(poller, "tick", watched_tick)
    monkeypatch.setattr(poller.store, "next_due", watched_read)
    poller_round = len(during["read"])
    manager.poll_wakeup.set()
    await eventually(lambda: len(during["read"]) > poller_round and 0 < manager.poll_wake_before
                     < float("inf"))
    assert set(during["tick"]) == {0.0} and set(during["read"]) == {float("inf")}

    rounds = len(during["read"])  # napping now, until 5 s from now at most
    await t.submit(agent, "checked in a minute")
    manager.poll_wake_before = 0.0  # as while it checks
    await t.submit(agent, "seen by the read after")
    await asyncio.sleep(0.3)
    assert len(during["read"]) == rounds
    manager.poll_wake_before = float("inf")  # as while it reads
    await t.submit(agent, "maybe missed by the read")
    await eventually(lambda: len(during["read"]) > rounds, timeout=2)


async def test_the_poller_lists_lettas_active_runs_only_when_that_costs_fewer_calls(tmp_path):
    """A listing of Letta's active runs is a call per 1,000 of them: for no more due runs
    than the calls the last listing took, asking for each run is cheaper."""
    from types import SimpleNamespace

    from tests.conftest import make_config
    from tracker.poller import Poller
    from tracker.store import RunRecord

    class Letta:
        listings = 0
        active = {f"run-{i}" for i in range(5_500)}  # six calls to list

        async def active_run_ids(self):
            self.listings += 1
            return self.active

    class Store:
        async def reschedule(self, checks, seen=None):
            pass

    letta = Letta()
    poller = Poller(make_config(tmp_path), SimpleNamespace(store=Store()), letta)

    def due(n: int) -> list[RunRecord]:  # all still running at Letta
        return [RunRecord(seq=i, id=f"t-{i}", user_id="u", agent_id="a", kind="message",
                          state=State.SUBMITTED, status="running", created_at="",
                          letta_run_id=f"run-{i}") for i in range(n)]

    assert await poller._triage(due(4)) == ([], {})  # its size unknown yet: listed
    assert letta.listings == 1
    finished, _ = await poller._triage(due(6))  # 6 calls, each, against 6 to list
    assert len(finished) == 6 and letta.listings == 1
    assert await poller._triage(due(7)) == ([], {})
    assert letta.listings == 2


def failing_once(fn, error: Exception):
    """``fn`` (a coroutine function), raising ``error`` on its first call."""
    calls = []

    async def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise error
        return await fn(*args, **kwargs)

    flaky.calls = calls
    return flaky


@pytest.mark.parametrize("loop", ["dispatcher", "poller"])
async def test_a_failed_read_of_the_next_due_run_does_not_end_the_loop(start_tracker, sim,
                                                                       agent, loop):
    """The loops read the next due run outside their turn's try: one read failing (the
    database locked, out of file handles) ended the task for good, silently, and /healthz
    still said ok: the messages queued behind a busy lane stayed queued, the runs whose
    callback was lost stayed unfinished."""
    from tracker.errors import Unavailable

    t = await start_tracker()
    sim.set_faults(callback_drop=1.0 if loop == "poller" else 0.0)
    store = t.svc.store
    store.next_due = failing_once(store.next_due, Unavailable("database read failed"))
    getattr(t.svc.manager, "dispatch_wakeup" if loop == "dispatcher" else "poll_wakeup").set()
    await eventually(lambda: store.next_due.calls)  # the failed read came
    first = await t.submit(agent, "first")
    behind = await t.submit(agent, "behind it")  # sent by the dispatcher's loop
    for run in (first, behind):
        assert (await t.wait_state(run["id"], "done"))["status"] == "completed"
    task = next(x for x in asyncio.all_tasks() if x.get_name() == f"tracker-{loop}")
    assert not task.done()


async def test_a_loop_ended_by_an_error_is_restarted_and_healthz_says_so_meanwhile(
        start_tracker, sim, agent, monkeypatch, caplog):
    """A background loop ended by an error none of its handlers caught ended silently (its
    error retrieved by nobody), and the service answered ok with nothing applied. It is
    logged, /healthz is degraded naming it, and it starts again."""
    from tracker import app as app_module

    monkeypatch.setattr(app_module, "RESTART_PAUSE_S", 1.0)
    t = await start_tracker()
    store = t.svc.store
    store.inbox = failing_once(store.inbox, RuntimeError("a bug"))
    t.svc.applier.wakeup.set()
    await eventually(lambda: t.svc.stopped)
    resp = await t.client.get("/healthz")
    assert resp.status == 503 and (await resp.json())["stopped"] == ["callback-applier"]
    assert "callback-applier stopped by an error" in caplog.text
    run = await t.submit(agent, "applied once the applier is back")
    assert (await t.wait_state(run["id"], "done"))["tracker"]["completed_via"] == "callback"
    assert (await t.client.get("/healthz")).status == 200


async def test_healthz_sees_the_database_take_writes_again_on_an_idle_service(start_tracker,
                                                                              monkeypatch):
    """A failed write (a full disk, a lock held past the busy timeout) marked the store
    unwritable until a write succeeded: an idle service writes nothing, so /healthz said 503
    for good, and a balancer that sends traffic only to a healthy service never sent any."""
    from tracker import sqlite_db

    monkeypatch.setattr(sqlite_db, "WRITE_RETEST_S", 0.0)
    t = await start_tracker()
    store = t.svc.store
    store._db.execute("PRAGMA query_only = 1")  # writes fail, as on a full disk
    with pytest.raises(Unavailable):
        await store._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO settings (key, value) VALUES ('x', 'y')"))
    resp = await t.client.get("/healthz")
    assert resp.status == 503 and (await resp.json())["database"] is False
    store._db.execute("PRAGMA query_only = 0")
    assert (await t.client.get("/healthz")).status == 200


async def test_a_callback_that_fails_to_apply_leaves_its_run_to_polling_and_stops_no_other(
        start_tracker, sim, agent, caplog):
    """An error the applier did not expect, on one callback, left that callback first in the
    inbox: every round failed on it again, and no later callback was applied. It is dropped
    as a missed callback is, and its run polled."""
    t = await start_tracker()
    manager = t.svc.manager
    real, failed = manager.apply_remote, []

    async def failing_for_the_first(run, obs, source):
        if source == "callback" and run.id in (failed or [run.id]):
            failed.append(run.id)  # every time: a bug on that body, say
            raise TypeError("unsupported operand type(s)")
        return await real(run, obs, source)

    manager.apply_remote = failing_for_the_first
    first = await t.submit(agent, "first")
    done = await t.wait_state(first["id"], "done")
    assert set(failed) == {first["id"]} and done["tracker"]["completed_via"] == "poll"
    second = await t.submit(agent, "second")
    done = await t.wait_state(second["id"], "done")
    assert done["tracker"]["completed_via"] == "callback"
    assert "could not be applied: its run is polled instead" in caplog.text
    assert not t.svc.stopped


async def test_a_failed_start_up_reconcile_is_logged_and_the_service_goes_on(
        start_tracker, sim, agent, monkeypatch, caplog):
    """Start-up's reconcile failing (the database busy, a bug) was swallowed without a word:
    the runs it would have settled waited for their next poll, and nothing said why."""
    from tracker import app as app_module

    async def failing(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module, "reconcile", failing)
    t = await start_tracker()
    assert "reconcile after start failed" in caplog.text and "a bug" in caplog.text
    run = await t.submit(agent, "sent all the same")
    assert (await t.wait_state(run["id"], "done"))["status"] == "completed"


async def test_a_restored_backup_sends_no_queued_run_a_second_time(start_tracker, sim, agent,
                                                                   tmp_path):
    """The live service goes on sending the runs a backup holds as queued: restored, it sent
    every one of them again. The backup marks them to be looked for at Letta first."""
    import argparse
    import shutil

    from tracker.cli_ops import backup

    t = await start_tracker()
    runs = [await t.submit(agent, f"[[delay=0.3]] message {i}") for i in range(4)]
    assert [r["tracker"]["state"] for r in runs[1:]] == ["queued"] * 3  # one at a time
    copy = tmp_path / "backup.db"
    assert await backup(t.svc.store, argparse.Namespace(path=str(copy), force=False)) == 0
    for run in runs:
        await t.wait_state(run["id"], "done")
    await t.client.close()
    live = tmp_path / "tracker.db"
    for leftover in (tmp_path / "tracker.db-wal", tmp_path / "tracker.db-shm"):
        leftover.unlink(missing_ok=True)
    shutil.copy(copy, live)  # the README's restore
    t2 = await start_tracker()
    for run in runs:
        assert (await t2.wait_state(run["id"], "done"))["status"] == "completed"
    assert len(sim.received) == 4 and max(sim.otid_counts().values()) == 1
