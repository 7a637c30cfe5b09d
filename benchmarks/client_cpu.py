"""Not one of the five targets: a diagnostic for benchmark 2. The CPU that a submit's call to
Letta costs the tracker's process: its Letta client (``tracker.letta_http``'s transport) and,
beside it in the same run, aiohttp's client session as the tracker used it until the
twenty-ninth session. Both send the same submits to the same simulator, alternating, from
this process, at the same concurrency; only this process's CPU is counted.

    .venv/bin/python benchmarks/client_cpu.py [--quick] [--repeats N] [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import aiohttp
import harness as h
import uvloop

from tracker.letta import LettaClient
from tracker.serialize import dumps


async def with_aiohttp(url: str, agents: list[str], bodies: list[dict], conc: int,
                       calls: int) -> tuple[float, float]:
    # as tracker.letta.LettaClient opened its session and sent a submit before letta_http
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=30))

    async def call(i: int) -> None:
        async with session.request(
                "POST", f"{url}/v1/agents/{agents[i % len(agents)]}/messages/async",
                data=dumps(bodies[i % len(bodies)]),
                headers={"Content-Type": "application/json"}) as resp:
            json.loads(await resp.read())

    try:
        return await _load(call, conc, calls)
    finally:
        await session.close()


async def with_tracker(url: str, agents: list[str], bodies: list[dict], conc: int,
                       calls: int) -> tuple[float, float]:
    letta = LettaClient(url)
    await letta.start()

    async def call(i: int) -> None:
        await letta.send_async(agents[i % len(agents)], bodies[i % len(bodies)])

    try:
        return await _load(call, conc, calls)
    finally:
        await letta.close()


async def _load(call, conc: int, calls: int) -> tuple[float, float]:
    """(CPU µs a call, calls/s): ``conc`` workers, each one call after the other."""
    counter = iter(range(10**9))

    async def worker(n: int) -> None:
        for _ in range(n):
            await call(next(counter))

    await asyncio.gather(*(worker(50) for _ in range(conc)))  # connections opened, warm
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(calls // conc) for _ in range(conc)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = calls // conc * conc
    return cpu / n * 1e6, n / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short repeat (smoke check)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.calls = 1, 2_000
    h.banner("Letta client CPU", args)
    rng = random.Random(5)
    bodies = [{"messages": [{"role": "user", "content": h.prose(rng, rng.randint(80, 400))}],
               "callback_url": "http://127.0.0.1:9/v1/callbacks/letta/run-x"}
              for _ in range(200)]
    clients = {"tracker (letta_http)": with_tracker, "aiohttp client session": with_aiohttp}
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    with h.Procs("client") as procs:
        url, agents, _ = procs.simulator("sim-client", agents=100, run_duration=(3600, 3600),
                                         extra=["--answer-time", "0", "0"])
        for i in range(args.repeats):
            names = list(clients) if i % 2 == 0 else list(clients)[::-1]  # each first in turn
            for name in names:
                got[name].append(uvloop.run(clients[name](url, agents, bodies,
                                                          args.connections, args.calls)))
            print(f"repeat {i + 1}: " + " | ".join(
                f"{n} {got[n][-1][0]:.1f} µs a call, {got[n][-1][1]:,.0f}/s" for n in clients),
                flush=True)
    rows = [[name, statistics.median(c for c, _ in v), statistics.median(r for _, r in v)]
            for name, v in got.items()]
    rows.append(["aiohttp / tracker, CPU a call", rows[1][1] / rows[0][1], ""])
    print(h.table(f"Letta client CPU: {args.calls:,} submits, {args.connections} at a time, median "
            f"of {args.repeats}", ["client", "CPU µs a call (this process)", "calls/s"], rows))


if __name__ == "__main__":
    main()
