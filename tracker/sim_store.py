"""In-memory state of the simulated Letta server: agents, runs and the indexes that keep
lookups and listings cheap with tens of thousands of runs."""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tracker.sim_faults import Faults
from tracker.sim_shapes import ACTIVE_STATUSES


@dataclass(frozen=True, slots=True)
class Received:
    """One accepted messages/async request, as it arrived."""

    agent_id: str
    body: dict[str, Any]
    raw: bytes
    run_id: str
    at: float  # time.time() of acceptance


@dataclass(slots=True, eq=False)
class SimAgent:
    """An agent: its served JSON plus what the simulator needs to play it."""

    id: str
    agent_type: str
    json: dict[str, Any]
    faults: Faults | None = None
    turns: int = 0


@dataclass(slots=True, eq=False)
class SimRun:
    """One run and everything Letta would have stored about it."""

    id: str
    agent_id: str
    seq: int
    created_at: datetime
    start_ns: int
    step_id: str
    request_config: dict[str, Any]
    callback_url: str | None
    inputs: list[dict[str, Any]]
    status: str = "created"
    stop_reason: str | None = None
    completed_at: datetime | None = None
    metadata: dict[str, Any] = field(
        default_factory=lambda: {"run_type": "send_message_async", "lettuce": None}
    )
    #: its step's status: pending until its turn ends (for ever when the turn is lost, as a
    #: Letta restart leaves it), whatever a cancel did to the run meanwhile
    step_status: str = "pending"
    callback_sent_at: datetime | None = None
    callback_status_code: int | None = None
    callback_error: str | None = None
    run_ns: int | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    usage: tuple[int, int] = (0, 0)  # (completion_tokens, prompt_tokens)
    deleted: bool = False

    @property
    def otids(self) -> list[str]:
        """The otids of the messages this run was given."""
        return [m["otid"] for m in self.inputs]

    def first_messages(self, stored: int) -> list[dict[str, Any]]:
        """The messages of the run's first ``stored`` stored ones, filtered (what Letta's
        callback carries)."""
        return self.visible(first_stored(self.messages, stored))

    def visible(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` filtered by the request's include_return_message_types, as Letta
        filters a page of a run's messages, once the page is cut."""
        kinds = self.request_config.get("include_return_message_types")
        return [m for m in messages if not kinds or m["message_type"] in kinds]


def first_stored(messages: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The messages of the first ``n`` stored ones (those cut from one share its id)."""
    ids: set[str] = set()
    out = []
    for m in messages:
        if m["id"] not in ids:
            if len(ids) == n:
                break
            ids.add(m["id"])
        out.append(m)
    return out


@dataclass(frozen=True, slots=True)
class RunQuery:
    """The filters of `GET /v1/runs/`, already parsed."""

    agent_ids: frozenset[str] | None = None  # Letta: `agent_id IN (...)`
    statuses: frozenset[str] | None = None
    background: bool | None = None
    stop_reason: str | None = None
    conversation_id: str | None = None
    before: str | None = None
    after: str | None = None
    limit: int = 100
    ascending: bool = False

    def matches(self, run: SimRun) -> bool:
        """Whether `run` passes every filter but the cursors."""
        if run.deleted or (self.statuses is not None and run.status not in self.statuses):
            return False
        if self.agent_ids is not None and run.agent_id not in self.agent_ids:
            return False
        if self.stop_reason is not None and run.stop_reason != self.stop_reason:
            return False
        # Every simulated run is a background run with no conversation: Letta filters on
        # any conversation_id given, even "" (run_manager.list_runs), so none matches
        return self.background is not False and self.conversation_id is None


class RunStore:
    """Runs by id, per agent and by activity; lists are in creation order."""

    def __init__(self, documented_cursors: bool = False) -> None:
        #: the runs listing's `before`/`after` as Letta's API reference describes them (`after`
        #: pages onward in the listing's order), which another Letta (Cloud, a later release)
        #: may follow; False: as Letta 0.16.8 does, the reverse (see select)
        self.documented_cursors = documented_cursors
        #: as a SQLite-backed Letta: a cursor's created_at cut to its whole second (see select)
        self.second_cursors = False
        self.agents: dict[str, SimAgent] = {}
        self._runs: dict[str, SimRun] = {}
        self._all: list[SimRun] = []
        self._by_agent: dict[str, list[SimRun]] = {}
        # Insertion-ordered, so iteration is creation order like the lists.
        self._active: dict[str, SimRun] = {}
        self._active_by_agent: dict[str, dict[str, SimRun]] = {}
        self._otids: Counter[str] = Counter()
        self._seq = itertools.count()

    def next_seq(self) -> int:
        """The creation rank of the next run (Letta's created_at, id tie-break)."""
        return next(self._seq)

    def add(self, run: SimRun) -> None:
        """Store a new, active run."""
        self._runs[run.id] = run
        self._all.append(run)
        self._by_agent.setdefault(run.agent_id, []).append(run)
        self._active[run.id] = run
        self._active_by_agent.setdefault(run.agent_id, {})[run.id] = run
        self._otids.update(run.otids)

    def get(self, run_id: str) -> SimRun | None:
        """The run with this id, if it exists."""
        return self._runs.get(run_id)

    def runs(self) -> Iterator[SimRun]:
        """Every live run, oldest first."""
        return (r for r in self._all if not r.deleted)

    def delete(self, run_id: str) -> SimRun | None:
        """Forget a run; listings skip its tombstone."""
        run = self._runs.pop(run_id, None)
        if run is not None:
            run.deleted = True
            self.deactivate(run)
        return run

    def deactivate(self, run: SimRun) -> None:
        """Take a run out of the active indexes once it left created/running."""
        self._active.pop(run.id, None)
        self._active_by_agent.get(run.agent_id, {}).pop(run.id, None)

    def active_for(self, agent_id: str) -> list[SimRun]:
        """The agent's created/running runs, oldest first."""
        return list(self._active_by_agent.get(agent_id, {}).values())

    def otid_counts(self) -> Counter[str]:
        """How many runs were created carrying each otid."""
        return Counter(self._otids)

    def select(self, query: RunQuery) -> list[SimRun]:
        """Runs matching `query`, in its order, at most `query.limit`."""
        after, before = self._seq_of(query.after), self._seq_of(query.before)
        if not self.documented_cursors:
            # Letta 0.16.8 (run_manager_helper._apply_pagination_async) filters `after` with
            # _cursor_filter's forward=not ascending and `before` with forward=ascending: in
            # either order `before` gives the runs beyond the cursor, `after` those on the
            # near side of it. (A SQLite-backed Letta also cuts the cursor's created_at to
            # whole seconds, as a string, so that onward pages repeat (asc) or skip (desc)
            # the cursor's same-second runs: simulated with ``second_cursors``.)
            after, before = before, after
        # `after` as documented: the runs past the cursor in the listing's order
        low, high = (after, before) if query.ascending else (before, after)
        if self.second_cursors:
            # a bound is its run's whole second: every run of that second, before or after
            # the cursor, falls on the same side (stored times carry microseconds; the cut
            # cursor has none, and compares lower as a string)
            low = None if low is None else self._second_start(low) - 1
            high = None if high is None else self._second_start(high)
        walk = self._walk(self._source(query), low, high, query.ascending)
        return list(itertools.islice((r for r in walk if query.matches(r)), query.limit))

    def _second_start(self, seq: int) -> int:
        """The seq of the first run created in the same second as run ``seq``."""
        i = bisect_left(self._all, seq, key=_seq)
        second = self._all[i].created_at.replace(microsecond=0)
        while i > 0 and self._all[i - 1].created_at.replace(microsecond=0) == second:
            i -= 1
        return self._all[i].seq

    def _seq_of(self, run_id: str | None) -> int | None:
        # Letta ignores a cursor naming no run.
        run = self._runs.get(run_id) if run_id else None
        return None if run is None else run.seq

    def _source(self, query: RunQuery) -> list[SimRun] | dict[str, SimRun]:
        # Only-active queries walk the (small) active index instead of all history.
        active_only = query.statuses is not None and query.statuses <= ACTIVE_STATUSES
        if query.agent_ids is None or len(query.agent_ids) > 1:
            # several agents: every run, `matches` keeps theirs
            return self._active if active_only else self._all
        (agent_id,) = query.agent_ids
        if active_only:
            return self._active_by_agent.get(agent_id, {})
        return self._by_agent.get(agent_id, [])

    @staticmethod
    def _walk(
        source: list[SimRun] | dict[str, SimRun], low: int | None, high: int | None, asc: bool
    ) -> Iterable[SimRun]:
        # `low`/`high` bound the seqs; the order decides which end the page starts from.
        if isinstance(source, dict):
            runs = source.values() if asc else reversed(source.values())
            return (
                r for r in runs if (low is None or r.seq > low) and (high is None or r.seq < high)
            )
        start = 0 if low is None else bisect_right(source, low, key=_seq)
        stop = len(source) if high is None else bisect_left(source, high, key=_seq)
        indices = range(start, stop) if asc else range(stop - 1, start - 1, -1)
        return (source[i] for i in indices)


def _seq(run: SimRun) -> int:
    return run.seq
