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


async def add_run(store, monkeypatch, age_days: float, state: State,
                  finished_days: float | None = None, webhook: str = "delivered") -> str:
    """A run created ``age_days`` ago, taken to ``state`` the way the service would, with
    events, and for a finished run (``finished_days`` ago, by default as it was created) a
    relay delivery and one attempt, which left the delivery ``webhook``."""
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
        finished = clock.iso(clock.now() - (age_days if finished_days is None
                                            else finished_days) * DAY)
        await store.transition(run.id, State.DONE, (State.SUBMITTED,),
                               {"status": "completed", "recorded_at": finished},
                               Event("callback", "completed"), relay=True)
        [delivery] = await store.deliveries(run.id)
        await webhook_attempt(store, delivery.id, webhook)
    return run.id


async def webhook_attempt(store, delivery_id: str, state: str) -> None:
    """An attempt that left the delivery ``state``: answered, or, with the user's endpoint
    down, to be retried in 10 h (pending) or given up (failed)."""
    code = 200 if state == "delivered" else 503
    retry_at = clock.now() + 36_000 if state == "pending" else None
    await store.record_attempt(delivery_id, {"at": clock.iso(), "status_code": code}, state,
                               retry_at)


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

    assert removed == {"runs": 1, "run_payloads": 1, "run_events": 3, "deliveries": 1,
                       "delivery_attempts": 1}
    assert await store.get_run(old_done) is None and await store.events(old_done) == []
    for kept in (old_queued, old_watched, recent_done):
        assert await store.get_run(kept) is not None
    assert len(await store.deliveries(recent_done)) == 1
    after = await store.table_counts()
    assert {t: before[t] - after[t] for t in removed} == removed  # the payloads' too


async def test_a_run_is_kept_keep_days_after_it_finished_however_long_it_waited(store,
                                                                               monkeypatch):
    """Pruned by creation time, a run that sat queued or stuck past keep_days went, result
    and outbox, at the first pass after it finished."""
    finished_long_ago = await add_run(store, monkeypatch, 40, State.DONE, finished_days=31)
    finished_lately = await add_run(store, monkeypatch, 40, State.DONE, finished_days=1 / 24)

    dry = await store.prune(cutoff(30 * DAY), 500, dry_run=True)
    removed = await retention(store, keep_days=30).prune_once()

    assert removed == dry == {"runs": 1, "run_payloads": 1, "run_events": 3, "deliveries": 1,
                              "delivery_attempts": 1}
    assert await store.get_run(finished_long_ago) is None
    assert await store.get_run(finished_lately) is not None
    assert len(await store.deliveries(finished_lately)) == 1


async def test_a_run_whose_webhook_awaits_a_retry_is_kept_until_its_delivery_ends(store,
                                                                                 monkeypatch):
    """The retry schedule spans ~27 h: with keep_days = 1, a run whose user's endpoint is
    down went with its delivery, and its last retries with them."""
    run_id = await add_run(store, monkeypatch, 2, State.DONE, webhook="pending")
    r = retention(store, keep_days=1)

    assert (await store.prune(cutoff(DAY), 500, dry_run=True))["runs"] == 0
    assert (await r.prune_once())["runs"] == 0
    [delivery] = await store.deliveries(run_id)
    assert delivery.state == "pending" and len(delivery.attempt_log) == 1

    await webhook_attempt(store, delivery.id, "failed")  # the schedule's last attempt
    assert (await r.prune_once())["runs"] == 1
    assert await store.get_run(run_id) is None


async def test_an_observation_of_a_run_pruned_meanwhile_writes_no_event(store, monkeypatch):
    """A duplicate callback read the run, prune deleted it, then its 'confirmed' event was
    appended: an event row whose run is gone, never pruned again."""
    run_id = await add_run(store, monkeypatch, 40, State.DONE)
    assert (await retention(store, keep_days=30).prune_once())["runs"] == 1
    before = await store.table_counts()

    await store.add_event(run_id, Event("callback", "confirmed", {"status": "completed"}))

    assert await store.events(run_id) == []
    assert (await store.table_counts())["run_events"] == before["run_events"]


async def test_prune_seeks_the_finish_time_index_batch_after_batch(store, monkeypatch):
    """A history of a million runs: every batch's selection is a seek into runs_recorded,
    never a scan of runs, and each starts past the runs kept before it."""
    waiting = [await add_run(store, monkeypatch, 40, State.DONE, finished_days=35,
                             webhook="pending") for _ in range(3)]
    for _ in range(5):
        await add_run(store, monkeypatch, 40, State.DONE, finished_days=32)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    try:
        removed = await retention(store, keep_days=30, batch_size=2).prune_once()
    finally:
        store._db.set_trace_callback(None)

    assert removed["runs"] == 5
    assert all([await store.get_run(r) for r in waiting])
    plans = {sql: " | ".join(row[3] for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}"))
             for sql in statements if sql.startswith(("SELECT", "DELETE"))}
    # the counts left at zero are found by a scan, once a prune: their table has a row a
    # user, agent, state and outcome, not a run
    assert [p for p in plans.values() if "SCAN" in p] == ["SCAN run_counts"], plans
    # the batches' selections (the others count the payloads going with them)
    selections = {sql: p for sql, p in plans.items() if sql.startswith("SELECT recorded_at")}
    assert len(selections) == 4, plans  # 2 + 2 + 1 runs, then none
    assert all(p.startswith("SEARCH runs USING INDEX runs_recorded")
               for p in selections.values()), plans
    # only the first starts at the beginning (the waiting runs); the rest past the last deleted
    assert [sql.endswith("> ('', 0) ORDER BY recorded_at, seq LIMIT 2")
            for sql in selections] == [True, False, False, False], selections


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
    await store.transition(later, State.DONE, (State.SUBMITTED,), {
        "status": "completed", "recorded_at": cutoff(2 * DAY)}, None)
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
