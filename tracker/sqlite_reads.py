"""The SQLite store's reads of runs: one run, the poller's and dispatcher's due lists, the
history pages, events and stats."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from tracker.errors import BadRequest
from tracker.serialize import dumps, run_out
from tracker.sqlite_db import MalformedJSON, SQLiteDB
from tracker.sqlite_queries import (
    FULL_COLS,
    RUN_JSON,
    SUMMARY_COLS,
    WITH_PAYLOAD,
    Key,
    as_run,
    as_runs,
    list_query,
    live_runs,
    marks,
    stats_queries,
)
from tracker.states import State
from tracker.store import Event, RunFilter, RunRecord


class RunReads(SQLiteDB):
    """Reads of runs and their events (a base of ``SQLiteStore``)."""

    async def get_run(self, run_id: str, user_id: str | None = None,
                      full: bool = False) -> RunRecord | None:
        """A run by tracker id or Letta run id, optionally only if it is ``user_id``'s."""
        rows = await self._find(f"{FULL_COLS} FROM {WITH_PAYLOAD}" if full
                                else f"{SUMMARY_COLS} FROM runs", run_id, user_id)
        return as_run(rows[0]) if rows else None

    async def runs_by_id(self, run_ids: Sequence[str]) -> dict[str, RunRecord]:
        """Several runs by tracker id in one read (unknown ids are left out)."""
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return {}
        rows = await self._read(
            f"SELECT {SUMMARY_COLS} FROM runs WHERE id IN ({marks(len(ids))})", ids)
        return {run.id: run for run in as_runs(rows)}

    async def paused_by(self, agent_id: str) -> set[str]:
        """The users whose runs of the agent are paused for an approval."""
        live, states = live_runs((State.PAUSED,))
        rows = await self._read(f"SELECT user_id FROM {live} AND agent_id = ?",
                                (*states, agent_id))
        return {r[0] for r in rows}

    async def _find(self, cols_from: str, run_id: str, user_id: str | None
                    ) -> list[sqlite3.Row]:
        """``SELECT {cols_from}`` the run with that tracker or Letta id (and user)."""
        # two indexed lookups: with `id = ? OR letta_run_id = ?` the planner may scan the table
        scope, arg = (" AND user_id = ?", (user_id,)) if user_id else ("", ())
        for column in ("id", "letta_run_id"):
            rows = await self._lookup(
                f"SELECT {cols_from} WHERE {column} = ?{scope} LIMIT 1", (run_id, *arg))
            if rows:
                return rows
        return []

    async def due(self, states: Iterable[State], now: float, limit: int) -> list[RunRecord]:
        live, states = live_runs(states)
        rows = await self._read(
            f"SELECT {SUMMARY_COLS} FROM {live}"
            " AND next_check_at <= ? ORDER BY next_check_at LIMIT ?", (*states, now, limit)
        )
        return as_runs(rows)

    async def seqs_in(self, states: Iterable[State]) -> list[int]:
        live, states = live_runs(states)
        # newest first, the order of Letta's listing of finished runs (see Poller.sweep);
        # the seqs are in the index (rowids): no table read
        rows = await self._read(f"SELECT seq FROM {live} ORDER BY seq DESC", states)
        return [r[0] for r in rows]

    async def runs_at(self, states: Iterable[State], seqs: Sequence[int]) -> list[RunRecord]:
        states = tuple(states)
        rows = await self._read(
            f"SELECT {SUMMARY_COLS} FROM runs WHERE seq IN ({marks(len(seqs))})"
            f" AND state IN ({marks(len(states))}) ORDER BY seq", (*seqs, *states))
        return as_runs(rows)

    async def in_states(self, states: Iterable[State], limit: int = 10_000) -> list[RunRecord]:
        live, states = live_runs(states, join=" LEFT JOIN run_payloads USING (seq)")
        rows = await self._read(
            f"SELECT {FULL_COLS} FROM {live} ORDER BY seq LIMIT ?", (*states, limit))
        return as_runs(rows)

    async def next_due(self, states: Iterable[State],
                       after: float | None = None) -> float | None:
        states = tuple(states)
        later, args = ("", ()) if after is None else (" AND next_check_at > ?", (after,))
        if states == (State.QUEUED,):
            # the dispatcher asks after every wake-up: the queue's own small index answers it
            rows = await self._read("SELECT min(next_check_at) FROM runs INDEXED BY runs_queue"
                                    " WHERE state = 'queued'" + later, args)
            return rows[0][0]
        live, states = live_runs(states)
        rows = await self._read(f"SELECT min(next_check_at) FROM {live}{later}", (*states, *args))
        return rows[0][0]

    async def count_by_state(self, states: Iterable[State]) -> dict[str, int]:
        """Runs in each of ``states`` (an index range: no table scan)."""
        live, states = live_runs(states)
        rows = await self._read(f"SELECT state, count(*) FROM {live} GROUP BY state", states)
        return {r[0]: r[1] for r in rows}

    async def queued_by_agent(self, limit: int) -> dict[str, int]:
        """Queued runs per agent, the ``limit`` deepest lanes (reads only queued rows)."""
        rows = await self._read(
            "SELECT agent_id, count(*) AS n FROM runs WHERE state = 'queued'"
            " GROUP BY agent_id ORDER BY n DESC, agent_id LIMIT ?", (limit,))
        return {r[0]: r[1] for r in rows}

    async def list_runs(self, flt: RunFilter) -> list[RunRecord]:
        return as_runs(await self._page(flt, SUMMARY_COLS))

    async def list_runs_json(self, flt: RunFilter) -> bytes:
        """``list_runs``'s page as the API's JSON array (``serialize.run_out`` of each run),
        built by SQLite: records and dicts made in Python were most of a page's time."""
        try:
            rows = await self._page(flt, RUN_JSON)
        except MalformedJSON:  # the page as records: Python's json reads what SQLite refuses
            return dumps([run_out(run) for run in await self.list_runs(flt)])
        return f"[{','.join(row[0] for row in rows)}]".encode()

    async def _page(self, flt: RunFilter, cols: str) -> list[sqlite3.Row]:
        after = await self._cursor(flt, "after")
        before = await self._cursor(flt, "before")
        return await self._read(*list_query(flt, after, before, cols))

    async def _cursor(self, flt: RunFilter, name: str) -> Key | None:
        """Where the run named by the ``after`` or ``before`` cursor sits in the order."""
        ref = getattr(flt, name)
        if not ref:
            return None
        # scoped like the listing: another user's run is no cursor (it would tell where that
        # run sits), refused like an unknown id
        rows = await self._find("created_at, seq FROM runs", ref, flt.user_id)
        if not rows:
            # Letta ignores a cursor naming no run and serves the first page again: a pager
            # whose cursor run was pruned between pages would go round for ever
            raise BadRequest(f"INVALID_ARGUMENT: {name}={ref} names no run you can list (it"
                             " may have been pruned): start again without it")
        return tuple(rows[0])

    async def explain(self, flt: RunFilter) -> list[str]:
        """The query plan of a history query (tests assert it uses an index)."""
        key = ("2026-01-01", 1)
        sql, params = list_query(flt, key if flt.after else None, key if flt.before else None)
        return [r[3] for r in await self._read("EXPLAIN QUERY PLAN " + sql, params)]

    async def events(self, run_id: str) -> list[Event]:
        # a few rows down the run's own index range: read on the loop, no thread's round trip
        rows = await self._lookup(
            "SELECT id, run_id, at, source, kind, state, status, detail FROM run_events"
            " WHERE run_id = ? ORDER BY id", (run_id,)
        )
        return [Event(id=r["id"], run_id=r["run_id"], at=r["at"], source=r["source"],
                      kind=r["kind"], state=r["state"], status=r["status"],
                      detail=json.loads(r["detail"]) if r["detail"] else None) for r in rows]

    async def stats(self, user_id: str | None) -> dict[str, Any]:
        """Raw figures for /v1/stats: counts (kept by triggers) and recent durations."""
        counts_sql, durations_sql, params = stats_queries(user_id)
        counts = [dict(r) for r in await self._read(counts_sql, params)]
        durations = [tuple(r) for r in await self._read(durations_sql, params)]
        return {"counts": counts, "durations": durations}
