"""Benchmark 5, recovery: the tracker is stopped with 10,000 submitted runs in flight, they all
finish on the simulator while it is down (their callbacks find nobody), and it starts again.

Each run's text carries a ``[[delay=N]]`` marker so that it ends a few seconds after the
submit phase is planned to end, whenever it was sent. The tracker runs with default settings
(serial dispatch, one agent per run). After the stop the benchmark waits until the simulator
has finished every run and tried every callback, then starts the tracker on the same database
and watches it until every run is recorded final with its messages and usage. Letta API calls
during recovery come from the simulator's own counts.

``--running N`` (not the target's measurement) adds N runs, on N more agents, that last an hour:
still running at Letta when the tracker starts again, as in most real restarts. The start-up
sweep checks them too; the figures stay those of the ``--runs`` that finished.

    .venv/bin/python benchmarks/recovery.py [--quick] [--runs N] [--repeats R] [--running N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import bulkdata
import harness as h

#: how long the simulator may take, after the stop, to finish every run and try its callback
#: (they end 1-4 s after the submit phase's planned end: seconds, unless something is wrong)
FINISH_TIMEOUT = 120.0


def sim_state(sim_url: str) -> dict:
    return h.http_json("GET", sim_url + "/_sim/stats")


def letta_calls(sim_url: str) -> dict[str, int]:
    return sim_state(sim_url)["calls"]


def recorded(db: Path, since: str) -> tuple[int, int]:
    """(runs created since ``since`` now final, of which with messages and usage)."""
    with closing(sqlite3.connect(db, timeout=10)) as c:
        return c.execute(
            "SELECT count(*), coalesce(sum(messages IS NOT NULL AND usage IS NOT NULL), 0)"
            " FROM runs LEFT JOIN run_payloads USING (seq) WHERE created_at >= ?"
            " AND state IN ('done', 'rejected', 'cancelled', 'lost')", (since,)).fetchone()


def database(history: int) -> Path:
    """A fresh database, or a copy of the cached month of ``history`` runs (benchmark 3's)."""
    db = h.OUT / "recovery-tracker.db"
    if not history:
        return h.fresh_db(db)
    source, _ = bulkdata.build(history)
    return h.copy_db(source, db)


def submit_phase(url: str, key: str, agents: list[str], budget: float, rng: random.Random,
                 running: int = 0) -> float:
    """Submit one run per agent, each planned to end after ``budget`` seconds + 1..4 s; the
    last ``running`` agents' runs last an hour."""
    t0 = time.time()
    end = t0 + budget

    def text() -> str:  # made just before its submit, so the run ends 1-4 s after ``end``
        delay = max(0.5, end - time.time() + rng.uniform(1, 4))
        return f"{h.prose(rng, 150)} [[delay={delay:.2f}]]"

    def long() -> str:
        return f"{h.prose(rng, 150)} [[delay=3600]]"

    short = len(agents) - running
    jobs = [(a, text if k < short else long) for k, a in enumerate(agents)]
    asyncio.run(h.submit_many(url, key, jobs, concurrency=64))
    return time.time() - t0


def wait_finished(sim: str, n: int, timeout: float) -> bool:
    """Wait until the simulator has completed ``n`` runs and tried each one's callback (and
    found nobody listening); whether it did in ``timeout`` s (the restart goes on either way,
    and the repeat is reported failed)."""
    end = time.monotonic() + timeout
    completed = sent = 0
    while time.monotonic() < end:
        completed = sim_state(sim)["statuses"].get("completed", 0)
        sent = sum(1 for r in h.http_json("GET", sim + "/_sim/runs") if r["callback_sent_at"])
        if completed >= n and sent >= n:
            return True
        time.sleep(0.5)
    print(f"the simulator had completed {completed:,} runs and tried {sent:,} callbacks of"
          f" {n:,} {timeout:.0f}s after the stop", flush=True)
    return False


def one_repeat(procs: h.Procs, args: argparse.Namespace, i: int) -> dict:
    n = args.runs
    sim, agents, _ = procs.simulator("sim", agents=n + args.running,
                                     run_duration=(3600, 3600))
    db = database(args.history)
    key = h.create_key(db, "bench", admin=True)
    since = h.iso(time.time())
    port = h.free_port()
    _, p = procs.tracker("tracker", db, sim, port=port)
    took = submit_phase(f"http://{h.HOST}:{port}", key, agents, args.budget, random.Random(i),
                        args.running)
    if took > args.budget - 1:
        raise SystemExit(f"submitting took {took:.0f}s, past the planned {args.budget:g}s:"
                         " raise --budget")
    with closing(sqlite3.connect(db)) as c:
        in_flight = c.execute("SELECT count(*) FROM runs WHERE state = 'submitted'"
                              " AND created_at >= ?", (since,)).fetchone()[0]
    calls_before = sum(letta_calls(sim).values())
    procs.stop(p)  # SIGTERM: the tracker's own graceful stop
    stopped = time.time()
    finished = wait_finished(sim, n, FINISH_TIMEOUT)
    finished_while_down = time.time() - stopped
    calls0 = letta_calls(sim)
    t0 = time.monotonic()
    p = procs.start("tracker-restart", [h.PY, "-m", "tracker", "serve"], env={
        **h.tracker_env(db, sim), "TRACKER_SERVER__PORT": str(port)})
    h.wait_http(f"http://{h.HOST}:{port}/healthz", proc=p)
    ready = time.monotonic() - t0
    done = with_result = 0
    while time.monotonic() - t0 < args.timeout:
        done, with_result = recorded(db, since)
        if with_result >= n:
            break
        time.sleep(0.1)
    all_in = time.monotonic() - t0
    calls1 = letta_calls(sim)
    during = {k: v - calls0.get(k, 0) for k, v in calls1.items() if v - calls0.get(k, 0)}
    with closing(sqlite3.connect(db)) as c:
        via = dict(c.execute("SELECT completed_via, count(*) FROM runs WHERE created_at >= ?"
                             " GROUP BY 1", (since,)).fetchall())
    procs.stop(p, sig=signal.SIGTERM)
    for proc in list(procs.procs):
        procs.stop(proc)
    return {"in_flight": in_flight, "finished": finished, "submit_s": took,
            "down_s": finished_while_down,
            "ready_s": ready, "all_s": all_in, "done": done, "with_result": with_result,
            "calls": sum(during.values()), "by_route": during, "via": via,
            "calls_before": calls_before, "total_calls": sum(calls1.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 runs, one repeat")
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    # 100, not 60: on a machine three times slower (2026-12-04) 10,000 submits took 61 s
    ap.add_argument("--budget", type=float, default=100.0,
                    help="seconds planned for the submit phase (runs end just after it)")
    ap.add_argument("--timeout", type=float, default=120.0, help="give up recovery after this")
    ap.add_argument("--history", type=int, default=0,
                    help="start from a copy of benchmark 3's database of this many runs"
                         " (0: an empty database)")
    ap.add_argument("--running", type=int, default=0,
                    help="runs more that are still running at the restart (an hour each)")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.repeats, args.budget = 1000, 1, 12.0
    h.banner("recovery", args)
    reps = []
    with h.Procs("recovery") as procs:
        for i in range(args.repeats):
            try:
                r = one_repeat(procs, args, i)
            except subprocess.CalledProcessError as e:
                raise SystemExit(f"a tracker command failed: {e.stderr}") from e
            reps.append(r)
            finished = (f"all finished {r['down_s']:.1f}s after it" if r["finished"] else
                        f"NOT all finished {r['down_s']:.0f}s after it")
            print(f"repeat {i + 1}: {r['in_flight']:,} of {args.runs + args.running:,} in"
                  f" flight at the stop (submitted in {r['submit_s']:.0f}s); {finished}; restart:"
                  f" healthy in {r['ready_s']:.1f}s, {r['with_result']:,}/{args.runs:,} recorded"
                  f" with results in {r['all_s']:.1f}s, {r['calls']:,} Letta calls"
                  f" ({r['calls'] / args.runs:.2f}/run) {r['by_route']}, via {r['via']}",
                  flush=True)
    report(reps, args)


def report(reps: list[dict], args: argparse.Namespace) -> None:
    n = args.runs
    all_s = h.median(r["all_s"] if r["with_result"] >= n else float("inf") for r in reps)
    per_run = h.median(r["calls"] / n for r in reps)
    life = h.median(r["total_calls"] / n for r in reps)
    print(h.table(f"recovery: {n:,} runs finished while the tracker was down, database with"
                  f" {args.history:,} older runs, median of {len(reps)} repeat(s)",
                  ["figure", "value", "target", ""],
                  [("seconds from start-up until all recorded final with results", all_s,
                    "<= 30", h.verdict(all_s <= 30)),
                   ("seconds from start-up until healthy", h.median(r["ready_s"] for r in reps),
                    "", ""),
                   ("Letta calls per run during recovery", per_run, "<= 3",
                    h.verdict(per_run <= 3)),
                   ("Letta calls per run over its whole life (submit, polls before the stop,"
                    " recovery)", life, "", ""),
                   ("runs recorded with results (worst repeat)",
                    min(r["with_result"] for r in reps), f"{n}",
                    h.verdict(min(r["with_result"] for r in reps) >= n)),
                   *setup_rows(reps, args)]))


def setup_rows(reps: list[dict], args: argparse.Namespace) -> list[tuple]:
    """Whether the repeats measured what the target names: every run in flight at Letta
    (state ``submitted``, none still queued) when the tracker stopped, and every one finished
    while it was down."""
    expect = args.runs + args.running  # --running's runs are in flight too
    in_flight = min(r["in_flight"] for r in reps)
    finished = sum(r["finished"] for r in reps)
    return [("runs in flight at the stop (worst repeat)", in_flight, f"{expect}",
             h.verdict(in_flight == expect)),
            (f"repeats whose runs all finished while the tracker was down (in"
             f" {FINISH_TIMEOUT:.0f} s)", finished, f"{len(reps)}",
             h.verdict(finished == len(reps)))]


if __name__ == "__main__":
    main()
