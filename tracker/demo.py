"""``tracker demo``: the whole product in one process, in under a minute, with no setup.

A Letta simulator that drops a share of its callbacks and a tracker in front of it are
served on free loopback ports; a batch of messages is submitted over HTTP like any client
would; the history then shows which outcomes came by callback and which the poller found.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from aiohttp import web
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from tracker import auth, clock, logs
from tracker.api_client import TrackerClient
from tracker.app import FIRST_KEY, STORE, create_app
from tracker.cli_args import bounded
from tracker.cli_client import SETTLED
from tracker.cli_render import console, runs_table
from tracker.config import Config
from tracker.simulator import Faults, Simulator

#: seconds one simulated turn takes (uniform): long enough to watch, short enough to finish
RUN_DURATION = (0.5, 3.0)
#: seconds between two looks at the history while the batch runs
WATCH_EVERY = 0.25
#: ``--drop``'s type
FRACTION = bounded(float, lambda f: 0.0 <= f <= 1.0, "a number from 0 to 1")


def add_command(cmd: Callable) -> None:
    """Register ``tracker demo`` with the CLI's ``cmd``."""
    p = cmd("demo", run, "see the tracker work: simulator, tracker and a batch of messages")
    p.add_argument("--runs", type=_count(1000), default=20, metavar="N",
                   help="messages to submit (20)")
    p.add_argument("--agents", type=_count(20), default=4, metavar="N",
                   help="agents to spread them over (4)")
    p.add_argument("--drop", type=FRACTION, default=0.3, metavar="FRACTION",
                   help="share of Letta's callbacks the simulator loses (0.3)")
    p.add_argument("--seed", type=int, default=7, help="seed of the simulator's faults (7)")
    p.add_argument("--database", metavar="PATH_OR_URL",
                   help="keep the history here (default: a temporary database)")
    p.add_argument("--timeout", type=float, default=50.0, metavar="S",
                   help="give up waiting for the batch after this long (50)")


def _count(most: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= most:
            raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {most}")
        return int(text)

    return parse


def run(cfg: Config, args: argparse.Namespace) -> int:
    """Run the demo; the loaded config is not used, so no real database or Letta is touched."""
    logs.setup("WARNING")
    # the tracker's one routine warning is the first-start admin key of a throwaway database
    logging.getLogger("tracker").setLevel(logging.ERROR)
    return asyncio.run(demo(args))


async def demo(args: argparse.Namespace) -> int:
    """Serve both, submit the batch, follow it, and explain the history."""
    out = console()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tracker-demo-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            sim, sim_url = await stack.enter_async_context(serve_simulator(args))
            names = {sim.create_agent(f"agent-{i + 1}")["id"]: f"agent-{i + 1}"
                     for i in range(args.agents)}
            url, key = await stack.enter_async_context(serve_tracker(args, sim_url, tmp))
            client = await stack.enter_async_context(TrackerClient(url, key))
            out.print(f"Letta simulator at {sim_url}: {args.agents} agents, drops "
                      f"{args.drop:.0%} of callbacks; tracker at {url}")
            first = await submit_batch(client, list(names), args.runs)
            out.print(f"submitted {args.runs} messages across {args.agents} agents")
            runs = await watch(client, first, args.runs, args.timeout)
            out.print(runs_table(runs, names, out.width))
            settled = all(r["tracker"]["state"] in SETTLED for r in runs)
            out.print(summary(runs, sim, args, time.monotonic() - started, settled))
    return 0 if settled else 1


# --- serving -------------------------------------------------------------------------------

def listen() -> socket.socket:
    """A socket bound to a free loopback port; the app is then served on that very socket,
    so the port known in advance (the tracker's callback URL needs it) cannot be taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serving(app: web.Application, sock: socket.socket) -> AsyncIterator[str]:
    """Serve ``app`` on ``sock`` (startup and cleanup included); yields its URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve_simulator(args: argparse.Namespace) -> AsyncIterator[tuple[Simulator, str]]:
    """The Letta simulator with the demo's faults; yields it and its URL."""
    faults = Faults(run_duration_s=RUN_DURATION, callback_drop=args.drop)
    sim = Simulator(seed=args.seed, faults=faults)
    async with serving(sim.app(), listen()) as url:
        yield sim, url


@contextlib.asynccontextmanager
async def serve_tracker(args: argparse.Namespace, letta_url: str,
                        tmp: str) -> AsyncIterator[tuple[str, str]]:
    """A tracker on the simulator; yields its URL and an admin key."""
    sock = listen()
    app = create_app(demo_config(args, letta_url, sock.getsockname()[1], tmp))
    async with serving(app, sock) as url:
        # a --database that already has users has no first-start key: make one
        key = app[FIRST_KEY][0] if app[FIRST_KEY] else (
            await auth.create_key(app[STORE], "demo", admin=True))[1]
        yield url, key


def demo_config(args: argparse.Namespace, letta_url: str, port: int, tmp: str) -> Config:
    """Defaults, except: the simulator as Letta, our port, and polls quick enough to watch."""
    database = args.database or str(Path(tmp) / "demo.db")
    return Config.model_validate({
        "server": {"host": "127.0.0.1", "port": port},
        "letta": {"base_url": letta_url},
        "database": {"url": database if "://" in database else f"sqlite:///{database}"},
        "polling": {"grace_s": 1.0, "min_interval_s": 1.0, "max_interval_s": 2.0},
    })


# --- the batch -----------------------------------------------------------------------------

async def submit_batch(client: TrackerClient, agents: list[str], n: int) -> dict:
    """Submit ``n`` messages round-robin over the agents, one by one so each agent's order is
    the order written here; returns the first run."""
    runs = []
    for i in range(n):
        agent = agents[i % len(agents)]
        text = f"demo message {i // len(agents) + 1} for this agent"
        runs.append(await client.submit(agent, text))
    return runs[0]


async def watch(client: TrackerClient, first: dict, n: int, timeout: float) -> list[dict]:
    """Follow the batch with a progress display until every run settles (or time is up)."""
    params = [("created_after", first["created_at"]), ("order", "asc"), ("limit", str(n))]
    deadline = asyncio.get_running_loop().time() + timeout
    with progress(n) as update:
        while True:
            runs = await client.runs(params)
            update(runs)
            done = all(r["tracker"]["state"] in SETTLED for r in runs)
            if done or asyncio.get_running_loop().time() > deadline:
                return runs
            await asyncio.sleep(WATCH_EVERY)


def tally(runs: list[dict]) -> tuple[int, int, int]:
    """(settled, learnt by callback, learnt by poll)."""
    settled = [r["tracker"] for r in runs if r["tracker"]["state"] in SETTLED]
    by = [t.get("completed_via") for t in settled]
    return len(settled), by.count("callback"), by.count("poll")


@contextlib.contextmanager
def progress(total: int) -> Iterator[Callable[[list[dict]], None]]:
    """``update(runs)``: a progress bar on a terminal; elsewhere a line per change."""
    out = console()

    def describe(runs: list[dict]) -> str:
        _, callback, poll = tally(runs)
        return f"[green]{callback} by callback[/] · [yellow]{poll} by poll[/]"

    if not out.is_terminal:
        yield _plain_progress(out, total, describe)
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn())
    with Progress(*columns, console=out, transient=True) as bar:
        task = bar.add_task("waiting", total=total)
        yield lambda runs: bar.update(task, completed=tally(runs)[0], description=describe(runs))


def _plain_progress(out: Console, total: int,
                    describe: Callable[[list[dict]], str]) -> Callable[[list[dict]], None]:
    last: list[str] = []

    def update(runs: list[dict]) -> None:
        line = f"{tally(runs)[0]}/{total} finished: {describe(runs)}"
        if last != [line]:
            last[:] = [line]
            out.print(line)

    return update


# --- what happened -------------------------------------------------------------------------

def summary(runs: list[dict], sim: Simulator, args: argparse.Namespace, seconds: float,
            settled: bool) -> str:
    """One paragraph: how outcomes were learnt, and whether exactly-once and order held."""
    done, callback, poll = tally(runs)
    # as Letta shows it on its own runs (the tracker's show the relay's delivery to the user)
    dropped = sum(1 for r in sim.store.runs() if r.callback_error)
    head = (f"{len(runs)} runs in {seconds:.0f} s" if settled else
            f"[red]{len(runs) - done} of {len(runs)} runs still unfinished after "
            f"{args.timeout:.0f} s[/]")
    return " ".join([
        f"{head}: [green]{callback} learnt by callback[/], [yellow]{poll} by poll[/] because "
        f"their callback never came (the simulator dropped {dropped} on purpose, as happens "
        "when Letta cannot reach the tracker: it sends each callback once, never again).",
        exactly_once(sim, len(runs)), order_note(runs, sim),
    ])


def exactly_once(sim: Simulator, n: int) -> str:
    """Whether Letta received each message once: no otid seen twice, one request per run."""
    twice = sum(1 for count in sim.otid_counts().values() if count > 1)
    if twice or len(sim.received) != n:
        return (f"[red]Letta received {len(sim.received)} requests for {n} messages "
                f"({twice} sent twice).[/]")
    return f"Letta received each of the {n} messages exactly once."


def order_note(runs: list[dict], sim: Simulator) -> str:
    """Whether each agent got its messages in submit order, one run at a time."""
    kept = per_agent_order_kept(runs, sim)
    if kept:
        return ("Per-agent order kept: each agent got its messages in the order submitted, "
                "the next only after the previous had finished.")
    return "[red]Per-agent order NOT kept.[/]"


def per_agent_order_kept(runs: list[dict], sim: Simulator) -> bool:
    """Compare what the simulator received per agent with the submit order of the runs."""
    finished = {r["tracker"]["letta_run_id"]: clock.epoch(r.get("completed_at")) for r in runs}
    by_agent: dict[str, list[dict]] = {}
    for r in runs:  # listed oldest first: submit order
        by_agent.setdefault(r["agent_id"], []).append(r)
    for agent, mine in by_agent.items():
        received = [x for x in sim.received if x.agent_id == agent]
        if [x.run_id for x in received] != [r["tracker"]["letta_run_id"] for r in mine]:
            return False
        for prev, nxt in zip(received, received[1:], strict=False):
            end = finished.get(prev.run_id)
            if end is None or nxt.at < end:
                return False
    return True
