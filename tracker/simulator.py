"""A faithful, in-package stand-in for the Letta server endpoints the tracker drives.

Payloads, status codes and timings follow the real server's recorded samples
(letta-samples/); faults (lost callbacks, failing or endless runs, 429/5xx, downtime,
restarts) are injected from a seeded RNG so tests are reproducible.

    sim = Simulator(seed=1, faults=Faults(run_duration_s=(0.05, 0.1)))
    agent = sim.create_agent("a")
    client = await aiohttp_client(sim.app())

Run it standalone with `python -m tracker.simulator --port 8283 --agents 2`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from tracker.sim_agents import DEFAULT_MODEL, agent_json
from tracker.sim_cli import add_arguments, faults_from_args, serve
from tracker.sim_control import add_control_routes
from tracker.sim_engine import Engine
from tracker.sim_errors import (
    RUN_ID_PATTERN,
    detail,
    invalid_run_id,
    no_active_runs,
    run_not_found,
)
from tracker.sim_faults import Faults
from tracker.sim_http import SIM_KEY, front_door, letta_errors, uvicorn_server_header
from tracker.sim_requests import input_messages, request_config
from tracker.sim_routes import add_v1_routes
from tracker.sim_shapes import iso_naive, new_id, new_uuid, utcnow
from tracker.sim_store import Received, RunStore, SimAgent, SimRun

__all__ = ["Faults", "Simulator", "add_arguments", "run_from_args", "SIM_KEY"]

_RUN_ID = re.compile(RUN_ID_PATTERN)


class Simulator:
    """A simulated Letta server: agents, async runs, callbacks, cancel, and injected faults."""

    def __init__(
        self, *, seed: int | None = None, faults: Faults | None = None, api_key: str | None = None
    ) -> None:
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.api_key = api_key
        self.store = RunStore()
        self.engine = Engine(self.store, self.rng, self.faults_for)
        self.received: list[Received] = []
        self.calls: Counter[tuple[str, str]] = Counter()
        # Letta's 404 text embeds the default actor's creation time.
        self.started_at = utcnow()
        self._up_timer: asyncio.TimerHandle | None = None

    # -- agents and faults -------------------------------------------------------------

    def create_agent(
        self,
        name: str | None = None,
        faults: Faults | None = None,
        *,
        model: str = DEFAULT_MODEL,
        agent_type: str = "letta_v1_agent",
    ) -> dict[str, Any]:
        """Create an agent (with its own faults, if given) and return its JSON."""
        agent_id = new_id("agent")
        name = name or f"sim-agent-{len(self.store.agents) + 1}"
        body = agent_json(agent_id, name, model, agent_type, utcnow(), new_id("message"))
        self.store.agents[agent_id] = SimAgent(agent_id, agent_type, body, faults)
        return body

    def faults_for(self, agent_id: str | None) -> Faults:
        """The faults in force for an agent: its own, else the simulator's."""
        agent = self.store.agents.get(agent_id) if agent_id else None
        return agent.faults if agent is not None and agent.faults is not None else self.faults

    def request_faults(self, request: web.Request) -> Faults:
        """The faults for the agent a request concerns (path, run or `agent_id` query)."""
        agent_id = request.match_info.get("agent_id") or request.query.get("agent_id")
        run = self.store.get(request.match_info.get("run_id", ""))
        return self.faults_for(run.agent_id if run is not None else agent_id)

    def set_faults(self, agent_id: str | None = None, **changes: Any) -> Faults:
        """Change the simulator's faults, or one agent's (starting from the simulator's)."""
        if agent_id is None:
            self.faults = self.faults.merged(changes)
            return self.faults
        agent = self.store.agents[agent_id]
        agent.faults = self.faults_for(agent_id).merged(changes)
        return agent.faults

    def go_down(self) -> None:
        """Close every /v1 connection unanswered until come_up().

        Only the API is unreachable: turns in flight go on and their callbacks still go out
        (restart() is the crash that loses them).
        """
        self.faults = self.faults.merged({"down": True})

    def come_up(self) -> None:
        """Answer requests again."""
        if self._up_timer is not None:
            self._up_timer.cancel()
            self._up_timer = None
        self.faults = self.faults.merged({"down": False})

    def down_for(self, seconds: float) -> None:
        """Go down now and come back up after `seconds`."""
        self.go_down()
        if self._up_timer is not None:
            self._up_timer.cancel()
        self._up_timer = asyncio.get_running_loop().call_later(seconds, self.come_up)

    def restart(self) -> None:
        """A Letta restart: in-flight runs stay `created` forever and no callback goes out."""
        self.engine.restart()

    def authorized(self, request: web.Request) -> bool:
        """Whether a /v1 request carries the API key (always, when none is set)."""
        if not self.api_key:
            return True
        # Letta's password mode also accepts its own `X-BARE-PASSWORD: password <key>` header.
        return request.headers.get("Authorization") == f"Bearer {self.api_key}" or (
            request.headers.get("X-BARE-PASSWORD") == f"password {self.api_key}"
        )

    # -- runs ---------------------------------------------------------------------------

    def submit(self, agent_id: str, body: dict[str, Any], raw: bytes) -> SimRun:
        """Accept a validated messages/async body: create the run and start its turn."""
        agent = self.store.agents.get(agent_id)
        if agent is None:
            raise detail(404, "Agent not found")
        inputs = input_messages(body, new_uuid)
        run = self.engine.submit(agent, inputs, request_config(body), body.get("callback_url"))
        self.received.append(Received(agent_id, body, raw, run.id, time.time()))
        return run

    async def cancel(self, agent_id: str, run_ids: list[str] | None) -> dict[str, str]:
        """Letta's cancel: the given runs, or all the agent's active ones. Letta never looks
        the path's agent up: a named run is cancelled whatever its agent, and an unknown agent
        has no active run (409)."""
        if not run_ids:
            run_ids = [r.id for r in self.store.active_for(agent_id)]
            if not run_ids:
                raise no_active_runs(agent_id)
        answer = {}
        for run_id in run_ids:
            run = self.store.get(run_id)
            if run is not None:
                await self.engine.cancel(run)
            answer[run_id] = "failed" if run is None else "cancelled"
        return answer

    def lookup_run(self, run_id: str) -> SimRun:
        """The run, or Letta's 400 (malformed id) / 404 (unknown)."""
        if not _RUN_ID.fullmatch(run_id):
            raise invalid_run_id(run_id)
        run = self.store.get(run_id)
        if run is None:
            raise run_not_found(run_id, self.started_at)
        return run

    def delete_run(self, run_id: str) -> bool:
        """Delete a run (Letta then answers 404 for it); False if there was none."""
        run = self.store.delete(run_id)
        if run is not None:
            self.engine.forget(run)
        return run is not None

    def otid_counts(self) -> Counter[str]:
        """otid -> number of runs whose messages carry it (above 1: a duplicate submit)."""
        return self.store.otid_counts()

    # -- inspection ---------------------------------------------------------------------

    def describe(self, run: SimRun) -> dict[str, Any]:
        """A run as /_sim/runs lists it."""
        return {
            "id": run.id,
            "agent_id": run.agent_id,
            "status": run.status,
            "stop_reason": run.stop_reason,
            "otids": run.otids,
            "callback_url": run.callback_url,
            "callback_sent_at": iso_naive(run.callback_sent_at),
            "callback_status_code": run.callback_status_code,
            "callback_error": run.callback_error,
        }

    def stats(self) -> dict[str, Any]:
        """Call counts, duplicate otids and run counts."""
        runs = list(self.store.runs())
        return {
            "calls": {f"{method} {route}": n for (method, route), n in self.calls.items()},
            "otid_duplicates": {o: n for o, n in self.otid_counts().items() if n > 1},
            "runs": len(runs),
            "statuses": dict(Counter(r.status for r in runs)),
            "received": len(self.received),
            "callbacks_sent": self.engine.callbacks_sent,
        }

    # -- serving ------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application serving Letta's routes and /_sim controls."""
        app = web.Application(middlewares=[front_door, letta_errors])
        app[SIM_KEY] = self
        app.on_response_prepare.append(uvicorn_server_header)
        add_v1_routes(app.router)
        add_control_routes(app.router)
        app.cleanup_ctx.append(self._lifespan)
        return app

    async def close(self) -> None:
        """Cancel pending turns, timers and callbacks; close the callback session."""
        if self._up_timer is not None:
            self._up_timer.cancel()
        await self.engine.close()

    async def _lifespan(self, app: web.Application) -> AsyncIterator[None]:
        await self.engine.sender.start()
        yield
        await self.close()


def run_from_args(args: argparse.Namespace) -> int:
    """Serve a simulator configured from `add_arguments` options until interrupted; the exit
    status."""
    sim = Simulator(seed=args.seed, faults=faults_from_args(args), api_key=args.api_key)
    agents = [sim.create_agent(f"sim-agent-{i + 1}")["id"] for i in range(args.agents)]
    return serve(sim.app(), args.host, args.port, agents)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tracker.simulator", description=__doc__)
    add_arguments(parser)
    sys.exit(run_from_args(parser.parse_args()))
