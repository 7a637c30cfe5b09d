"""Submit storage: what the tracker's schema costs benchmark 2, and what folding it in bulk
would. Not one of the five targets: a diagnostic for benchmark 2's ratio.

Benchmark 2's load (``submit_overhead.side``: wrk, 32 connections, the simulator answering at
once, a fresh simulator and database each side), in rounds, each side first in turn:
- direct to the simulator;
- the bare forwarder storing a submit's two writes in one narrow table (``floor``);
- the same forwarder writing the tracker's rows on the tracker's own schema (``schema``:
  the history's indexes and the counts' triggers, the payload, the events), by plain
  statements, without the tracker's store or request path;
- the same forwarder writing both to a narrow journal, folded into the tracker's schema by a
  thread every 20 ms (``journal``);
- the tracker with its run writes kept in memory (``nostore_tracker.py``): its request path
  without the storage;
- the tracker.

Printed per side: submits/s and its share of direct's, and the CPU a submit of the server's
process (all its threads) and of the simulator, from ``/proc``; for the journal, how many of
its rows were folded and at what CPU a row, and how many its last fold before the figures
were read left waiting (so that its figure does not leave work undone).

    .venv/bin/python benchmarks/submit_storage.py [--quick] [--rounds N] [--duration S]
"""

from __future__ import annotations

import argparse

import harness as h
import submit_overhead as so

#: bare_store_proxy.py's shapes, each a side of its own
SHAPES = ["floor", "schema", "journal"]
SIDES = ["direct", *SHAPES, "no-store", "tracker"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short round (smoke check)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per side")
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 3.0
    h.banner("submit storage", args)
    so.FORWARDERS.update({shape: ("bare_store_proxy.py", shape) for shape in SHAPES})
    rows, shares = [], {w: [] for w in SIDES}
    with h.Procs("storage") as procs:
        for i in range(args.rounds):
            order = SIDES[i % len(SIDES):] + SIDES[:i % len(SIDES)]
            got = {w: so.side(procs, w, args.connections, args.duration) for w in order}
            direct = h.rate(got["direct"])
            for w in SIDES:
                cpu = got[w]["cpu_us"]
                fold = got[w].get("fold") or {}
                shares[w].append(h.rate(got[w]) / direct)
                rows.append((i + 1, w, h.rate(got[w]), shares[w][-1],
                             sum(v for k, v in cpu.items() if k != "simulator"),
                             cpu["simulator"],
                             fold.get("cpu_s", 0) / max(1, fold.get("rows", 0)) * 1e6 or "",
                             fold.get("behind", "")))
            print(f"round {i + 1}: " + " | ".join(
                f"{w} {h.rate(got[w]):,.0f}/s ({shares[w][-1]:.2f})" for w in SIDES), flush=True)
    print(h.table("submit storage, per round", [
        "round", "side", "submits/s", "of direct", "server CPU µs/submit",
        "simulator CPU µs/submit", "fold CPU µs/journal row", "journal rows not folded"],
        rows))
    print(h.table(f"submit storage: median of {args.rounds} round(s)", [
        "side", "of direct"], [(w, h.median(shares[w])) for w in SIDES]))


if __name__ == "__main__":
    main()
