"""Submit writes: the CPU that a submit's two durable writes cost in the SQLite store alone,
and how much of it the history's indexes and the counts' triggers take.

Not one of the five targets: a diagnostic for benchmark 2. No server and no network: the
manager's own ``submit`` (the queued run, claimed) and ``mark_submitted`` (Letta's answer),
so the writes keep the service's shape, 16 submits at a time as benchmark 2's group commits
hold them, on a fresh database per variant:
- as is;
- without the triggers that keep ``run_counts`` (what ``/v1/stats`` reads);
- without the ten indexes on ``runs`` that serve the history's pages and the operators'
  queries (``runs_live``, ``runs_queue``, the id and the Letta id's unique ones kept: the
  dispatcher, the poller and the callbacks need them);
- without both.
The variants without are not a way to run the tracker (the history's pages and stats would
scan the table); they say what a leaner write shape could save at most. The CPU is the
whole process's, per submit: the writes on the event loop's thread, as in the service, and
the WAL's checkpoints on theirs. Letta's run ids are random, as Letta's are (a unique index
on ids in time order would cost less).

    .venv/bin/python benchmarks/submit_writes.py [--quick] [--rounds N] [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

import harness as h

from tracker.config import load_config
from tracker.manager import Manager
from tracker.states import Source, Status
from tracker.store import User
from tracker.store_sqlite import SQLiteStore

BATCH = 16  # benchmark 2's group commits held 15.4 writes on average (BENCHMARKS-HISTORY.md)
AGENTS = [f"agent-{i:08x}-0000-4000-8000-000000000000" for i in range(100)]
HISTORY_INDEXES = ("runs_created", "runs_agent", "runs_status", "runs_state", "runs_user",
                   "runs_letta_status", "runs_missed", "runs_active", "runs_recorded", "runs_via")
TRIGGERS = ("runs_count_insert", "runs_count_update")
NO_TRIGGERS = [f"DROP TRIGGER {t}" for t in TRIGGERS]
NO_INDEXES = [f"DROP INDEX {i}" for i in HISTORY_INDEXES]
VARIANTS = {
    "as is": [],
    "without the counts' triggers": NO_TRIGGERS,
    "without the history's indexes": NO_INDEXES,
    "without both": NO_TRIGGERS + NO_INDEXES,
}


USER = User(id="user-bench", name="bench", is_admin=True, created_at="")


async def one_submit(manager: Manager, body: dict, agent: str) -> None:
    """The two writes as a submit makes them: the manager's own calls, no Letta."""
    run, _ = await manager.submit(USER, agent, dict(body))
    # random, as Letta's (and the simulator's) run ids are
    letta_run = {"id": f"run-{uuid.uuid4()}", "status": Status.CREATED}
    await manager.mark_submitted(run, letta_run, Source.DISPATCH)


async def measure(drops: list[str], bodies: list[dict], rounds: int) -> float:
    """µs of the process's CPU a submit, ``rounds`` group commits of BATCH submits each."""
    with tempfile.TemporaryDirectory(dir=h.OUT) as d:
        path = str(Path(d) / "writes.db")
        store = SQLiteStore(path)
        await store.open()
        # claimed in the submit's own transaction, as benchmark 2's parallel dispatch does
        cfg = load_config(None, environ={"TRACKER_DISPATCH__PER_AGENT": "parallel"})
        manager = Manager(cfg, store, None, lambda run_id: "")  # type: ignore[arg-type]
        try:
            with closing(sqlite3.connect(path)) as db:  # DDL: each statement commits
                for sql in drops:
                    db.execute(sql)

            async def round_(r: int) -> None:
                await asyncio.gather(*(one_submit(manager, bodies[(r * BATCH + k) % len(bodies)],
                                                  AGENTS[(r * BATCH + k) % len(AGENTS)])
                                       for k in range(BATCH)))

            for r in range(50):  # warm up: caches, the first pages of every index
                await round_(r)
            t0 = time.process_time()
            for r in range(rounds):
                await round_(r)
            return (time.process_time() - t0) / (rounds * BATCH) * 1e6
        finally:
            await store.close()


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(5)  # bodies as benchmark 2's: 80-400 characters of prose
    bodies = [{"messages": [{"role": "user", "content": h.prose(rng, rng.randint(80, 400))}]}
              for _ in range(1000)]
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(args.repeats):
        for name, drops in VARIANTS.items():  # alternated: the machine drifts
            cpu[name].append(await measure(drops, bodies, args.rounds))
            print(f"repeat {i + 1}: {name}: {cpu[name][-1]:.1f} µs", flush=True)
    base = h.median(cpu["as is"])
    print(h.table(f"submit writes: median of {args.repeats} repeat(s), {args.rounds} group"
                  f" commits of {BATCH} submits each",
                  ["store", "CPU µs a submit (both writes)", "saved vs as is"],
                  [(name, h.median(v), base - h.median(v)) for name, v in cpu.items()]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short repeat (smoke check)")
    ap.add_argument("--rounds", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.repeats = 100, 1
    h.banner("submit writes", args)
    import uvloop  # the service's loop (tracker serve's default where installed)
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
