"""Benchmark 2's diagnostic peer: the tracker with a submit's run writes kept in memory.

    .venv/bin/python benchmarks/nostore_tracker.py   (configured as ``tracker serve`` is)

This is the real ``tracker serve`` with one change. A submit's two writes to SQLite, the queued
run and then Letta's answer, go to a dict instead. Everything else runs the tracker's own code:
- the API key lookup (still in SQLite);
- the body's parsing and validation;
- the dispatcher and the Letta client;
- the answer.

It is not a way to run the tracker: nothing it takes is kept. It answers one question. Its
throughput against the direct path, in the same run, is the most that any storage could let
the tracker's request path reach on this machine. The gap between it and the tracker is what
the durable writes cost.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Iterable
from typing import Any

from tracker import clock
from tracker.cli import main
from tracker.states import State
from tracker.store import Event, NewRun, RunRecord
from tracker.store_sqlite import SQLiteStore

_seq = itertools.count(1)
_runs: dict[str, RunRecord] = {}


async def submit(self: SQLiteStore, new: NewRun, event: Event,
                 claim: bool | None = None) -> tuple[RunRecord, bool]:
    """The run as ``SQLiteStore.submit`` returns it with parallel lanes (the benchmark's):
    claimed at once when asked to be; serial lanes' check is not modelled."""
    go = claim is not None
    run = RunRecord(seq=next(_seq), id=new.id, user_id=new.user_id, agent_id=new.agent_id,
                    kind=new.kind, state=State.SUBMITTING if go else State.QUEUED,
                    status="created", created_at=clock.iso(), request=new.request,
                    request_config=new.request_config, callback_url=new.callback_url,
                    idempotency_key=new.idempotency_key, request_hash=new.request_hash,
                    attempts=int(go), next_check_at=0.0)
    _runs[run.id] = run
    return run, True


async def transition(self: SQLiteStore, run_id: str, to: State | None,
                     expect: Iterable[State], fields: dict[str, Any], event: Event | None,
                     relay: bool = False) -> RunRecord | None:
    """The compare-and-set of ``SQLiteStore.transition``, on the dict."""
    run = _runs.get(run_id)
    if run is None or run.state not in tuple(expect):
        return None
    known = {k: v for k, v in fields.items() if k in RunRecord.__dataclass_fields__}
    run = _runs[run_id] = dataclasses.replace(run, **known, state=to or run.state)
    return run


if __name__ == "__main__":
    SQLiteStore.submit = submit  # type: ignore[method-assign]
    SQLiteStore.transition = transition  # type: ignore[method-assign]
    sys.exit(main(["serve", *sys.argv[1:]]))
