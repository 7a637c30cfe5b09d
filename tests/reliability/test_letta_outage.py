"""Letta outage: the simulator stops answering its API for a while under load, then comes back.

Submits keep being accepted while Letta is down; nothing is lost or sent twice; what queued up
goes out afterwards in each agent's order; every run ends recorded with Letta's outcome.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import aiohttp
import pytest

from tests.reliability.harness import (
    Client,
    Submitted,
    verify_exactly_once,
    verify_order,
    wait_all_final,
)

pytestmark = pytest.mark.slow

AGENTS = 10
CLIENTS = 20
PER_CLIENT = 8
DOWN_AT_S, DOWN_FOR_S = 1.0, 2.0


async def client_loop(n: int, client: Client, agents: list[str], rng: random.Random,
                      out: Submitted, answered_queued: list[str]) -> None:
    for i in range(PER_CLIENT):
        agent = rng.choice(agents)
        otid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        try:
            status, body = await client.submit(agent, f"c{n}-m{i}", otid)
        except (aiohttp.ClientError, TimeoutError) as e:
            out.failures.append(f"{otid}: {e!r}")
            continue
        if status != 200:
            out.failures.append(f"{otid}: {status} {body}")
            continue
        out.acked[otid] = body["id"]
        out.by_client[n].append((agent, otid))
        if body["tracker"]["state"] == "queued":
            answered_queued.append(body["id"])
        await asyncio.sleep(rng.uniform(0, 0.8))


async def outage(sim, log: list[str]) -> None:
    await asyncio.sleep(DOWN_AT_S)
    await sim.faults(down_for_s=DOWN_FOR_S)
    log.append("down")


async def test_letta_down_under_load_then_back(procs):
    rng = random.Random(8)
    sim = await procs.simulator(agents=AGENTS, seed=2, run_duration=(0.05, 0.3))
    tracker = procs.tracker(sim)
    key = await tracker.create_key()
    await tracker.start()
    clients = [procs.client(tracker, key, timeout=20) for _ in range(CLIENTS)]
    out, queued, log = Submitted(), [], []
    await asyncio.gather(outage(sim, log), *(
        client_loop(n, c, sim.agents, random.Random(rng.random()), out, queued)
        for n, c in enumerate(clients)))
    # every submit was accepted, Letta down or not
    assert not out.failures, out.failures[:10]
    assert len(out.acked) == CLIENTS * PER_CLIENT
    assert log == ["down"] and len(queued) >= 10, ("the outage must hit submits", len(queued))
    reader = clients[0]
    await wait_all_final(reader, len(out.acked), 60, "after the outage")
    sim_runs = await verify_exactly_once(reader, sim, out, "outage")
    await verify_order(reader, sim, out, sim_runs, "outage")
    # the tracker saw the outage (and did not merely wait it out before answering): sends
    # failed and were queued again. Which runs those were is a matter of timing (the first
    # came 6th to 9th among the runs answered "queued" on a quiet machine; a look at only the
    # first 10 failed under CI's load), so every run answered "queued" is looked at
    retried = [r for r in queued if any(e["kind"] == "retry" for e in await reader.events(r))]
    assert retried, f"none of the {len(queued)} queued runs was retried: the outage missed them"
