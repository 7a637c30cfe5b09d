"""Submit compare: benchmark 2's load against several copies of the tracker, side by side.
Not one of the five targets: how to tell whether a change to the tracker moves benchmark 2,
on a machine whose speed drifts by more than most changes are worth.

Benchmark 2's load (``submit_overhead.side``: wrk, 32 connections, the simulator answering at
once, a fresh simulator and database for each side), in rounds, each side first in turn:
direct to the simulator, then each copy given with ``--src`` (a directory holding a
``tracker`` package, for example a ``git archive`` of a commit: ``git archive HEAD tracker |
tar -x -C /tmp/a``; ``..`` is the tree's own). Each copy's database is made by that copy (its
own schema); the simulator is the same for all: the tree's, or ``BENCH_TRACKER_SRC``'s.

Printed per round and as medians: each copy's submits/s and its share of direct's in the
same round, and the CPU a submit of its event loop's thread (user + system, what bounds its
rate), of all its threads, and of the simulator behind it. A change is worth believing when
its copy is ahead in most rounds, not only in the median.

    .venv/bin/python benchmarks/submit_compare.py --src /tmp/a --src /tmp/b [--quick]
        [--rounds N]
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import harness as h
import submit_overhead as so


def copies(srcs: list[str]) -> dict[str, str]:
    """Each copy's label (its directory's name, made unique) and absolute path, after
    checking that a tracker started with it imports that copy."""
    found: dict[str, str] = {}
    for src in srcs:
        path = Path(src).resolve()
        if not (path / "tracker" / "__init__.py").is_file():
            raise SystemExit(f"--src {src}: no tracker package in {path}")
        base = path.name or "root"
        label, n = base, 1
        while label in found:
            n += 1
            label = f"{base}-{n}"
        imported = subprocess.run(
            [h.PY, "-c", "import tracker; print(tracker.__file__)"], cwd=h.OUT, check=True,
            env=h.child_env(h.package_env(str(path))), capture_output=True, text=True)
        print(f"{label}: {imported.stdout.strip()}")
        found[label] = str(path)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", required=True,
                    help="a directory holding a tracker package (repeat for each copy)")
    ap.add_argument("--quick", action="store_true", help="one short round (smoke check)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per side")
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 3.0
    h.banner("submit compare", args)
    srcs = copies(args.src)
    sides = ["direct", *srcs]
    rows, shares, loops = [], {w: [] for w in srcs}, {w: [] for w in srcs}
    with h.Procs("compare") as procs:
        for i in range(args.rounds):
            order = sides[i % len(sides):] + sides[:i % len(sides)]
            got = {w: so.side(procs, "direct" if w == "direct" else "tracker",
                              args.connections, args.duration, src=srcs.get(w))
                   for w in order}
            direct = h.rate(got["direct"])
            for w in srcs:
                cpu = got[w]["cpu"]
                shares[w].append(h.rate(got[w]) / direct)
                loops[w].append(cpu["tracker"]["loop_user_us"] + cpu["tracker"]["loop_sys_us"])
                rows.append((i + 1, w, h.rate(got[w]), shares[w][-1], loops[w][-1],
                             cpu["tracker"]["cpu_us"], cpu["simulator"]["cpu_us"],
                             got[w]["bad"]))
            print(f"round {i + 1}: direct {direct:,.0f}/s | " + " | ".join(
                f"{w} {h.rate(got[w]):,.0f}/s ({shares[w][-1]:.2f}), loop {loops[w][-1]:.0f} µs"
                for w in srcs), flush=True)
    print(h.table("submit compare, per round", [
        "round", "copy", "submits/s", "of direct", "loop's thread µs/submit",
        "all threads µs/submit", "simulator µs/submit", "non-2xx"], rows))
    print(h.table(f"submit compare: median of {args.rounds} round(s)", [
        "copy", "of direct", "per round", "loop's thread µs/submit"],
        [(w, h.median(shares[w]), " / ".join(f"{x:.2f}" for x in shares[w]),
          h.median(loops[w])) for w in srcs]))


if __name__ == "__main__":
    main()
