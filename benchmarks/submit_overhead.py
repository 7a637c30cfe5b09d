"""Benchmark 2, submit overhead: messages submitted through the tracker to the simulator versus
straight to the simulator, by wrk, with the same requests and concurrency, in the same run.
Three peers, in the same run, bound what the tracker could reach:
- the same submits through a bare aiohttp forwarder (``bare_proxy.py``), which only passes the
  bytes on: what any service standing in the path costs;
- the same forwarder writing and committing the run before calling Letta and Letta's answer
  after (``bare_store_proxy.py``): about the most a tracker on aiohttp and SQLite could reach;
- the tracker with its two run writes kept in memory (``nostore_tracker.py``, a diagnostic,
  not a way to run it): what the tracker's request path costs without the durable storage.

Each repeat starts a fresh simulator (and, for the two tracker sides, a fresh tracker database)
per side, each side first in turn between repeats. Runs last long enough that none ends during
the measurement and the tracker's first poll comes after it, so only the submit path is
measured (the cost of learning outcomes is benchmarks 1 and 4). The tracker dispatches per agent in
parallel, so that each submit is sent to Letta inline as a direct submit would be.

Two loads against a simulator that answers at once: ``--connections`` (throughput at
saturation) and one connection (the latency a request pays when nothing queues: the tracker's
own overhead). A third, for context and not a target: ``--connections`` again with the
simulator taking the real Letta server's recorded 50-110 ms to answer a submit
(``--answer-time``; letta-behaviour.md), as a deployment would see it.

    .venv/bin/python benchmarks/submit_overhead.py [--quick] [--repeats N] [--connections C]
"""

from __future__ import annotations

import argparse
import json
import random
from typing import NamedTuple

import harness as h

SCRIPT = h.HERE / "replay.lua"
AGENTS = 100
#: the paths a submit takes: straight to the simulator; through a bare aiohttp forwarder
#: (bare_proxy.py: what standing in the path costs before any of the tracker's work); through
#: the same forwarder with the run's two writes committed (bare_store_proxy.py: the least a
#: tracker must do); through the tracker with its run writes in memory (nostore_tracker.py:
#: all of its work but the durable storage); through the tracker
PATHS = ["direct", "forwarder", "stored-fwd", "no-store", "tracker"]
#: the forwarders' scripts, and the shape of their writes for those that store
#: (bare_store_proxy.py's SHAPE)
FORWARDERS: dict[str, tuple[str, str | None]] = {
    "forwarder": ("bare_proxy.py", None), "stored-fwd": ("bare_store_proxy.py", "floor")}
TRACKERS = {"tracker": None, "no-store": "nostore_tracker.py"}


def requests_file(agents: list[str], n: int) -> str:
    rng = random.Random(5)
    path = h.OUT / "submit-requests.txt"
    lines = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": h.prose(rng, rng.randint(80, 400))}]}
        lines.append(f"POST\t/v1/agents/{agents[i % len(agents)]}/messages/async\t"
                     f"{json.dumps(body, separators=(',', ':'))}\n")
    path.write_text("".join(lines))
    return str(path)


def side(procs: h.Procs, which: str, connections: int, duration: float,
         profile: bool = False, answer_time: tuple[float, float] = (0, 0),
         src: str | None = None) -> dict:
    """One measurement: a fresh simulator, and the forwarder or the tracker in front of it
    unless direct; ``src``: the tracker's package from that directory (submit_compare.py)."""
    sim_url, agents, sim = procs.simulator(
        f"sim-{which}", agents=AGENTS, run_duration=(3600, 3600),
        extra=["--answer-time", *map(str, answer_time)])
    reqs = requests_file(agents, 20_000)
    url, key, pids = sim_url, "", []
    if which in FORWARDERS:
        script, shape = FORWARDERS[which]
        stores = [str(h.no_db(h.OUT / "submit-forwarder.db")), shape] if shape else []
        url, p = procs.bare(which, script, sim_url, *stores)
        pids.append(p.pid)
    if which in TRACKERS:
        db = h.fresh_db(h.OUT / "submit-tracker.db", src=src)
        key = h.create_key(db, "bench", admin=True, src=src)
        url, p = procs.tracker(which, db, sim_url, env={
            "TRACKER_DISPATCH__PER_AGENT": "parallel", "TRACKER_POLLING__GRACE_S": "3600"},
            script=TRACKERS[which], src=src)
        pids.append(p.pid)
    sim_pid = sim.pid
    pids.append(sim_pid)
    meters = {(which if pid != sim_pid else "simulator"): h.CpuMeter(pid) for pid in pids}
    spy = (h.py_spy(procs, pids[0], f"submit-{which}-{connections}")
           if profile and which in TRACKERS else None)
    res = h.wrk(url, SCRIPT, connections, duration, env={
        "BENCH_REQUESTS": reqs, "BENCH_THREADS": "1", "BENCH_AUTH": key})
    res["cpu"] = {name: m.stop(res) for name, m in meters.items()}  # per server (see cpu_table)
    res["cpu_us"] = {name: c["cpu_us"] for name, c in res["cpu"].items()}
    sim_stats = h.http_json("GET", sim_url + "/_sim/stats")  # before py-spy's slow stop
    res["letta_calls"] = sum(sim_stats["calls"].values())
    # A submit answered with its run still queued (not yet at Letta) is not one done: each
    # answered 2xx must be at the simulator when the load ends (read at once, before the
    # tracker's queue drains)
    res["unreached"] = max(0, res["ok"] - sim_stats["received"])
    h.end_py_spy(procs, spy)
    if which in FORWARDERS and FORWARDERS[which][1]:
        res["fold"] = h.http_json("GET", url + "/_fold")
    for proc in list(procs.procs):
        procs.stop(proc)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short repeat (smoke check)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per side and load")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the tracker and its no-store peer in repeat 1")
    ap.add_argument("--answer-time", type=float, nargs=2, default=(0.05, 0.11),
                    metavar=("MIN", "MAX"), help="the third load's simulated Letta answer time"
                    " in seconds (the real server's: 0.05 0.11; 0 0 leaves the load out)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.duration = 1, 3.0
    h.banner("submit overhead", args)
    loads = [Load(args.connections), Load(1)]
    if max(args.answer_time) > 0:
        loads.append(Load(args.connections, tuple(args.answer_time)))
    results: dict[Load, list[dict[str, dict]]] = {load: [] for load in loads}
    with h.Procs("submit") as procs:
        for i in range(args.repeats):
            for load in loads:
                turn = i % len(PATHS)
                order = PATHS[turn:] + PATHS[:turn]  # each side first in turn
                got = {w: side(procs, w, load.connections, args.duration,
                               args.profile and i == 0 and not load.answer_time,
                               load.answer_time or (0, 0)) for w in order}
                results[load].append(got)
                print(f"repeat {i + 1}, {load}: " + " | ".join(
                    f"{w} {h.rate(got[w]):,.0f}/s p50 {got[w]['latency_us']['p50'] / 1e3:.2f}"
                    f" ms" for w in PATHS) + "".join(
                    f", {w} non-2xx {got[w]['bad']} {got[w]['codes']}, socket errors"
                    f" {h.socket_errors(got[w])}, answered but not at Letta {got[w]['unreached']}"
                    for w in TRACKERS), flush=True)
    report(results, args)
    for load in loads if args.profile else ():
        if not load.answer_time:  # the profiled loads (see side's profile argument)
            for which in TRACKERS:
                print("\n" + h.profile_summary(f"submit-{which}-{load.connections}", top=45))


def cpu_table(reps: list[dict[str, dict]], args: argparse.Namespace) -> str:
    """Where the CPU goes at the throughput load: each path's server, its event loop's thread
    apart (a single-process server's rate is bound by it), and the simulator behind it."""
    def med(w: str, name: str, key: str) -> float:  # µs a submit answered, or the busy share
        return h.median(r[w]["cpu"][name][key] for r in reps)

    rows = []
    for w in PATHS:
        server = ["", "", "", ""] if w == "direct" else [
            med(w, w, "cpu_us"), med(w, w, "loop_user_us"), med(w, w, "loop_sys_us"),
            f"{med(w, w, 'loop_busy'):.0%}"]
        rows.append((w, *server, med(w, "simulator", "cpu_us"),
                     f"{med(w, 'simulator', 'loop_busy'):.0%}"))
    return h.table(f"submit overhead: where the CPU goes, {args.connections} connections "
                   "(median µs a submit answered)",
                   ["path", "server: all threads", "its event loop's thread: user", "system",
                    "the loop's thread busy", "simulator", "the simulator's loop busy"], rows)


class Load(NamedTuple):
    """One load: wrk's connections, and the simulator's time to answer (None: at once)."""

    connections: int
    answer_time: tuple[float, float] | None = None

    def __str__(self) -> str:
        at = (f", Letta answers in {self.answer_time[0] * 1e3:.0f}-"
              f"{self.answer_time[1] * 1e3:.0f} ms" if self.answer_time else "")
        return f"{self.connections} conn{at}"


def report(results: dict[Load, list[dict[str, dict]]], args: argparse.Namespace) -> None:
    rows, figures = [], {}
    for c, reps in results.items():
        for w in PATHS:
            lat = lambda q, w=w, reps=reps: h.median(  # noqa: E731
                r[w]["latency_us"][q] / 1e3 for r in reps)
            cpu = h.median(sum(r[w]["cpu_us"].values()) for r in reps)
            rows.append((str(c), w, h.median(h.rate(r[w]) for r in reps), lat("p50"), lat("p90"),
                         lat("p99"), cpu, h.median(r[w]["letta_calls"] / max(1, r[w]["ok"])
                                                   for r in reps)))
        of = lambda a, b, reps=reps: h.median(  # noqa: E731  (a's throughput / b's)
            h.rate(r[a]) / h.rate(r[b]) for r in reps)
        added = lambda w, reps=reps: h.median(  # noqa: E731  (w's median latency over direct's)
            (r[w]["latency_us"]["p50"] - r["direct"]["latency_us"]["p50"]) / 1e3 for r in reps)
        figures[c] = {"ratio": of("tracker", "direct"), "added_p50": added("tracker"),
                      "forwarder": of("forwarder", "direct"),
                      "forwarder_added_p50": added("forwarder"),
                      "of_forwarder": of("tracker", "forwarder"),
                      "stored_fwd": of("stored-fwd", "direct"),
                      "of_stored_fwd": of("tracker", "stored-fwd"),
                      "no_store": of("no-store", "direct"),
                      "of_no_store": of("tracker", "no-store")}
    print(h.table(f"submit overhead: median of {args.repeats} repeat(s)",
                  ["load", "path", "submits/s", "p50 ms", "p90 ms", "p99 ms",
                   "CPU µs/submit (all servers)", "Letta calls/submit"], rows))
    print(cpu_table(results[Load(args.connections)], args))
    hi, one = figures[Load(args.connections)], figures[Load(1)]
    real = figures.get(Load(args.connections, tuple(args.answer_time)))
    tracker = [r["tracker"] for reps in results.values() for r in reps]  # every load's
    errors = sum(t["bad"] + h.socket_errors(t) for t in tracker)
    unreached = sum(t["unreached"] for t in tracker)
    print(h.table("submit overhead: targets", ["figure", "value", "target", ""], [
        (f"tracker / direct throughput, {args.connections} connections", hi["ratio"], ">= 0.5",
         h.verdict(hi["ratio"] >= 0.5)),
        ("added median latency, 1 connection (ms)", one["added_p50"], "<= 2",
         h.verdict(one["added_p50"] <= 2)),
        (f"added median latency, {args.connections} connections (ms)", hi["added_p50"],
         "(queueing: see ratio)", ""),
        ("tracker / direct throughput, 1 connection", one["ratio"], "", ""),
        (f"bare forwarder / direct throughput, {args.connections} connections (a service"
         " that only passes the submit on)", hi["forwarder"], "(peer)", ""),
        (f"tracker / bare forwarder throughput, {args.connections} connections",
         hi["of_forwarder"],
         "(peer)", ""),
        ("bare forwarder's added median latency, 1 connection (ms)", one["forwarder_added_p50"],
         "(peer)", ""),
        (f"forwarder with the run's two writes committed / direct throughput, {args.connections}"
         " connections (the least a tracker does, on aiohttp and SQLite)", hi["stored_fwd"],
         "(peer)", ""),
        (f"tracker / forwarder with the two writes throughput, {args.connections} connections"
         " (what the tracker's work beyond the least costs)", hi["of_stored_fwd"], "(peer)", ""),
        (f"tracker without its durable writes / direct throughput, {args.connections}"
         " connections (a diagnostic: the most any storage could let it reach)",
         hi["no_store"], "(peer)", ""),
        (f"tracker / tracker without its durable writes throughput, {args.connections}"
         " connections (what the storage costs)", hi["of_no_store"], "(peer)", ""),
        *([(f"tracker / direct throughput, {args.connections} connections, Letta answering"
            " in its real time", real["ratio"], "(context)", ""),
           (f"added median latency, {args.connections} connections, Letta answering in its"
            " real time (ms)", real["added_p50"], "(context)", "")] if real else []),
        ("non-2xx answers and wrk's socket errors (connect, read, write, timeout) from the"
         " tracker", errors, "0", h.verdict(errors == 0)),
        ("tracker submits answered 2xx but not at the simulator when the load ended (answered"
         " with the run still queued)", unreached, "0", h.verdict(unreached == 0))]))


if __name__ == "__main__":
    main()
