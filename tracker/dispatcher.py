"""The dispatcher: sends queued runs to Letta, one active run per agent (serial) or at once.

A run is claimed (queued -> submitting) in the database before Letta is called, so two
dispatch paths (the background loop, an inline submit) can never send the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from tracker import clock
from tracker.config import Config
from tracker.errors import LettaError, LettaUnavailable, NotFound, Unavailable
from tracker.letta import LettaClient
from tracker.manager import Manager
from tracker.reconcile import attach_or_requeue
from tracker.states import Source, State
from tracker.store import RunRecord

log = logging.getLogger("tracker.dispatcher")


#: how often the loop looks for runs stranded in `submitting` by a fault
RESCUE_EVERY_S = 2.0
#: the most runs one claim takes; a claim that took this many may have left more sendable
CLAIM_LIMIT = 100
#: the pause after the loop's read of the next due run failed (the database unreadable)
ERROR_PAUSE_S = 1.0


class Dispatcher:
    """Background sender of queued runs; also used inline by the submit handler."""

    def __init__(self, cfg: Config, manager: Manager, letta: LettaClient) -> None:
        self.cfg = cfg
        self.manager = manager
        self.store = manager.store
        self.letta = letta
        self.serial = cfg.dispatch.per_agent == "serial"
        self._slots = asyncio.Semaphore(cfg.dispatch.concurrency)
        self._tasks: set[asyncio.Task] = set()
        self.idle = asyncio.Event()  # set once the loop has started and found nothing to do
        self._inflight: dict[int, tuple[str, asyncio.Task]] = {}
        self._next_rescue = 0.0
        self._suspects: set[str] = set()

    async def run(self) -> None:
        """Loop: claim what can be sent, send it, sleep until woken or the next retry."""
        wakeup = self.manager.dispatch_wakeup
        while True:
            wakeup.clear()
            drained = False
            try:
                await self._rescue_stranded()
                claimed = await self.store.claim(self.serial, clock.now(), limit=CLAIM_LIMIT)
                for run in claimed:
                    self._spawn(run)
                drained = len(claimed) < CLAIM_LIMIT
            except Exception:
                log.exception("dispatch loop error; retrying")
            self.idle.set()
            await self._sleep(wakeup, drained)

    async def _rescue_stranded(self) -> None:
        """A run left `submitting` by no send of ours (a storage fault hit both its write and
        its requeue) is looked up and resent once the database works again: no restart."""
        if clock.now() < self._next_rescue:
            return
        self._next_rescue = clock.now() + RESCUE_EVERY_S
        mine = {run_id for run_id, _ in self._inflight.values()} | self.manager.sending
        orphans = {r.id: r for r in await self.store.in_states((State.SUBMITTING,), limit=1000)
                   if r.id not in mine}
        # seen orphaned twice, RESCUE_EVERY_S apart: not a claim whose send is just starting
        for run_id in orphans.keys() & self._suspects:
            # its send may have got no answer, and may still land: looked up no sooner than
            # a send that got none (see _retry), unless its callback came
            await self.manager.requeue(orphans[run_id], self.manager.look_at(run_id),
                                       needs_lookup=True, error="stranded while submitting",
                                       kind="rescued")
        self._suspects = orphans.keys() - self._suspects

    async def _sleep(self, wakeup: asyncio.Event, drained: bool) -> None:
        """Until woken, or the next queued run is due. After a claim that took every run it
        could, the due runs left wait for their lanes, and whatever frees a lane (an outcome,
        a requeue, a released pause) wakes this loop: only a later retry is worth waking for
        unprompted. (Counted among the due, they woke it every 10 ms, a claim each time, as
        long as any lane had a backlog.)"""
        try:
            nxt = await self.store.next_due((State.QUEUED,),
                                            after=clock.now() if drained else None)
        except Exception:  # raised out of the loop, it ended the dispatcher for good
            log.exception("dispatch loop error; retrying")
            nxt = clock.now() + ERROR_PAUSE_S
        # at least every few seconds: the rescue of stranded runs must not wait for a wake-up
        longest = 2 * RESCUE_EVERY_S
        await clock.nap(wakeup, longest if nxt is None else max(0.01, min(nxt - clock.now(),
                                                                            longest)))

    def _spawn(self, run: RunRecord) -> asyncio.Task:
        task = asyncio.create_task(self.send(run))
        self._tasks.add(task)
        self._inflight[id(task)] = (run.id, task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        run_id, _ = self._inflight.pop(id(task), (None, None))
        self.manager.sending.discard(run_id)

    async def stop(self) -> None:
        """Wait for sends in flight: a send cut off here would be healed by reconcile, but
        finishing it is cheaper."""
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.cfg.letta.timeout_s)
            for task in pending:
                task.cancel()  # left `submitting`: reconcile finds it again at the next start

    async def dispatch_inline(self, run: RunRecord) -> RunRecord:
        """Send a run that the submit already claimed (its lane was free), and wait for
        Letta's answer; a queued run is left to the loop."""
        if run.state is not State.SUBMITTING:
            self.manager.dispatch_wakeup.set()
            return run
        mine = self._spawn(run)
        # shielded: a slow Letta must not cancel the send; the client gets the run as it is
        done, _ = await asyncio.wait({mine}, timeout=self.cfg.dispatch.inline_timeout_s)
        recorded = None
        if mine in done and not mine.cancelled():
            if mine.exception() is None:
                recorded = mine.result()
            else:
                # the run is committed, and may be at Letta, but the send's outcome could not
                # be recorded (the database failing): answered with an error, the client would
                # send it again, a second run. The rescue of stranded runs sees to this one
                log.warning("run %s: its send's outcome was not recorded (%s); answered as"
                            " stored", run.id, mine.exception(), extra={"run_id": run.id})
        try:
            return recorded or await self.store.get_run(run.id) or run
        except Unavailable:
            return run

    async def send(self, run: RunRecord) -> RunRecord | None:
        """Send one claimed run to Letta and record Letta's answer; returns the run as
        recorded when this send decided its state (None when it could not tell)."""
        async with self._slots:
            try:
                return await self._send(run)
            finally:  # the run has moved on: a callback's note for this send is spent
                self.manager.called_back.discard(run.id)

    async def _send(self, run: RunRecord) -> RunRecord | None:
        try:
            if run.needs_lookup:
                await self._look_up(run)
                return None
            letta_run = await self.letta.send_async(run.agent_id, self._body(run))
        except LettaUnavailable as e:
            # a send (not a look) that got no answer may still be landing at Letta
            await self._retry(run, e, landing=e.sent and not e.answered
                              and not run.needs_lookup)
            return None
        except (LettaError, NotFound) as e:
            return await self.manager.reject(run, e.status, e.detail)
        except Exception as e:
            await self._unexpected(run, e)
            return None
        return await self._submitted(run, letta_run)

    async def _look_up(self, run: RunRecord) -> None:
        """Found at Letta: attached; not found: requeued, the loop sends it next. A refused
        look (a 401, a 400, a 404 of Letta's listing) says nothing of the run, which may be at
        Letta: look again later, never reject it for that."""
        try:
            await attach_or_requeue(self.manager, run, Source.DISPATCH)
        except (LettaError, NotFound) as e:
            await self._retry(run, LettaUnavailable(f"looking for the run at Letta: {e}"))

    async def _submitted(self, run: RunRecord, letta_run: dict) -> RunRecord | None:
        try:
            recorded = await self.manager.mark_submitted(run, letta_run, Source.DISPATCH)
        except Exception as e:
            await self._unexpected(run, e)
            return None
        log.info("run submitted", extra={"run_id": run.id, "agent_id": run.agent_id,
                                         "letta_run_id": letta_run.get("id")})
        return recorded

    async def _unexpected(self, run: RunRecord, e: Exception) -> None:
        """A fault after the claim (storage, a bug): Letta may have the run, so look first."""
        log.error("send failed unexpectedly: %r", e, extra={"run_id": run.id,
                                                              "agent_id": run.agent_id})
        with contextlib.suppress(Exception):  # if this fails too, start-up reconcile heals it
            await self.manager.requeue(run, clock.now() + self.cfg.dispatch.retry_min_s,
                                       needs_lookup=True, error=repr(e))

    def _body(self, run: RunRecord) -> dict:
        """The body as the user gave it, but with our callback URL (theirs goes to the relay),
        and without include_return_message_types: the tracker applies it to the result it
        records (``manager.shown``). Letta applies it to each page of a run's stored
        messages, so a page all of hidden kinds (a long run's tool steps) came back empty
        and ended the paging: the rest, the answer among them, was never read."""
        body = dict(run.request or {})
        body["callback_url"] = self.manager.callback_url(run.id)
        body.pop("include_return_message_types", None)
        return body

    async def _retry(self, run: RunRecord, e: LettaUnavailable, landing: bool = False) -> None:
        """Back off and queue the run again; when Letta may have got it, look before resending.
        ``landing``: the send got no answer, and Letta may still be working on it."""
        delay = min(self.cfg.dispatch.retry_max_s,
                    self.cfg.dispatch.retry_min_s * 2 ** max(0, run.attempts - 1))
        delay = e.retry_after if e.retry_after is not None else delay * random.uniform(0.8, 1.2)
        if landing:
            # a Letta slow enough to time us out (its workers or database saturated) may
            # create the run after we gave up: a look sooner would miss it, and send the
            # message a second time (unless its callback came: ``Manager.look_at``)
            delay = max(delay, self.manager.look_at(run.id) - clock.now())
        log.warning("Letta unavailable, run requeued in %.1fs: %s", delay, e,
                    extra={"run_id": run.id, "agent_id": run.agent_id})
        # once a send may have reached Letta, every later try must look before resending
        await self.manager.requeue(run, clock.now() + delay,
                                   needs_lookup=e.sent or run.needs_lookup, error=str(e))
