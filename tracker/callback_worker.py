"""One callback worker process (``callbacks.workers``): it takes Letta's callbacks on the
callback port, files them in the inbox, and reports to the service's process.

The workers share their port (``SO_REUSEPORT``: the kernel spreads connections over them)
and the database with the service. A worker changes no run: the service's applier applies
what it files, told so by its reports, which also carry what it counted for /metrics.
``workers`` starts, watches and stops them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from aiohttp import web

from tracker import callbacks, logs, logs_redact
from tracker.callbacks import CallbackSigner
from tracker.config import Config
from tracker.letta import LettaClient
from tracker.metrics import Tally
from tracker.middleware import error_middleware, timing_middleware
from tracker.store import Store, open_store

log = logging.getLogger("tracker.worker")

#: a report at most this often while callbacks are filed: the applier hears of them this late
REPORT_S = 0.02
#: and at least this often: a worker whose service is gone notices it within this
IDLE_REPORT_S = 1.0


class Reporter:
    """The worker's ``callbacks.Filing``: counts the callbacks being received, notes those
    filed, and sends both, with what the metrics counted, to the service."""

    def __init__(self, index: int, conn: Connection) -> None:
        self.index = index
        self.conn = conn
        self.receiving = 0
        self.filed: list[str] = []
        self.unvouched_runs: list[tuple[str, str]] = []
        self.tally = Tally()
        self.gone = False  # the service's end of the pipe closed
        self._filed = asyncio.Event()
        # one writer on the pipe at a time: the last report, sent at the worker's stop, may
        # meet a report still being sent from its thread, and two large ones interleaved
        self._sending = threading.Lock()

    def received(self, run_id: str) -> None:
        self.filed.append(run_id)
        self._filed.set()

    def unvouched(self, run_id: str, letta_run_id: str) -> None:
        self.unvouched_runs.append((run_id, letta_run_id))
        self._filed.set()

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """``timing_middleware``'s observer."""
        self.tally.request(method, route, status, seconds)

    def letta_call(self, endpoint: str, status: int | str) -> None:
        """``LettaClient.on_call``."""
        self.tally.letta_call(endpoint, status)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._filed.wait(), IDLE_REPORT_S)
            self._filed.clear()
            # sent from a thread: the pipe holds ~64 KB, and while the service's loop does not
            # read it (a stall) a send blocks; on this loop it stopped every answer to Letta,
            # whose callbacks timed out. What is filed meanwhile goes in the next report
            await asyncio.to_thread(self._post, self._report())
            await asyncio.sleep(REPORT_S)

    def send(self) -> None:
        """Report now, waiting for the pipe (at the worker's stop)."""
        self._post(self._report())

    def _report(self) -> tuple:
        """What to report, taken on the loop (where callbacks are noted)."""
        filed, self.filed = self.filed, []
        unvouched, self.unvouched_runs = self.unvouched_runs, []
        tally, self.tally = self.tally, Tally()
        return ("report", self.receiving, filed, tally if tally else None, unvouched)

    def _post(self, report: tuple) -> None:
        if self.gone:
            return
        try:
            with self._sending:
                self.conn.send(report)
        except OSError:  # the pipe broken: the service is gone
            # what this worker files, the service applies when it starts again
            self.gone = True
            log.error("callback worker %d: the service is gone; stopping", self.index)
            os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Worker:
    """What the callback handler reaches, built by the worker app's cleanup context."""

    signer: CallbackSigner
    store: Store
    letta: LettaClient
    reporter: Reporter


WORKER: web.AppKey[Worker] = web.AppKey("worker", Worker)


def create_worker_app(cfg: Config, secret: str, index: int,
                      conn: Connection) -> web.Application:
    """The callback worker's application: Letta's callback route, nothing else."""
    reporter = Reporter(index, conn)
    app = web.Application(client_max_size=cfg.callbacks.max_body_bytes,
                          middlewares=[timing_middleware(reporter.request), error_middleware])
    app.router.add_post(callbacks.PATH, letta_callback)
    app.cleanup_ctx.append(lambda a: _worker_ctx(a, cfg, secret, reporter))
    return app


async def _worker_ctx(app: web.Application, cfg: Config, secret: str,
                      reporter: Reporter) -> AsyncIterator[None]:
    # the service checkpoints: one checkpointer, whose last pass holds every process's writes
    store = open_store(cfg.database.url, cfg.database.synchronous, checkpoints=False)
    await store.open()
    letta = LettaClient(cfg.letta.base_url, cfg.letta.api_key, cfg.letta.timeout_s)
    letta.on_call = reporter.letta_call
    await letta.start()
    app[WORKER] = Worker(CallbackSigner(secret, cfg.callback_base()), store, letta, reporter)
    tasks = [asyncio.create_task(store.warm_up()), asyncio.create_task(reporter.run())]
    yield
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    reporter.send()  # the last callbacks filed, and the last counts
    await letta.close()
    await store.close()


async def letta_callback(request: web.Request) -> web.Response:
    w = request.app[WORKER]
    run_id = await callbacks.receive(request, w.signer, w.store, w.letta, w.reporter)
    return callbacks.accepted(run_id)


def main(cfg_data: dict[str, Any], secret: str, index: int, conn: Connection) -> None:
    """A worker process's entry point (``multiprocessing``, spawned): serve until SIGTERM."""
    from tracker.cli import event_loop, tune_gc

    cfg = Config.model_validate(cfg_data)
    logs.setup(cfg.logging.level, cfg.logging.format)
    logs_redact.register(cfg.letta.api_key, secret)
    # Ctrl-C reaches the whole process group: the service stops its workers itself, after
    # the last requests it takes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = event_loop(cfg.server.event_loop)
    loop.add_signal_handler(signal.SIGTERM, _graceful_exit, loop)
    app = create_worker_app(cfg, secret, index, conn)
    app.on_startup.append(tune_gc)
    try:
        web.run_app(app, host=cfg.server.host, port=cfg.callback_port(), reuse_port=True,
                    print=lambda _: conn.send(("ready", None)), handle_signals=False,
                    shutdown_timeout=10.0, access_log=None, loop=loop)
    except OSError as e:  # the port taken by something else, or the address not ours
        conn.send(("failed", f"cannot listen on {cfg.server.host}:{cfg.callback_port()}: "
                             f"{e.strerror or e}"))
        raise SystemExit(1) from None


def _graceful_exit(loop: asyncio.AbstractEventLoop) -> None:
    # once: a second SIGTERM raising in the middle of the cleanups would leave the database
    # open (its threads keep the process); now it ends the process at once
    loop.remove_signal_handler(signal.SIGTERM)
    raise web.GracefulExit()
