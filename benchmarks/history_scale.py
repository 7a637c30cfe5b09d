"""Benchmark 3, history at scale: the REST history over a database of 1,000,000 runs and
~5,000,000 events (built once by bulkdata.py and cached under benchmarks/out/).

The tracker serves the cached database (Letta unreachable: only history is asked of it). One
client on a keep-alive connection asks, one request at a time, for pages of runs by agent,
by status, by time range, the next page by cursor, one run and its timeline (in one request,
``?include=events``, and in two), and the stats, with parameters drawn at random; latencies
are taken at the client. The tracker's RSS is sampled every 20 ms throughout. A first pass
warms the caches and is not counted.

    .venv/bin/python benchmarks/history_scale.py [--quick] [--runs N] [--passes P]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from urllib.parse import urlencode

import bulkdata
import harness as h

# kind -> target p99 in ms
TARGETS = {"runs: by agent": 10, "runs: by agent, as its user": 10, "runs: by status": 10,
           "runs: by two statuses": 10, "runs: by time range": 10, "runs: newest (no filter)": 10,
           "runs: callback missed": 10, "runs: next page by cursor": 10,
           "run: one": 5, "run: its timeline (events)": 5,
           "run: with its timeline (one request)": 5,
           # what a client without ?include=events pays: two requests, one after the other
           "run: one + timeline (two requests)": None,
           "stats: all (admin)": 250, "stats: one user": 250}


class Client:
    """One keep-alive HTTP connection; ``get`` returns (ms, status, parsed body)."""

    def __init__(self, port: int, key: str) -> None:
        self.conn = http.client.HTTPConnection(h.HOST, port, timeout=60)
        self.headers = {"Authorization": f"Bearer {key}"}

    def get(self, path: str) -> tuple[float, int, object]:
        t = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        resp = self.conn.getresponse()
        body = resp.read()
        ms = (time.perf_counter() - t) * 1e3
        return ms, resp.status, json.loads(body) if body else None


def sample(db, n: int, rng: random.Random) -> dict:
    """Run ids, agents (with their owners) and time bounds to draw requests from."""
    with closing(sqlite3.connect(db)) as c:
        top = c.execute("SELECT max(seq) FROM runs").fetchone()[0]
        seqs = [rng.randint(1, top) for _ in range(n)]
        runs = [r[0] for r in c.execute(
            f"SELECT id FROM runs WHERE seq IN ({','.join('?' * len(seqs))})", seqs)]
        try:  # run_counts (schema v3) has every (agent, user) pair in a few hundred rows
            pairs = "SELECT DISTINCT agent_id, user_id FROM run_counts"
            c.execute(pairs + " LIMIT 1")
        except sqlite3.OperationalError:
            pairs = "SELECT DISTINCT agent_id, user_id FROM runs"
        agents = c.execute(f"SELECT r.agent_id, u.name FROM ({pairs}) r"
                           " JOIN users u ON u.id = r.user_id").fetchall()
    return {"runs": runs, "agents": agents}


def kinds(s: dict, meta: dict, admin: Client, users: dict[str, Client]) -> dict[str, Callable]:
    """Each kind of request: a function of the RNG that makes one and returns its (ms, status)."""
    span = meta["end"] - meta["start"]

    def runs(client: Client, **q) -> Callable:
        return lambda rng: client.get("/v1/runs?" + urlencode(
            {k: v(rng) if callable(v) else v for k, v in q.items()}, doseq=True))[:2]

    def window(rng: random.Random, hours: float) -> tuple[str, str]:
        lo = meta["start"] + rng.uniform(0, span - hours * 3600)
        return h.iso(lo), h.iso(lo + hours * 3600)

    def by_time(rng: random.Random) -> tuple:
        lo, hi = window(rng, rng.choice((1, 6, 24)))
        return admin.get(f"/v1/runs?{urlencode({'created_after': lo, 'created_before': hi})}")[:2]

    def as_user(rng: random.Random) -> tuple:
        agent, owner = rng.choice(s["agents"])
        return users[owner].get(f"/v1/runs?agent_id={agent}")[:2]

    def next_page(rng: random.Random) -> tuple:
        agent = rng.choice(s["agents"])[0]
        page = admin.get(f"/v1/runs?agent_id={agent}")[2]
        last = page[-1]["id"] if page else ""
        return admin.get(f"/v1/runs?agent_id={agent}&after={last}")[:2]

    def one_run(rng: random.Random) -> tuple:
        return admin.get(f"/v1/runs/{rng.choice(s['runs'])}")[:2]

    def timeline(rng: random.Random) -> tuple:
        return admin.get(f"/v1/runs/{rng.choice(s['runs'])}/events")[:2]

    def with_events(rng: random.Random) -> tuple:
        return admin.get(f"/v1/runs/{rng.choice(s['runs'])}?include=events")[:2]

    def both(rng: random.Random) -> tuple:
        run_id = rng.choice(s["runs"])
        a, b = admin.get(f"/v1/runs/{run_id}"), admin.get(f"/v1/runs/{run_id}/events")
        return a[0] + b[0], max(a[1], b[1])

    agent = lambda rng: rng.choice(s["agents"])[0]  # noqa: E731
    return {
        "runs: by agent": runs(admin, agent_id=agent),
        "runs: by agent, as its user": as_user,
        "runs: by status": runs(admin, statuses=lambda rng: rng.choice(
            ("completed", "failed", "cancelled", "running"))),
        "runs: by two statuses": runs(admin, statuses=["failed", "cancelled"]),
        "runs: by time range": by_time,
        "runs: newest (no filter)": runs(admin),
        "runs: callback missed": runs(admin, callback_missed="true"),
        "runs: next page by cursor": next_page,
        "run: one": one_run,
        "run: its timeline (events)": timeline,
        "run: with its timeline (one request)": with_events,
        "run: one + timeline (two requests)": both,
        "stats: all (admin)": lambda rng: admin.get("/v1/stats")[:2],
        "stats: one user": lambda rng: users[rng.choice(list(users))].get("/v1/stats")[:2],
    }


def measure(todo: dict[str, Callable], n: int, rng: random.Random) -> dict[str, list[float]]:
    """``n`` requests of every kind, interleaved in random order; latencies by kind."""
    plan = [k for k in todo for _ in range(n if not k.startswith("stats") else max(3, n // 10))]
    rng.shuffle(plan)
    out: dict[str, list[float]] = {k: [] for k in todo}
    for kind in plan:
        ms, status = todo[kind](rng)
        if status != 200:
            raise RuntimeError(f"{kind}: HTTP {status}")
        out[kind].append(ms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 runs, one short pass")
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300, help="per kind and pass")
    ap.add_argument("--profile", action="store_true", help="py-spy the tracker during pass 1")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.passes, args.requests = 20_000, 1, 40
    h.banner("history at scale", args)
    db, meta = bulkdata.build(args.runs)
    print(f"database {db.name}: {meta['runs']:,} runs, {meta['events']:,} events,"
          f" {db.stat().st_size / 2**30:.2f} GiB", flush=True)
    rng = random.Random(11)
    s = sample(db, 2000, rng)
    passes = []
    with h.Procs("history") as procs:
        url, p = procs.tracker("tracker", db, "http://127.0.0.1:9")
        port = int(url.rsplit(":", 1)[1])
        rss = h.MaxSampler(lambda: h.rss_mb(p.pid), 0.02)
        rss.start()
        admin = Client(port, meta["keys"]["admin"])
        users = {u: Client(port, meta["keys"][u]) for u in bulkdata.USERS}
        todo = kinds(s, meta, admin, users)
        t = time.monotonic()
        measure(todo, max(10, args.requests // 5), rng)  # warm-up, not counted
        print(f"warm-up pass done in {time.monotonic() - t:.0f}s", flush=True)
        for i in range(args.passes):
            spy = h.py_spy(procs, p.pid, "history-tracker") if args.profile and i == 0 else None
            t = time.monotonic()
            passes.append(measure(todo, args.requests, rng))
            h.end_py_spy(procs, spy)
            print(f"pass {i + 1} done in {time.monotonic() - t:.0f}s; tracker RSS max so far"
                  f" {rss.max:.0f} MiB", flush=True)
        rss_max = rss.stop()
        rss_now = h.rss_mb(p.pid)
    report(passes, rss_max, rss_now, args)
    if args.profile:
        print("\n" + h.profile_summary("history-tracker"))


def report(passes: list[dict[str, list[float]]], rss_max: float, rss_end: float,
           args: argparse.Namespace) -> None:
    rows = []
    missed = []
    for kind, target in TARGETS.items():
        p50 = h.median(h.pct(p[kind], 50) for p in passes)
        p99 = h.median(h.pct(p[kind], 99) for p in passes)
        worst = max(max(p[kind]) for p in passes)
        ok = target is None or p99 < target
        if not ok:
            missed.append(kind)
        rows.append((kind, sum(len(p[kind]) for p in passes), p50, p99, worst,
                     f"< {target}" if target else "(peer)", h.verdict(ok) if target else ""))
    print(h.table(f"history at scale: {args.runs:,} runs, latency at the client in ms,"
                  f" median over {len(passes)} pass(es)",
                  ["request", "n", "p50", "p99", "max", "target p99", ""], rows))
    print(h.table("history at scale: memory", ["figure", "value", "target", ""], [
        ("tracker RSS, max while serving (MiB)", rss_max, "< 150", h.verdict(rss_max < 150)),
        ("tracker RSS at the end (MiB)", rss_end, "", "")]))


if __name__ == "__main__":
    main()
