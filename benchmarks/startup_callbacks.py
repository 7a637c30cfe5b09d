"""Callbacks in the first seconds after a start with many runs in flight.

Benchmark 1's template (250,000 submitted runs beside 100,000 finished ones, cached under
out/) is copied, the tracker started on it, and from the moment its process starts Letta's
callbacks come at a steady rate, each on a new connection as Letta sends them, for
``--duration`` seconds. Letta waits 5 s for an answer and never retries: a callback answered
later than that is a missed one (the run is then learnt by polling, late). Letta is out of reach
here, as in benchmark 1: what is measured is the tracker's own start-up (migrations, the
start-up reconcile, the check of every run in flight), not the checking calls.

Reported, per repeat: when the port first answered, when the first callback was answered, the
callbacks' latency (p50, p99, max) in the first 5 s after the port opened and after that, and
how many took 5 s or more.

    .venv/bin/python benchmarks/startup_callbacks.py [--quick] [--rate R] [--duration S]
        [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import aiohttp
import callback_ingest as ci
import harness as h

LETTA_TIMEOUT_S = 5.0


async def fire(url: str, lines: list[str], rate: float, duration: float, t0: float) -> list:
    """Send ``rate`` callbacks a second from ``t0`` for ``duration`` s, open loop; each one's
    (sent at, answered at, status), refused connections retried (the port is not open yet)."""
    out: list[tuple[float, float, int | str]] = []
    timeout = aiohttp.ClientTimeout(total=LETTA_TIMEOUT_S + 25)
    headers = {"Content-Type": "application/json"}

    async def one(session: aiohttp.ClientSession, path: str, body: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        sent = time.monotonic()
        while True:
            try:
                async with session.post(url + path, data=body, headers=headers) as r:
                    await r.read()
                    out.append((sent - t0, time.monotonic() - t0, r.status))
                    return
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.01)  # not listening yet: as soon as it is
                sent = time.monotonic()
            except (aiohttp.ClientError, TimeoutError) as e:
                out.append((sent - t0, time.monotonic() - t0, type(e).__name__))
                return

    conn = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        n = int(rate * duration)
        tasks = []
        for i, line in enumerate(lines[:n]):
            _, path, body = line.rstrip("\n").split("\t", 2)
            tasks.append(asyncio.create_task(one(session, path, body, t0 + i / rate)))
        await asyncio.gather(*tasks)
    return out


def repeat(procs: h.Procs, template: Path, lines: list[str], args: argparse.Namespace) -> dict:
    db = h.copy_db(template, h.OUT / "startup-run.db")
    port = h.free_port()
    url = f"http://{h.HOST}:{port}"
    t0 = time.monotonic()
    p = procs.start("tracker", [h.PY, "-m", "tracker", "serve"], env={
        **h.tracker_env(db), "TRACKER_SERVER__PORT": str(port),
        "TRACKER_CALLBACKS__SECRET": ci.SECRET})
    got = asyncio.run(fire(url, lines, args.rate, args.duration, t0))
    procs.stop(p)
    ok = [(s, a) for s, a, st in got if isinstance(st, int) and st < 300]
    opened = min((s for s, _ in ok), default=float("nan"))  # first sent once listening
    early = [a - s for s, a in ok if s < opened + 5]
    late = [a - s for s, a in ok if s >= opened + 5]
    return {"ok": len(ok), "open_s": opened,
            "first_s": min((a for _, a in ok), default=float("nan")),
            "early": early, "late": late,
            "over_5s": sum(1 for s, a in ok if a - s >= LETTA_TIMEOUT_S),
            "failed": len(got) - len(ok)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short repeat (smoke check)")
    ap.add_argument("--runs", type=int, default=250_000, help="submitted runs in the template")
    ap.add_argument("--history", type=int, default=100_000, help="finished runs in it")
    ap.add_argument("--rate", type=float, default=300.0, help="callbacks a second")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of callbacks")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.duration = 1, 8.0
    h.banner("callbacks at start-up", args)
    template, reqs = ci.prepare(args.runs, max(1, args.runs // 100), args.history)
    lines = reqs.read_text().splitlines(keepends=True)
    rows = []
    with h.Procs("startup") as procs:
        for i in range(args.repeats):
            r = repeat(procs, template, lines, args)
            rows.append(r)
            print(f"repeat {i + 1}: port open {r['open_s']:.2f} s, first answered "
                  f"{r['first_s']:.2f} s; first 5 s p50/p99/max "
                  f"{h.pct(r['early'], 50) * 1e3:.0f}/{h.pct(r['early'], 99) * 1e3:.0f}/"
                  f"{max(r['early'], default=0) * 1e3:.0f} ms; after "
                  f"{h.pct(r['late'], 50) * 1e3:.0f}/{h.pct(r['late'], 99) * 1e3:.0f}/"
                  f"{max(r['late'], default=0) * 1e3:.0f} ms; {r['over_5s']} of {r['ok']}"
                  f" answered after 5 s; {r['failed']} failed", flush=True)
    print(h.table("callbacks at start-up: median of the repeats",
                  ["figure", "value"], [
                      ("port open after (s)", h.median(r["open_s"] for r in rows)),
                      ("first callback answered after (s)",
                       h.median(r["first_s"] for r in rows)),
                      ("p99, first 5 s (ms)",
                       h.median(h.pct(r["early"], 99) * 1e3 for r in rows)),
                      ("max, first 5 s (ms)",
                       h.median(max(r["early"], default=0) * 1e3 for r in rows)),
                      ("p99, after (ms)", h.median(h.pct(r["late"], 99) * 1e3 for r in rows)),
                      ("answered after Letta's 5 s (missed)",
                       h.median(r["over_5s"] for r in rows)),
                      ("failed", h.median(r["failed"] for r in rows))]))


if __name__ == "__main__":
    main()
