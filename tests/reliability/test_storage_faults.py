"""Storage faults: while the database refuses writes (read-only file, full disk) requests get a
503 and nothing half-done is left; once the fault is gone the service recovers by itself.

The faults are SQLite's own, raised on the tracker's writer connection: ``query_only`` makes
every write fail with SQLITE_READONLY ("attempt to write a readonly database"), and
``max_page_count`` at the current size makes any growth fail with SQLITE_FULL ("database or disk
is full"). (File permissions cannot model this here: the suite may run as root.)
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import eventually

pytestmark = pytest.mark.slow


class Fault:
    """A write fault on the running tracker's database, switched on and off."""

    def __init__(self, t, kind: str) -> None:
        self.t = t
        self.kind = kind

    @property
    def db(self):
        return self.t.svc.store._db  # the writer (used by the loop, between transactions)

    async def on(self) -> None:
        if self.kind == "read-only":
            self.db.execute("PRAGMA query_only = 1")
        else:
            [(pages,)] = self.db.execute("PRAGMA page_count").fetchall()
            self.db.execute(f"PRAGMA max_page_count = {pages}")

    async def off(self) -> None:
        self.db.execute("PRAGMA query_only = 0")
        self.db.execute("PRAGMA max_page_count = 1073741823")


async def snapshot(t) -> dict:
    """Row counts, and whatever a half-done write could leave behind."""
    store = t.svc.store
    orphans = await store._read(
        "SELECT (SELECT count(*) FROM run_events WHERE run_id NOT IN (SELECT id FROM runs)),"
        " (SELECT count(*) FROM deliveries WHERE run_id NOT IN (SELECT id FROM runs))")
    return {**await store.table_counts(), "orphans": tuple(orphans[0])}


@pytest.mark.parametrize("kind", ["read-only", "disk-full"])
async def test_submit_during_a_write_fault_is_503_and_leaves_nothing(start_tracker, sim, agent,
                                                                     kind):
    t = await start_tracker()
    fault = Fault(t, kind)
    await t.wait_state((await t.submit(agent, "before"))["id"], "done")
    path = f"/v1/agents/{agent}/messages/async"
    body = {"messages": [{"role": "user", "content": "x" * 50_000, "otid": "fault-otid"}]}
    before, sent = await snapshot(t), len(sim.received)
    await fault.on()
    for _ in range(3):
        resp = await t.post(path, body, headers={"Idempotency-Key": "during-fault"})
        assert resp.status == 503, await resp.text()
        detail = (await resp.json())["detail"]
        assert isinstance(detail, str) and "database" in detail, detail
    # reads go on; health says writes fail
    assert (await t.get("/v1/runs")).status == 200
    health = await t.client.get("/healthz")
    assert health.status == 503 and (await health.json())["status"] == "degraded"
    assert await snapshot(t) == before and len(sim.received) == sent
    await fault.off()
    # the same request again (the client's retry) now goes through, once
    resp = await t.post(path, body, headers={"Idempotency-Key": "during-fault"})
    assert resp.status == 200, await resp.text()
    run = await t.wait_state((await resp.json())["id"], "done")
    assert run["status"] == "completed"
    assert sim.otid_counts()["fault-otid"] == 1
    assert (await snapshot(t))["orphans"] == (0, 0)
    assert (await t.client.get("/healthz")).status == 200


async def test_callbacks_and_cancels_during_a_write_fault(start_tracker, sim, agent):
    """Letta's callback refused with 503 is never sent again: the poller must still learn the
    outcome after the fault. A cancel refused with 503 changes nothing."""
    t = await start_tracker(polling={"grace_s": 0.3})
    other = sim.create_agent("other")["id"]
    fault = Fault(t, "read-only")
    finishing = await t.submit(agent, "[[delay=0.6]] ends during the fault")
    running = await t.submit(other, "[[delay=2]] still running after it")
    assert finishing["tracker"]["state"] == running["tracker"]["state"] == "submitted"
    before = await snapshot(t)
    await fault.on()
    resp = await t.post(f"/v1/agents/{other}/messages/cancel", {"run_ids": [running["id"]]})
    assert resp.status == 503, await resp.text()
    letta_run = sim.store.get(finishing["tracker"]["letta_run_id"])
    await eventually(lambda: letta_run.callback_status_code is not None, timeout=5)
    assert letta_run.callback_status_code == 503  # the tracker could not record it
    await asyncio.sleep(1.0)  # the poller meets the fault too
    assert await snapshot(t) == before
    await fault.off()
    done = await t.wait_state(finishing["id"], "done", timeout=10)
    assert done["tracker"]["completed_via"] == "poll" and done["status"] == "completed"
    # the refused cancel did nothing: the run ends as Letta ends it
    final = await t.wait_state(running["id"], "done", timeout=10)
    assert final["status"] == "completed"
    assert max(sim.otid_counts().values()) == 1
    assert (await snapshot(t))["orphans"] == (0, 0)


async def test_fault_between_letta_answer_and_our_write_heals_without_restart(
        start_tracker, sim, agent):
    """Letta has the run, the write recording it fails, and so does the callback: once the
    fault is gone the run must still be found and finished, and the agent's queue move on."""
    t = await start_tracker()
    fault = Fault(t, "read-only")
    letta = t.svc.letta
    send = letta.send_async

    async def fault_after_letta_answers(*args, **kwargs):
        answer = await send(*args, **kwargs)
        await fault.on()
        return answer

    letta.send_async = fault_after_letta_answers
    first = await t.submit(agent, "first")
    letta.send_async = send
    [received] = sim.received
    letta_run = sim.store.get(received.run_id)
    await eventually(lambda: letta_run.callback_status_code is not None, timeout=5)
    await fault.off()
    second = await t.submit(agent, "second")
    # no restart: the tracker must notice by itself (it may take a few of its own checks)
    done = await t.wait_state(first["id"], "done", timeout=25)
    assert done["tracker"]["letta_run_id"] == received.run_id
    assert done["status"] == letta_run.status
    await t.wait_state(second["id"], "done", timeout=10)
    assert len(sim.received) == 2 and max(sim.otid_counts().values()) == 1
