"""Client commands: ``tracker submit`` and ``tracker runs list|show``, over the REST API.

They talk to a running tracker like any other client would: the URL from ``--url``,
``TRACKER_URL`` or the config's server address; the key from ``--key`` or
``TRACKER_API_KEY``. ``--json`` prints what the API returned, for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from textwrap import shorten
from typing import Any

from rich.text import Text

from tracker.api_client import ApiError, TrackerClient
from tracker.cli_args import add_config_option, bounded
from tracker.cli_render import (
    completed,
    console,
    events_table,
    print_outcome,
    run_fields,
    runs_table,
)
from tracker.config import Config, http_url, url_host
from tracker.states import FINAL, State, Status

#: seconds between two looks at a run while ``submit --wait`` follows it
POLL_EVERY = 0.5
#: ``--wait`` stops at these: the tracker will not change them without a user's action
SETTLED = frozenset({*FINAL, State.PAUSED})
#: ``--wait``'s default limit: a run stuck at Letta is checked for ever, and the command
#: must not wait with it
WAIT_TIMEOUT_S = 600.0
#: ``submit --wait``'s exit code when ``--timeout`` passes first (``timeout(1)``'s): the run
#: goes on, unlike 1 (it ended without completing)
TIMED_OUT = 124
#: ``--timeout``'s type
SECONDS = bounded(float, lambda s: 0 < s < float("inf"), "a number of seconds above 0")


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# --- submit --------------------------------------------------------------------------------

async def submit(client: TrackerClient, args: argparse.Namespace) -> int:
    """``tracker submit AGENT_ID TEXT [--wait]``."""
    run = await client.submit(args.agent_id, args.text)
    if not args.wait:
        if args.json:
            print_json(run)
        else:
            print(f"submitted {run['id']} ({run['tracker']['state']}); "
                  f"follow it with: tracker runs show {run['id']}")
        return 0
    args.timeout = args.timeout or WAIT_TIMEOUT_S
    run = await follow(client, run, args.timeout, quiet=args.json)
    if run["tracker"]["state"] not in SETTLED:
        return gave_up(run, args)
    messages = await client.messages(run["id"]) if run["tracker"]["letta_run_id"] else []
    if args.json:
        print_json({**run, "messages": messages})
    else:
        print_outcome(run, messages)
    return 0 if completed(run) else 1


async def follow(client: TrackerClient, run: dict, timeout: float,
                 quiet: bool = False) -> dict:
    """Look at the run every POLL_EVERY seconds, with a live status line, until it settles
    or ``timeout`` seconds pass; the run as last seen."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    trouble: ApiError | None = None
    with status_line(quiet) as show:
        while run["tracker"]["state"] not in SETTLED:
            elapsed = loop.time() - started
            if elapsed >= timeout:
                break
            show(progress(run, trouble), f"  {elapsed:.0f}s")
            await asyncio.sleep(min(POLL_EVERY, timeout - elapsed))
            try:
                run, trouble = await client.run(run["id"]), None
            except ApiError as e:
                # the tracker restarting, or a moment's fault: the run goes on meanwhile
                # (ending here said it had ended otherwise, exit 1); waited out to --timeout
                if not e.passing:
                    raise
                trouble = e
    return run


def progress(run: dict, trouble: ApiError | None = None) -> str:
    """The status line's text for the run as last seen (``trouble``: why the last look
    failed)."""
    if trouble is not None:
        return f"{run['id']}  {shorten(str(trouble), 90)}; still waiting"
    if run["tracker"]["state"] == State.CONFIRMING:
        # polling.cancel_confirm_s (30 s) at least, and until Letta's step has ended
        return f"{run['id']}  confirming the cancel with Letta (its step may still complete)"
    line = f"{run['id']}  {run['tracker']['state']} / {run['status']}"
    error = run["tracker"].get("error")
    if run["tracker"]["state"] == State.QUEUED and error:
        # why it is still queued: the last try's error (Letta unreachable, refusing the key)
        line += f"  (retrying: {shorten(error, 90)})"
    return line


def gave_up(run: dict, args: argparse.Namespace) -> int:
    """``--timeout`` passed first: say where the run is and how to look at it later."""
    if args.json:
        print_json(run)
    print(f"tracker: stopped waiting after {args.timeout:g} s: {run['id']} is"
          f" {run['tracker']['state']} ({run['status']}); look at it later with:"
          f" tracker runs show {run['id']}", file=sys.stderr)
    return TIMED_OUT


@contextmanager
def status_line(quiet: bool) -> Iterator[Callable[[str, str], None]]:
    """``show(text, ticker)``: a live line on a terminal's stderr; elsewhere a plain line
    each time ``text`` changes (the ticking part would print a line every look)."""
    err = console(stderr=True)
    if quiet:
        yield lambda text, ticker: None
    elif err.is_terminal:
        with err.status("") as status:
            # as Text: a string would be read as markup, and the run's fields are data
            yield lambda text, ticker: status.update(Text(text + ticker))
    else:
        last: list[str] = []

        def plain(text: str, ticker: str) -> None:
            if last != [text]:
                last[:] = [text]
                err.print(text, markup=False)

        yield plain


# --- runs list / show ----------------------------------------------------------------------

FILTERS = {"agent_id": "agent_id", "status": "statuses", "state": "state",
           "completed_via": "completed_via", "created_after": "created_after",
           "created_before": "created_before", "limit": "limit", "order": "order",
           "before": "before", "after": "after"}


def list_params(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The API query for the ``runs list`` options given."""
    params: list[tuple[str, str]] = []
    for dest, name in FILTERS.items():
        value = getattr(args, dest)
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                params.append((name, str(v)))
    params += [(flag, "true") for flag in ("active", "callback_missed") if getattr(args, flag)]
    return params


async def runs_list(client: TrackerClient, args: argparse.Namespace) -> int:
    """``tracker runs list``."""
    runs = await client.runs(list_params(args))
    if args.json:
        print_json(runs)
    elif runs:
        out = console()
        out.print(runs_table(runs, width=out.width))
    else:
        print("no runs match")
    return 0


async def runs_show(client: TrackerClient, args: argparse.Namespace) -> int:
    """``tracker runs show ID``."""
    run = await client.run(args.run_id, events=True)
    events = run.pop("events")
    if args.json:
        print_json({"run": run, "events": events})
        return 0
    out = console()
    out.print(run_fields(run))
    out.print(events_table(events))
    return 0


# --- registration --------------------------------------------------------------------------

Command = Callable[[TrackerClient, argparse.Namespace], Awaitable[int]]


def tracker_url(cfg: Config, args: argparse.Namespace) -> str:
    """--url, else TRACKER_URL, else the configured server address."""
    # a server bound to every interface is reached on loopback from this machine
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.server.host, cfg.server.host)
    return args.url or os.environ.get("TRACKER_URL") or \
        f"http://{url_host(host)}:{cfg.server.port}"


def with_client(fn: Command) -> Callable[[Config, argparse.Namespace], int]:
    """Run ``fn(client, args)`` against the tracker the options name."""

    def run(cfg: Config, args: argparse.Namespace) -> int:
        url = tracker_url(cfg, args)
        try:
            http_url(url)  # as the config's URLs are: `localhost:8080` failed, unexplained
        except ValueError as e:
            print(f"tracker: the tracker URL {url!r} {e}", file=sys.stderr)
            return 2
        if getattr(args, "timeout", None) is not None and not args.wait:
            print("tracker: --timeout goes with --wait (how long to wait for the run)",
                  file=sys.stderr)
            return 2

        async def go() -> int:
            key = args.key or os.environ.get("TRACKER_API_KEY")
            key_from = "--key" if args.key else "TRACKER_API_KEY"
            async with TrackerClient(url, key, key_from=key_from) as client:
                return await fn(client, args)

        return asyncio.run(go())

    return run


def client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="tracker URL (default: $TRACKER_URL, else the config's server)")
    p.add_argument("--key", help="API key (default: $TRACKER_API_KEY)")
    p.add_argument("--json", action="store_true",
                   help="print JSON, for scripts: the API's runs (runs show: {run, events};"
                        " submit --wait: the run with its messages)")


def filter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent-id", help="one agent's runs")
    p.add_argument("--status", action="append", choices=[s.value for s in Status],
                   help="Letta status (repeatable)")
    p.add_argument("--state", action="append", choices=[s.value for s in State],
                   help="tracker state (repeatable)")
    p.add_argument("--active", action="store_true", help="only runs still in progress")
    p.add_argument("--completed-via", choices=["callback", "poll", "reconcile", "api",
                                                "dispatch"], help="how the outcome was learnt")
    p.add_argument("--callback-missed", action="store_true",
                   help="only runs whose outcome came by poll or reconcile")
    p.add_argument("--created-after", metavar="ISO", help="created at or after this time")
    p.add_argument("--created-before", metavar="ISO", help="created before this time")
    p.add_argument("--limit", type=int, default=50, help="at most this many (50)")
    p.add_argument("--order", choices=["asc", "desc"], help="by creation time (desc)")
    p.add_argument("--before", metavar="RUN_ID", help="page: runs before this one")
    p.add_argument("--after", metavar="RUN_ID", help="page: runs after this one")


def add_commands(cmd: Callable) -> None:
    """Register ``submit``, ``runs list|show`` and ``demo`` with the CLI's ``cmd``."""
    from tracker import demo

    sub = cmd("submit", with_client(submit), "send a message to an agent through the tracker")
    sub.add_argument("agent_id", metavar="AGENT_ID")
    sub.add_argument("text", metavar="TEXT")
    sub.add_argument("--wait", action="store_true",
                     help="follow the run until it ends, then print the reply")
    sub.add_argument("--timeout", type=SECONDS, metavar="SECONDS",
                     help=f"with --wait: stop waiting after this long, exit {TIMED_OUT}; the run"
                          f" goes on ({WAIT_TIMEOUT_S:g})")
    client_options(sub)
    runs = cmd("runs", None, "the run history").add_subparsers(dest="runs_cmd", required=True)
    lst = runs.add_parser("list", help="runs as a table (newest first)")
    filter_options(lst)
    show = runs.add_parser("show", help="one run and its timeline")
    show.add_argument("run_id", metavar="ID", help="tracker or Letta run id")
    for p, fn in ((lst, runs_list), (show, runs_show)):
        add_config_option(p, nested=True)
        client_options(p)
        p.set_defaults(fn=with_client(fn))
    demo.add_command(cmd)
