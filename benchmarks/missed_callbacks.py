"""Benchmark 4, missed callbacks: runs of 1 to 5 s with every callback dropped, so that the
tracker learns every outcome by polling; beside it, in the same run, the usual client loop.

Two simulators with the same settings (``--run-duration 1 5 --callback-drop 1.0``, one agent
per run): the tracker (default polling settings, serial dispatch) gets its runs from one
submit per run; the peer submits straight to the other simulator and polls each run every
second until it ends, then fetches its messages and usage (what the tracker records). Both
go at once.

Lag is from the simulator finishing a run (Letta's ``completed_at``) to the tracker recording
it (``recorded_at``), or to the peer's poll that saw it. Letta API calls come from the
simulator's own counts (``/_sim/stats``).

    .venv/bin/python benchmarks/missed_callbacks.py [--quick] [--runs N] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import aiohttp
import harness as h

from tracker.config import load_config

TERMINAL = {"completed", "failed", "cancelled"}
FINAL_STATES = ("done", "rejected", "cancelled", "lost")


async def naive_loop(sim_url: str, agents: list[str], texts: list[str]) -> list[float]:
    """The usual client: submit, poll every second until the run ends, fetch the result.
    Returns each run's lag from finishing to the poll that saw it."""
    conn = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(sim_url, connector=conn) as s:
        slots = asyncio.Semaphore(64)

        async def get(path: str) -> dict:
            async with s.get(path) as r:
                return await r.json()

        async def one(agent: str, text: str) -> float:
            async with slots, s.post(f"/v1/agents/{agent}/messages/async",
                                     json={"messages": [{"role": "user", "content": text}]}) as r:
                run = await r.json()
            while True:
                await asyncio.sleep(1.0)
                run = await get(f"/v1/runs/{run['id']}")
                if run["status"] in TERMINAL:
                    break
            seen = time.time()
            await get(f"/v1/runs/{run['id']}/messages")
            await get(f"/v1/runs/{run['id']}/usage")
            return seen - h.epoch(run["completed_at"])

        return await asyncio.gather(*(one(a, t) for a, t in zip(agents, texts, strict=True)))


async def tracker_side(url: str, key: str, db: Path, agents: list[str], texts: list[str],
                       timeout: float) -> float:
    """Submit through the tracker and wait until every run is final; returns the seconds."""
    t0 = time.monotonic()
    await h.submit_many(url, key, list(zip(agents, texts, strict=True)))
    n = len(agents)
    while time.monotonic() - t0 < timeout:
        if final_count(db) >= n:
            break
        await asyncio.sleep(0.25)
    return time.monotonic() - t0


def final_count(db: Path) -> int:
    with closing(sqlite3.connect(db, timeout=10)) as c:
        return c.execute(f"SELECT count(*) FROM runs WHERE state IN {FINAL_STATES}").fetchone()[0]


def tracker_record(db: Path, n: int) -> dict:
    """Lags, completion sources and completeness of the tracker's ``n`` runs; ``missing``,
    how many have no lag (never recorded, or not even created): left out of the lags."""
    with closing(sqlite3.connect(db)) as c:
        rows = c.execute("SELECT completed_at, recorded_at, completed_via, poll_count,"
                         " messages IS NOT NULL AND usage IS NOT NULL"
                         " FROM runs LEFT JOIN run_payloads USING (seq)").fetchall()
    via: dict[str, int] = {}
    for row in rows:
        via[str(row[2])] = via.get(str(row[2]), 0) + 1
    lags = [h.epoch(rec) - h.epoch(done) for done, rec, *_ in rows if done and rec]
    return {"lags": lags, "missing": n - len(lags), "via": via, "polls": [r[3] for r in rows],
            "with_result": sum(r[4] for r in rows)}


def min_interval(pid: int) -> float:
    """The tracker's polling.min_interval_s in force: ``serve`` runs without a config file,
    so its defaults and the environment its process started with (which passes the
    benchmark's own on: a TRACKER_POLLING__MIN_INTERVAL_S there is in force too)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = dict(v.decode().split("=", 1) for v in f.read().split(b"\0") if b"=" in v)
    return load_config(environ=environ).polling.min_interval_s


def calls(sim_url: str) -> dict[str, int]:
    """Letta API calls: all, submits, result fetches (messages, usage), status checks."""
    c = h.http_json("GET", sim_url + "/_sim/stats")["calls"]
    submits = sum(v for k, v in c.items() if k.endswith("/messages/async"))
    results = sum(v for k, v in c.items() if k.endswith(("/messages", "/usage")))
    return {"all": sum(c.values()), "submit": submits, "result": results,
            "checks": sum(c.values()) - submits - results, "routes": c}


def one_repeat(procs: h.Procs, args: argparse.Namespace, i: int) -> dict:
    n = args.runs
    sim_t, agents_t, _ = procs.simulator("sim-tracker", agents=n, run_duration=(1, 5),
                                         callback_drop=1.0)
    sim_n, agents_n, _ = procs.simulator("sim-naive", agents=n, run_duration=(1, 5),
                                         callback_drop=1.0)
    db = h.fresh_db(h.OUT / "missed-tracker.db")
    key = h.create_key(db, "bench", admin=True)
    url, tracker = procs.tracker("tracker", db, sim_t)
    rng = random.Random(i)
    texts = [h.prose(rng, 200) for _ in range(n)]

    async def both() -> tuple[float, list[float]]:
        return await asyncio.gather(tracker_side(url, key, db, agents_t, texts, args.timeout),
                                    naive_loop(sim_n, agents_n, texts))

    elapsed, naive = asyncio.run(both())
    got = {"elapsed": elapsed, "final": final_count(db), "naive": naive,
           "calls_t": calls(sim_t), "calls_n": calls(sim_n), **tracker_record(db, n),
           "min_interval": min_interval(tracker.pid)}
    for proc in list(procs.procs):
        procs.stop(proc)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 runs, one repeat")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=90.0)
    args = ap.parse_args()
    if args.quick:
        args.runs, args.repeats = 200, 1
    h.banner("missed callbacks", args)
    reps = []
    with h.Procs("missed") as procs:
        for i in range(args.repeats):
            r = one_repeat(procs, args, i)
            reps.append(r)
            ct, cn = r["calls_t"], r["calls_n"]
            print(f"repeat {i + 1}: tracker {r['final']}/{args.runs} final in {r['elapsed']:.1f}s,"
                  f" lag p50 {h.pct(r['lags'], 50):.2f}s p99 {h.pct(r['lags'], 99):.2f}s"
                  f" ({r['missing']} runs never recorded: no lag),"
                  f" {ct['all'] / args.runs:.2f} calls/run {ct['routes']}, via {r['via']}"
                  f" | peer lag p99 {h.pct(r['naive'], 99):.2f}s,"
                  f" {cn['all'] / args.runs:.2f} calls/run", flush=True)
    report(reps, args)


def report(reps: list[dict], args: argparse.Namespace) -> None:
    n = args.runs
    # what the tracker ran with (the same in every repeat: one environment)
    interval = min(r["min_interval"] for r in reps)
    missing = max(r["missing"] for r in reps)

    def fig(side: str) -> dict:
        lag_key, call_key = ("lags", "calls_t") if side == "t" else ("naive", "calls_n")
        return {"p50": h.median(h.pct(r[lag_key], 50) for r in reps),
                "p99": h.median(h.pct(r[lag_key], 99) for r in reps),
                "max": h.median(max(r[lag_key], default=float("nan")) for r in reps),
                "calls": h.median(r[call_key]["all"] / n for r in reps),
                "after": h.median((r[call_key]["all"] - r[call_key]["submit"]) / n
                                  for r in reps),
                "checks": h.median(r[call_key]["checks"] / n for r in reps)}

    t, p = fig("t"), fig("n")
    print(h.table(f"missed callbacks: {n:,} runs of 1-5 s, every callback dropped, median of"
                  f" {len(reps)} repeat(s)",
                  ["side", "lag p50 s", "lag p99 s", "lag max s", "runs with no lag (worst)",
                   "Letta calls/run", "after the submit", "of which status checks"],
                  [(f"tracker (poller, min_interval_s {interval:g})", t["p50"], t["p99"],
                    t["max"], missing, t["calls"], t["after"], t["checks"]),
                   ("peer: poll each run every 1 s, then messages + usage", p["p50"], p["p99"],
                    p["max"], 0, p["calls"], p["after"], p["checks"])]))
    complete = min(r["with_result"] for r in reps)
    print(h.table("missed callbacks: targets", ["figure", "value", "target", ""], [
        ("tracker Letta calls per run to learn the outcome (after the submit)", t["after"],
         "<= 3", h.verdict(t["after"] <= 3)),
        ("tracker Letta calls per run, the submit included", t["calls"], "(for reference)", ""),
        ("tracker / peer calls per run", t["calls"] / p["calls"], "", ""),
        ("tracker lag p99 (s), of the runs recorded", t["p99"],
         f"<= {2 * interval:g} (2 x min_interval_s, {interval:g} in force)",
         h.verdict(t["p99"] <= 2 * interval and missing == 0)),
        ("tracker runs never recorded, so left out of the lag (worst repeat)", missing, "0",
         h.verdict(missing == 0)),
        ("runs recorded final with messages and usage (worst repeat)", complete, f"{n}",
         h.verdict(complete == n))]))


if __name__ == "__main__":
    main()
