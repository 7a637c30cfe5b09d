"""SQL text for the SQLite store's queries, and its rows turned into records: kept apart from
the I/O."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import replace
from itertools import product
from typing import Any

from tracker.migrations import LIVE_STATES_SQL
from tracker.serialize import DEFAULT_METADATA, RUN_SHAPE, TRACKER_SHAPE
from tracker.states import LANE_BUSY, LETTA_ACTIVE, State
from tracker.store import RunFilter, RunRecord

SUMMARY_COLS = ", ".join([
    "seq", "id", "user_id", "agent_id", "kind", "state", "status", "stop_reason", "letta_run_id",
    "request_config", "callback_url", "created_at", "submitted_at", "completed_at", "recorded_at",
    "completed_via", "conversation_id", "base_template_id", "background", "metadata",
    "callback_sent_at", "callback_status_code", "callback_error", "ttft_ns", "total_duration_ns",
    "error", "error_code", "attempts", "poll_count", "next_check_at", "deadline_at",
    "needs_lookup", "idempotency_key", "request_hash",
])
#: a run's wide part, in a table of its own since schema v6 (run_payloads, keyed by seq)
PAYLOAD_COLS = ("request", "messages", "usage")
FULL_COLS = SUMMARY_COLS + ", " + ", ".join(PAYLOAD_COLS)
#: FROM for FULL_COLS: the run with its payload beside it
WITH_PAYLOAD = "runs LEFT JOIN run_payloads USING (seq)"
DELIVERY_COLS = ("id, run_id, user_id, url, state, attempts, next_attempt_at, created_at,"
                 " finished_at, last_status, last_error")
LIVE = frozenset({*LANE_BUSY, State.QUEUED, State.PAUSED})
JSON_COLS = frozenset({"request", "request_config", "metadata", "messages", "usage"})


def _json_object(shape: tuple[tuple[str, str | None], ...], computed: dict[str, str]) -> str:
    """SQL building ``shape`` (``tracker.serialize``) from a row of ``runs``."""
    parts = []
    for key, column in shape:
        value = computed[key] if column is None else (
            f"json({column})" if column in JSON_COLS else column)
        parts.append(f"'{key}', {value}")
    return f"json_object({', '.join(parts)})"


_METADATA = json.dumps(DEFAULT_METADATA)
assert "'" not in _METADATA
#: one run as the API shows it (``serialize.run_out``, the relay state left out), built by
#: SQLite: a history page's 100 runs in ~0.6 ms instead of ~2 as records and then dicts
RUN_JSON = _json_object(RUN_SHAPE, {
    # NULL (Letta's default) is true
    "background": "json(CASE WHEN background = 0 THEN 'false' ELSE 'true' END)",
    "metadata": f"json(coalesce(metadata, '{_METADATA}'))",
    "tracker": _json_object(TRACKER_SHAPE, {"state": "state", "relay": "NULL"}),
})


def as_run(row: sqlite3.Row) -> RunRecord:
    return as_runs([row])[0]


def as_runs(rows: Sequence[sqlite3.Row]) -> list[RunRecord]:
    """Records from rows of run columns. Built by position, the column names read once per
    result: ``row["name"]`` scans the names, which cost a page of 100 runs 3 ms."""
    if not rows:
        return []
    keys = rows[0].keys()
    json_cols = [k for k in keys if k in JSON_COLS]
    return [_record(dict(zip(keys, row, strict=True)), json_cols) for row in rows]


def _record(data: dict[str, Any], json_cols: list[str]) -> RunRecord:
    for k in json_cols:
        if data[k] is not None:
            data[k] = json.loads(data[k])
    data["state"] = State(data["state"])
    data["needs_lookup"] = bool(data.get("needs_lookup"))
    if data.get("background") is not None:
        data["background"] = bool(data["background"])
    # the dataclass __init__ with ~40 keywords costs ~10 µs a run, most of a history page's
    # time; the row has every field without a default, the class holds the other defaults
    run = object.__new__(RunRecord)
    run.__dict__.update(data)
    return run


def marks(n: int) -> str:
    return ",".join("?" * n)


def live_runs(states: Iterable[State], join: str = "") -> tuple[str, tuple[str, ...]]:
    """``FROM ... WHERE`` for runs in some live states, through the runs_live partial index:
    its own WHERE term must appear verbatim for SQLite to use it."""
    states = tuple(states)
    assert set(states) <= LIVE, states
    return (f"runs INDEXED BY runs_live{join} WHERE {LIVE_STATES_SQL}"
            f" AND state IN ({marks(len(states))})", states)


def _in(column: str, values: Any, where: list[str], params: list[Any]) -> None:
    values = list(values)
    where.append(f"{column} IN ({marks(len(values))})")
    params.extend(values)


def _filters(flt: RunFilter) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("user_id", flt.user_id), ("agent_id", flt.agent_id), ("stop_reason", flt.stop_reason),
        ("conversation_id", flt.conversation_id), ("completed_via", flt.completed_via),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if flt.statuses:
        _in("status", flt.statuses, where, params)
    if flt.states:
        _in("state", list(dict.fromkeys(flt.states)), where, params)
    if flt.active is not None:
        # the same text as the partial index runs_active, so SQLite can use it
        where.append(("" if flt.active else "NOT ") + "status IN ('created', 'running')")
    if flt.background is not None:
        # NULL until Letta's answer says (a queued run, one refused or cancelled before it
        # was sent), and shown as true (serialize.run_out): filtered as it is shown
        where.append("coalesce(background, 1) = ?")
        params.append(int(flt.background))
    if flt.callback_missed is not None:
        # missed: Letta's callback never told us; the poller or reconcile did (runs_missed)
        where.append("completed_via IN ('poll', 'reconcile')" if flt.callback_missed
                     else "completed_via = 'callback'")
    if flt.created_after:
        where.append("created_at >= ?")
        params.append(flt.created_after)
    if flt.created_before:
        where.append("created_at < ?")
        params.append(flt.created_before)
    return where, params


def _hint(flt: RunFilter) -> str:
    """Without statistics SQLite prefers an equality index and then sorts; for the two
    multi-value filters the partial index already yields pages in order."""
    if flt.agent_id or flt.user_id or flt.statuses or flt.states:
        return ""
    if flt.active:
        return " INDEXED BY runs_active"
    if flt.callback_missed:
        return " INDEXED BY runs_missed"
    return ""


#: a run's place in the history's order: (created_at, seq)
Key = tuple[str, int]


def list_query(flt: RunFilter, after: Key | None = None, before: Key | None = None,
               cols: str = SUMMARY_COLS) -> tuple[str, list[Any]]:
    """Keyset-paginated history query of ``cols``, newest (or oldest) first by
    (created_at, seq), between the ``after`` and ``before`` cursors' runs."""
    # a value given twice is one filter: as two branches of the merge it counted runs twice
    agents = [flt.agent_id] if flt.agent_id else list(dict.fromkeys(flt.agent_ids))
    statuses = list(dict.fromkeys(flt.statuses))
    if len(agents) > 1 or len(statuses) > 1:
        return _merged(flt, agents, statuses, after, before, cols)
    one = replace(flt, agent_id=agents[0] if agents else None, agent_ids=(), statuses=statuses)
    return _single(one, after, before, cols)


def _merged(flt: RunFilter, agents: list[str], statuses: list[str], after: Key | None,
            before: Key | None, cols: str) -> tuple[str, list[Any]]:
    """Several agents or statuses: one ordered page per agent and status, each down its own
    index, merged. A single `IN (...)` query walks the time index and filters, which is
    slower. The merge needs only (created_at, seq), which those indexes hold: rows are read
    for the page's runs alone."""
    parts, params = [], []
    for agent, status in product(agents or [None], statuses or [None]):
        branch = replace(flt, agent_id=agent, agent_ids=(), statuses=[status] if status else [])
        sql, sub_params = _single(branch, after, before, "seq, created_at")
        parts.append(f"SELECT * FROM ({sql})")
        params.extend(sub_params)
    direction = "ASC" if flt.ascending else "DESC"
    order = f" ORDER BY created_at {direction}, seq {direction}"
    merged = " UNION ALL ".join(parts) + order + " LIMIT ?"
    return (f"SELECT {cols} FROM runs WHERE seq IN (SELECT seq FROM ({merged})){order}",
            [*params, flt.limit])


def _single(flt: RunFilter, after: Key | None, before: Key | None,
            cols: str) -> tuple[str, list[Any]]:
    where, params = _filters(flt)
    # Letta's cursors are positional in the listing's order (as its SDK pages with
    # after=<last id>): `after` is further along, `before` is back towards the start; with
    # both, the runs between them
    further, back = (">", "<") if flt.ascending else ("<", ">")
    for key, op in ((after, further), (before, back)):
        if key:
            where.append(f"(created_at, seq) {op} (?, ?)")
            params.extend(key)
    direction = "ASC" if flt.ascending else "DESC"
    sql = (f"SELECT {cols} FROM runs{_hint(flt)}"
           + (" WHERE " + " AND ".join(where) if where else "")
           + f" ORDER BY created_at {direction}, seq {direction} LIMIT ?")
    return sql, [*params, flt.limit]


#: percentiles are over this many most recently finished runs
DURATION_SAMPLE = 5000


def stats_queries(user_id: str | None) -> tuple[str, str, list[Any]]:
    """Counts per agent, status and state; and durations of the most recent finished runs."""
    scope = "WHERE user_id = ?" if user_id else ""
    params = [user_id] if user_id else []
    counts = ("SELECT agent_id, status, state, nullif(completed_via, '') AS completed_via,"
              f" sum(n) AS n FROM run_counts {scope + ' AND' if scope else 'WHERE'} n > 0"
              " GROUP BY agent_id, status, state, completed_via")
    finished = "recorded_at IS NOT NULL AND submitted_at IS NOT NULL"
    active = ", ".join(f"'{s}'" for s in LETTA_ACTIVE)
    seconds = "(julianday({}) - julianday({})) * 86400.0"
    durations = (
        f"SELECT {seconds.format('completed_at', 'submitted_at')} AS run_s,"
        f" {seconds.format('recorded_at', 'created_at')} AS to_completion_s FROM runs"
        f" {scope + ' AND' if scope else 'WHERE'} {finished} AND status NOT IN ({active})"
        f" ORDER BY recorded_at DESC LIMIT {DURATION_SAMPLE}"
    )
    return counts, durations, params
