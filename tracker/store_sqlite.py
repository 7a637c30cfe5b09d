"""The SQLite store, ``SQLiteStore``: here the writes of runs (submit, claim, transition),
their events and pruning; the rest in its bases, the sqlite_* modules. These are the only
modules that touch SQLite (``tracker.sqlite_db`` the only one that imports aiosqlite)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from tracker import clock
from tracker.errors import Conflict
from tracker.sqlite_accounts import Accounts
from tracker.sqlite_batch import Batch, GroupCommit
from tracker.sqlite_deliveries import Deliveries
from tracker.sqlite_inbox import CallbackInbox
from tracker.sqlite_queries import (
    FULL_COLS,
    PAYLOAD_COLS,
    SUMMARY_COLS,
    WITH_PAYLOAD,
    as_run,
    live_runs,
    marks,
)
from tracker.sqlite_reads import RunReads
from tracker.states import ANSWERED, FINAL, LANE_BUSY, Source, State, ends_pause
from tracker.store import Add, Event, NewRun, RunRecord

#: the payloads of the runs whose seqs a subquery selects (prune's counts: they are deleted
#: with their runs by a trigger, which rowcount does not count)
PAYLOADS_OF = "SELECT count(*) FROM run_payloads WHERE seq IN ({})"
_EVENT_INTO = "INSERT INTO run_events (run_id, at, source, kind, state, status, detail)"
EVENT_SQL = _EVENT_INTO + " VALUES (?, ?, ?, ?, ?, ?, ?)"
#: the same, written only while the run exists (its id bound again, last), with the run's
#: state and status as they are when none is given
EVENT_IF_RUN_SQL = (_EVENT_INTO + " SELECT ?, ?, ?, ?, coalesce(nullif(?, ''), state),"
                    " coalesce(nullif(?, ''), status), ? FROM runs WHERE id = ?")


def _encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def _event_row(run_id: str, event: Event, state: str, status: str) -> tuple:
    return (run_id, event.at or clock.iso(), event.source, event.kind, event.state or state,
            event.status or status, json.dumps(event.detail) if event.detail else None)


def _insert_events(db: sqlite3.Connection, rows: list[tuple]) -> None:
    if rows:
        db.executemany(EVENT_SQL, rows)


class SQLiteStore(RunReads, CallbackInbox, Accounts, Deliveries, GroupCommit):
    """Store backed by one SQLite file (see ``tracker.store.Store`` for the operations)."""

    # --- runs ------------------------------------------------------------------------------

    async def submit(self, new: NewRun, event: Event,
                     claim: bool | None = None) -> tuple[RunRecord, bool]:
        """Insert a queued run; with an idempotency key already used, return the first run.
        ``claim`` (True: parallel lanes, False: serial) also claims it in the same
        transaction when its lane is free, so the submit can send it at once."""
        now = clock.iso()
        row = (new.id, new.user_id, new.agent_id, new.kind, json.dumps(new.request_config),
               new.callback_url, now, new.idempotency_key, new.request_hash)
        request = json.dumps(new.request)

        def op(db: sqlite3.Connection, batch: Batch) -> RunRecord:
            # claimed as it is inserted (one row write, not an insert and an update)
            go = claim is not None and self._lane_free(db, new, parallel=claim)
            rows = db.execute(
                "INSERT INTO runs (id, user_id, agent_id, kind, state, request_config,"
                " callback_url, created_at, next_check_at, idempotency_key, request_hash,"
                f" attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?) RETURNING {SUMMARY_COLS}",
                (*row[:4], State.SUBMITTING if go else State.QUEUED, *row[4:], int(go))
            ).fetchall()
            run = as_run(rows[0])
            db.execute("INSERT INTO run_payloads (seq, request) VALUES (?, ?)", (run.seq, request))
            run.request = new.request
            self._add_event(db, new.id, event, State.QUEUED, "created", now)
            return run

        try:
            # group-committed with whatever else is being written: under load one commit
            # (and one set of dirtied index pages) serves many submits
            run = await self._batched(op)
        except sqlite3.IntegrityError:
            first = new.idempotency_key and await self.run_by_key(new.user_id,
                                                                  new.idempotency_key)
            if not first:
                raise
            return first, False
        # built inside the transaction: nothing awaits between its commit and the caller's
        # send, so a claimed run is never seen `submitting` with no send of ours behind it
        return run, True

    async def run_by_key(self, user_id: str, idempotency_key: str) -> RunRecord | None:
        """The user's run submitted with that Idempotency-Key, whole."""
        rows = await self._read(f"SELECT {FULL_COLS} FROM {WITH_PAYLOAD}"
                                " WHERE user_id = ? AND idempotency_key = ?",
                                (user_id, idempotency_key))
        return as_run(rows[0]) if rows else None

    async def claim(self, serial: bool, now: float, agent_id: str | None = None,
                    limit: int = 100) -> list[RunRecord]:
        """Move the next sendable queued runs to ``submitting`` and return them."""
        # most wake-ups find nothing queued: a read says so without taking the write lock
        if not await self._read("SELECT 1 FROM runs INDEXED BY runs_queue WHERE state = 'queued'"
                                " AND next_check_at <= ? LIMIT 1", (now,)):
            return []

        def write(db: sqlite3.Connection) -> list[RunRecord]:
            ids = (self._lane_heads(db, now, agent_id) if serial
                   else self._due_queued(db, now, agent_id, limit))
            claimed = [self._claim_one(db, run_id) for run_id in ids[:limit]]
            return [run for run in claimed if run is not None]

        return await self._write(write)

    def _claim_one(self, db: sqlite3.Connection, run_id: str) -> RunRecord | None:
        rows = db.execute(
            "UPDATE runs SET state = 'submitting', attempts = attempts + 1 "
            "WHERE id = ? AND state = 'queued' RETURNING seq", (run_id,)
        ).fetchall()
        if not rows:
            return None
        seq = rows[0][0]
        # read back whole, request included (the dispatcher sends it): RETURNING cannot join
        return as_run(db.execute(f"SELECT {FULL_COLS} FROM {WITH_PAYLOAD} WHERE seq = ?",
                               (seq,)).fetchone())

    def _lane_free(self, db: sqlite3.Connection, new: NewRun, parallel: bool) -> bool:
        """Whether a run about to be inserted may go at once: parallel lanes always; a serial
        lane when nothing of its agent is in flight or queued (a pause lets only answers by)."""
        if parallel:  # no lanes, but an answer waits out another user's pause (_answers)
            return new.kind != "answer" or not db.execute(
                _OTHERS_PAUSE_OF_NEW, (new.agent_id, new.user_id)).fetchall()
        live, states = live_runs((*LANE_BUSY, State.PAUSED))
        held = db.execute(f"SELECT state, user_id FROM {live} AND agent_id = ?",
                          (*states, new.agent_id)).fetchall()
        if held and not _answers(new.kind, new.user_id, held):
            return False
        ahead, args = ("AND kind = 'answer' AND user_id = ?", (new.user_id,)) if held else ("", ())
        earlier = db.execute(
            f"SELECT 1 FROM runs WHERE state = 'queued' AND agent_id = ? {ahead} LIMIT 1",
            (new.agent_id, *args)).fetchall()
        return not earlier

    def _answer_pause(self, db: sqlite3.Connection, answer: RunRecord, source: str) -> None:
        """Letta took the approval or tool return: the run that paused for it is done. Not
        before (when the answer is claimed, or sent): an answer requeued, refused at the door
        or failed as answering other tool calls leaves the agent paused at Letta, and the
        messages queued behind the pause must wait on (``states.ends_pause``). It finished
        now: retention counts from now, not from the pause (a pause longer than keep_days
        was pruned as it ended)."""
        now = clock.iso()
        # only its own user's pause: another's answer never goes ahead of it (_answers)
        rows = db.execute(
            "UPDATE runs SET state = 'done', recorded_at = ? WHERE agent_id = ?"
            " AND state = 'paused' AND user_id = ? AND seq < ? RETURNING id, status",
            (now, answer.agent_id, answer.user_id, answer.seq)).fetchall()
        for run_id, status in rows:
            self._add_event(db, run_id, Event(source, "answered", {"by": answer.id}),
                            State.DONE, status, now)

    def _due_queued(self, db: sqlite3.Connection, now: float, agent_id: str | None,
                    limit: int) -> list[str]:
        sql = ("SELECT id FROM runs INDEXED BY runs_queue"
               " WHERE state = 'queued' AND next_check_at <= ?"
               f" AND NOT (kind = 'answer' AND EXISTS ({_OTHERS_PAUSE_OF_ROW}))")
        params: list[Any] = [now]
        if agent_id:
            sql += " AND agent_id = ?"
            params.append(agent_id)
        rows = db.execute(sql + " ORDER BY seq LIMIT ?", (*params, limit)).fetchall()
        return [r[0] for r in rows]

    def _lane_heads(self, db: sqlite3.Connection, now: float,
                    agent_id: str | None) -> list[str]:
        """Per agent with a free lane, the run to send next: its oldest queued, or, when the
        agent is paused for an approval, the oldest queued answer (which goes ahead)."""
        busy_states = (*LANE_BUSY, State.PAUSED)
        agent_sql = " AND agent_id = ?" if agent_id else ""
        agent_arg = (agent_id,) if agent_id else ()
        lanes: dict[str, list[tuple[str, str]]] = {}
        heads = dict(db.execute(
            "SELECT agent_id, min(seq) FROM runs WHERE state = 'queued'" + agent_sql
            + " GROUP BY agent_id", agent_arg))
        if not heads:
            return []
        live, states = live_runs(busy_states)
        for a, st, user in db.execute(
            f"SELECT agent_id, state, user_id FROM {live}" + agent_sql, (*states, *agent_arg)
        ):
            lanes.setdefault(a, []).append((st, user))
        ids = []
        for agent, seq in heads.items():
            held = lanes.get(agent, [])
            if any(st != State.PAUSED for st, _ in held):
                continue
            where = "agent_id = ? AND state = 'queued'"
            # paused: the oldest answer by the user whose run paused goes ahead (_answers)
            where += " AND kind = 'answer' AND user_id = ?" if held else " AND seq = ?"
            args = (agent, held[0][1]) if held else (agent, seq)
            rows = db.execute(
                f"SELECT id, next_check_at FROM runs WHERE {where} ORDER BY seq LIMIT 1",
                args).fetchall()
            if rows and rows[0][1] <= now:
                ids.append(rows[0][0])
        return ids

    async def transition(self, run_id: str, to: State | None, expect: Iterable[State],
                         fields: dict[str, Any], event: Event | None,
                         relay: bool = False,
                         unless_status: str | None = None) -> RunRecord | None:
        """Compare-and-set: update the run only if its state is in ``expect`` (and its status
        is not ``unless_status``); append the event, and the relay's outbox row when
        ``relay``, in the same transaction."""
        expect = tuple(expect)
        sets = dict(fields, **({"state": to} if to else {}))
        payload = {k: _encode(sets.pop(k)) for k in PAYLOAD_COLS if k in sets}
        assign = ", ".join(f"{k} = {k} + ?" if isinstance(v, Add) else f"{k} = ?"
                           for k, v in sets.items())
        values = [v.n if isinstance(v, Add) else _encode(v) for v in sets.values()]
        unless = " AND status IS NOT ?" if unless_status else ""
        sql = (f"UPDATE runs SET {assign} WHERE id = ? AND state IN ({marks(len(expect))})"
               f"{unless} RETURNING {SUMMARY_COLS}")  # no request or result: none reads them
        payload_sql = (f"UPDATE run_payloads SET {', '.join(f'{k} = ?' for k in payload)}"
                       " WHERE seq = ?")

        # an answer ends the pause it answers as it comes to an end (ANSWERED), not again on a
        # later write to it (a late send's answer recorded against it, an overwrite): by then
        # a later message may have paused the agent, which this answer never saw
        from_answered = bool(ANSWERED.intersection(expect))

        def op(db: sqlite3.Connection, batch: Batch) -> RunRecord | None:
            was = from_answered and db.execute(
                "SELECT state FROM runs WHERE id = ? AND kind = 'answer'", (run_id,)).fetchone()
            ended = bool(was) and was[0] in ANSWERED
            try:
                rows = db.execute(sql, (*values, run_id, *expect,
                                        *((unless_status,) if unless_status else ()))).fetchall()
            except sqlite3.IntegrityError:
                raise Conflict("that Letta run belongs to another tracker run") from None
            if not rows:
                return None
            run = as_run(rows[0])
            if run.kind == "answer" and not ended \
                    and ends_pause(run.state, run.status, run.metadata):
                self._answer_pause(db, run, event.source if event else Source.DISPATCH)
            if payload:
                db.execute(payload_sql, (*payload.values(), run.seq))
            if event:
                batch.events.append(_event_row(run_id, event, run.state, run.status))
            if relay and run.callback_url:
                self._enqueue_delivery(db, run)
            return run

        run = await self._batched(op)
        if run is not None:
            self._remember(run)  # committed: the callback inbox may rely on it
        return run

    def _end_batch(self, db: sqlite3.Connection, batch: Batch) -> None:
        _insert_events(db, batch.events)
        self._file_callbacks(db, batch.callbacks)

    def _add_event(self, db: sqlite3.Connection, run_id: str, event: Event,
                   state: str, status: str, at: str) -> None:
        event.at = event.at or at
        db.execute(EVENT_SQL, _event_row(run_id, event, state, status))

    async def add_event(self, run_id: str, event: Event) -> None:
        """Append an observation that changes nothing on the run; nothing when the run is
        gone (pruned since the caller read it): no event row without its run."""
        event.at = event.at or clock.iso()
        row = _event_row(run_id, event, event.state or "", event.status or "")
        await self._write(lambda db: db.execute(EVENT_IF_RUN_SQL, (*row, run_id)))

    async def reschedule(self, checks: Sequence[tuple[str, float, int]],
                         seen: Sequence[float | None] | None = None) -> None:
        """Set (next_check_at, poll_count) for many watched runs at once; with ``seen``, only
        where next_check_at is still as the caller read it."""
        if not checks:
            return
        if seen is None:
            sql, rows = ("UPDATE runs SET next_check_at = ?, poll_count = ? WHERE id = ?",
                         [(at, count, run_id) for run_id, at, count in checks])
        else:
            sql = ("UPDATE runs SET next_check_at = ?, poll_count = ? WHERE id = ?"
                   " AND next_check_at IS ?")
            rows = [(at, count, run_id, was)
                    for (run_id, at, count), was in zip(checks, seen, strict=True)]
        await self._write(lambda db: db.executemany(sql, rows))

    # --- operations ------------------------------------------------------------------------

    async def prune(self, before: str, batch: int, dry_run: bool = False) -> dict[str, int]:
        """Delete runs that finished before ``before`` and are not awaiting a webhook retry,
        with their payloads, events and deliveries, ``batch`` runs per transaction so that
        requests are never held up for long."""
        if dry_run:
            return await self._prune_counts(before)
        totals = dict.fromkeys(("runs", "run_payloads", "run_events", "deliveries",
                                "delivery_attempts"), 0)
        key = ("", 0)  # (recorded_at, seq) of the last run deleted
        while True:
            deleted, key = await self._write(
                lambda db, after=key: self._prune_batch(db, before, after, batch), slow=True)
            if not deleted:
                # the counts left at zero (every run of a user's agent in some state gone or
                # moved on): with agents made and dropped, one per end user say, they were
                # kept for good, and /v1/stats and /metrics read them all
                await self._write(lambda db: db.execute("DELETE FROM run_counts WHERE n = 0"),
                                  slow=True)
                return totals
            for table, n in deleted.items():
                totals[table] += n
            await asyncio.sleep(0)  # let requests in between batches

    @staticmethod
    def _prunable(before: str) -> tuple[str, tuple]:
        """``FROM ... WHERE`` for the runs prune may delete: final, finished (recorded_at)
        before ``before``, and with no delivery pending, whose retries (~27 h by default)
        would go with it. Through the finish-time index, forced: SQLite may pick runs_state
        instead (it does on a new database), all of a history that is nearly all final."""
        final = tuple(FINAL)
        return ("runs INDEXED BY runs_recorded WHERE recorded_at < ?"
                f" AND state IN ({marks(len(final))}) AND NOT EXISTS (SELECT 1 FROM deliveries"
                " WHERE deliveries.run_id = runs.id AND deliveries.state = 'pending')",
                (before, *final))

    def _prune_batch(self, db: sqlite3.Connection, before: str, key: tuple,
                     batch: int) -> tuple[dict[str, int], tuple]:
        """One batch, in finish order from past ``key``: the runs kept earlier in the order
        (awaiting a retry, paused) are not walked again by every batch after them."""
        where, params = self._prunable(before)
        rows = db.execute(f"SELECT recorded_at, seq, id FROM {where}"
                          " AND (recorded_at, seq) > (?, ?) ORDER BY recorded_at, seq LIMIT ?",
                          (*params, *key, batch)).fetchall()
        if not rows:
            return {}, key
        return self._delete_runs(db, [r[2] for r in rows]), tuple(rows[-1][:2])

    async def _prune_counts(self, before: str) -> dict[str, int]:
        where, params = self._prunable(before)
        sub = f"SELECT id FROM {where}"
        q = {
            "runs": f"SELECT count(*) FROM {where}",
            "run_payloads": PAYLOADS_OF.format(f"SELECT seq FROM {where}"),
            "run_events": f"SELECT count(*) FROM run_events WHERE run_id IN ({sub})",
            "deliveries": f"SELECT count(*) FROM deliveries WHERE run_id IN ({sub})",
            "delivery_attempts": "SELECT count(*) FROM delivery_attempts WHERE delivery_id IN"
                                 f" (SELECT id FROM deliveries WHERE run_id IN ({sub}))",
        }
        return {t: (await self._read(sql, params))[0][0] for t, sql in q.items()}

    def _delete_runs(self, db: sqlite3.Connection, ids: list[str]) -> dict[str, int]:
        m = marks(len(ids))
        deleted = {"run_payloads": db.execute(PAYLOADS_OF.format(
            f"SELECT seq FROM runs WHERE id IN ({m})"), ids).fetchone()[0]}
        for table, sql in (
            ("delivery_attempts", "DELETE FROM delivery_attempts WHERE delivery_id IN"
                                  f" (SELECT id FROM deliveries WHERE run_id IN ({m}))"),
            ("deliveries", f"DELETE FROM deliveries WHERE run_id IN ({m})"),
            ("run_events", f"DELETE FROM run_events WHERE run_id IN ({m})"),
            ("runs", f"DELETE FROM runs WHERE id IN ({m})"),
        ):
            deleted[table] = db.execute(sql, ids).rowcount
        return deleted


#: whether another user's run of the agent is paused (an answer waits it out: _answers), for
#: a run about to be inserted (its agent and user as parameters) or for a row of ``runs``
_OTHERS_PAUSE = ("SELECT 1 FROM runs AS p WHERE p.agent_id = {agent}"
                 " AND p.state = 'paused' AND p.user_id != {user} LIMIT 1")
_OTHERS_PAUSE_OF_NEW = _OTHERS_PAUSE.format(agent="?", user="?")
_OTHERS_PAUSE_OF_ROW = _OTHERS_PAUSE.format(agent="runs.agent_id", user="runs.user_id")


def _answers(kind: str, user_id: str, held: list) -> bool:
    """Whether a run may go ahead of its agent's live runs (``held``, of (state, user_id)):
    only an answer to a pause, by the user whose run paused. Another user's approval would
    decide (or learn, from Letta's refusal naming them) that user's pending tool calls."""
    return kind == "answer" and all(st == State.PAUSED and user == user_id for st, user in held)
