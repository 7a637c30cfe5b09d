"""Retention: only finished runs older than the cutoff go, with their rows; the rest stay."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from tests.conftest import eventually
from tracker import clock
from tracker.config import RetentionConfig
from tracker.errors import Unavailable
from tracker.retention import DAY, Retention, cutoff, parse_age
from tracker.states import State
from tracker.store import Event, NewRun

A1 = "agent-11111111-1111-4111-8111-111111111111"


async def add_run(store, monkeypatch, age_days: float, state: State) -> str:
    """A run created ``age_days`` ago, taken to ``state`` the way the service would, with
    events, and for a finished run a relay delivery and one attempt."""
    created = clock.now() - age_days * DAY
    with monkeypatch.context() as m:
        m.setattr(clock, "now", lambda: created)
        run, _ = await store.submit(NewRun(
            id=f"run-{uuid.uuid4()}", user_id="user-1", agent_id=A1, kind="message",
            request={"messages": []}, request_config={}, callback_url="https://example.com/h"),
            Event("api", "submit"))
    if state is State.QUEUED:
        return run.id
    await store.transition(run.id, State.SUBMITTING, (State.QUEUED,), {}, None)
    await store.transition(run.id, State.SUBMITTED, (State.SUBMITTING,),
                           {"letta_run_id": f"run-{uuid.uuid4()}"}, Event("dispatch", "sent"))
    if state is State.DONE:
        await store.transition(run.id, State.DONE, (State.SUBMITTED,), {"status": "completed"},
                               Event("callback", "completed"), relay=True)
        [delivery] = await store.deliveries(run.id)
        await store.record_attempt(delivery.id, {"at": clock.iso(), "status_code": 200},
                                   "delivered", None)
    return run.id


def retention(store, keep_days: float | None = 30, interval_s: float = 3600,
              batch_size: int = 500) -> Retention:
    cfg = RetentionConfig(keep_days=keep_days, interval_s=interval_s, batch_size=batch_size)
    return Retention(cfg, store)


# --- ages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("30d", 30 * DAY), ("12h", 43_200), ("90m", 5_400), ("45s", 45), ("1.5h", 5_400),
    (" 7D ", 7 * DAY),
])
def test_parse_age(text, seconds):
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "-1d", "0s", "30x", "1d2h", "thirty days"])
def test_parse_age_refuses_anything_else(text):
    with pytest.raises(ValueError, match="invalid age"):
        parse_age(text)


def test_cutoff_is_a_stored_timestamp_that_long_ago():
    assert abs(clock.epoch(cutoff(3600)) - (clock.now() - 3600)) < 1


# --- pruning -------------------------------------------------------------------------------

async def test_prune_removes_only_finished_runs_older_than_keep_days(store, monkeypatch):
    old_done = await add_run(store, monkeypatch, 40, State.DONE)
    old_queued = await add_run(store, monkeypatch, 40, State.QUEUED)
    old_watched = await add_run(store, monkeypatch, 40, State.SUBMITTED)
    recent_done = await add_run(store, monkeypatch, 10, State.DONE)
    before = await store.table_counts()

    removed = await retention(store, keep_days=30).prune_once()

    assert removed == {"runs": 1, "run_events": 3, "deliveries": 1, "delivery_attempts": 1}
    assert await store.get_run(old_done) is None and await store.events(old_done) == []
    for kept in (old_queued, old_watched, recent_done):
        assert await store.get_run(kept) is not None
    assert len(await store.deliveries(recent_done)) == 1
    after = await store.table_counts()
    assert {t: before[t] - after[t] for t in removed} == removed
    assert before["run_payloads"] - after["run_payloads"] == 1  # the request and result too


async def test_without_keep_days_nothing_is_pruned_and_run_returns(store, monkeypatch):
    old_done = await add_run(store, monkeypatch, 400, State.DONE)
    r = retention(store, keep_days=None)
    await asyncio.wait_for(r.run(), 1)
    assert await r.prune_once() == {}
    assert await store.get_run(old_done) is not None


async def test_background_loop_prunes_every_interval_until_stopped(store, monkeypatch):
    r = retention(store, keep_days=1, interval_s=0.05)
    first = await add_run(store, monkeypatch, 2, State.DONE)
    task = asyncio.create_task(r.run())
    await eventually(lambda: _gone(store, first))
    # finished only once it is in place: the loop, every 50 ms, would prune a finished run
    # between add_run's steps (its delivery read then found none)
    later = await add_run(store, monkeypatch, 2, State.SUBMITTED)
    await store.transition(later, State.DONE, (State.SUBMITTED,), {"status": "completed"}, None)
    await eventually(lambda: _gone(store, later))
    r.stop()
    await asyncio.wait_for(task, 1)


async def _gone(store, run_id: str) -> bool:
    return await store.get_run(run_id) is None


async def test_a_long_prune_lets_other_writes_through(store, monkeypatch):
    for _ in range(60):
        await add_run(store, monkeypatch, 40, State.DONE)
    r = retention(store, keep_days=30, batch_size=2)
    pruning = asyncio.create_task(r.prune_once())
    await asyncio.sleep(0)  # the prune holds the writer for its first batch
    fresh = await add_run(store, monkeypatch, 0, State.QUEUED)
    # the new run went in between two batches, not after the whole prune
    assert not pruning.done()
    assert (await pruning)["runs"] == 60
    assert await store.get_run(fresh) is not None


async def test_a_failed_pass_is_logged_and_retried(caplog):
    class Busy:
        calls = 0

        async def prune(self, before, batch, dry_run=False):
            Busy.calls += 1
            if Busy.calls == 1:
                raise Unavailable("database write failed: database is locked")
            return {"runs": 0}

    r = retention(Busy(), keep_days=30, interval_s=0.01)
    with caplog.at_level(logging.WARNING, "tracker.retention"):
        task = asyncio.create_task(r.run())
        await eventually(lambda: Busy.calls >= 2)
        r.stop()
        await asyncio.wait_for(task, 1)
    assert "prune failed" in caplog.text and "database is locked" in caplog.text
