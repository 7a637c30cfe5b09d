"""Apply lag: how long a Letta callback waits to be applied, at steady rates below a flood.

Not one of the issue's five targets: a check of what the applier's flood hold (applier.py,
``SATURATED``) costs when callbacks come steadily rather than in a flood. Runs are submitted
through the tracker (default configuration) at a fixed rate to the simulator, whose runs
last 0.5-1.5 s and whose callbacks come each on a new connection, as Letta's do. Once all
are recorded, the lag of each is read from the database: from the callback's
``completed_at`` (the simulator stamps it as it sends the callback, as Letta does) to the
tracker's ``recorded_at`` (when the callback was applied). Also printed: whether the hold
engaged (its log line), and the tracker's CPU use during the load, which says how near the
rate is to the most this machine's tracker takes, and the largest the database's WAL grew
(a checkpoint that never lets it start over shows here).

With ``--workers N`` the tracker runs N callback worker processes (``callbacks.workers``),
which take the callbacks; the CPU figure then adds up the tracker's and its workers'.

    .venv/bin/python benchmarks/apply_lag.py [--quick] [--rates R ...] [--seconds S]
        [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sqlite3
import time
from contextlib import closing

import aiohttp
import harness as h

AGENTS = 1000  # each agent gets a run every AGENTS / rate s: its lane is free again by then
FINAL = "('done', 'rejected', 'cancelled', 'lost')"
HOLD_LINE = "applying them waits"


async def submit_at(url: str, key: str, agents: list[str], rate: float,
                    seconds: float) -> tuple[int, collections.Counter]:
    """Submit ``rate`` runs a second for ``seconds``; returns how many, and non-2xx codes."""
    bad: collections.Counter = collections.Counter()
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=256),
                                     headers={"Authorization": f"Bearer {key}"}) as s:
        async def one(i: int) -> None:
            async with s.post(f"/v1/agents/{agents[i % len(agents)]}/messages/async",
                              json={"messages": [{"role": "user", "content": f"task {i}"}]}
                              ) as r:
                await r.read()
                if r.status >= 300:
                    bad[r.status] += 1

        tasks, sent, start = [], 0, time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            while sent < elapsed * rate:
                tasks.append(asyncio.create_task(one(sent)))
                sent += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
    return sent, bad


def one_rate(procs: h.Procs, rate: float, seconds: float, workers: int) -> dict:
    sim_url, agents, _ = procs.simulator(f"sim-{rate:.0f}", agents=AGENTS,
                                         run_duration=(0.5, 1.5))
    db = h.fresh_db(h.OUT / "apply-lag.db")
    key = h.create_key(db, "bench", admin=True)
    log_file = h.OUT / f"applylag-tracker-{rate:.0f}.log"
    log_file.unlink(missing_ok=True)  # the harness appends: only this run's lines
    url, p = procs.tracker(f"tracker-{rate:.0f}", db, sim_url,
                           env={"TRACKER_CALLBACKS__WORKERS": str(workers)})
    cpu0, t0 = h.cpu_seconds(p.pid, children=True), time.monotonic()
    wal = h.wal_sampler(db)
    sent, bad = asyncio.run(submit_at(url, key, agents, rate, seconds))
    busy = (h.cpu_seconds(p.pid, children=True) - cpu0) / (time.monotonic() - t0)
    wal_mb = wal.stop()
    end, left = time.monotonic() + 120, -1
    while time.monotonic() < end and left:
        time.sleep(0.5)
        left = h.count(db, f"SELECT count(*) FROM runs WHERE state NOT IN {FINAL}")
    with closing(sqlite3.connect(db)) as c:
        rows = c.execute("SELECT completed_at, recorded_at, completed_via FROM runs").fetchall()
    log = log_file.read_text(errors="replace")
    for proc in list(procs.procs):
        procs.stop(proc)
    lags = [h.epoch(r[1]) - h.epoch(r[0]) for r in rows if r[0] and r[1]]
    return {"rate": rate, "sent": sent, "bad": sum(bad.values()), "left": left,
            "via": collections.Counter(r[2] for r in rows), "busy": busy,
            "held": HOLD_LINE in log, "wal_mb": wal_mb, **{q: h.pct(lags, q) for q in (50, 90, 99)},
            "max": max(lags, default=float("nan"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one rate, 5 s (smoke check)")
    ap.add_argument("--rates", type=float, nargs="+", default=[100, 200, 300],
                    help="submits (and so callbacks) a second")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of load per rate")
    ap.add_argument("--workers", type=int, default=0,
                    help="the tracker's callbacks.workers: processes taking the callbacks")
    args = ap.parse_args()
    if args.quick:
        args.rates, args.seconds = [100], 5.0
    h.banner("apply lag", args)
    with h.Procs("applylag") as procs:
        results = [one_rate(procs, rate, args.seconds, args.workers) for rate in args.rates]
    print(h.table("apply lag: from Letta's callback to the run recorded", [
        "runs/s", "runs", "non-2xx", "not final", "recorded via", "tracker CPU (cores)",
        "hold engaged", "WAL at most (MB)", "p50 s", "p90 s", "p99 s", "max s"], [
        (r["rate"], r["sent"], r["bad"], r["left"],
         ", ".join(f"{k} {v}" for k, v in r["via"].items()), r["busy"],
         "yes" if r["held"] else "no", r["wal_mb"], r[50], r[90], r[99], r["max"])
        for r in results]))


if __name__ == "__main__":
    main()
