"""The callback worker processes (``callbacks.workers``), seen from the service: started
before it sends anything, restarted when one dies, stopped with it. Their reports reach the
applier (what they filed and are receiving) and the metrics (what they counted).

One process answers Letta's callbacks at about half the speed of a bare handler (see
BENCHMARKS-HISTORY.md, benchmark 1): the workers spread answering a flood over more cores."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from tracker import callback_worker
from tracker.applier import Applier
from tracker.config import Config
from tracker.errors import TrackerError
from tracker.metrics import Metrics

log = logging.getLogger("tracker.workers")

#: seconds a worker has to start listening
START_S = 30.0
#: seconds a stopping worker has to answer its last callbacks, before it is killed
STOP_S = 15.0
#: seconds before restarting a worker that died, doubled on each failure in a row up to the
#: most; a worker that ran ``STABLE_S`` before dying starts the count again
RESTART_S, RESTART_MAX_S = 1.0, 60.0
STABLE_S = 60.0


class WorkerFailed(TrackerError):
    status = 503


class _Worker:
    """One worker process and the service's end of its pipe."""

    def __init__(self, index: int, process: BaseProcess, conn: Connection) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # its failure is raised where it is awaited; one nobody awaits any more (the start
        # timed out) is not worth asyncio's "never retrieved" complaint
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.started = asyncio.get_running_loop().time()


class Workers:
    """Starts ``cfg.callbacks.workers`` callback workers and keeps them running."""

    def __init__(self, cfg: Config, secret: str, applier: Applier, metrics: Metrics,
                 down: set[str] | None = None) -> None:
        self.cfg = cfg
        #: the workers gone and not started again yet, by name (the service's ``stopped``:
        #: /healthz is degraded meanwhile, as callbacks to their port may find none)
        self.down = set() if down is None else down
        self.secret = secret
        self.applier = applier
        self.metrics = metrics
        self._ctx = multiprocessing.get_context("spawn")  # never fork a running event loop
        self._workers: dict[int, _Worker] = {}
        self._restarts: set[asyncio.Task] = set()
        self._exits: set[asyncio.Task] = set()  # workers gone, being reaped (``_exited``)
        self._failures: dict[int, int] = {}  # failures in a row, by worker
        self._stopping = False

    async def start(self) -> None:
        """Start every worker and wait until each listens; raises ``WorkerFailed`` (the
        service then does not start) when one cannot."""
        try:
            await asyncio.gather(*(self._start(i) for i in range(self.cfg.callbacks.workers)))
        except BaseException:
            await self.stop()
            raise
        log.info("%d callback workers listening on %s", len(self._workers),
                 self.cfg.callback_base())

    async def _start(self, index: int) -> None:
        ours, theirs = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=callback_worker.main, name=f"tracker-callbacks-{index}", daemon=True,
            args=(self.cfg.model_dump(), self.secret, index, theirs))
        process.start()
        theirs.close()  # the worker's end: once the worker is gone, reading ours ends
        w = self._workers[index] = _Worker(index, process, ours)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._read, w)
        try:
            await asyncio.wait_for(asyncio.shield(w.ready), START_S)
        except TimeoutError:
            process.kill()
            raise WorkerFailed(f"callback worker {index} did not start listening in "
                               f"{START_S:g}s") from None

    def _read(self, w: _Worker) -> None:
        """The worker's pipe is readable: take every message waiting."""
        try:
            while w.conn.poll():
                self._take(w, w.conn.recv())
        except (EOFError, OSError):
            self._gone(w)

    def _take(self, w: _Worker, message: tuple) -> None:
        kind, *rest = message
        if kind == "report":
            receiving, filed, tally, unvouched = rest
            self.applier.reported(w.index, receiving, filed, unvouched)
            if tally is not None:
                self.metrics.add(tally)
        elif kind == "ready" and not w.ready.done():
            w.ready.set_result(None)
        elif kind == "failed" and not w.ready.done():
            w.ready.set_exception(WorkerFailed(f"callback worker {w.index}: {rest[0]}"))

    def _gone(self, w: _Worker) -> None:
        """The worker's process ended (its pipe closed): restart it, unless stopping."""
        asyncio.get_running_loop().remove_reader(w.conn.fileno())
        w.conn.close()
        self.applier.remote.pop(w.index, None)
        # what it filed and had not reported yet waits in the inbox: the applier's next pass
        self.applier.wakeup.set()
        if self._stopping:
            return  # nothing to start again, and nobody waits to hear why it ended
        task = asyncio.create_task(self._exited(w))
        self._exits.add(task)
        task.add_done_callback(self._exits.discard)

    async def _exited(self, w: _Worker) -> None:
        """Once its process is reaped: say why it could not start, or start it again."""
        # its pipe is closed: it is exiting, if not gone already. Waited for off the loop (a
        # join here held every request and callback up to a second)
        await asyncio.get_running_loop().run_in_executor(None, w.process.join, 1.0)
        if not w.ready.done():
            w.ready.set_exception(WorkerFailed(
                f"callback worker {w.index} exited with code {w.process.exitcode} before "
                "listening (its error is in the log above)"))
            return
        if w.ready.exception() is not None:
            return  # its start failed, and whoever started it tries again: not a second loop
        if self._stopping or self._workers.get(w.index) is not w:
            return
        log.error("callback worker %d exited with code %s; restarting it", w.index,
                  w.process.exitcode)
        self.down.add(_name(w.index))
        task = asyncio.create_task(self._restart(w))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, dead: _Worker) -> None:
        i = dead.index
        if asyncio.get_running_loop().time() - dead.started > STABLE_S:
            self._failures[i] = 0
        while True:
            delay = min(RESTART_S * 2 ** self._failures.get(i, 0), RESTART_MAX_S)
            self._failures[i] = self._failures.get(i, 0) + 1
            await asyncio.sleep(delay)
            if self._stopping:  # the service began to stop meanwhile
                return
            try:
                await self._start(i)
                log.info("callback worker %d restarted", i)
                self.down.discard(_name(i))
                return
            except WorkerFailed as e:
                log.error("%s", e.detail)
            except Exception:  # the pipe or the process not made (EMFILE, EAGAIN): again
                log.exception("callback worker %d could not be started", i)

    def stopping(self) -> None:
        """The service is stopping: a worker that ends from now on is not started again.
        A SIGTERM to the whole process group (systemd's default, ``timeout``'s) ends the
        workers first, and each was started again during the service's stop."""
        self._stopping = True

    async def stop(self) -> None:
        """Stop every worker: each answers the callbacks it has taken, then exits (SIGTERM);
        one that does not within ``STOP_S`` is killed."""
        self.stopping()
        tasks = [*self._exits, *self._restarts]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        workers = [w for w in self._workers.values() if w.process.is_alive()]
        for w in workers:
            w.process.terminate()
        await asyncio.gather(*(self._reap(w) for w in workers))

    async def _reap(self, w: _Worker) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, w.process.join, STOP_S)
        if w.process.is_alive():
            log.warning("callback worker %d did not stop in %gs; killing it", w.index, STOP_S)
            w.process.kill()
            await loop.run_in_executor(None, w.process.join, 5.0)
        if not w.conn.closed:
            self._read(w)  # its last report: what it filed and counted while stopping

    def pids(self) -> list[int]:
        """The workers' process ids (for tests and the log)."""
        return [w.process.pid for w in self._workers.values() if w.process.pid is not None]


def _name(index: int) -> str:
    return f"callback-worker-{index}"
