"""Crash: the real `tracker serve` is SIGKILLed five times under load and restarted each time.

Whatever moment the kill lands on (a submit being committed, a send in flight, Letta's answer
not yet written, a callback arriving at a dead port), every acknowledged submit must exist once
in the history, reach Letta once, end in Letta's final state, and keep its agent's order.

Letta's answers to submits are held 0-150 ms on the wire (``LettaProxy``) after Letta created the
run, so most kills land while some runs are at Letta but not yet recorded as such: the window
that restart must heal by finding the run again instead of sending it twice.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import uuid

import aiohttp
import pytest

from tests.reliability.harness import (
    HOST,
    Client,
    Submitted,
    verify_exactly_once,
    verify_order,
    wait_all_final,
)
from tests.reliability.proxies import LettaProxy

pytestmark = pytest.mark.slow

MESSAGES = 500
AGENTS = 20
CLIENTS = 50
KILLS = 5
SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or random.randrange(1, 10**6)


async def submit_until_acked(client: Client, agent: str, otid: str, text: str,
                             out: Submitted) -> str | None:
    """Retry one submit (same Idempotency-Key) through crashes until a 2xx answer."""
    for _ in range(400):
        try:
            status, body = await client.submit(agent, text, otid, idempotency_key=otid)
        except (aiohttp.ClientError, TimeoutError):
            status, body = None, None
        if status is not None and 200 <= status < 300:
            return body["id"]
        if status is not None and status != 503:
            out.failures.append(f"{otid}: {status} {body}")
            return None
        out.retries += 1
        await asyncio.sleep(0.1)
    out.failures.append(f"{otid}: never acknowledged")
    return None


async def client_loop(n: int, client: Client, agents: list[str], count: int,
                      rng: random.Random, out: Submitted) -> None:
    for i in range(count):
        agent = rng.choice(agents)
        otid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        run_id = await submit_until_acked(client, agent, otid, f"c{n}-m{i}", out)
        if run_id is not None:
            out.acked[otid] = run_id
            out.by_client[n].append((agent, otid))
        await asyncio.sleep(rng.uniform(0, 1.0))


async def killer(tracker, rng: random.Random, kills: list[float]) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(KILLS):
        await asyncio.sleep(rng.uniform(0.3, 2.0))
        await tracker.kill()
        kills.append(round(loop.time() - start, 2))
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        await tracker.start()


async def test_sigkill_five_times_under_load(procs, aiohttp_server):
    rng = random.Random(SEED)
    sim = await procs.simulator(agents=AGENTS, seed=1, run_duration=(0.05, 0.3))
    wire = await aiohttp_server(LettaProxy(sim.url, hold_submit_s=(0.0, 0.15), seed=SEED).app())
    tracker = procs.tracker(sim, env={"TRACKER_LETTA__BASE_URL": f"http://{HOST}:{wire.port}"})
    key = await tracker.create_key()
    await tracker.start()
    clients = [procs.client(tracker, key, timeout=10) for _ in range(CLIENTS)]
    out = Submitted()
    kills: list[float] = []
    per_client = MESSAGES // CLIENTS
    await asyncio.gather(
        killer(tracker, random.Random(rng.random()), kills),
        *(client_loop(n, c, sim.agents, per_client, random.Random(rng.random()), out)
          for n, c in enumerate(clients)))
    context = f"seed={SEED} kills at {kills}s, {out.retries} retried submits"
    assert not out.failures, (context, out.failures[:10])
    assert len(out.acked) == MESSAGES, context
    reader = clients[0]
    await wait_all_final(reader, MESSAGES, 120, context)
    sim_runs = await verify_exactly_once(reader, sim, out, context)
    await verify_order(reader, sim, out, sim_runs, context)
    # the kills did land between Letta's answer and our record of it, and restart healed that
    healed = await count_events(tracker.db, "found_in_letta")
    print(context, "healed by restart:", healed)
    assert healed >= 1, (context, "no kill hit a send in flight")


async def count_events(db_path, kind: str) -> int:
    db = sqlite3.connect(db_path)
    try:
        return db.execute("SELECT count(*) FROM run_events WHERE kind = ?", (kind,)).fetchone()[0]
    finally:
        db.close()
