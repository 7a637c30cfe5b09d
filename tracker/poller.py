"""The poller: learns the outcome of runs whose callback is overdue.

Each watched run has a next-check time (the grace period after submit, then backoff with
jitter). When several runs are due at once, one ``GET /v1/runs/?active=true`` tells which are
still running, and one listing of finished runs gives the rest, so that the cost per run stays
near the two calls needed for its result (messages and usage).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from tracker import clock
from tracker.config import Config
from tracker.errors import LettaError, LettaUnavailable, NotFound
from tracker.letta import PAGE, LettaClient
from tracker.manager import Manager, Observation, cancelled_since
from tracker.states import LETTA_ACTIVE, WATCHED, Source, State
from tracker.store import Add, Event, RunRecord

log = logging.getLogger("tracker.poller")

BATCH = 2000
#: listed finished runs the sweep keeps for its next chunks, at most (see _Paging)
UNCLAIMED_MAX = 2 * PAGE
#: how long the poller's first tick waits for start-up's sweep to be set (see run)
SWEEP_WAIT_S = 10.0
#: the pause after the loop's read of the next due run failed (the database unreadable)
ERROR_PAUSE_S = 1.0


@dataclass
class _Paging:
    """How far a paging of Letta's finished runs (newest first) went: the last run it listed
    (where the next page starts), whether it reached the end, and the runs it listed that no
    chunk has claimed yet."""

    last: dict | None = None
    ended: bool = False
    unclaimed: dict[str, dict] = field(default_factory=dict)


class Poller:
    """Background checker of watched runs, bounded in concurrency, polite to Letta."""

    def __init__(self, cfg: Config, manager: Manager, letta: LettaClient) -> None:
        self.p = cfg.polling
        self.manager = manager
        self.store = manager.store
        self.letta = letta
        self._slots = asyncio.Semaphore(self.p.concurrency)
        self._paused_until = 0.0
        self._failures = 0
        self.on_poll: Callable[[int], None] | None = None  # metrics hook: runs checked
        self._sweep = array("q")  # seqs of runs to check whatever their next check time
        self._swept = 0  # how many of them are checked
        #: Letta's active runs as the sweep first listed them (see _triage)
        self._sweep_active: set[str] | None = None
        #: the sweep's paging of Letta's finished runs, chunk after chunk (_finished_runs)
        self._sweep_paging = _Paging()
        self._sweep_set = asyncio.Event()
        #: the calls the last listing of Letta's active runs took (a call per PAGE runs)
        self._listing_calls = 1

    async def run(self) -> None:
        # start-up's sweep first (reconcile sets it, in a moment): a tick before it took the
        # runs overdue while the tracker was down, oldest first, and the newest pages of
        # Letta's listing, which held none of them: 2,000 calls of their own in benchmark 5
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SWEEP_WAIT_S):
                await self._sweep_set.wait()
        wakeup = self.manager.poll_wakeup
        while True:
            wakeup.clear()
            # what is committed from now on, _sleep's read of the next due run sees: no
            # submit needs to wake the poller until that read
            self.manager.poll_wake_before = 0.0
            try:
                await self.tick()
            except Exception:
                log.exception("poll loop error; retrying")
            await self._sleep(wakeup)

    async def _sleep(self, wakeup: asyncio.Event) -> None:
        self.manager.poll_wake_before = math.inf  # committed during the read: it may miss it
        try:
            nxt = clock.now() if self._sweeping() else await self.store.next_due(WATCHED)
        except Exception:  # raised out of the loop, it ended the poller for good
            log.exception("poll loop error; retrying")
            nxt = clock.now() + ERROR_PAUSE_S
        at = max(nxt if nxt is not None else clock.now() + 5.0, self._paused_until)
        at = min(at, clock.now() + 5.0)
        self.manager.poll_wake_before = at
        await clock.nap(wakeup, max(0.02, at - clock.now()))

    async def sweep(self) -> int:
        """Check every watched run over the next ticks, whatever its next check time (at
        start-up: what Letta did while the tracker was down is unknown); returns how many.
        Only a read: one UPDATE making them all due held every write for 7-9 s with 250,000
        runs in flight, long enough for Letta's callbacks to time out. Newest first, the
        order in which Letta lists its finished runs (see _finished_runs)."""
        self._sweep = array("q", await self.store.seqs_in(WATCHED))
        self._swept, self._sweep_active, self._sweep_paging = 0, None, _Paging()
        self._sweep_set.set()
        self.manager.poll_wakeup.set()
        return len(self._sweep)

    def _sweeping(self) -> bool:
        return self._swept < len(self._sweep)

    async def tick(self) -> int:
        """Check every due run once, the sweep's next first; returns how many were due."""
        if clock.now() < self._paused_until:
            return 0
        chunk = self._sweep[self._swept:self._swept + BATCH]
        due = await self.store.runs_at(WATCHED, chunk) if chunk else []
        if len(due) < BATCH:
            ids = {r.id for r in due}
            due += [r for r in await self.store.due(WATCHED, clock.now(), BATCH - len(due))
                    if r.id not in ids]
        due = await self._unanswered(due)
        if not due:
            self._swept += len(chunk)
            return 0
        if self.on_poll:
            self.on_poll(len(due))
        try:
            finished, known = await self._triage(due, sweeping=bool(chunk))
        except (LettaUnavailable, LettaError) as e:
            self._back_off(e)  # the sweep's chunk is taken again after the pause
            return len(due)
        self._swept += len(chunk)
        if not self._sweeping():
            self._sweep_active, self._sweep_paging = None, _Paging()
        self._failures = 0
        await asyncio.gather(*(self.check(r, known.get(r.letta_run_id or "")) for r in finished))
        return len(due)

    async def _unanswered(self, due: list[RunRecord]) -> list[RunRecord]:
        """``due`` without the runs whose callback is answered and waits for the applier (a
        flood of callbacks defers applying them): no need to ask Letta; looked at again
        after ``min_interval_s`` in case that callback fails to apply."""
        filed = self.manager.callback_filed
        later = clock.now() + self.p.min_interval_s
        waiting = [r for r in due if r.id in filed]
        if waiting:
            await self.store.reschedule([(r.id, later, r.poll_count) for r in waiting],
                                        seen=[r.next_check_at for r in waiting])
        return [r for r in due if r.id not in filed]

    async def _triage(self, due: list[RunRecord], sweeping: bool = False
                      ) -> tuple[list[RunRecord], dict[str, dict]]:
        """Split due runs into finished ones (with their Letta run when a listing had it) and
        still-active ones, which are rescheduled here without a call each. The sweep lists
        Letta's active runs once, for all its chunks: it looks for what ended while the
        tracker was down; a run active when it began calls back as it ends, or is polled
        at its next check. (A listing a chunk: with 250,000 runs in flight, 250 calls each
        of 125 chunks.) Outside the sweep, a listing is only worth it for more due runs than
        the calls it took last time."""
        if len(due) < self.p.sweep_min:
            return due, {}
        active = self._sweep_active if sweeping else None
        if active is None:
            if not sweeping and len(due) <= self._listing_calls:
                return due, {}  # a call each is cheaper than listing Letta's active runs
            async with self._slots:
                active = await self.letta.active_run_ids()
            self._listing_calls = len(active) // PAGE + 1
            if sweeping:
                self._sweep_active = active
        running = [r for r in due if r.letta_run_id in active]
        await self._reschedule_active(running)
        finished = [r for r in due if r.letta_run_id not in active]
        if len(finished) < self.p.sweep_min:
            return finished, {}
        return finished, await self._finished_runs(
            {r.letta_run_id for r in finished}, self._sweep_paging if sweeping else _Paging())

    async def _finished_runs(self, wanted: set, paging: _Paging) -> dict[str, dict]:
        """Page through Letta's finished runs, newest first, until all wanted are seen (a
        few pages more than they fill at most: the rest is fetched a run at a time). The
        sweep's chunks go newest first too, and its paging goes on where the last chunk's
        stopped: each page is listed once. (Begun afresh a chunk, it found only the newest
        chunks' runs: 6,000 of the 10,000 of benchmark 5 took a call each.)"""
        found = {i: paging.unclaimed.pop(i) for i in wanted & paging.unclaimed.keys()}
        for _ in range(len(wanted) // PAGE + 2):
            if paging.ended or wanted <= found.keys():
                break
            async with self._slots:
                page = await self.letta.recent_terminal(PAGE, paging.last)
            for r in page:
                (found if r["id"] in wanted else paging.unclaimed)[r["id"]] = r
            paging.ended = len(page) < PAGE
            paging.last = page[-1] if page else paging.last
        if len(paging.unclaimed) > UNCLAIMED_MAX:  # the newest go: the chunks after want older
            paging.unclaimed = dict(list(paging.unclaimed.items())[-UNCLAIMED_MAX:])
        return found

    async def check(self, run: RunRecord, letta_run: dict | None = None) -> None:
        """One run: fetch it unless a listing had it, then apply or reschedule."""
        try:
            if letta_run is None:
                async with self._slots:
                    letta_run = await self.letta.get_run(run.letta_run_id or "")
            if letta_run.get("status") in LETTA_ACTIVE:
                await self._still_active(run, letta_run)
            elif self._callback_pending(letta_run):
                await self._wait_for_callback(run)
            elif (settled := await self._cancel_settled(run, letta_run)) is None:
                await self._look_later(run)  # its step still running at Letta
            else:
                await self._finish(run, settled)
        except NotFound:
            await self.manager.mark_lost(run, f"Letta no longer knows run {run.letta_run_id}")
        except LettaUnavailable as e:
            self._back_off(e)
            await self.store.reschedule([(run.id, self._paused_until, run.poll_count)],
                                        seen=[run.next_check_at])
        except Exception as e:
            # Letta refusing this look (a 400, a 401 as keys rotate), or a fault recording
            # it: looked at again later, as the backoff says, not at once (unrescheduled, the
            # run stayed due and the loop called Letta for it ~50 times a second)
            log.warning("poll of run %s failed: %r", run.id, e, extra={"run_id": run.id})
            await self._look_later(run)

    async def _finish(self, run: RunRecord, letta_run: dict) -> None:
        async with self._slots:
            messages = await self.letta.run_messages(letta_run["id"])
        async with self._slots:
            usage = await self.letta.run_usage(letta_run["id"])
        obs = Observation.from_run(letta_run, messages, usage)
        obs.fields["poll_count"] = Add(1)
        updated = await self.manager.apply_remote(run, obs, Source.POLL)
        if updated.state in WATCHED:
            await self.store.reschedule([(run.id, self._confirm_at(updated), updated.poll_count)])

    async def _cancel_settled(self, run: RunRecord, letta_run: dict) -> dict | None:
        """``letta_run``, or None while a cancel this poll would confirm has its step still
        running at Letta. A cancel does not stop the step in flight: at its end Letta writes
        the run again (to `completed`, when the step was the turn's last), sends no callback,
        and starts nothing the agent is sent meanwhile on its own. So the cancel is final,
        and the agent's lane free, only once Letta's newest step has ended, or the run is past
        its deadline (a step Letta lost, at a restart, stays `pending` for ever). Then the
        run is read again: a step ending just before its look may have overwritten it."""
        confirming = (run.state is State.CONFIRMING and letta_run.get("status") == "cancelled"
                      and self.manager.confirmed(run, Source.POLL))
        if not confirming or clock.now() > (run.deadline_at or math.inf):
            return letta_run
        async with self._slots:
            step = await self.letta.newest_step(letta_run["id"])
        if step is not None and step.get("status") == "pending":
            return None
        if step is None and run.kind == "answer":
            # an answer's first step runs under the paused run's step (letta_agent_v3.py:
            # no step of its own, no cancel check): it has ended once its messages, stored
            # at its end, are there
            async with self._slots:
                if not await self.letta.has_messages(letta_run["id"]):
                    return None
        async with self._slots:
            return await self.letta.get_run(letta_run["id"])

    async def _look_later(self, run: RunRecord) -> None:
        """Look at the run again when the backoff says."""
        nxt = self._next(run)
        await self.store.reschedule([(run.id, nxt["next_check_at"], nxt["poll_count"])],
                                    seen=[run.next_check_at])

    def _confirm_at(self, run: RunRecord) -> float:
        """Next look at a run still watched after a finished poll (a cancel to confirm)."""
        at = self._next(run)["next_check_at"]
        if run.state is State.CONFIRMING:
            seen = clock.epoch(run.recorded_at) or clock.now()
            at = max(min(at, seen + self.manager.cfg.polling.cancel_confirm_s), clock.now())
        return at

    def _callback_pending(self, letta_run: dict) -> bool:
        """Letta shows a run finished ~0.2 s before it sends the callback: give it a moment
        rather than pay two calls for a result that is on its way. The same moment once the
        tracker answered the callback 2xx: it is filed (committed before the answer), and the
        applier records it; a callback worker's report of it comes a few ms after that answer,
        and a poll meanwhile would record the run as learnt by polling."""
        if not letta_run.get("callback_url"):
            return False
        since = letta_run.get("completed_at")
        if letta_run.get("callback_sent_at"):
            if not 200 <= (letta_run.get("callback_status_code") or 0) < 300:
                return False  # refused or never answered: polling is how it is learnt
            since = letta_run["callback_sent_at"]
        return clock.now() - (clock.epoch(since) or 0) < self.p.callback_wait_s

    async def _wait_for_callback(self, run: RunRecord) -> None:
        await self.store.reschedule([(run.id, clock.now() + self.p.callback_wait_s,
                                      run.poll_count)], seen=[run.next_check_at])

    async def _still_active(self, run: RunRecord, letta_run: dict) -> None:
        fields = {"status": letta_run.get("status"), **self._next(run)}
        # a cancel recorded since this poll read the run (its status, its "look soon") is
        # newer than what this poll saw, and kept: overwritten, the cancel's look waited a
        # backoff (up to polling.max_interval_s), the agent's lane held
        unless = cancelled_since(run)
        stuck = run.state is State.SUBMITTED and clock.now() > (run.deadline_at or float("inf"))
        if stuck:
            fields["next_check_at"] = clock.now() + self.p.max_interval_s
            await self.store.transition(run.id, State.STUCK, (State.SUBMITTED,), fields,
                                        Event(Source.POLL, "stuck", {"deadline_s":
                                                                     self.p.deadline_s}),
                                        unless_status=unless)
            # Letta may still be at work on it (a long run) or have lost it (a restart): only
            # a cancel tells, so the run keeps its agent's lane until it ends or is cancelled
            log.warning("run stuck past its deadline (%gs): still polled; it holds its agent's"
                        " lane, messages queued behind it wait: cancel it to let them go",
                        self.p.deadline_s, extra={"run_id": run.id, "agent_id": run.agent_id})
            return
        # an event only when Letta's status moved (created to running, say): one each poll
        # of a run stuck for good added 288 a day to its timeline, kept while it lives
        moved = letta_run.get("status") != run.status
        await self.store.transition(run.id, None, WATCHED, fields,
                                    Event(Source.POLL, "still_active",
                                          {"status": letta_run.get("status")})
                                    if moved else None,
                                    unless_status=unless)

    async def _reschedule_active(self, runs: list[RunRecord]) -> None:
        past = [r for r in runs if r.state is State.SUBMITTED
                and clock.now() > (r.deadline_at or float("inf"))]
        for r in past:
            await self._still_active(r, {"status": r.status})
        rest = [r for r in runs if r not in past]
        await self.store.reschedule([(r.id, self._next(r)["next_check_at"], r.poll_count + 1)
                                     for r in rest], seen=[r.next_check_at for r in rest])

    def _next(self, run: RunRecord) -> dict:
        """Next check: exponential backoff with jitter, capped; stuck runs at the cap."""
        if run.state is State.STUCK:
            interval = self.p.max_interval_s
        else:
            interval = min(self.p.max_interval_s,
                           self.p.min_interval_s * self.p.backoff ** run.poll_count)
        jittered = interval * random.uniform(0.8, 1.0)
        return {"next_check_at": clock.now() + jittered, "poll_count": run.poll_count + 1}

    def _back_off(self, e: LettaUnavailable | LettaError) -> None:
        """Letta is down, rate-limiting or refusing the listing: pause all polling
        (Retry-After when given). The failures of one pause count once: a tick's checks run
        together, and nine failing on one blip paused polling 2^8 minimum intervals."""
        if clock.now() >= self._paused_until:
            self._failures += 1
        retry_after = e.retry_after if isinstance(e, LettaUnavailable) else None
        delay = retry_after if retry_after is not None else min(
            self.p.max_interval_s, self.p.min_interval_s * 2 ** (self._failures - 1))
        self._paused_until = max(self._paused_until, clock.now() + delay)
        log.warning("Letta unavailable to the poller; pausing %.1fs: %s", delay, e)
