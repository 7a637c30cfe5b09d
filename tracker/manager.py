"""The business operations: submit, apply what was learnt about a run, cancel, reconcile.

Whatever the source (callback, poll, reconcile), ``apply_remote`` is the one place where an
observation of a Letta run becomes a state change.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tracker import clock
from tracker.config import Config
from tracker.errors import Conflict, NotFound
from tracker.letta import LettaClient
from tracker.letta_request import answers_pause, ensure_otids
from tracker.reconcile import find_in_letta
from tracker.states import (
    REPORTED,
    WATCHED,
    Source,
    State,
    Status,
    may_overwrite,
    sources_of,
    state_for,
)
from tracker.store import Event, NewRun, RunFilter, RunRecord, Store, User

log = logging.getLogger("tracker.manager")

#: what Letta's run holds that the tracker's shows as it is. Not its callback_sent_at,
#: callback_status_code and callback_error: those tell of Letta's callback to the tracker, and
#: the run shows the relay's delivery to the user's callback_url there (the relay sets them)
LETTA_FIELDS = ("conversation_id", "base_template_id", "background", "metadata", "ttft_ns",
                "total_duration_ns")
#: live runs read a page at a time by a cancel of all of an agent's
CANCEL_PAGE = 1000
USAGE_KEYS = ("completion_tokens", "prompt_tokens", "total_tokens", "prompt_tokens_details",
              "completion_tokens_details")
REQUEST_CONFIG_DEFAULTS = {"use_assistant_message": True,
                           "assistant_message_tool_name": "send_message",
                           "assistant_message_tool_kwarg": "message",
                           "include_return_message_types": None}


_TOKEN_MAC = re.compile(r"(/callbacks/letta/run-[0-9a-fA-F-]+\.)[A-Za-z0-9_=-]+")


def mask_token(text: str) -> str:
    """Letta's callback_error quotes our callback URL, whose MAC is a credential: hide it."""
    return _TOKEN_MAC.sub(r"\1***", text)


def letta_usage(usage: dict | None) -> dict | None:
    """Usage in the shape Letta's ``/usage`` serves (the callback sends a longer one)."""
    return {k: usage.get(k) for k in USAGE_KEYS} if usage is not None else None


@dataclass
class Observation:
    """What one look at a Letta run (its callback, or a poll) told us."""

    letta_run_id: str
    status: str
    stop_reason: str | None = None
    completed_at: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    messages: list | None = None
    usage: dict | None = None
    #: why Letta's callback to the tracker failed, as Letta's run says (a poll): kept in the
    #: timeline, where an operator finds why callbacks do not arrive (a wrong public URL)
    callback_error: str | None = None

    @classmethod
    def from_run(cls, run: dict, messages: list | None = None,
                 usage: dict | None = None) -> Observation:
        """From Letta's Run object (a poll), with the result fetched beside it."""
        fields = {k: run.get(k) for k in LETTA_FIELDS if k in run}
        error = run.get("callback_error")
        return cls(letta_run_id=run["id"], status=run.get("status") or Status.CREATED,
                   stop_reason=run.get("stop_reason"), completed_at=run.get("completed_at"),
                   fields=fields, messages=messages, usage=letta_usage(usage),
                   callback_error=mask_token(error) if error else None)

    @classmethod
    def from_callback(cls, body: Any) -> Observation:
        """From Letta's callback body (a validated ``LettaCallback``)."""
        # only what Letta sent: the model's defaults (an absent "error") are not Letta's
        meta = body.metadata.model_dump(exclude_unset=True) if body.metadata else {}
        result = meta.pop("result", None) or {}
        stop = (result.get("stop_reason") or {}).get("stop_reason")
        return cls(letta_run_id=body.run_id, status=body.status, stop_reason=stop,
                   completed_at=body.completed_at, fields={"metadata": meta},
                   messages=result.get("messages"), usage=letta_usage(result.get("usage")))


def shown(messages: list, config: dict | None) -> list:
    """The messages of the kinds the run's include_return_message_types asks for (all when
    unset): applied here, not by Letta (see ``Dispatcher._body``)."""
    kinds = (config or {}).get("include_return_message_types")
    if not kinds:
        return messages
    return [m for m in messages if isinstance(m, dict) and m.get("message_type") in kinds]


def _changed(run: RunRecord, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without the Letta id and status when the run already holds those values:
    an unchanged column left out of an UPDATE spares rewriting its indexes."""
    return {k: v for k, v in fields.items()
            if k not in ("letta_run_id", "status") or getattr(run, k) != v}


def _awaits_look(run: RunRecord) -> bool:
    """Whether the run is queued to be looked up at Letta (an earlier send may be there)."""
    return run.state is State.QUEUED and run.needs_lookup


def cancelled_since(run: RunRecord) -> str | None:
    """The status guard (``Store.transition``'s ``unless_status``) for recording what was
    seen from ``run``, as read: a cancel recorded since that read is newer than what was seen,
    and stands. None when the read already showed the cancel."""
    return None if run.status == Status.CANCELLED else Status.CANCELLED


def new_run_id() -> str:
    """``run-`` and a UUID of version 4's form (Letta's run id pattern) whose first 48 bits
    are the time in milliseconds and the other 74 random: ids of later milliseconds sort
    later, so each insert extends the id indexes (of runs and of their events) at their end
    instead of dirtying a random page of each; a group commit of many submits writes a few
    pages there, not one per run."""
    bits = time.time_ns() // 1_000_000 << 80 | int.from_bytes(os.urandom(10))
    # the version (4) and variant (10) bits where UUID version 4 has them
    bits = bits & ~(0xF << 76 | 0x3 << 62) | 0x4 << 76 | 0x2 << 62
    h = f"{bits:032x}"  # str(uuid.UUID(int=bits)), without building the object
    return f"run-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def request_hash(agent_id: str, body: dict) -> str:
    """Fingerprint of a submit, to tell a retried request from a different one."""
    canonical = json.dumps([agent_id, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Manager:
    """Submit, apply_remote, cancel and reconcile, over the store and the Letta client."""

    def __init__(self, cfg: Config, store: Store, letta: LettaClient,
                 callback_url: Callable[[str], str]) -> None:
        self.cfg = cfg
        self.store = store
        self.letta = letta
        self.callback_url = callback_url
        self.dispatch_wakeup = asyncio.Event()
        self.relay_wakeup = asyncio.Event()
        self.poll_wakeup = asyncio.Event()
        #: a run due to be checked before this wakes the poller (which sets it: see its loop)
        self.poll_wake_before = math.inf
        #: runs this process claimed and is sending (or about to): never "stranded"
        self.sending: set[str] = set()
        #: runs whose Letta callback this process has answered and not yet applied: the
        #: poller leaves them to the applier
        self.callback_filed: set[str] = set()
        #: runs being sent whose callback came, but which Letta could not vouch for: if the
        #: send gets no answer, the look for the run need not wait (``look_at``)
        self.called_back: set[str] = set()
        self.on_applied: Callable[[RunRecord, str], None] | None = None  # metrics hook

    # --- submit ----------------------------------------------------------------------------

    async def submit(self, user: User, agent_id: str, body: dict,
                     idempotency_key: str | None = None) -> tuple[RunRecord, bool]:
        """Record a queued run (committed before anything is sent); returns (run, created)."""
        # compared only when the key was used before: a submit without one is never a retry
        digest = request_hash(agent_id, body) if idempotency_key else None
        forwarded = ensure_otids(body)
        kind = "answer" if answers_pause(forwarded) else "message"
        if kind == "answer" and not (idempotency_key and await self.store.run_by_key(
                user.id, idempotency_key)):  # a retry answers its first run (store.submit)
            await self._own_pause(user, agent_id)
        config = {k: forwarded.get(k, v) for k, v in REQUEST_CONFIG_DEFAULTS.items()}
        new = NewRun(id=new_run_id(), user_id=user.id, agent_id=agent_id, kind=kind,
                     request=forwarded, request_config=config,
                     callback_url=forwarded.get("callback_url"),
                     idempotency_key=idempotency_key, request_hash=digest)
        # claimed in the same transaction when its lane is free: the submit sends it at once.
        # Reserved first, so that no rescue of stranded runs mistakes it for one meanwhile.
        parallel = self.cfg.dispatch.per_agent == "parallel"
        self.sending.add(new.id)
        run: RunRecord | None = None
        try:
            run, created = await self.store.submit(new, Event(Source.API, "submit", {
                "idempotency_key": idempotency_key} if idempotency_key else None),
                claim=parallel)
        finally:
            if run is None or run.id != new.id or run.state is not State.SUBMITTING:
                self.sending.discard(new.id)
        if not created and run.request_hash != digest:
            raise Conflict("Idempotency-Key was already used with a different request")
        if created and run.state is State.QUEUED:
            # a run claimed here is sent at once: its "run submitted" line (or its failure's)
            # follows, and one line per submit is enough
            log.info("run queued", extra={"run_id": run.id, "agent_id": agent_id})
        return run, created

    async def _own_pause(self, user: User, agent_id: str) -> None:
        """An approval or tool return answers the pause of the user's own run: another user's
        would decide that user's pending tool calls (or, refused by Letta, learn their ids
        from its error). Refused here; one sent as a pause began waits it out instead (the
        store lets no answer by another user's pause, in either dispatch mode)."""
        users = await self.store.paused_by(agent_id)
        if users and user.id not in users:
            raise Conflict(f"agent {agent_id} is paused for an approval of another user's run;"
                           " only that user can answer it (or cancel it)")

    # --- what Letta told us ----------------------------------------------------------------

    async def apply_remote(self, run: RunRecord, obs: Observation, source: str) -> RunRecord:
        """Apply one observation of the Letta run; safe against duplicates and races."""
        if _awaits_look(run) and source == Source.CALLBACK:
            return await self._look_now(run, {"letta_run_id": obs.letta_run_id,
                                              "status": obs.status})
        target = state_for(obs.status, obs.stop_reason)
        if target is State.PAUSED and source == Source.CALLBACK \
                and run.status == Status.CANCELLED and run.state in WATCHED:
            return await self._pause_after_cancel(run, obs)
        fields = _changed(run, {"status": obs.status, "stop_reason": obs.stop_reason,
                                "letta_run_id": obs.letta_run_id}) | obs.fields
        if target is None:
            updated = await self.store.transition(run.id, None, (State.SUBMITTING, *WATCHED),
                                                  fields, None)
            return updated or run
        if target is State.CONFIRMING and self.confirmed(run, source):
            target = State.DONE
        fields.update(self._final_fields(target, obs, source, run.request_config))
        expect = tuple(s for s in sources_of(target) if s is not State.PAUSED)
        event = Event(source, "completed" if target in REPORTED else "cancel_seen",
                      {"status": obs.status, "stop_reason": obs.stop_reason,
                       **({"letta_callback_error": obs.callback_error}
                          if obs.callback_error else {})})
        # a pause seen before a cancel Letta took, recorded after it (its read of the run
        # predates the cancel): Letta cancelled the paused run, so recorded paused, the run was
        # never looked at again and its lane stayed held. Not recorded; the cancel's poll tells
        updated = await self.store.transition(
            run.id, target, expect, fields, event, relay=target in REPORTED,
            unless_status=cancelled_since(run) if target is State.PAUSED else None)
        if updated is None:
            updated = await self._settled(run, obs, source, fields)
        else:
            self._after_change(updated, source)
        return updated

    async def _look_now(self, run: RunRecord, detail: dict) -> RunRecord:
        """A callback for a run whose send got no answer, queued to be looked up at Letta no
        sooner than dispatch.lookup_after_s: Letta has it, the callback says, so the look
        need not wait (it attaches the run, and a poll reads the outcome). Ignored, the
        outcome was learnt that long later."""
        moved = await self.store.transition(run.id, None, (State.QUEUED,), {
            "next_check_at": clock.now()}, Event(Source.CALLBACK, "look_now", detail))
        self.dispatch_wakeup.set()
        return moved or run

    async def look_now(self, run_id: str, letta_run_id: str) -> None:
        """The same for a callback Letta could not vouch for (``callbacks._vouched``): not
        applied, it still says Letta has the run (its token is Letta's alone), and the look
        for the run at Letta is what attaches it. A run still being sent is left to its send,
        which, if it gets no answer, looks at once (noted before the read: a send ending
        meanwhile has moved the run on by then, or finds the note)."""
        self.called_back.add(run_id)
        try:
            run = await self.store.get_run(run_id)
        except BaseException:
            self.called_back.discard(run_id)
            raise
        detail = {"letta_run_id": letta_run_id, "vouched": False}
        if run is not None and run.state is State.SUBMITTING:
            await self.store.add_event(run_id, Event(Source.CALLBACK, "look_now", {
                **detail, "if": "the send gets no answer"}))
            return
        self.called_back.discard(run_id)
        if run is not None and _awaits_look(run):
            await self._look_now(run, detail)

    def look_at(self, run_id: str) -> float:
        """When to look up a run whose send may still be landing at Letta: no sooner than
        dispatch.lookup_after_s, unless its callback came (``called_back``: the note is
        spent), which shows Letta has it."""
        if run_id in self.called_back:
            self.called_back.discard(run_id)
            return clock.now()
        return clock.now() + self.cfg.dispatch.lookup_after_s

    async def _pause_after_cancel(self, run: RunRecord, obs: Observation) -> RunRecord:
        """A pause's callback come after Letta took a cancel of the run: Letta sends a run
        one callback, so this one left before the cancel, which Letta applied to the paused
        run (final: it denies the tool calls; its agent waits no more). Recorded paused, the
        run was never looked at again, and its agent's lane stayed held. A poll tells."""
        await self.store.add_event(run.id, Event(Source.CALLBACK, "ignored", {
            "status": obs.status, "stop_reason": obs.stop_reason, "state": run.state,
            "why": "sent before the cancel Letta took"}))
        await self.poll_now(run)
        return run

    async def poll_now(self, run: RunRecord) -> None:
        """Have the poller look at ``run`` at once (what a callback could not tell)."""
        await self.store.reschedule([(run.id, clock.now(), run.poll_count)])
        self.poll_wakeup.set()

    def confirmed(self, run: RunRecord, source: str) -> bool:
        """A cancelled outcome is final once a poll sees it after the confirm window (and,
        the poller checks before, with its step ended at Letta)."""
        if run.state is not State.CONFIRMING or source == Source.CALLBACK:
            return False
        seen = clock.epoch(run.recorded_at) or 0
        return clock.now() >= seen + self.cfg.polling.cancel_confirm_s

    def _final_fields(self, target: State, obs: Observation, source: str,
                      config: dict | None) -> dict[str, Any]:
        now = clock.now()
        fields: dict[str, Any] = {"completed_at": clock.to_iso(obs.completed_at),
                                  "recorded_at": clock.iso(now), "completed_via": source}
        if obs.messages is not None:
            fields["messages"] = shown(obs.messages, config)
        if obs.usage is not None:
            fields["usage"] = obs.usage
        if target is State.CONFIRMING:
            fields["next_check_at"] = now + self.cfg.polling.cancel_confirm_s
        error = (obs.fields.get("metadata") or {}).get("error")
        if error:
            fields["error"] = str(error)
        return fields

    async def _settled(self, run: RunRecord, obs: Observation, source: str,
                       fields: dict[str, Any]) -> RunRecord:
        """The CAS found the run already moved on: a duplicate, late or overwriting report."""
        current = await self.store.get_run(run.id)
        if current is None:
            raise NotFound(f"Run not found with id={run.id}")
        if may_overwrite(current.state, current.status, obs.status, obs.stop_reason):
            updated = await self.store.transition(
                run.id, State.DONE, (State.DONE,), {**fields, "status": obs.status},
                Event(source, "overwritten", {"status": obs.status, "was": current.status}),
                # two reports (a callback, a poll) that both read it cancelled: one overwrite,
                # one delivery (two, each its own webhook id, were two outcomes to the user)
                relay=True, unless_status=obs.status)
            if updated:
                # counted already, as cancelled: a run is one outcome in the metrics, and a
                # counter cannot take the first back (the timeline tells of the overwrite)
                self._after_change(updated, source, counted=False)
                return updated
        same = (current.status, current.stop_reason) == (obs.status, obs.stop_reason)
        await self.store.add_event(run.id, Event(source, "confirmed" if same else "ignored", {
            "status": obs.status, "stop_reason": obs.stop_reason, "state": current.state}))
        return current

    def _after_change(self, run: RunRecord, source: str, counted: bool = True) -> None:
        log.info("run %s", run.state, extra={"run_id": run.id, "agent_id": run.agent_id,
                                             "source": source, "status": run.status})
        self.dispatch_wakeup.set()
        if run.state in REPORTED and run.callback_url:
            self.relay_wakeup.set()
        if self.on_applied and counted:
            self.on_applied(run, source)

    # --- cancel ----------------------------------------------------------------------------

    async def cancel(self, user: User, agent_id: str,
                     run_ids: list[str] | None) -> dict[str, str]:
        """Letta's cancel: queued runs locally, submitted ones at Letta; {id: outcome}."""
        scope = None if user.is_admin else user.id
        targets = await self._cancel_targets(scope, agent_id, run_ids)
        answers: dict[str, str] = {}
        at_letta: dict[str, str] = {}
        for ref, run in targets.items():
            if run is not None and run.agent_id == agent_id and run.state is State.QUEUED:
                run = await self._cancel_queued(run)
            if run is None or run.agent_id != agent_id:
                answers[ref] = "failed"
            elif run.state is State.CANCELLED:
                answers[ref] = "cancelled"
            elif run.letta_run_id and run.state in (*WATCHED, State.PAUSED):
                at_letta[run.letta_run_id] = ref
            elif run.state is State.PAUSED:
                answers[ref] = await self._release_pause(run)
            else:
                answers[ref] = "cancelled" if run.state is State.DONE else "failed"
        if at_letta:
            answers.update(await self._cancel_at_letta(agent_id, at_letta, targets))
        return answers

    async def _cancel_targets(self, scope: str | None, agent_id: str,
                              run_ids: list[str] | None) -> dict[str, RunRecord | None]:
        if run_ids is not None:
            return {r: await self.store.get_run(r, scope) for r in dict.fromkeys(run_ids)}
        live = [s.value for s in (State.QUEUED, State.SUBMITTING, *WATCHED, State.PAUSED)]
        # every one, oldest first: a backlog of more than a page behind a stuck run must
        # not leave out that run, the one holding the lane (the oldest)
        runs: list[RunRecord] = []
        while True:
            page = await self.store.list_runs(RunFilter(
                user_id=scope, agent_id=agent_id, states=live, limit=CANCEL_PAGE,
                ascending=True, after=runs[-1].id if runs else None))
            runs += page
            if len(page) < CANCEL_PAGE:
                break
        if not runs:
            raise Conflict(f"CONFLICT: No active runs to cancel for agent {agent_id}")
        return {r.id: r for r in runs}

    async def _cancel_queued(self, run: RunRecord) -> RunRecord | None:
        """A queued run, cancelled here if it never reached Letta; returns it as it now is.
        Claimed first, so that no send starts meanwhile and so that the claim reads whether
        an earlier send that failed may have reached Letta (``needs_lookup``): such a run is
        looked for there, and found, attached and cancelled at Letta like any submitted run;
        when the look fails, it stays queued (and its cancel fails), never forgotten."""
        claimed = await self.store.transition(run.id, State.SUBMITTING, (State.QUEUED,), {}, None)
        if claimed is None:
            return await self.store.get_run(run.id)  # moved on meanwhile: as it is now
        look_at = claimed.next_check_at or 0.0
        self.sending.add(run.id)  # no rescue of stranded runs while this looks
        try:
            found = await find_in_letta(self, claimed) if claimed.needs_lookup else None
        except Exception as e:  # Letta down, or refusing the look: it may still have the run
            await self.requeue(claimed, clock.now(), needs_lookup=True, error=str(e),
                               kind="cancel_lookup_failed", source=Source.API)
            return await self.store.get_run(run.id)
        finally:
            self.sending.discard(run.id)
        called_back = run.id in self.called_back  # a note come with this look: spent with it
        self.called_back.discard(run.id)
        if found is not None:
            return (await self.mark_submitted(claimed, found, Source.API, "found_in_letta")
                    or await self.store.get_run(run.id))
        if claimed.needs_lookup and (look_at > clock.now() or called_back):
            # not found, but its last send got no answer and may still land at Letta: a look
            # before its time proves nothing (see Dispatcher._retry), and a cancel here let the
            # agent's next message go first; nor does one that missed a run whose callback
            # came. It stays queued for a later look; this cancel fails
            if called_back:
                look_at = max(look_at, clock.now() + self.cfg.dispatch.retry_min_s)
            await self.requeue(claimed, look_at, needs_lookup=True, error=claimed.error,
                               kind="cancel_too_soon", source=Source.API)
            return await self.store.get_run(run.id)
        fields = {"status": Status.CANCELLED, "stop_reason": "cancelled",
                  "recorded_at": clock.iso(), "completed_via": Source.API, "needs_lookup": 0}
        done = await self.store.transition(run.id, State.CANCELLED, (State.SUBMITTING,), fields,
                                           Event(Source.API, "cancelled"), relay=True)
        if done:
            self._after_change(done, Source.API)
        return done or await self.store.get_run(run.id)

    async def _release_pause(self, run: RunRecord) -> str:
        """The paused run is done, and its agent's lane free for the next message. A new
        outcome: the user's callback_url, told of the pause, is told of the cancel too (it
        may be another user's cancel-all), and ``recorded_at`` is now's (retention counts
        from it)."""
        fields = {"status": Status.CANCELLED, "stop_reason": "cancelled",
                  "recorded_at": clock.iso(), "completed_via": Source.API}
        done = await self.store.transition(run.id, State.DONE, (State.PAUSED,), fields,
                                           Event(Source.API, "pause_cancelled"), relay=True)
        if done:  # counted once in runs_completed, at its pause (as an overwrite is)
            self._after_change(done, Source.API, counted=False)
        return "cancelled"

    async def _cancel_at_letta(self, agent_id: str, at_letta: dict[str, str],
                               targets: dict[str, RunRecord | None]) -> dict[str, str]:
        answer = await self.letta.cancel(agent_id, list(at_letta))
        soon = clock.now() + self.cfg.polling.min_interval_s
        out = {}
        for letta_id, ref in at_letta.items():
            out[ref] = answer.get(letta_id, "failed")
            run = targets[ref]
            assert run is not None
            if run.state is State.PAUSED:
                # Letta cancels a paused run, denying its tool calls, so that its agent takes
                # messages again; released here only then (a pause left at Letta would fail
                # every message sent after it)
                if out[ref] == "cancelled":
                    await self._release_pause(run)
                continue
            # confirmed by the next observation (callback or a poll soon); Letta's status
            # as Letta answered (see _pause_after_cancel)
            taken = {"status": Status.CANCELLED} if out[ref] == "cancelled" else {}
            moved = await self.store.transition(run.id, None, WATCHED,
                                                {"next_check_at": soon, **taken},
                                                Event(Source.API, "cancel_requested",
                                                      {"letta": out[ref]}))
            if moved is None and taken:
                await self._paused_meanwhile(run.id)
        self.poll_wakeup.set()
        return out

    async def _paused_meanwhile(self, run_id: str) -> None:
        """A run this cancel read as running, whose pause was recorded before Letta took the
        cancel: Letta cancelled the paused run, so its agent waits no more. Left paused, it
        was never looked at again and its agent's lane stayed held."""
        run = await self.store.get_run(run_id)
        if run is not None and run.state is State.PAUSED:
            await self._release_pause(run)

    # --- recording what happened at Letta ----------------------------------------------

    async def mark_submitted(self, run: RunRecord, letta_run: dict, source: str,
                             kind: str = "submitted") -> RunRecord | None:
        """Letta has the run: watch it (grace period first, then polls)."""
        now = clock.now()
        fields = {"letta_run_id": letta_run["id"], "submitted_at": clock.iso(now),
                  "status": letta_run.get("status") or Status.CREATED,
                  "next_check_at": now + self.cfg.polling.grace_s,
                  "deadline_at": now + self.cfg.polling.deadline_s, "needs_lookup": 0,
                  **{k: letta_run.get(k) for k in LETTA_FIELDS if k in letta_run}}
        fields["status"] = fields["status"] if fields["status"] in (
            Status.CREATED, Status.RUNNING) else Status.CREATED
        done = await self.store.transition(run.id, State.SUBMITTED, (State.SUBMITTING,),
                                           _changed(run, fields), Event(source, kind,
                                                         {"letta_run_id": letta_run["id"]}))
        if done is None:
            # a callback got here first and already moved the run on: keep what it recorded,
            # but for the deadline, which a cancel it reported needs (its confirmation stops
            # waiting for a step Letta lost only past the deadline: without one, never)
            await self.store.transition(run.id, None, tuple(State), {
                "submitted_at": fields["submitted_at"], "deadline_at": fields["deadline_at"]},
                Event(source, kind, {"letta_run_id": letta_run["id"], "after": "callback"}))
        # wake the poller only if it would otherwise look too late: not when it sleeps until
        # before this run's first check, nor while it works (it reads what is due next after)
        if fields["next_check_at"] < self.poll_wake_before:
            self.poll_wakeup.set()
        return done

    async def requeue(self, run: RunRecord, at: float, needs_lookup: bool, error: str | None,
                      kind: str = "retry", source: str = Source.DISPATCH) -> None:
        await self.store.transition(run.id, State.QUEUED, (State.SUBMITTING,), {
            "next_check_at": at, "needs_lookup": int(needs_lookup), "error": error},
            Event(source, kind, {"error": error, "retry_in_s": round(at - clock.now(), 3)}))
        self.dispatch_wakeup.set()

    async def reject(self, run: RunRecord, status: int, detail: Any) -> RunRecord | None:
        """Letta refused the request: the run ends failed with Letta's status and detail."""
        text = detail if isinstance(detail, str) else json.dumps(detail)
        done = await self.store.transition(run.id, State.REJECTED, (State.SUBMITTING,), {
            "status": Status.FAILED, "stop_reason": "error", "error": text, "error_code": status,
            "recorded_at": clock.iso(), "completed_via": Source.DISPATCH},
            Event(Source.DISPATCH, "rejected", {"status_code": status, "detail": detail}),
            relay=True)
        if done:
            self._after_change(done, Source.DISPATCH)
        return done

    async def mark_lost(self, run: RunRecord, reason: str) -> None:
        done = await self.store.transition(run.id, State.LOST, tuple(WATCHED), {
            "status": Status.FAILED, "stop_reason": "error", "error": reason,
            "recorded_at": clock.iso(), "completed_via": Source.POLL},
            Event(Source.POLL, "lost", {"reason": reason}), relay=True)
        if done:
            self._after_change(done, Source.POLL)
