"""The storage contract, against real SQLite: CAS transitions, lanes, idempotency, history."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from contextlib import closing

import aiosqlite
import pytest

from tests.conftest import eventually, record_commits
from tracker import clock, sqlite_inbox
from tracker.errors import Conflict, Unavailable
from tracker.migrations import LATEST, MIGRATIONS
from tracker.serialize import dumps, run_out
from tracker.sqlite_batch import GATHER_ENOUGH
from tracker.states import WATCHED, State
from tracker.store import Event, NewRun, RunFilter, Verdict, open_store

A1 = "agent-11111111-1111-4111-8111-111111111111"
A2 = "agent-22222222-2222-4222-8222-222222222222"


def new_run(agent=A1, kind="message", user="user-1", key=None, digest="h"):
    return NewRun(id=f"run-{uuid.uuid4()}", user_id=user, agent_id=agent, kind=kind,
                  request={"messages": [{"role": "user", "content": "hi", "otid": "o1"}]},
                  request_config={}, callback_url=None, idempotency_key=key, request_hash=digest)


async def submit(store, **kw):
    run, created = await store.submit(new_run(**kw), Event("api", "submit"))
    assert created
    return run


async def test_new_database_is_at_latest_schema(store):
    assert await store.schema_version() == LATEST


@pytest.mark.parametrize("version", range(1, LATEST))
async def test_a_database_at_each_earlier_version_upgrades_with_its_rows(tmp_path, version):
    """Not only v1's: every migration's script runs on the rows of the version before (runs,
    payloads split out at v6, deliveries), and the counts' triggers and prune work after."""
    path = tmp_path / f"v{version}.db"
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:version]:
        db.executescript(script)
    cols = "id, user_id, agent_id, state, status, created_at, recorded_at, completed_via"
    vals = ("'run-old', 'u', ?, 'done', 'completed', '2026-01-01T00:00:00.000000Z',"
            " '2026-01-01T00:00:01.000000Z', 'poll'")
    if version < 6:
        db.execute(f"INSERT INTO runs ({cols}, request) VALUES ({vals}, '{{}}')", (A1,))
    else:
        db.execute(f"INSERT INTO runs ({cols}) VALUES ({vals})", (A1,))
        db.execute("INSERT INTO run_payloads (seq, request) SELECT seq, '{}' FROM runs")
    db.execute("INSERT INTO run_events (run_id, at, source, kind) VALUES ('run-old', 'x',"
               " 'api', 'submit')")
    if version >= 2:
        db.execute("INSERT INTO deliveries (id, run_id, user_id, url, created_at, state)"
                   " VALUES ('d1', 'run-old', 'u', 'http://x', 'x', 'done')")
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()
    s = open_store(f"sqlite:///{path}")
    await s.open()
    try:
        assert await s.schema_version() == LATEST
        run = await s.get_run("run-old", full=True)
        assert run is not None and run.request == {} and run.state is State.DONE
        assert run.agent_id == A1 and len(await s.events("run-old")) == 1
        await submit(s)
        # v3 backfilled the trigger-kept counts from the rows already there
        counts = sorted((c["state"], c["n"]) for c in (await s.stats(None))["counts"])
        assert counts == [("done", 1), ("queued", 1)]
        assert (await s.prune("9999", 10))["runs"] == 1
        assert sorted((c["state"], c["n"]) for c in (await s.stats(None))["counts"]) == [
            ("queued", 1)]
    finally:
        await s.close()


async def test_v5_runs_keep_their_request_and_result_in_the_v6_payload_table(tmp_path):
    """v6 rebuilds `runs` without its wide columns: rows, payloads, counts, indexes and the
    AUTOINCREMENT high-water mark all survive, and deleting a run deletes its payload."""
    path = tmp_path / "v5.db"
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:5]:
        db.executescript(script)
    db.executemany(
        "INSERT INTO runs (id, user_id, agent_id, state, status, request, created_at, messages,"
        " usage) VALUES (?, 'u', ?, 'done', 'completed', ?, ?, ?, ?)",
        [(f"run-{i}", A1, f'{{"n": {i}}}', f"2026-01-0{i}T00:00:00.000000Z", f"[{i}]",
          '{"total_tokens": 7}') for i in (1, 2, 3)])
    db.execute("DELETE FROM runs WHERE id = 'run-3'")  # its seq (3) is not to be reused
    db.execute("PRAGMA user_version = 5")
    db.commit()
    db.close()
    s = open_store(f"sqlite:///{path}")
    await s.open()
    try:
        run = await s.get_run("run-2", full=True)
        assert (run.seq, run.request, run.messages, run.usage) == (
            2, {"n": 2}, [2], {"total_tokens": 7})
        new = await submit(s)
        assert new.seq == 4
        assert (await s.get_run(new.id, full=True)).request == new.request
        counts = (await s.stats(None))["counts"]
        assert [(c["state"], c["n"]) for c in counts] == [("done", 2), ("queued", 1)]
        names = {r[0] for r in await s._read(
            "SELECT name FROM sqlite_master WHERE tbl_name = 'runs' AND type != 'table'"
            " AND name NOT LIKE 'sqlite_%'")}
        assert names == {"runs_created", "runs_agent", "runs_status", "runs_state", "runs_queue",
                         "runs_idempotency", "runs_user", "runs_via", "runs_letta_status",
                         "runs_missed", "runs_active", "runs_recorded", "runs_live",
                         "runs_count_insert", "runs_count_update", "runs_count_delete",
                         "runs_payload_delete"}
        await s._write(lambda db: db.execute("DELETE FROM runs WHERE id = 'run-1'"))
        assert [r[0] for r in await s._read("SELECT seq FROM run_payloads")] == [2, 4]
    finally:
        await s.close()


async def test_submit_records_run_and_event(store):
    run = await submit(store)
    assert run.state is State.QUEUED and run.status == "created"
    assert run.request["messages"][0]["otid"] == "o1"
    assert [e.kind for e in await store.events(run.id)] == ["submit"]


async def test_idempotency_key_returns_the_first_run(store):
    first = await submit(store, key="k1")
    again, created = await store.submit(new_run(key="k1"), Event("api", "submit"))
    assert not created and again.id == first.id
    # keys are per user
    other, created = await store.submit(new_run(key="k1", user="user-2"), Event("api", "s"))
    assert created and other.id != first.id


async def test_transition_is_compare_and_set(store):
    run = await submit(store)
    [claimed] = await store.claim(serial=True, now=clock.now())
    assert claimed.id == run.id and claimed.state is State.SUBMITTING
    moved = await store.transition(run.id, State.SUBMITTED, (State.SUBMITTING,),
                                   {"letta_run_id": "run-x"}, Event("dispatch", "submitted"))
    assert moved.state is State.SUBMITTED
    # a second observer racing the first finds the guard closed
    assert await store.transition(run.id, State.SUBMITTED, (State.SUBMITTING,), {},
                                  Event("dispatch", "submitted")) is None
    assert [e.kind for e in await store.events(run.id)] == ["submit", "submitted"]


async def test_serial_lanes_send_one_run_per_agent_in_order(store):
    a1 = [await submit(store, agent=A1) for _ in range(3)]
    a2 = await submit(store, agent=A2)
    claimed = await store.claim(serial=True, now=clock.now())
    assert sorted(r.id for r in claimed) == sorted([a1[0].id, a2.id])
    assert await store.claim(serial=True, now=clock.now()) == []
    await store.transition(a1[0].id, State.DONE, (State.SUBMITTING,), {}, None)
    [nxt] = await store.claim(serial=True, now=clock.now())
    assert nxt.id == a1[1].id


async def test_paused_lane_lets_only_the_answer_through_ahead_of_others(store):
    first = await submit(store)
    await store.claim(serial=True, now=clock.now())
    await store.transition(first.id, State.PAUSED, (State.SUBMITTING,), {}, None)
    waiting = await submit(store)
    assert await store.claim(serial=True, now=clock.now()) == []
    answer = await submit(store, kind="answer")
    [claimed] = await store.claim(serial=True, now=clock.now())
    assert claimed.id == answer.id
    assert (await store.get_run(waiting.id)).state is State.QUEUED


async def test_the_pause_holds_until_letta_has_taken_the_answer(store):
    """An answer whose send failed (a 429, a timeout: requeued) still goes ahead of the
    messages queued behind the pause: the pause ends when Letta has taken the answer, not when
    the answer is claimed, nor sent. Refused by Letta, the answer leaves the agent paused."""
    first = await submit(store)
    await store.claim(serial=True, now=clock.now())
    await store.transition(first.id, State.PAUSED, (State.SUBMITTING,), {}, None)
    waiting = await submit(store)
    answer = await submit(store, kind="answer")
    [claimed] = await store.claim(serial=True, now=clock.now())
    assert claimed.id == answer.id
    assert (await store.get_run(first.id)).state is State.PAUSED  # Letta has nothing yet
    await store.transition(answer.id, State.QUEUED, (State.SUBMITTING,), {}, None)
    [again] = await store.claim(serial=True, now=clock.now())
    assert again.id == answer.id  # not the message behind the pause
    await store.transition(answer.id, State.REJECTED, (State.SUBMITTING,), {}, None)
    assert (await store.get_run(first.id)).state is State.PAUSED
    assert await store.claim(serial=True, now=clock.now()) == []
    # a second answer: sent, but failed by Letta as answering other tool calls (checked only
    # once its run starts), it leaves the pause; a third, that Letta takes, ends it once its
    # run ends; the message goes next
    wrong = await submit(store, kind="answer")
    await store.claim(serial=True, now=clock.now())
    await store.transition(wrong.id, State.SUBMITTED, (State.SUBMITTING,),
                           {"letta_run_id": "run-letta-wrong"}, None)
    assert (await store.get_run(first.id)).state is State.PAUSED
    await store.transition(wrong.id, State.DONE, (State.SUBMITTED,), {
        "status": "failed", "metadata": {"error": "Invalid tool call IDs. Expected '['call-a"
                                         "']', but received '['call-b']'."}}, None)
    assert (await store.get_run(first.id)).state is State.PAUSED
    assert await store.claim(serial=True, now=clock.now()) == []
    retry = await submit(store, kind="answer")
    await store.claim(serial=True, now=clock.now())
    await store.transition(retry.id, State.SUBMITTED, (State.SUBMITTING,),
                           {"letta_run_id": "run-letta-answer"}, None)
    assert (await store.get_run(first.id)).state is State.PAUSED
    await store.transition(retry.id, State.DONE, (State.SUBMITTED,),
                           {"status": "completed"}, None)
    assert (await store.get_run(first.id)).state is State.DONE
    assert "answered" in [e.kind for e in await store.events(first.id)]
    [nxt] = await store.claim(serial=True, now=clock.now())
    assert nxt.id == waiting.id


async def test_an_answer_sent_inline_also_waits_for_letta_to_end_the_pause(store):
    first = await submit(store)
    await store.claim(serial=True, now=clock.now())
    await store.transition(first.id, State.PAUSED, (State.SUBMITTING,), {}, None)
    answer, _ = await store.submit(new_run(kind="answer"), Event("api", "submit"), claim=False)
    assert answer.state is State.SUBMITTING
    assert (await store.get_run(first.id)).state is State.PAUSED
    # a fast callback can record the answer's outcome before the submit records Letta's answer
    await store.transition(answer.id, State.DONE, (State.SUBMITTING, State.SUBMITTED), {}, None)
    assert (await store.get_run(first.id)).state is State.DONE


async def test_only_the_user_whose_run_paused_answers_ahead_of_the_queue(store):
    """Another user's approval would decide the pausing user's tool calls: it neither goes
    ahead of the pause (inserted, nor claimed later) nor ends it; the pausing user's does."""
    first = await submit(store, user="user-a")
    await store.claim(serial=True, now=clock.now())
    await store.transition(first.id, State.PAUSED, (State.SUBMITTING,), {}, None)
    assert await store.paused_by(A1) == {"user-a"}
    theirs, _ = await store.submit(new_run(kind="answer", user="user-b"), Event("api", "submit"),
                                   claim=False)
    assert theirs.state is State.QUEUED
    assert await store.claim(serial=True, now=clock.now()) == []
    own = await submit(store, kind="answer", user="user-a")
    [claimed] = await store.claim(serial=True, now=clock.now())
    assert claimed.id == own.id
    # were the other user's answer ever recorded taken, it still would not end the pause
    await store.transition(theirs.id, State.DONE, (State.QUEUED,), {"status": "completed"},
                           None)
    assert (await store.get_run(first.id)).state is State.PAUSED
    await store.transition(own.id, State.DONE, (State.SUBMITTING,), {"status": "completed"},
                           None)
    assert (await store.get_run(first.id)).state is State.DONE


async def test_with_parallel_dispatch_another_users_answer_waits_out_the_pause(store):
    """No lanes, but an answer by another user still never goes to a paused agent: neither
    claimed as it is inserted nor by the dispatcher's claim, until the pause ends."""
    first = await submit(store, user="user-a")
    await store.transition(first.id, State.PAUSED, (State.QUEUED,), {}, None)
    theirs, _ = await store.submit(new_run(kind="answer", user="user-b"), Event("api", "submit"),
                                   claim=True)
    assert theirs.state is State.QUEUED
    message, _ = await store.submit(new_run(user="user-b"), Event("api", "submit"), claim=True)
    assert message.state is State.SUBMITTING  # messages go as ever (Letta refuses them)
    assert await store.claim(serial=False, now=clock.now()) == []
    await store.transition(first.id, State.DONE, (State.PAUSED,), {}, None)
    [claimed] = await store.claim(serial=False, now=clock.now())
    assert claimed.id == theirs.id


async def test_a_later_write_to_a_finished_answer_ends_no_later_pause(store):
    """An answer ends the pause it answered once, as it ends: written again later (its send's
    late answer recorded against it), it ended the pause of a message sent after it."""
    first = await submit(store)
    await store.claim(serial=True, now=clock.now())
    await store.transition(first.id, State.PAUSED, (State.SUBMITTING,), {}, None)
    later = await submit(store)
    answer = await submit(store, kind="answer")
    await store.claim(serial=True, now=clock.now())
    # its callback, applied before the send's answer, ends it and the pause
    await store.transition(answer.id, State.DONE, (State.SUBMITTING,), {"status": "completed"},
                           None)
    assert (await store.get_run(first.id)).state is State.DONE
    [sent] = await store.claim(serial=True, now=clock.now())
    assert sent.id == later.id
    await store.transition(later.id, State.PAUSED, (State.SUBMITTING,), {}, None)
    # the send's answer, late, recorded against the finished answer
    assert await store.transition(answer.id, None, tuple(State),
                                  {"letta_run_id": "run-letta-answer"}, None) is not None
    assert (await store.get_run(later.id)).state is State.PAUSED


async def test_parallel_claims_everything_due(store):
    runs = [await submit(store) for _ in range(3)]
    claimed = await store.claim(serial=False, now=clock.now())
    assert [r.id for r in claimed] == [r.id for r in runs]


async def test_retry_time_holds_the_lane_head(store):
    run = await submit(store)
    await store.claim(serial=True, now=clock.now())
    await store.transition(run.id, State.QUEUED, (State.SUBMITTING,),
                           {"next_check_at": clock.now() + 60}, None)
    await submit(store)
    assert await store.claim(serial=True, now=clock.now()) == []
    assert [r.id for r in await store.claim(serial=True, now=clock.now() + 61)] == [run.id]


async def test_lookup_by_letta_id_and_user_scope(store):
    run = await submit(store)
    await store.transition(run.id, None, (State.QUEUED,), {"letta_run_id": "run-letta"}, None)
    assert (await store.get_run("run-letta")).id == run.id
    assert await store.get_run(run.id, user_id="someone-else") is None


async def test_list_pagination_is_stable_and_filters(store):
    runs = [await submit(store, agent=A1 if i % 2 else A2) for i in range(7)]
    page1 = await store.list_runs(RunFilter(limit=3))
    assert [r.id for r in page1] == [r.id for r in reversed(runs)][:3]
    await submit(store, agent=A2)  # a new run arrives between pages
    page2 = await store.list_runs(RunFilter(limit=3, after=page1[-1].id))
    assert [r.id for r in page2] == [r.id for r in reversed(runs)][3:6]
    by_agent = await store.list_runs(RunFilter(agent_id=A1))
    assert {r.agent_id for r in by_agent} == {A1} and len(by_agent) == 3
    asc = await store.list_runs(RunFilter(ascending=True, limit=2, after=runs[0].id))
    assert [r.id for r in asc] == [runs[1].id, runs[2].id]
    # cursors are positional in the order, as Letta's: after = the next page, either way
    desc_next = await store.list_runs(RunFilter(limit=2, after=runs[3].id))
    assert [r.id for r in desc_next] == [runs[2].id, runs[1].id]
    back = await store.list_runs(RunFilter(ascending=True, limit=2, before=runs[3].id))
    assert [r.id for r in back] == [runs[0].id, runs[1].id]


@pytest.mark.parametrize("flt", [
    RunFilter(agent_id=A1), RunFilter(statuses=["completed"]), RunFilter(states=["queued"]),
    RunFilter(user_id="u"), RunFilter(created_after="2026-01-01", created_before="2026-02-01"),
    RunFilter(agent_id=A1, before="run-x"), RunFilter(completed_via="poll"),
    RunFilter(callback_missed=True), RunFilter(agent_id=A1, statuses=["failed"]),
    RunFilter(active=True), RunFilter(),
])
async def test_every_history_filter_uses_an_index(store, flt):
    plan = " ".join(await store.explain(flt))
    assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
    assert "USE TEMP B-TREE FOR ORDER BY" not in plan, plan


async def test_watched_runs_come_due(store):
    run = await submit(store)
    await store.claim(serial=True, now=clock.now())
    await store.transition(run.id, State.SUBMITTED, (State.SUBMITTING,),
                           {"next_check_at": clock.now() + 5}, None)
    assert await store.due(WATCHED, clock.now(), 10) == []
    assert [r.id for r in await store.due(WATCHED, clock.now() + 6, 10)] == [run.id]


async def test_the_writer_keeps_statement_journals_in_memory_and_readers_do_not(store):
    """A run's insert journals ~15 pages, past what SQLite holds in memory before it spills
    to a temp file (two write() calls a page, ~40% of the insert's cost): the writer keeps
    them in memory. The readers' large sorts keep the temp files' bound on memory."""
    [(writer,)] = store._db.execute("PRAGMA temp_store").fetchall()
    [(reader,)] = await store._r.execute_fetchall("PRAGMA temp_store")
    assert (writer, reader) == (2, 0)  # MEMORY, DEFAULT (files)


async def test_write_failure_is_unavailable_and_leaves_nothing(tmp_path, store):
    await submit(store)
    store._db.execute("PRAGMA query_only = 1")
    with pytest.raises(Unavailable):
        await store.submit(new_run(), Event("api", "submit"))
    store._db.execute("PRAGMA query_only = 0")
    assert (await store.table_counts())["runs"] == 1
    await submit(store)  # recovers once the fault is gone


async def test_prune_removes_old_finished_runs_only(store):
    old = await submit(store)
    await store.transition(old.id, State.CANCELLED, (State.QUEUED,),
                           {"created_at": "2020-01-01T00:00:00.000000Z",
                            "recorded_at": "2020-01-01T00:00:00.000000Z"}, Event("api", "x"))
    live = await submit(store)
    dry = await store.prune("2021-01-01T00:00:00.000000Z", 10, dry_run=True)
    assert dry["runs"] == 1 and await store.get_run(old.id) is not None
    removed = await store.prune("2021-01-01T00:00:00.000000Z", 10)
    assert removed["runs"] == 1 and removed["run_events"] == 2
    assert await store.get_run(old.id) is None and await store.get_run(live.id) is not None
    # the counts left at zero go too (kept, agents made and dropped grew them for good)
    counts = await store._read("SELECT state, n FROM run_counts")
    assert [tuple(r) for r in counts] == [("queued", 1)]


async def test_backup_is_a_consistent_copy(tmp_path, store):
    run = await submit(store)
    await store.backup(str(tmp_path / "copy.db"))
    copy = open_store(f"sqlite:///{tmp_path / 'copy.db'}")
    await copy.open()
    try:
        assert (await copy.get_run(run.id)).id == run.id
    finally:
        await copy.close()


async def test_counts_kept_by_triggers_match_the_rows(store):
    runs = [await submit(store, agent=A1 if i % 2 else A2, user=f"u{i % 3}") for i in range(9)]
    await store.claim(serial=False, now=clock.now())
    for r in runs[:4]:
        await store.transition(r.id, State.DONE, (State.SUBMITTING,),
                               {"status": "completed", "completed_via": "poll",
                                "recorded_at": clock.iso()}, None)
    await store.transition(runs[4].id, State.REJECTED, (State.SUBMITTING,),
                           {"status": "failed", "recorded_at": clock.iso()}, None)
    # deletes the finished ones: counts follow deletes too
    assert (await store.prune("9999", 100))["runs"] == 5
    await submit(store)

    def grouped(rows):
        out = {}
        for r in rows:
            key = (r["agent_id"], r["status"], r["state"], r["completed_via"])
            out[key] = out.get(key, 0) + r["n"]
        return out

    truth = await store._read("SELECT agent_id, status, state, completed_via, count(*) AS n"
                              " FROM runs GROUP BY 1, 2, 3, 4")
    assert grouped((await store.stats(None))["counts"]) == grouped([dict(r) for r in truth])
    mine = await store._read("SELECT count(*) FROM runs WHERE user_id = 'u1'")
    assert sum(c["n"] for c in (await store.stats("u1"))["counts"]) == mine[0][0]


async def test_concurrent_transitions_share_commits_and_fail_alone(store):
    runs = [await submit(store) for _ in range(50)]
    await store.claim(serial=False, now=clock.now())
    await store.transition(runs[0].id, None, (State.SUBMITTING,),
                           {"letta_run_id": "run-taken"}, None)

    async def attach(i: int):
        # run 7 tries to take a Letta run id that belongs to run 0: only it must fail
        letta_id = "run-taken" if i == 7 else f"run-l{i}"
        return await store.transition(runs[i].id, State.SUBMITTED, (State.SUBMITTING,),
                                      {"letta_run_id": letta_id}, Event("dispatch", "sub"))

    results = await asyncio.gather(*(attach(i) for i in range(1, 50)), return_exceptions=True)
    failures = [r for r in results if isinstance(r, Exception)]
    assert len(failures) == 1 and isinstance(failures[0], Conflict)
    assert all(r.state is State.SUBMITTED for r in results if not isinstance(r, Exception))
    assert (await store.get_run(runs[7].id)).state is State.SUBMITTING
    events = await store._read("SELECT count(*) FROM run_events WHERE kind = 'sub'")
    assert events[0][0] == 48


async def test_writes_a_turn_of_the_loop_apart_share_one_commit(store):
    """Under load the next requests' writes are a turn or two of the event loop behind: the
    group commit waits for them while more keep coming, unless it has enough already; a
    write alone does not wait."""
    commits = record_commits(store)

    def sizes() -> list[int]:
        return [n for n, _ in commits]

    await asyncio.gather(*(submit_after(store, i) for i in range(3)))
    assert sizes() == [3]
    await submit(store)
    assert sizes() == [3, 1]
    # enough writes at once: they commit without waiting for the next turn's
    await asyncio.gather(*(submit_after(store, 0) for _ in range(GATHER_ENOUGH)),
                         submit_after(store, 1))
    assert sizes() == [3, 1, GATHER_ENOUGH, 1]


async def submit_after(store, turns: int):
    """A submit's write ``turns`` turns of the event loop from now (a later request's)."""
    for _ in range(turns):
        await asyncio.sleep(0)
    return await submit(store)


async def test_a_lone_write_commits_at_once_but_writes_coming_together_share_a_commit(store):
    """The only request in flight commits at once, with no turn of the loop waited. Writes
    that each look alone but come in one turn (a flood of callbacks: handlers that run one
    after the other) go through the drain but the first; and after a drain that several
    joined, so do the next, until one comes alone again."""
    commits = record_commits(store)
    store.alone = lambda: True

    def later():  # a write of a later turn of the loop (a lone request's next)
        return submit_after(store, 1)

    await later()
    await later()
    assert commits == [(1, False), (1, False)]
    commits.clear()
    await asyncio.gather(*(submit(store) for _ in range(5)))
    assert commits == [(1, False), (4, True)]
    commits.clear()
    await later()  # after a drain of four: not yet quiet
    await later()  # after a drain of one: quiet again
    assert commits == [(1, True), (1, False)]
    store.alone = lambda: False  # another request in flight, or background work
    await submit(store)
    assert commits[-1] == (1, True)


async def test_callback_inbox_files_only_callbacks_naming_the_runs_own_letta_run(store):
    run, early = await submit(store), await submit(store, agent=A2)
    await store.claim(serial=False, now=clock.now())
    await store.transition(run.id, State.SUBMITTED, (State.SUBMITTING,),
                           {"letta_run_id": "run-l1"}, None)
    # arriving together: one lookup, one insert, one commit for all of them
    verdicts = await asyncio.gather(
        store.accept_callback(run.id, "run-l1", b'{"n": 1}'),
        store.accept_callback(run.id, "run-other", b'{"n": 2}'),
        store.accept_callback(early.id, "run-l2", b'{"n": 3}'),  # its Letta id not stored yet
        store.accept_callback(early.id, "run-l2", b'{"n": 4}', verified=True),  # Letta vouched
        store.accept_callback(f"run-{uuid.uuid4()}", "run-l3", b'{"n": 5}'),
    )
    assert verdicts == [Verdict.ACCEPTED, Verdict.OTHER_RUN, Verdict.UNVERIFIED,
                        Verdict.ACCEPTED, Verdict.NO_RUN]
    filed = await store.inbox(10)
    assert [(i.run_id, i.body) for i in filed] == [(run.id, b'{"n": 1}'), (early.id, b'{"n": 4}')]
    assert await store.inbox_depth() == 2
    await store.forget_callbacks([filed[0].id])
    assert [i.id for i in await store.inbox(10)] == [filed[1].id]


async def test_live_runs_letta_ids_are_known_without_a_lookup_even_after_a_restart(
        store, tmp_path):
    """Filing checks a callback's Letta run against its run's; for live runs that comes from
    memory (kept from each committed change, loaded once after a start by the service as it
    starts), not from the runs table; before that load, from the runs table. A callback
    naming another Letta run is always checked against the runs table."""
    live, finished = await submit(store), await submit(store, agent=A2)
    await store.claim(serial=False, now=clock.now())
    for run, letta_id in ((live, "run-l1"), (finished, "run-l2")):
        await store.transition(run.id, State.SUBMITTED, (State.SUBMITTING,),
                               {"letta_run_id": letta_id}, None)
    await store.transition(finished.id, State.DONE, (State.SUBMITTED,), {}, None)
    looked_up: list[str] = []

    async def verdicts(s) -> list[str]:
        s._db.set_trace_callback(lambda sql: looked_up.append(sql) if "FROM runs" in sql
                                 else None)
        return [await s.accept_callback(live.id, "run-l1", b"{}")]

    assert await verdicts(store) == [Verdict.ACCEPTED] and not looked_up
    assert await store.accept_callback(live.id, "run-x", b"{}") == Verdict.OTHER_RUN
    assert len(looked_up) == 1
    looked_up.clear()
    # a finished run's is not kept: a late duplicate is checked against the database
    assert await store.accept_callback(finished.id, "run-l2", b"{}") == Verdict.ACCEPTED
    assert len(looked_up) == 1
    reopened = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    await reopened.open()
    try:
        looked_up.clear()
        assert await verdicts(reopened) == [Verdict.ACCEPTED]
        assert looked_up  # not loaded yet: filing does not wait for it
        await reopened.warm_up()
        looked_up.clear()
        assert await verdicts(reopened) == [Verdict.ACCEPTED]
        assert not looked_up
    finally:
        await reopened.close()


async def sent(store, n: int) -> list:
    """``n`` runs sent to Letta, each on an agent of its own; run i is Letta's ``run-l{i}``."""
    runs = [await submit(store, agent=f"agent-{i}") for i in range(n)]
    await store.claim(serial=False, now=clock.now())
    for i, run in enumerate(runs):
        await store.transition(run.id, State.SUBMITTED, (State.SUBMITTING,),
                               {"letta_run_id": f"run-l{i}"}, None)
    return runs


async def test_past_the_bound_of_letta_ids_in_memory_callbacks_are_checked_in_the_table(
        store, monkeypatch):
    """The pairs kept in memory are bounded (``LETTA_IDS_MAX``): a run past it still gets its
    callbacks checked, against the runs table; a finished run's pair makes room."""
    monkeypatch.setattr(sqlite_inbox, "LETTA_IDS_MAX", 1)
    first, second = await sent(store, 2)
    looked_up: list[str] = []
    store._db.set_trace_callback(lambda sql: looked_up.append(sql) if "FROM runs" in sql
                                 else None)
    assert await store.accept_callback(first.id, "run-l0", b"{}") == Verdict.ACCEPTED
    assert not looked_up
    assert await store.accept_callback(second.id, "run-l1", b"{}") == Verdict.ACCEPTED
    assert await store.accept_callback(second.id, "run-x", b"{}") == Verdict.OTHER_RUN
    assert len(looked_up) == 2
    await store.transition(first.id, State.DONE, (State.SUBMITTED,), {}, None)
    await store.transition(second.id, State.CONFIRMING, (State.SUBMITTED,), {}, None)
    looked_up.clear()
    assert await store.accept_callback(second.id, "run-l1", b"{}") == Verdict.ACCEPTED
    assert not looked_up


async def test_the_start_up_load_of_letta_ids_reads_in_slices_up_to_the_bound(
        store, tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_inbox, "LOAD_CHUNK", 2)
    monkeypatch.setattr(sqlite_inbox, "LETTA_IDS_MAX", 3)
    runs = await sent(store, 5)
    reopened = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    await reopened.open()
    try:
        await reopened.warm_up()
        assert len(reopened._letta_pairs) == 3
        looked_up: list[str] = []
        reopened._db.set_trace_callback(lambda sql: looked_up.append(sql)
                                        if "FROM runs" in sql else None)
        for i, run in enumerate(runs):
            assert await reopened.accept_callback(run.id, f"run-l{i}", b"{}") == Verdict.ACCEPTED
        assert len(looked_up) == 2  # the two past the bound
    finally:
        await reopened.close()


async def test_reads_during_the_start_up_load_of_letta_ids_see_what_is_committed(
        store, tmp_path, monkeypatch):
    """The load reads in slices, its statement open in between: on the reader's connection,
    the other reads would see the database as it was when the load began."""
    monkeypatch.setattr(sqlite_inbox, "LOAD_CHUNK", 1)
    runs = await sent(store, 40)
    gate, fetches, fetchmany = asyncio.Event(), [], aiosqlite.Cursor.fetchmany

    async def held(cursor, size=None):  # the load stops after its first slice
        fetches.append(size)
        if len(fetches) > 1:
            await gate.wait()
        return await fetchmany(cursor, size)

    monkeypatch.setattr(aiosqlite.Cursor, "fetchmany", held)
    reopened = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    await reopened.open()
    try:
        loading = asyncio.create_task(reopened.warm_up())
        await eventually(lambda: len(fetches) == 2)
        late = await submit(reopened, agent="agent-late")
        listed = await reopened.list_runs(RunFilter(agent_id="agent-late"))
        assert [r.id for r in listed] == [late.id]
        gate.set()
        await loading
        assert len(reopened._letta_pairs) == len(runs)
    finally:
        await reopened.close()


async def test_a_connection_cancelled_as_it_opens_leaves_no_thread_behind(tmp_path, monkeypatch):
    """A connection's thread is not a daemon: one left running keeps the process from
    exiting. The start-up load of Letta ids opens one, and a start that stops at once
    (its port taken) cancelled it during its pragmas, hanging the process 13 times in 30."""
    made, connect = [], aiosqlite.connect

    def recorded(*args, **kw):
        made.append(connect(*args, **kw))
        return made[-1]

    pragma_sent = asyncio.Event()

    async def stalled(self, sql, *args):  # the first pragma never returns
        pragma_sent.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(aiosqlite, "connect", recorded)
    monkeypatch.setattr(aiosqlite.Connection, "execute", stalled)
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    opening = asyncio.create_task(store._connect())
    try:
        await asyncio.wait_for(pragma_sent.wait(), 5)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        await eventually(lambda: not made[0]._thread.is_alive(), timeout=5)
    finally:
        for db in made:  # this test's failure must not hang the test run in turn
            if db._thread.is_alive():
                db.stop()


class _SlowClose:
    """A sqlite3 connection whose close takes a moment (a busy machine's)."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real

    def close(self) -> None:
        time.sleep(0.2)
        self.real.close()


@pytest.mark.parametrize("cancelled_in", ["connect", "pragmas"])
def test_a_connection_cancelled_as_it_opens_is_done_with_its_loop_before_it_returns(
        tmp_path, monkeypatch, cancelled_in):
    """Stopping a connection, its thread posts the end to the event loop. When the cancelled
    opening returned at once, a loop closed meanwhile (a service stopping as it starts, a
    test's end) made the thread die with "Event loop is closed" (a warning in CI)."""
    made, connect, real_sqlite_connect = [], aiosqlite.connect, sqlite3.connect
    errors: list = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    monkeypatch.setattr(aiosqlite, "connect", lambda *a, **kw: made.append(connect(*a, **kw))
                        or made[-1])
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")

    async def opening_cancelled() -> None:
        reached = threading.Event()  # set on the connection's thread, or on the loop

        def slow_connect(*args, **kw):  # on the connection's thread
            reached.set()
            time.sleep(0.2)
            return real_sqlite_connect(*args, **kw)

        async def stalled(self, sql, *args):  # the first pragma never returns
            self._connection = _SlowClose(self._connection)
            reached.set()
            await asyncio.Event().wait()

        if cancelled_in == "connect":
            monkeypatch.setattr(sqlite3, "connect", slow_connect)
        else:
            monkeypatch.setattr(aiosqlite.Connection, "execute", stalled)
        opening = asyncio.create_task(store._connect())
        await eventually(reached.is_set, timeout=5)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening

    asyncio.run(opening_cancelled())  # and its loop closed at once
    made[0]._thread.join(5)
    assert not made[0]._thread.is_alive()
    assert errors == []


async def test_point_reads_on_the_loop_fall_back_to_the_reader_when_busy(store):
    run = await submit(store)

    class Busy:
        def execute(self, *args):
            raise sqlite3.OperationalError("database is locked")

    assert (await store.get_run(run.id)).id == run.id  # read on the loop thread
    store._now = Busy()
    assert (await store.get_run(run.id)).id == run.id  # the threaded reader answered
    store._now = None


@pytest.fixture
def other(store):
    """A second connection to the store's database, as another process (a callback worker, a
    CLI command) has: to hold its write lock. Closed before the store."""
    db = sqlite3.connect(store.path, isolation_level=None)
    yield db
    db.close()


async def test_a_write_blocked_by_another_process_waits_off_the_loop(store, other):
    """Writes run on the event loop only when the database is free: while another connection
    holds the write lock, a submit waits on the writer's thread and the loop keeps going."""
    other.execute("BEGIN IMMEDIATE")  # e.g. `tracker keys create` from a shell
    pending = asyncio.create_task(store.submit(new_run(), Event("api", "submit")))
    loop = asyncio.get_running_loop()
    for _ in range(20):  # the loop is free all along: each nap ends about on time
        start = loop.time()
        await asyncio.sleep(0.01)
        assert loop.time() - start < 0.5
    assert not pending.done()
    other.execute("COMMIT")
    run, created = await asyncio.wait_for(pending, 5)
    assert created and (await store.get_run(run.id)) is not None
    await submit(store)  # and the next write is back on the loop


async def test_writes_failed_together_by_a_held_lock_all_fail_at_once(store, other,
                                                                       monkeypatch):
    """A group commit that met the database locked past the busy timeout ran each of its
    writes again alone, each waiting its own timeout: the k-th caller answered after k+1 of
    them, and once the lock went the writes whose callers had given up were committed
    (their submits then sent, as the clients retried). The lock is the database's, not one
    write's: every write of the batch fails with it."""
    from tracker import sqlite_db

    monkeypatch.setattr(sqlite_db, "BUSY_TIMEOUT_MS", 200)
    other.execute("BEGIN IMMEDIATE")
    loop = asyncio.get_running_loop()
    # let go well after the batch's failure (a lone first write's timeout, then the batch's)
    loop.call_later(0.9, other.execute, "COMMIT")
    writes = [store.submit(new_run(), Event("api", "submit")) for _ in range(6)]
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    await asyncio.sleep(0.5)  # past the lock's end: nothing of theirs committed after it
    assert await store.list_runs(RunFilter(limit=10)) == []


async def test_background_queries_never_scan_a_big_history(tmp_path):
    """On a table that is almost all finished runs, with statistics as after ANALYZE, the
    dispatcher's and poller's queries still read only live runs (never `SCAN runs`)."""
    path = tmp_path / "big.db"
    s = open_store(f"sqlite:///{path}")
    await s.open()
    await s.close()
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT INTO runs (id, user_id, agent_id, state, status, created_at,"
        " next_check_at) VALUES (?, 'u', ?, ?, ?, ?, ?)",
        [(f"run-{i}", f"agent-{i % 50}", "done" if i < 30_000 else "submitted",
          "completed" if i < 30_000 else "created", f"2026-01-01T00:00:{i:09d}Z", 0)
         for i in range(30_010)])
    db.execute("INSERT INTO run_payloads (seq, request) SELECT seq, '{}' FROM runs")
    db.execute("ANALYZE")
    db.commit()
    s = open_store(f"sqlite:///{path}")
    await s.open()
    statements: list[str] = []
    s._db.set_trace_callback(statements.append)
    await s._r.set_trace_callback(statements.append)
    await s.submit(new_run(), Event("api", "submit"))
    now = clock.now()
    await s.claim(serial=True, now=now)
    await s.claim(serial=False, now=now)
    await s.due(WATCHED, now, 100)
    await s.next_due(WATCHED)
    await s.next_due((State.QUEUED,))
    await s.in_states((State.SUBMITTING,))
    await s.runs_at(WATCHED, await s.seqs_in(WATCHED))
    await s.count_by_state((State.QUEUED, State.SUBMITTED))
    await s.queued_by_agent(10)
    await s.close()
    plans = []
    for sql in statements:
        if sql.lstrip().upper().startswith(("SELECT", "UPDATE")) and " runs" in sql:
            plan = [r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql)]
            plans.append((sql, plan))
    assert plans
    for sql, plan in plans:
        assert "SCAN runs" not in plan, (sql, plan)


async def test_pages_built_by_sqlite_are_run_out_of_each_run(store):
    """The API's history pages come as JSON from SQLite (list_runs_json): the same runs,
    key for key, as run_out of list_runs' records, whatever is set or left NULL."""
    runs = [await submit(store, agent=A1 if i % 2 else A2, user="u" if i < 4 else "v")
            for i in range(6)]
    varied = [
        {"background": 0, "metadata": {"run_type": "x", "n": [1, 2.5, None]}, "status": "failed",
         "stop_reason": "error", "error": 'quote " and \\ and \n é 😀', "error_code": 500},
        {"background": 1, "letta_run_id": "run-letta-1", "ttft_ns": 12_345_678_901,
         "total_duration_ns": 2**62, "completed_via": "callback", "poll_count": 3,
         "callback_status_code": 200, "callback_sent_at": "2026-01-01T00:00:00.000000Z",
         "request_config": {"use_assistant_message": False, "include_return_message_types":
                            ["assistant_message"]}, "status": "completed"},
        {"request_config": None, "conversation_id": "conv-1", "base_template_id": "t-1",
         "callback_url": "https://example.com/hook", "status": "completed"},
    ]
    for run, fields in zip(runs, varied, strict=False):
        await store.transition(run.id, State.DONE, (State.QUEUED,), fields, None)
    filters = [RunFilter(), RunFilter(limit=2, after=runs[4].id), RunFilter(agent_id=A1),
               RunFilter(statuses=["completed", "failed"], limit=3), RunFilter(user_id="u"),
               RunFilter(ascending=True, before=runs[5].id), RunFilter(states=["queued"])]

    async def same(flt):
        expected = json.loads(dumps([run_out(r) for r in await store.list_runs(flt)]))
        assert json.loads(await store.list_runs_json(flt)) == expected, flt
        return expected

    pages = [await same(flt) for flt in filters]
    assert len(pages[0]) == 6 and [len(p) for p in pages[1:]] == [2, 3, 3, 4, 5, 3]
    assert {r["background"] for r in pages[0]} == {True, False}
    # a stored JSON text SQLite refuses but Python's json wrote and reads (NaN): same page,
    # built the slower way
    store._db.execute("UPDATE runs SET metadata = '{\"x\": NaN}' WHERE id = ?", (runs[5].id,))
    assert (await same(RunFilter()))[0]["metadata"] == {"x": None}


async def test_several_statuses_page_in_order_with_cursors(store):
    runs = [await submit(store) for _ in range(8)]
    statuses = ["completed", "failed", "cancelled", "completed", "failed", "completed",
                "cancelled", "failed"]
    for run, status in zip(runs, statuses, strict=True):
        await store.transition(run.id, None, (State.QUEUED,), {"status": status}, None)
    wanted = [r.id for r, st in zip(runs, statuses, strict=True) if st != "cancelled"][::-1]
    flt = RunFilter(statuses=["completed", "failed"], limit=4)
    first = await store.list_runs(flt)
    rest = await store.list_runs(RunFilter(statuses=["completed", "failed"], limit=4,
                                           after=first[-1].id))
    assert [r.id for r in first + rest] == wanted
    oldest = await store.list_runs(RunFilter(statuses=["failed", "completed"], limit=2,
                                             ascending=True))
    assert [r.id for r in oldest] == wanted[::-1][:2]


def _wal_salt(path) -> bytes:
    """The WAL header's salts: SQLite changes them each time it starts the WAL over."""
    with open(f"{path}-wal", "rb") as f:
        return f.read(24)[16:24]


async def test_wal_starts_over_under_steady_writes(tmp_path, monkeypatch):
    # writes that never pause: each checkpoint sees new frames come in while it copies, and
    # the WAL must still be started over, not grow for as long as the writes go on
    from tracker import sqlite_db

    monkeypatch.setattr(sqlite_db, "CHECKPOINT_EVERY_S", 0.05)
    path = tmp_path / "steady.db"
    s = open_store(f"sqlite:///{path}")
    await s.open()
    salts = set()
    end = asyncio.get_running_loop().time() + 1.5

    async def writer(agent):
        while asyncio.get_running_loop().time() < end:
            await submit(s, agent=agent)
            salts.add(_wal_salt(path))

    try:
        await asyncio.gather(*(writer(f"agent-{uuid.uuid4()}") for _ in range(4)))
    finally:
        await s.close()
    assert len(salts) >= 3


async def test_a_checkpoint_failing_outside_sqlite_is_tried_again(tmp_path, monkeypatch,
                                                                 caplog):
    """The database file's fdatasync failing (a full disk, EIO: an OSError, no SQLite
    error) ended the checkpoints for good, and the WAL grew for the rest of the process."""
    from tracker import sqlite_db

    monkeypatch.setattr(sqlite_db, "CHECKPOINT_EVERY_S", 0.02)
    caplog.set_level(logging.INFO, "tracker.store")
    s = open_store(f"sqlite:///{tmp_path / 'ck.db'}")
    await s.open()
    rounds = []
    real = s._checkpoint

    async def checkpoint():
        rounds.append(1)
        if len(rounds) <= 3:
            raise OSError(28, "No space left on device")
        await real()

    s._checkpoint = checkpoint
    try:
        await eventually(lambda: len(rounds) >= 5)
        assert not s._checkpointer.done()
    finally:
        await s.close()
    # said once while it fails (rounds come 4 a second), and when it works again
    assert caplog.text.count("WAL checkpoint failed") == 1
    assert "WAL checkpoints succeed again" in caplog.text


async def test_health_probes_coming_together_make_one_write(store, monkeypatch):
    """/healthz needs no key: while writes fail, each probe queued a write of its own (each
    up to the busy timeout) ahead of the service's; those coming meanwhile see the answer."""
    from tracker import sqlite_db

    monkeypatch.setattr(sqlite_db, "WRITE_RETEST_S", 1.0)
    writes = []
    real = store._write

    async def counted(fn, slow=False):
        writes.append(1)
        await asyncio.sleep(0.05)
        return await real(fn, slow)

    store.writable, store._failed_at = False, time.monotonic() - 10  # failed a while ago
    store._write = counted
    answers = await asyncio.gather(*(store.ping() for _ in range(5)))
    assert len(writes) == 1 and True in answers and store.writable


async def test_a_flood_of_writes_is_not_held_until_its_wal_is_long(tmp_path, monkeypatch):
    # holding every write (the last pass) while callbacks flood in stalls answering them:
    # the WAL is left to grow, up to WAL_MAX_FRAMES, and starts over once the flood ends;
    # the hold at WAL_MAX_FRAMES comes after the database file was synced beside the writes;
    # a long WAL's file is cut back only once the flood is over, by the checkpoint, never by
    # a commit (on the event loop) as the WAL starts over
    from tracker import sqlite_db

    monkeypatch.setattr(sqlite_db, "CHECKPOINT_EVERY_S", 0.05)
    monkeypatch.setattr(sqlite_db, "WAL_KEEP_BYTES", 64 * 1024)
    path = tmp_path / "flood.db"
    s = open_store(f"sqlite:///{path}")
    await s.open()
    flood = True
    s.flooding = lambda: flood
    steps = []  # the checkpoint's held passes (every write waits for them), and syncs
    passive = s._ck.execute_fetchall
    sync_database = s._sync_database

    async def checkpoint(sql, *args):
        result = await passive(sql, *args)
        # noted once done: a TRUNCATE noted as it began was seen by the wait below before it
        # had cut the file back (its syncs take tens of ms on a slow machine)
        steps.extend([sql.split("(")[1][:-1]] if "PASSIVE" not in sql else [])
        return result

    async def synced():
        steps.append("sync")
        await sync_database()

    s._ck.execute_fetchall = checkpoint
    s._sync_database = synced

    async def while_writing(seconds: float, pause: float = 0) -> tuple[set[bytes], list[int]]:
        salts, sizes = set(), []
        end = asyncio.get_running_loop().time() + seconds

        async def writer(agent):
            while asyncio.get_running_loop().time() < end:
                await submit(s, agent=agent)
                salts.add(_wal_salt(path))
                sizes.append(path.with_name("flood.db-wal").stat().st_size)
                await asyncio.sleep(pause)

        await asyncio.gather(*(writer(f"agent-{uuid.uuid4()}") for _ in range(4)))
        return salts, sizes

    try:
        await while_writing(1.0)
        # never held in the flood (it may still start over, when a pass copies all there is
        # between two writes: writers slowed down by a busy machine leave such gaps)
        assert not steps
        monkeypatch.setattr(sqlite_db, "WAL_MAX_FRAMES", 64)
        salts, sizes = await while_writing(1.0)
        assert "FULL" in steps and len(salts) >= 2  # ... until the WAL is long
        assert all(i and steps[i - 1] == "sync" for i, step in enumerate(steps)
                   if step == "FULL")  # synced first
        assert sizes == sorted(sizes) and sizes[-1] > 64 * 1024  # its file never cut back
        monkeypatch.setattr(sqlite_db, "WAL_MAX_FRAMES", 2**17)
        flood = False
        # and when the flood is over (writes at a steady pace: nonstop ones the allowance
        # catches only as the WAL grows, in seconds on a slow machine)
        assert len((await while_writing(1.0, pause=0.01))[0]) >= 2
        # and once they pause, the file is cut back
        del steps[:]
        for _ in range(100):
            if "TRUNCATE" in steps:
                break
            await asyncio.sleep(0.02)
        assert path.with_name("flood.db-wal").stat().st_size < 64 * 1024
    finally:
        await s.close()


async def test_a_checkpoint_waits_for_another_process_write_and_the_wal_starts_over(
        tmp_path, monkeypatch):
    # a callback worker writes from its own process: holding this store's writes does not
    # stop it, and a write of its committed while the last pass copied would leave the WAL
    # to grow; the last pass waits for it and copies it too
    from tracker import sqlite_db

    monkeypatch.setattr(sqlite_db, "CHECKPOINT_EVERY_S", 3600)  # only the round below
    monkeypatch.setattr(sqlite_db, "CHECKPOINT_WAIT_MS", 2000)  # the test's timing loose
    path = tmp_path / "worker.db"
    s = open_store(f"sqlite:///{path}")
    await s.open()
    worker = sqlite3.connect(path, isolation_level=None)
    try:
        await submit(s)
        salt = _wal_salt(path)
        worker.execute("BEGIN IMMEDIATE")
        worker.execute("CREATE TABLE filed (body TEXT)")
        checkpoint = asyncio.create_task(s._checkpoint())
        await asyncio.sleep(0.02)  # the passes beside the writes are done by now
        worker.execute("COMMIT")  # within CHECKPOINT_WAIT_MS of the last pass's start
        await checkpoint
        await submit(s)  # finds the WAL all copied
        assert _wal_salt(path) != salt
    finally:
        worker.close()
        await s.close()


async def test_a_store_left_to_another_process_to_checkpoint_never_does(tmp_path, monkeypatch):
    # a callback worker's: the service's checkpointer, whose last pass holds all writes, is
    # the one; a second, in the worker, would hold the service's writes as well
    from tracker import sqlite_db

    monkeypatch.setattr(sqlite_db, "CHECKPOINT_EVERY_S", 0.05)
    path = tmp_path / "left.db"
    s = open_store(f"sqlite:///{path}", checkpoints=False)
    await s.open()
    salts = set()
    service = sqlite3.connect(path)  # still open when the worker's store closes
    service.execute("SELECT count(*) FROM runs").fetchall()
    try:
        for _ in range(30):
            await submit(s)
            await asyncio.sleep(0.01)  # pauses a checkpointer would use
            salts.add(_wal_salt(path))
    finally:
        await s.close()
    try:
        assert len(salts) == 1
        assert path.with_name("left.db-wal").stat().st_size > 0  # not emptied at close either
    finally:
        service.close()


async def test_a_write_finding_another_process_holding_the_database_tries_again_soon(
        store, other):
    # a callback worker's commit or a checkpoint holds it for a few ms: the write tries again
    # on the loop within a ms or two of its end, not after SQLite's sleeps on the writer's
    # thread (1, 2, 5, 10, 15 ms...), which stalled every request behind it
    ran_on = []

    def write(db):
        ran_on.append(threading.get_ident())
        db.execute("INSERT INTO settings VALUES ('k', 'v')")

    other.execute("BEGIN IMMEDIATE")
    task = asyncio.create_task(store._write(write))
    await asyncio.sleep(0.003)
    assert not task.done()  # it waits for the other connection
    other.execute("COMMIT")
    await task
    assert ran_on[-1] == threading.get_ident()  # here, not on the writer's thread
    assert await store.setting("k", "other") == "v"


async def test_a_write_that_keeps_finding_the_database_held_gets_in_soon_after_it_is_free(
        store, other):
    # two callback workers commit back to back: a write that waited longer and longer between
    # its tries (up to 8 ms) kept missing the moment the other let go, 23-38 ms in all
    late = []
    for i in range(5):
        ran = []
        other.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(store._write(lambda db, i=i, ran=ran: (
            ran.append(time.monotonic()),
            db.execute("INSERT INTO settings VALUES (?, 'v')", (f"k{i}",)))))
        await asyncio.sleep(0.017)  # held past several tries
        other.execute("COMMIT")
        free = time.monotonic()
        await task
        late.append(ran[-1] - free)
    assert sorted(late)[2] < 0.003, late  # within a try's ms of it, not 5 ms on


def test_the_service_lock_is_held_by_one_holder_at_a_time(tmp_path):
    from tracker.errors import Conflict
    from tracker.service_lock import ServiceLock

    first, second = ServiceLock(str(tmp_path / "t.db")), ServiceLock(str(tmp_path / "t.db"))
    first.acquire()
    with pytest.raises(Conflict, match=rf"pid {os.getpid()}, holding {tmp_path}/t.db.lock"):
        second.acquire()
    first.release()
    second.acquire()  # free again once released (and when a holder's process dies)
    other = ServiceLock(str(tmp_path / "other.db"))
    other.acquire()  # one lock per database
    other.release()
    second.release()


def test_two_paths_to_one_database_are_one_lock(tmp_path):
    """SQLite opens a symlink's target: a service started through the link must find the
    lock of a service started on the file itself."""
    from tracker.errors import Conflict
    from tracker.service_lock import ServiceLock

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "t.db").touch()
    (tmp_path / "b" / "t.db").symlink_to(tmp_path / "a" / "t.db")
    first = ServiceLock(str(tmp_path / "a" / "t.db"))
    first.acquire()
    through_link = ServiceLock(str(tmp_path / "b" / "t.db"))
    assert through_link.held_elsewhere()
    with pytest.raises(Conflict):
        through_link.acquire()
    first.release()
    assert not through_link.held_elsewhere()


async def test_two_processes_opening_a_new_database_at_once_both_open_it(tmp_path):
    """Both read its schema version before either migrates: the second's migrations find
    them applied (they fail as re-runs, atomically) and take them as done."""
    for i in range(40):  # each pair also races to turn the new file to WAL (set_pragma)
        path = tmp_path / f"new{i}.db"
        a, b = open_store(f"sqlite:///{path}"), open_store(f"sqlite:///{path}")
        try:
            await asyncio.gather(a.open(), b.open())
            assert await a.schema_version() == await b.schema_version() == LATEST
        finally:
            await a.close()
            await b.close()


def test_two_connections_turning_a_new_database_to_wal_at_once_both_do(tmp_path):
    """SQLite refuses the second at once (no busy handler): it is tried again."""
    from tracker.sqlite_db import BUSY_TIMEOUT_MS, set_pragma

    for i in range(50):
        gate, failed = threading.Barrier(2), []

        def turn(path=tmp_path / f"w{i}.db", gate=gate, failed=failed):
            with closing(sqlite3.connect(path, isolation_level=None)) as db:
                db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                gate.wait()
                try:
                    set_pragma(db, "journal_mode = WAL")
                except sqlite3.OperationalError as e:
                    failed.append(e)

        pair = [threading.Thread(target=turn) for _ in range(2)]
        for t in pair:
            t.start()
        for t in pair:
            t.join()
        assert not failed, (i, failed)


async def test_a_command_does_not_migrate_a_database_a_service_is_using(tmp_path):
    """A newer CLI beside an older running service would change the schema under it: it
    refuses, naming what to do; the service, holding the lock, migrates at its start."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    service = open_store(f"sqlite:///{path}")
    service.lock_for_service()
    command = open_store(f"sqlite:///{path}")
    with pytest.raises(Unavailable, match="a tracker service is using it"):
        await command.open()
    await command.close()
    await service.open()  # the lock's holder migrates
    try:
        assert await service.schema_version() == LATEST
    finally:
        await service.close()


async def test_two_first_requests_without_auth_share_one_anonymous_user(store):
    """auth.required = false: the first requests, at once, both find no anonymous user; one
    makes it, the other takes it (the second insert broke the unique name: a 500)."""
    from tracker import auth

    await store._lock.acquire()  # both read before either can write
    first = asyncio.create_task(auth.anonymous_user(store))
    second = asyncio.create_task(auth.anonymous_user(store))
    await asyncio.sleep(0.05)
    store._lock.release()
    a, b = await asyncio.gather(first, second)
    assert a.id == b.id and a.name == "anonymous" and a.is_admin
    with pytest.raises(Conflict):
        await store.create_user("anonymous", False, "whsec_x")


async def test_a_write_cancelled_on_the_writers_thread_keeps_the_lock_to_its_end(store):
    """Shutdown cancels retention mid-prune: the lock was released with the transaction still
    running on the writer's thread, and the next write, inline on the loop, met the
    connection inside it (its BEGIN failed: a write lost, the store marked unwritable)."""
    run = await submit(store)
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(db):
        # like a prune batch: several statements in one transaction, on the writer's thread
        db.execute("DELETE FROM run_events WHERE run_id = ?", (run.id,))
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.3)
        db.execute("UPDATE runs SET error = 'slow-second-half' WHERE id = ?", (run.id,))
        return 1

    task = asyncio.create_task(store._write(slow, slow=True))
    await started.wait()
    task.cancel()  # shutdown cancelling retention mid-prune
    await asyncio.gather(task, return_exceptions=True)
    # a dispatcher send finishing during shutdown records its outcome (inline on the loop)
    inline_error = None
    try:
        await store.submit(new_run(), Event("api", "submit"))
    except Unavailable as e:
        inline_error = e
    await asyncio.sleep(0.5)  # the slow transaction's thread ends
    events = await store._read("SELECT count(*) FROM run_events WHERE run_id = ?", (run.id,))
    err = await store._read("SELECT error FROM runs WHERE id = ?", (run.id,))
    # the one transaction must be all-or-nothing, and the unrelated write must succeed
    assert inline_error is None
    assert (events[0][0], err[0][0]) in ((0, "slow-second-half"), (1, None))


async def test_a_write_cancelled_in_its_busy_wait_does_not_freeze_the_loop(store):
    """A write that found another process holding the database waits on the writer's thread
    (busy_timeout 10 s on the shared connection); cancelled, it released the lock, and the
    next write, run inline on the loop, met that wait on the same connection: the loop froze
    until the other process committed."""
    run = await submit(store)
    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # a callback worker / CLI command holding the database
    threading.Timer(1.5, lambda: other.execute("COMMIT")).start()
    task = asyncio.create_task(store.add_event(run.id, Event("poll", "x")))
    await asyncio.sleep(0.2)  # past the inline tries: now waiting on the writer's thread
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    error = None
    try:
        await store.submit(new_run(), Event("api", "submit"))
    except Unavailable as e:
        error = e
    took = time.monotonic() - started
    t.cancel()
    await asyncio.sleep(1.5)
    other.close()
    assert error is None and ticks > took / 0.02  # the loop kept turning


async def test_an_answered_pause_is_kept_keep_days_from_its_finish(store):
    """Its recorded_at was its pause's: paused longer than keep_days, it was pruned the
    moment its answer ended it."""
    from tracker.retention import DAY, cutoff

    paused = await submit(store)
    await store.claim(serial=True, now=clock.now())
    # paused 10 days ago (the manager sets recorded_at when the run pauses)
    long_ago = clock.iso(clock.now() - 10 * DAY)
    await store.transition(paused.id, State.PAUSED, (State.SUBMITTING,), {
        "status": "completed", "stop_reason": "requires_approval", "recorded_at": long_ago,
        "completed_via": "callback"}, None)
    assert (await store.prune(cutoff(7 * DAY), 100))["runs"] == 0  # paused: kept
    answer = await submit(store, kind="answer")
    await store.claim(serial=True, now=clock.now())
    await store.transition(answer.id, State.SUBMITTED, (State.SUBMITTING,),
                           {"letta_run_id": "run-letta-answer"}, None)
    await store.transition(answer.id, State.DONE, (State.SUBMITTED,), {
        "status": "completed", "recorded_at": clock.iso()}, None)
    run = await store.get_run(paused.id)
    assert run.state is State.DONE  # finished just now, by its answer
    # retention (keep_days = 7) must keep a run that finished a moment ago
    removed = await store.prune(cutoff(7 * DAY), 100)
    assert removed["runs"] == 0, removed
