"""Runs from creation to their end, the way Letta plays them.

A turn is one `loop.call_later` timer, so ten thousand in-flight runs cost ten thousand
timer handles and nothing else. Letta's quirks kept on purpose:

- the run is terminal in GET `callback_lag_s` before its callback is POSTed;
- a cancel marks the run `cancelled` and sends a `cancelled` callback at once, but the turn
  goes on (its step `pending` in `GET /v1/runs/{id}/steps`); when it ends the run is
  overwritten with the turn's outcome and no second callback goes out;
- a restart loses every in-flight turn and pending callback: those runs stay as they are;
- an agent whose turn ended `requires_approval` awaits its approval: any other message fails,
  as does an approval when none is awaited, or one of other tool calls than those asked
  about (and the agent goes on waiting); cancelling the paused run cancels it (`cancelled`,
  no callback) and ends the wait.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

from tracker.sim_callbacks import CallbackSender, unreachable_text
from tracker.sim_faults import Faults, chance
from tracker.sim_llm import TurnPlan, is_answer, plan_turn, refusal, turn_result
from tracker.sim_shapes import callback_json, new_id, utcnow
from tracker.sim_store import RunStore, SimAgent, SimRun


class Engine:
    """Creates runs, ends their turns, cancels them and delivers their callbacks."""

    def __init__(
        self, store: RunStore, rng: random.Random, faults_for: Callable[[str], Faults]
    ) -> None:
        self.store = store
        self.rng = rng
        self.sender = CallbackSender()
        self._faults_for = faults_for
        self._turns: dict[str, asyncio.TimerHandle] = {}
        self._callback_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dropped: set[str] = set()
        #: agent id -> the run that paused it, while the agent awaits its approval
        self._awaiting: dict[str, str] = {}
        self.callbacks_sent = 0

    def submit(
        self, agent: SimAgent, inputs: list[dict[str, Any]], config: dict[str, Any], url: str | None
    ) -> SimRun:
        """Create a run for validated inputs and start its turn."""
        faults = self._faults_for(agent.id)
        run = SimRun(
            id=new_id("run"),
            agent_id=agent.id,
            seq=self.store.next_seq(),
            created_at=utcnow(),
            start_ns=time.time_ns(),
            step_id=new_id("step"),
            request_config=config,
            callback_url=url,
            inputs=inputs,
        )
        awaited = self.store.get(self._awaiting.get(agent.id, ""))
        plan = (refusal(inputs, awaited.messages[-1] if awaited else None)
                or plan_turn(inputs, faults, self.rng))
        if plan.error is None and is_answer(inputs):
            self._awaiting.pop(agent.id)  # answered: the agent takes messages again
        # Decided now, not at send time, so a seeded run repeats whatever the timing.
        if url and chance(self.rng, faults.callback_drop):
            self._dropped.add(run.id)
        self.store.add(run)
        if plan.outcome != "never":
            loop = asyncio.get_running_loop()
            self._turns[run.id] = loop.call_later(plan.duration_s, self._finish, run, plan)
        return run

    async def cancel(self, run: SimRun) -> None:
        """Letta's cancel: mark it cancelled and call back now; the turn itself goes on."""
        if run.stop_reason == "requires_approval":
            # Letta cancels a paused run (denying its tool calls): no callback, as the run
            # already completed; the agent no longer awaits the approval
            run.status = run.stop_reason = "cancelled"
            if self._awaiting.get(run.agent_id) == run.id:
                del self._awaiting[run.agent_id]
            return
        if run.completed_at is not None:
            return  # a terminal run answers "cancelled" but nothing changes
        run.status = run.stop_reason = "cancelled"
        run.completed_at = utcnow()
        run.run_ns = time.time_ns() - run.start_ns
        self.store.deactivate(run)
        if run.callback_url:
            # Letta awaits the callback inside the cancel request before answering.
            faults = self._faults_for(run.agent_id)
            wait = faults.callback_lag_s + faults.callback_delay_s
            await self._spawn(self._deliver_later(wait, run, "cancelled", "cancelled", faults))

    def forget(self, run: SimRun) -> None:
        """Stop everything still scheduled for a deleted run."""
        self._dropped.discard(run.id)
        for timers in (self._turns, self._callback_timers):
            handle = timers.pop(run.id, None)
            if handle is not None:
                handle.cancel()

    def restart(self) -> None:
        """Lose in-flight turns and pending callbacks, as a Letta process restart does."""
        for timers in (self._turns, self._callback_timers):
            for handle in timers.values():
                handle.cancel()
            timers.clear()
        for task in self._tasks:
            task.cancel()

    async def close(self) -> None:
        """Cancel everything pending and close the callback session."""
        self.restart()
        tasks = list(self._tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sender.close()

    def _finish(self, run: SimRun, plan: TurnPlan) -> None:
        self._turns.pop(run.id, None)
        agent = self.store.agents[run.agent_id]
        result = turn_result(plan, run, agent, utcnow())
        agent.turns += 1
        agent.json["last_stop_reason"] = result.stop_reason
        overwrite = run.completed_at is not None  # cancelled while the turn ran
        run.status, run.stop_reason = result.status, result.stop_reason
        run.step_status = "failed" if result.status == "failed" else "success"
        run.messages, run.usage = result.messages, result.usage
        if result.error is not None:
            run.metadata["error"] = result.error
        if result.stop_reason == "requires_approval":
            self._awaiting[run.agent_id] = run.id
        run.run_ns = time.time_ns() - run.start_ns
        if overwrite:
            return  # Letta sends no second callback for an already-completed run
        run.completed_at = utcnow()
        self.store.deactivate(run)
        if run.callback_url:
            self._schedule_callback(run)

    def _schedule_callback(self, run: SimRun) -> None:
        faults = self._faults_for(run.agent_id)
        wait = faults.callback_lag_s + faults.callback_delay_s
        loop = asyncio.get_running_loop()
        args = (run, run.status, run.stop_reason, faults)
        self._callback_timers[run.id] = loop.call_later(wait, self._callback_due, *args)

    def _callback_due(self, run: SimRun, status: str, stop: str | None, faults: Faults) -> None:
        self._callback_timers.pop(run.id, None)
        self._spawn(self._deliver(run, status, stop, faults))

    async def _deliver_later(self, wait: float, run: SimRun, *args: Any) -> None:
        await asyncio.sleep(wait)
        await self._deliver(run, *args)

    async def _deliver(self, run: SimRun, status: str, stop: str | None, faults: Faults) -> None:
        if run.deleted or not run.callback_url:
            return
        payload = callback_json(run, status, stop, utcnow())
        sent_at = utcnow()
        if run.id in self._dropped:  # a run sends at most one callback, so forget the mark
            self._dropped.discard(run.id)
            outcome: tuple[int | None, str | None] = (None, unreachable_text())
        else:
            outcome = await self.sender.post(run.callback_url, payload, faults.callback_timeout_s)
            self.callbacks_sent += 1
        run.callback_sent_at = sent_at
        run.callback_status_code, error = outcome
        run.callback_error = None if error is None else _dispatch_error(run, error)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _dispatch_error(run: SimRun, error: str) -> str:
    return f"Failed to dispatch callback for run {run.id} to {run.callback_url}: {error}"
