"""Command-line options and serving loop of the simulator (`tracker simulate`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from aiohttp import web

from tracker.sim_faults import Faults

# option dest -> Faults field
_FAULT_OPTIONS = {
    "callback_drop": "callback_drop",
    "callback_delay": "callback_delay_s",
    "callback_lag": "callback_lag_s",
    "run_duration": "run_duration_s",
    "answer_time": "answer_time_s",
    "accept_delay": "accept_delay_s",
    "fail_rate": "fail_rate",
    "never_finish_rate": "never_finish_rate",
    "api_429_rate": "api_429_rate",
    "retry_after": "retry_after_s",
    "api_5xx_rate": "api_5xx_rate",
    "response_drop": "response_drop",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options (address, seed, auth, agents, one flag per fault)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8283, help="port (0: any free port)")
    parser.add_argument("--seed", type=int, default=None, help="seed the fault RNG")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--agents", type=int, default=0, metavar="N", help="pre-create N agents")
    rate = {"type": float, "default": None, "metavar": "P"}
    seconds = {"type": float, "default": None, "metavar": "S"}
    parser.add_argument("--callback-drop", **rate, help="probability a callback is lost")
    parser.add_argument("--callback-delay", **seconds, help="extra delay before each callback")
    parser.add_argument("--callback-lag", **seconds, help="terminal-to-callback lag (0.2)")
    parser.add_argument(
        "--run-duration", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
        help="seconds a turn takes, uniform (0.3 1.0)",
    )
    parser.add_argument(
        "--answer-time", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
        help="seconds the async submit takes to answer, uniform (0 0; the real server:"
             " 0.05 0.11)",
    )
    parser.add_argument("--accept-delay", **seconds,
                        help="seconds the async submit waits before creating its run (0),"
                             " the client gone or not: a saturated server")
    parser.add_argument("--fail-rate", **rate, help="probability a run fails")
    parser.add_argument("--never-finish-rate", **rate, help="probability a run never ends")
    parser.add_argument("--api-429-rate", **rate, help="probability of a 429 answer")
    parser.add_argument("--retry-after", **seconds, help="Retry-After of those 429s (1)")
    parser.add_argument("--api-5xx-rate", **rate, help="probability of a 500/502/503 answer")
    parser.add_argument("--response-drop", **rate, help="probability an answer is lost")


def faults_from_args(args: argparse.Namespace) -> Faults:
    """The Faults the given options ask for (defaults for those not given)."""
    changes = {
        field: getattr(args, dest)
        for dest, field in _FAULT_OPTIONS.items()
        if getattr(args, dest, None) is not None
    }
    return Faults().merged(changes)


def serve(app: web.Application, host: str, port: int, agent_ids: list[str]) -> int:
    """Serve `app` until SIGINT/SIGTERM; print agent ids, then where it listens. 1, with one
    line saying why, when it cannot listen there (the port taken, or no such port)."""
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(app, host, port, agent_ids))
    except (OSError, OverflowError) as e:
        why = getattr(e, "strerror", None) or e
        print(f"tracker simulate: cannot listen on {host}:{port}: {why}", file=sys.stderr)
        return 1
    return 0


async def _serve(app: web.Application, host: str, port: int, agent_ids: list[str]) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        for agent_id in agent_ids:
            print(agent_id, flush=True)
        bound_host, bound_port = runner.addresses[0][:2]
        # One line a parent process can wait for; it carries the real port when --port 0.
        print(f"Letta simulator listening on http://{bound_host}:{bound_port}", flush=True)
        await _until_signalled()
    finally:
        await runner.cleanup()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if sys.platform != "win32":
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
