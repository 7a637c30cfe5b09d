"""The ``tracker`` command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from tracker import __version__, logs
from tracker.cli_args import add_config_option, bounded
from tracker.config import Config, checked, load_config, url_host
from tracker.config import warnings as config_warnings
from tracker.errors import ConfigError, TrackerError, Unavailable

if TYPE_CHECKING:
    from tracker.store import Store


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    from tracker.app import create_app, show_first_key

    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    cfg = checked(cfg)  # --port against callbacks.port
    logs.setup(cfg.logging.level, cfg.logging.format)
    log = logging.getLogger("tracker")
    try:
        # before anything starts: run_app binds after the app's start-up, which sends queued
        # runs to Letta, telling it to call back on a port this process might never get
        sock = _listening_socket(cfg.server.host, cfg.server.port)
    except OSError as e:  # the port taken, or the address not this machine's
        log.error("cannot listen on %s:%s: %s", cfg.server.host, cfg.server.port,
                  e.strerror or e)
        return 1
    # port 0 (any free one): the port had, which the callback URLs handed to Letta name
    cfg.server.port = sock.getsockname()[1]
    loop = event_loop(cfg.server.event_loop)
    log.info("tracker %s starting: database %s, Letta at %s, event loop %s", __version__,
             cfg.database.url, cfg.letta.base_url, type(loop).__module__.split(".")[0])
    for warning in config_warnings(cfg):
        log.warning("%s", warning)
    app = create_app(cfg, show_key=show_first_key)
    app.on_startup.append(tune_gc)
    # run_app calls ``print`` once the port is open: after start-up, migrations included
    listening = lambda _: log.info("tracker listening on http://%s:%s",  # noqa: E731
                                   url_host(cfg.server.host), cfg.server.port)
    stop_on_signals(loop, log)
    web.run_app(app, sock=sock, handle_signals=False, print=listening, shutdown_timeout=10.0,
                access_log=None, loop=loop)
    return 0


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (its first address), as aiohttp would bind it."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def stop_on_signals(loop: asyncio.AbstractEventLoop, log: logging.Logger) -> None:
    """SIGTERM or Ctrl-C stops the service gracefully: aiohttp's GracefulExit, after which
    it takes no new connection, lets the requests in flight finish (10 s at most) and runs
    the cleanups (sends to Letta in flight finish too: ``letta.timeout_s`` at most).
    aiohttp's own handler raises it again at a second signal, in the middle of the cleanups,
    which were then abandoned with the database open: its threads kept the process alive for
    ever (``timeout`` sends SIGTERM twice, to the process and to its group). So after the
    first, SIGTERM is ignored and a Ctrl-C ends the process at once: what is committed is
    safe, as after a crash, and a restart heals the rest."""

    def first(sig: signal.Signals) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, again, s)
        log.info("%s: stopping; requests and sends to Letta in flight finish first", sig.name)
        raise web.GracefulExit()

    def again(sig: signal.Signals) -> None:
        if sig is signal.SIGINT:
            log.warning("interrupted again: exiting at once")
            os._exit(130)
        log.warning("SIGTERM again: ignored, the stop under way goes on (Ctrl-C to exit at once)")

    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(s, first, s)
        except NotImplementedError:  # Windows: Ctrl-C's KeyboardInterrupt stops run_app
            return


def event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """The service's event loop: uvloop when asked for, or ("auto") when it is installed.
    The same asyncio API with its loop, transports and futures in C: ~25% less CPU per
    callback answered (see BENCHMARKS-HISTORY.md); "asyncio" is the fallback if uvloop
    misbehaves."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError('server.event_loop is "uvloop" but uvloop is not installed'
                                  " (pip install uvloop)") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def tune_gc(app: web.Application) -> None:
    # everything built at start-up lives as long as the process: keep it out of the full
    # collections that would otherwise stall a request for ~20 ms each (see BENCHMARKS-HISTORY.md)
    gc.collect()
    gc.freeze()
    # a young collection every 20,000 allocations, not 700: each one walks the objects of
    # every request in flight, and under load most of them are still alive (promoted, only
    # to be walked again); the ingest benchmark answered ~10-35% more callbacks per second
    gc.set_threshold(20_000, 20, 20)


def _simulate(cfg: Config, args: argparse.Namespace) -> int:
    from tracker import simulator

    logs.setup(cfg.logging.level, cfg.logging.format)
    return simulator.run_from_args(args)


def _with_store(fn: Callable, creates: bool = False,
                any_schema: bool = False) -> Callable[[Config, argparse.Namespace], int]:
    """Run ``fn(store, args)`` against the configured database, then close it. Only a
    command that ``creates`` (``db migrate``) makes a database that is not there, and
    migrates it: a command run from another directory, whose relative default path names no
    database, made an empty one and reported success on it (a backup of nothing, a key the
    service never saw). The others take the database as it is, at this tracker's schema
    unless ``any_schema`` (``db status``, ``backup``: a backup before an upgrade must be of
    the database before it)."""

    def run(cfg: Config, args: argparse.Namespace) -> int:
        from tracker.store import open_store

        # the store's own lines: a migration's progress (v6 takes minutes on a large
        # history), a slow checkpoint; and the CLI's warnings go through the log's redactor
        logs.setup(cfg.logging.level, cfg.logging.format)

        async def go() -> int:
            store = open_store(cfg.database.url, cfg.database.synchronous)
            path = getattr(store, "path", ":memory:")
            args.created = creates and path != ":memory:" and not os.path.exists(path)
            try:
                # in the try: an open failing once its reader's thread ran left that thread,
                # no daemon, keeping the process from exiting
                await store.open(creates)
                if not any_schema:
                    await _current_schema(store)
                return await fn(store, args) or 0
            finally:
                await store.close()

        return asyncio.run(go())

    return run


async def _current_schema(store: Store) -> None:
    """Unavailable unless the database is at this tracker's schema, whose SQL the commands
    use; migrating is left to ``db migrate`` and ``serve``, said to take minutes (README)."""
    from tracker.migrations import LATEST

    version = await store.schema_version()
    where = getattr(store, "path", "the database")
    if version < LATEST:
        raise Unavailable(f"database {where} is at schema v{version}, this tracker's is"
                          f" v{LATEST}: run `tracker db migrate` first (with the service"
                          " stopped)")
    if version > LATEST:
        raise Unavailable(f"database {where} is at schema v{version}, newer than this"
                          f" tracker's (v{LATEST}): use the tracker that upgraded it")


def build_parser() -> argparse.ArgumentParser:
    from tracker import cli_commands as c

    p = argparse.ArgumentParser(prog="tracker", description=__doc__)
    p.add_argument("--version", action="version", version=f"tracker {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        add_config_option(s)
        s.set_defaults(fn=fn)
        return s

    serve = cmd("serve", _serve, "run the tracker service")
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=bounded(int, lambda p: 0 <= p <= 65535,
                                              "a port number, 0-65535"),
                       help="port to listen on (default: server.port); 0: any free one, named"
                            " in the 'listening on' line and in the callback URLs")
    from tracker import simulator

    simulator.add_arguments(cmd("simulate", _simulate, "run the Letta simulator"))
    c.add_commands(cmd, _with_store)
    from tracker import cli_ops

    cli_ops.add_commands(cmd, _with_store)
    from tracker import cli_client

    cli_client.add_commands(cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        code = args.fn(cfg, args)
        sys.stdout.flush()  # here, where a reader gone away is caught, not at exit
        return code
    except BrokenPipeError:
        # the reader stopped reading (`tracker runs list | head`): no traceback; the rest of
        # the output goes nowhere, and the status is a pipe's (128 + SIGPIPE), as cat's is
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ConfigError as e:
        print(f"tracker: {e}", file=sys.stderr)
        return 2
    except TrackerError as e:
        print(f"tracker: {e.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
