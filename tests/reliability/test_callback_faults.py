"""Callbacks: whatever happens to Letta's callbacks on the wire, final states are Letta's; forged
ones change nothing and get the right status code.

The disturbances are real network ones: the tracker's public URL points at a proxy that drops,
duplicates, delays past the grace period and reorders Letta's callbacks (``CallbackChaos``), and
Letta's base URL at one that holds Letta's answer to a submit (``LettaProxy``).
"""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest

from tests.reliability.proxies import CallbackChaos, LettaProxy
from tracker.callbacks import CallbackSigner
from tracker.sim_shapes import callback_json, utcnow

pytestmark = pytest.mark.slow


def base(server) -> str:
    return str(server.make_url("")).rstrip("/")


async def letta_view(sim, letta_run_id: str) -> tuple[list, dict]:
    """The run's messages and usage as Letta itself serves them."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sim.url}/v1/runs/{letta_run_id}/messages?limit=1000") as r:
            messages = await r.json()
        async with s.get(f"{sim.url}/v1/runs/{letta_run_id}/usage") as r:
            usage = await r.json()
    return messages, usage


async def assert_matches_letta(t, sim, run_id: str) -> dict:
    """The tracker's record of the run is Letta's: status, stop reason, messages, usage."""
    run = await t.run(run_id)
    letta = sim.store.get(run["tracker"]["letta_run_id"])
    assert letta is not None, run
    assert run["tracker"]["state"] == "done", run
    assert (run["status"], run["stop_reason"]) == (letta.status, letta.stop_reason), run
    messages, usage = await letta_view(sim, letta.id)
    assert await (await t.get(f"/v1/runs/{run_id}/messages", limit=1000)).json() == messages
    mine = await (await t.get(f"/v1/runs/{run_id}/usage")).json()
    assert {k: mine[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
        k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}, run_id
    return run


async def events(t, run_id: str) -> list[dict]:
    return await (await t.get(f"/v1/runs/{run_id}/events")).json()


async def test_dropped_duplicated_late_and_reordered_callbacks(start_tracker, sim,
                                                               aiohttp_server):
    chaos = CallbackChaos(seed=11)
    proxy = await aiohttp_server(chaos.app())
    t = await start_tracker(server={"public_url": base(proxy)})
    chaos.target = str(t.client.make_url("")).rstrip("/")
    sim.set_faults(fail_rate=0.25)
    agents = [sim.create_agent(f"chaos-{i}")["id"] for i in range(6)]

    async def lane(agent: str) -> list[str]:
        return [(await t.submit(agent, f"{agent[-4:]}-{i}"))["id"] for i in range(8)]

    run_ids = [r for ids in await asyncio.gather(*map(lane, agents)) for r in ids]
    for run_id in run_ids:
        await t.wait_state(run_id, "done", timeout=30)
    await chaos.settle()  # late and held callbacks have all been passed on by now
    # every kind of disturbance really happened
    assert set(chaos.log.actions.values()) == set(CallbackChaos.ACTIONS), chaos.log.actions
    assert len(sim.received) == len(run_ids) and max(sim.otid_counts().values()) == 1
    via = {}
    for run_id in run_ids:
        run = await assert_matches_letta(t, sim, run_id)
        via[run["tracker"]["completed_via"]] = via.get(run["tracker"]["completed_via"], 0) + 1
        token = t.svc.signer.token(run_id)
        answers = chaos.log.answers.get(token, [])
        # a genuine callback is always accepted, however late, repeated or out of order...
        assert set(answers) <= {200}, (run_id, answers)
        # ... and each one is on the run's timeline: none lost, none invented
        from_callbacks = [e for e in await events(t, run_id) if e["source"] == "callback"]
        assert len(from_callbacks) == len(answers), (run_id, chaos.log.actions.get(token),
                                                     from_callbacks)
    assert via.get("callback") and via.get("poll"), via


async def test_callback_before_the_submit_response(start_tracker, sim, agent, aiohttp_server):
    letta = LettaProxy(sim.url)
    letta.hold_submit_s = 0.5  # Letta's answer reaches the tracker after the run's callback
    proxy = await aiohttp_server(letta.app())
    t = await start_tracker(letta={"base_url": base(proxy)})
    sim.set_faults(run_duration_s=(0.0, 0.0), callback_lag_s=0.0, fail_rate=0.3)
    run_ids = [(await t.submit(agent, f"fast-{i}"))["id"] for i in range(4)]
    for run_id in run_ids:
        run = await t.wait_state(run_id, "done", timeout=10)
        await assert_matches_letta(t, sim, run_id)
        assert run["tracker"]["completed_via"] == "callback"
        assert run["tracker"]["submitted_at"], run
        kinds = [e["kind"] for e in await events(t, run_id)]
        # the callback came first, and Letta's late answer did not undo it
        assert kinds.index("completed") < kinds.index("submitted"), kinds
    assert [r.run_id for r in sim.received] == [
        (await t.run(r))["tracker"]["letta_run_id"] for r in run_ids]
    assert max(sim.otid_counts().values()) == 1


def letta_body(sim, letta_run_id: str, status: str = "failed") -> dict:
    """A callback body in Letta's exact shape, for a run of the simulator."""
    stop = "error" if status == "failed" else "end_turn"
    return callback_json(sim.store.get(letta_run_id), status, stop, utcnow())


async def test_forged_callbacks_change_nothing(start_tracker, sim, agent, aiohttp_server):
    # no poll of the running run while it is forged at: a poll counts itself in the run's
    # poll_count, and on a slow machine the forgeries outlast the tests' 0.3 s grace
    t = await start_tracker(polling={"grace_s": 60})
    other_agent = sim.create_agent("other")["id"]
    a = await t.wait_state((await t.submit(agent, "a"))["id"], "done")
    b = await t.wait_state((await t.submit(other_agent, "b"))["id"], "done")
    c = await t.submit(agent, "[[delay=2]] still running")  # not terminal while forged at
    signer: CallbackSigner = t.svc.signer
    a_letta, c_letta = a["tracker"]["letta_run_id"], c["tracker"]["letta_run_id"]
    assert c_letta and c["tracker"]["state"] == "submitted"
    stranger = f"run-{uuid.uuid4()}"
    forged_signer = CallbackSigner("not-the-secret", "http://x")
    cases = [
        # (why, token, body, status)
        ("no MAC", c["id"], letta_body(sim, c_letta), 404),
        ("not a run token", "nonsense", letta_body(sim, c_letta), 404),
        ("wrong MAC", signer.token(c["id"])[:-4] + "AAAA", letta_body(sim, c_letta), 401),
        ("another server's secret", forged_signer.token(c["id"]), letta_body(sim, c_letta), 401),
        ("MAC of another run", f"{c['id']}.{signer.token(a['id']).rsplit('.', 1)[1]}",
         letta_body(sim, c_letta), 401),
        ("valid token of no run", signer.token(stranger), letta_body(sim, c_letta), 404),
        ("token of another run", signer.token(b["id"]), letta_body(sim, c_letta), 409),
        ("token of another run, body of a done run", signer.token(c["id"]),
         letta_body(sim, a_letta, "completed"), 409),
        ("body naming another run", signer.token(a["id"]),
         letta_body(sim, b["tracker"]["letta_run_id"]), 409),
        ("body naming a run Letta never had", signer.token(c["id"]),
         dict(letta_body(sim, c_letta), run_id=f"run-{uuid.uuid4()}"), 409),
    ]
    before = {r: (await t.run(r), await events(t, r)) for r in (a["id"], b["id"], c["id"])}
    for why, token, body, status in cases:
        resp = await t.client.post(f"/callbacks/letta/{token}", json=body)
        assert resp.status == status, (why, await resp.text())
        assert "detail" in await resp.json(), why
    # nothing changed, not even a timeline entry
    for run_id, (run, timeline) in before.items():
        assert await t.run(run_id) == run
        assert await events(t, run_id) == timeline
    # a valid callback replayed after the terminal state: accepted (Letta must not see an
    # error), recorded as ignored, and the outcome stays Letta's
    for run, status in ((a, "failed"), (a, "completed"), (b, "cancelled")):
        replay = letta_body(sim, run["tracker"]["letta_run_id"], status)
        resp = await t.client.post(f"/callbacks/letta/{signer.token(run['id'])}", json=replay)
        assert resp.status == 200, await resp.text()
        await t.callbacks_applied()
        after = await t.run(run["id"])
        assert {k: after[k] for k in ("status", "stop_reason", "completed_at")} == {
            k: run[k] for k in ("status", "stop_reason", "completed_at")}
        assert after["tracker"]["state"] == "done"
    kinds = [e["kind"] for e in await events(t, a["id"])]
    assert kinds[-2:] == ["ignored", "confirmed"], kinds
    # the running run, forged at ten times, still ends with Letta's own outcome
    await t.wait_state(c["id"], "done", timeout=10)
    await assert_matches_letta(t, sim, c["id"])
    assert (await t.run(c["id"]))["status"] == "completed"


async def test_body_naming_another_run_before_letta_answered(start_tracker, sim, agent,
                                                              aiohttp_server):
    """While the tracker does not know its Letta run id yet (submit answer in flight), a
    callback on its valid token naming some other Letta run must not be taken as its own."""
    letta = LettaProxy(sim.url)
    proxy = await aiohttp_server(letta.app())
    t = await start_tracker(letta={"base_url": base(proxy)})
    done = await t.wait_state((await t.submit(agent, "earlier"))["id"], "done")
    other = sim.create_agent("other")["id"]
    other_run = await t.wait_state((await t.submit(other, "elsewhere"))["id"], "done")
    sim.set_faults(callback_drop=1.0)  # the genuine callback never comes: only polls decide
    forged: dict[str, int] = {}

    async def forge(answer: bytes) -> None:
        # Letta has answered the submit; the tracker has not heard it yet
        own = json.loads(answer)["id"]
        [run] = [r for r in await (await t.get("/v1/runs", state="submitting")).json()]
        token = t.svc.signer.token(run["id"])
        for why, letta_id in (("a finished run of the same agent", done["tracker"]["letta_run_id"]),
                              ("a run of another agent", other_run["tracker"]["letta_run_id"])):
            body = dict(letta_body(sim, own, "failed"), run_id=letta_id)
            forged[why] = (await t.client.post(f"/callbacks/letta/{token}", json=body)).status
        body = dict(letta_body(sim, own, "failed"), run_id=f"run-{uuid.uuid4()}")
        forged["a run Letta never had"] = (
            await t.client.post(f"/callbacks/letta/{token}", json=body)).status

    letta.on_submit_answered = forge
    run = await t.submit(agent, "[[delay=0.3]] mine")
    letta.on_submit_answered = None
    final = await t.wait_state(run["id"], "done", timeout=10)
    assert forged == {"a finished run of the same agent": 409, "a run of another agent": 409,
                      "a run Letta never had": 409}, forged
    [received] = [r for r in sim.received if r.body["messages"][0]["content"].endswith("mine")]
    assert final["tracker"]["letta_run_id"] == received.run_id
    assert final["status"] == "completed", final
    for r in (done, other_run):
        assert await t.run(r["id"]) == r
