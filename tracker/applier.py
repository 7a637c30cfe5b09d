"""Applying Letta's callbacks: the inbox's callbacks, filed by ``callbacks.receive`` and
answered at once, made into their runs' state changes just after, many per transaction."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from tracker import clock
from tracker.callbacks import parse_callback
from tracker.errors import TrackerError, Unavailable
from tracker.manager import Manager, Observation
from tracker.models import LettaCallback
from tracker.states import Source
from tracker.store import InboxItem, RunRecord

log = logging.getLogger("tracker.applier")

#: the stored messages of a run that Letta's callback carries at most (see maybe_cut)
CALLBACK_STORED_MESSAGES = 100

#: callbacks applied per round, and per round while callbacks are arriving (a round of 8
#: state changes holds the writer ~5 ms, which bounds what a callback's filing waits)
APPLY_BATCH = 256
APPLY_BATCH_BUSY = 8
#: callbacks count as arriving for this long after the last one
BUSY_S = 0.2
#: callbacks being received at once from which the service counts as saturated: each
#: applied callback costs ~15 random page writes (its run's indexes), several times what
#: filing one costs, so applying then waits (see Applier) and Letta's answers keep the loop.
#: Two, not more: with a new connection per callback, as Letta sends them, a flood of
#: 3,000/s keeps only two or three in the handler at once; at 8 the wait never began and
#: one process answered 0.32-0.35 of the bare handler's rate, at 2 0.61 (BENCHMARKS-HISTORY.md)
SATURATED = 2
#: callbacks filed a second from which they count as a flood, here and in the callback
#: workers: the store's checkpoints then leave the writes be (see ``SQLiteDB._checkpoint``).
#: Letta sends one as each run ends, so steady work stays far under it; a burst (a backlog
#: released at once, benchmark 1) comes at thousands. ``SATURATED`` does not tell them
#: apart: two at once happen at 100 a second, and the WAL then doubled (BENCHMARKS-HISTORY.md)
FLOOD_PER_S = 1_000
#: the window over which that rate is counted
FLOOD_WINDOW_S = 0.25
#: callbacks that make that rate in one window: as many filed before a window is over is a
#: flood already (``flooding``)
FLOOD_PER_WINDOW = int(FLOOD_PER_S * FLOOD_WINDOW_S)
#: how often a waiting applier looks again
HOLD_S = 0.05
#: seconds before the applier tries again after a storage fault
RETRY_S = 1.0


def maybe_cut(obs: Observation, body: LettaCallback) -> bool:
    """Whether the callback's messages may be only the run's first ones: Letta puts in its
    callback those of the run's first 100 stored messages (run_manager.get_run_messages,
    called without a limit), so a run with more ends without its last ones, its answer
    among them. Judged by the count, or by the steps where the count says little (each step
    of a run that goes on past it stores two messages or more, and a legacy agent's
    send_message stores two that Letta shows as one)."""
    if len(obs.messages or ()) >= CALLBACK_STORED_MESSAGES:
        return True
    result = body.metadata.result if body.metadata else None
    steps = ((result.usage if result else None) or {}).get("step_count") or 0
    return 2 * steps >= CALLBACK_STORED_MESSAGES - 10  # a little room for the inputs


class Applier:
    """Applies the inbox's callbacks to their runs, oldest first, many per transaction.

    Answering Letta comes first: while callbacks keep arriving, the applier takes small
    rounds, so that filing a callback never waits behind a long apply transaction (their
    state changes share the group commits with the filing). While they arrive faster than
    the service answers them (``SATURATED`` being received at once), it does not apply at
    all, until they ease off or the oldest has waited ``callbacks.apply_max_lag_s`` (then
    small rounds again): a burst is answered at filing speed, and applied just after. When
    they stop coming, it applies in large rounds at full speed.

    Callback workers (``callbacks.workers``) file in other processes: their reports (see
    ``workers``) tell it what they are receiving and what they filed."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.store = manager.store
        self.max_lag = manager.cfg.callbacks.apply_max_lag_s
        self.wakeup = asyncio.Event()
        self.receiving = 0  # callbacks between their token check and their answer
        self.remote: dict[int, int] = {}  # the same, in each callback worker, as last reported
        #: runs a worker reported filed, and when: ``callback_filed`` holds them too
        self._reported: dict[str, float] = {}
        #: runs whose callback Letta could not vouch for, and the Letta run each named
        self._unvouched: dict[str, str] = {}
        self._last_received = 0.0
        self._window = (0.0, 0)  # when the rate's window began, callbacks filed since
        self._rate = 0.0  # callbacks filed a second in the last whole window
        self._hold_logged = -60.0

    def received(self, run_id: str) -> None:
        """A callback was filed: it is for the applier now."""
        self._filed(1)
        self.manager.callback_filed.add(run_id)
        self.wakeup.set()

    def unvouched(self, run_id: str, letta_run_id: str) -> None:
        """A callback Letta could not vouch for: its run is looked up at once (``run``)."""
        self._unvouched[run_id] = letta_run_id
        self.wakeup.set()

    def reported(self, worker: int, receiving: int, filed: list[str],
                 unvouched: Sequence[tuple[str, str]] = ()) -> None:
        """A callback worker's report: the callbacks it is receiving now, the runs whose
        callbacks it filed since its last report, and those Letta could not vouch for."""
        self.remote[worker] = receiving
        for run_id, letta_run_id in unvouched:
            self.unvouched(run_id, letta_run_id)
        if filed:
            now = self._filed(len(filed))
            self.manager.callback_filed.update(filed)
            self._reported.update(dict.fromkeys(filed, now))
            self.wakeup.set()

    def _forget_reported(self, before: float) -> None:
        """The inbox was empty at ``before``: the runs reported filed until then are applied
        (a report may come after its callback was applied: the poller would skip that run)."""
        gone = [r for r, at in self._reported.items() if at < before]
        for r in gone:
            del self._reported[r]
        self.manager.callback_filed.difference_update(gone)

    def _busy(self) -> bool:
        return time.monotonic() - self._last_received < BUSY_S

    def _filed(self, filed: int) -> float:
        """``filed`` callbacks were filed now (returned): they count as arriving, and
        towards the rate (``flooding``)."""
        now = self._last_received = time.monotonic()
        start, count = self._window
        if now - start >= FLOOD_WINDOW_S:
            self._rate = count / (now - start)
            start, count = now, 0
        self._window = (start, count + filed)
        return now

    def flooding(self) -> bool:
        """Whether callbacks are flooding in: ``FLOOD_PER_S`` or more filed a second in the
        last window, here and in the callback workers, and still coming. A window's worth
        filed before the window is over is that rate already: a flood is told as soon as
        that many came, not once its first window ends (a checkpoint's hold in that first
        quarter second stalled the flood's first answers 23-38 ms, BENCHMARKS-HISTORY.md)."""
        return (self._rate >= FLOOD_PER_S or self._window[1] >= FLOOD_PER_WINDOW) and self._busy()

    def _hold(self, oldest: InboxItem) -> bool:
        """Whether to leave the inbox be for now: callbacks are saturating the service, and
        the oldest filed one has not waited ``max_lag`` yet."""
        arriving = self.receiving + sum(self.remote.values())
        hold = arriving >= SATURATED and clock.now() - oldest.received_at < self.max_lag
        if hold and time.monotonic() - self._hold_logged > 60:  # a line a minute at most
            self._hold_logged = time.monotonic()
            log.info("%d callbacks arriving at once: applying them waits (at most %gs)",
                     arriving, self.max_lag)
        return hold

    async def run(self) -> None:
        while True:
            self.wakeup.clear()  # before the read: a callback filed after it sets it again
            started = time.monotonic()
            try:
                if self._unvouched:
                    await self._look_now()
                items = await self.store.inbox(APPLY_BATCH_BUSY if self._busy() else APPLY_BATCH)
                if not items:
                    if self._reported:
                        self._forget_reported(started)
                    await self.wakeup.wait()
                elif self._hold(items[0]):
                    await asyncio.sleep(HOLD_S)
                elif not await self.apply(items):
                    await asyncio.sleep(RETRY_S)  # a storage fault: the rest stays filed
            except Unavailable as e:
                log.warning("callback inbox: %s; retrying", e)
                await asyncio.sleep(RETRY_S)

    async def _look_now(self) -> None:
        """Have the runs of the callbacks Letta could not vouch for looked up at once."""
        for run_id, letta_run_id in list(self._unvouched.items()):
            del self._unvouched[run_id]
            try:
                await self.manager.look_now(run_id, letta_run_id)
            except Unavailable:
                self._unvouched.setdefault(run_id, letta_run_id)  # the next round's
                raise
            except Exception:  # not retried: its look comes after lookup_after_s, as before
                log.exception("callback for run %s: its look at Letta not hastened", run_id,
                              extra={"run_id": run_id})

    async def apply(self, items: list[InboxItem]) -> bool:
        """Apply ``items`` and drop them from the inbox; False when a storage fault left
        some of them there. A crash before the drop applies them again on the next start,
        which the state machine records as a duplicate observation, nothing more."""
        runs = await self.store.runs_by_id([i.run_id for i in items])
        done = await asyncio.gather(*(self._apply_one(i, runs.get(i.run_id)) for i in items))
        applied = [i for i, ok in zip(items, done, strict=True) if ok]
        await self.store.forget_callbacks([i.id for i in applied])
        self.manager.callback_filed.difference_update(i.run_id for i in applied)
        if self._reported:
            for i in applied:
                self._reported.pop(i.run_id, None)
        return all(done)

    async def _all_messages(self, run: RunRecord, obs: Observation) -> bool:
        """Replace a callback's messages, perhaps cut short, with all of the run's from
        Letta; when Letta cannot tell now, the run is polled at once instead (the poll
        fetches the result whole) and False returned: nothing recorded incomplete."""
        try:
            obs.messages = await self.manager.letta.run_messages(obs.letta_run_id)
            return True
        except TrackerError as e:
            log.warning("callback for run %s: its messages may be cut short and Letta did not"
                        " give them all (%s): polled instead", run.id, e,
                        extra={"run_id": run.id, "agent_id": run.agent_id})
            await self.manager.poll_now(run)
            return False

    async def _apply_one(self, item: InboxItem, run: RunRecord | None) -> bool:
        if run is None:  # pruned since (the inbox check found it)
            log.warning("callback for run %s: the run is gone", item.run_id)
            return True
        try:
            body = parse_callback(item.body)
            obs = Observation.from_callback(body)
            if maybe_cut(obs, body) and not await self._all_messages(run, obs):
                return True  # left to the poller, which reads every message
            await self.manager.apply_remote(run, obs, Source.CALLBACK)
        except Unavailable:
            return False
        except TrackerError as e:
            log.warning("callback for run %s not applied: %s", run.id, e,
                        extra={"run_id": run.id, "agent_id": run.agent_id})
        except Exception:
            # one this code fails on (a bug, a body no Letta sent yet) must not stop all the
            # others: the inbox is read oldest first, and it came first again every round,
            # for ever. Dropped as a missed callback is: its run is polled at once
            log.exception("callback for run %s could not be applied: its run is polled"
                          " instead", run.id, extra={"run_id": run.id, "agent_id": run.agent_id})
            try:
                await self.manager.poll_now(run)
            except Unavailable:
                return False  # kept, and tried again
        return True
