"""The run state machine: tracker lifecycle states, Letta statuses, and the transition table.

Every state change in the tracker is checked against ``TRANSITIONS`` here and performed by
the store as a compare-and-set, so racing observers (callback, poller, reconcile) are safe.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where a run is in the tracker's own lifecycle."""

    #: committed, waiting for its agent's lane (or for Letta to come back)
    QUEUED = "queued"
    #: being sent to Letta now; after a crash here, reconcile finds it again by otid
    SUBMITTING = "submitting"
    #: Letta has it; waiting for the callback, or for the poller to find it finished
    SUBMITTED = "submitted"
    #: submitted and past its deadline; still checked, at the maximum interval
    STUCK = "stuck"
    #: Letta said cancelled; a cancel does not stop Letta's step, so we wait and confirm
    CONFIRMING = "confirming"
    #: Letta completed with requires_approval; holds the agent's lane for the answer
    PAUSED = "paused"
    #: final: Letta's terminal status and result are recorded
    DONE = "done"
    #: final: Letta refused the request (4xx) at submit
    REJECTED = "rejected"
    #: final: cancelled while still queued; never reached Letta
    CANCELLED = "cancelled"
    #: final: Letta no longer knows the run (404)
    LOST = "lost"


class Status(StrEnum):
    """Letta's run status, the only values ever served as ``status``."""

    CREATED = "created"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Source(StrEnum):
    """How the tracker learnt something about a run (recorded on every event)."""

    API = "api"
    DISPATCH = "dispatch"
    CALLBACK = "callback"
    POLL = "poll"
    RECONCILE = "reconcile"


LETTA_TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
LETTA_ACTIVE = frozenset({Status.CREATED, Status.RUNNING})

#: the tracker will never change these again (but see ``may_overwrite``)
FINAL = frozenset({State.DONE, State.REJECTED, State.CANCELLED, State.LOST})
#: runs the poller checks against Letta
WATCHED = frozenset({State.SUBMITTED, State.STUCK, State.CONFIRMING})
#: runs that keep their agent's lane busy (serial dispatch)
LANE_BUSY = frozenset({State.SUBMITTING, State.SUBMITTED, State.STUCK, State.CONFIRMING})
#: an answer's run has ended in these: the pause it answers ends, unless Letta refused the
#: answer (see ``ends_pause``)
ANSWERED = frozenset({State.PAUSED, State.DONE, State.LOST})
#: how Letta's words begin when it fails an approval (or tool return) of other tool calls than
#: those its agent asked about (agents/helpers.py): the agent goes on waiting
REFUSED_ANSWER = ("Invalid tool call IDs.", "Invalid approval response.")
#: runs the relay reports to the user's callback_url once reached
REPORTED = frozenset({State.PAUSED, *FINAL})

TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.SUBMITTING, State.CANCELLED}),
    # a fast callback can land before the submit call has stored Letta's answer; a cancel
    # claims a queued run, and cancels it if it never reached Letta (looked for when unsure)
    State.SUBMITTING: frozenset(
        {State.QUEUED, State.SUBMITTED, State.REJECTED, State.PAUSED, State.CONFIRMING, State.DONE,
         State.CANCELLED}
    ),
    State.SUBMITTED: frozenset(
        {State.STUCK, State.CONFIRMING, State.PAUSED, State.DONE, State.LOST}
    ),
    State.STUCK: frozenset({State.CONFIRMING, State.PAUSED, State.DONE, State.LOST}),
    State.CONFIRMING: frozenset({State.PAUSED, State.DONE, State.LOST}),
    # answered (an approval went out) or cancelled by the user
    State.PAUSED: frozenset({State.DONE}),
    State.DONE: frozenset(),
    State.REJECTED: frozenset(),
    State.CANCELLED: frozenset(),
    State.LOST: frozenset(),
}


def can_move(old: State, new: State) -> bool:
    """True when the table allows ``old`` -> ``new``."""
    return new in TRANSITIONS[old]


def sources_of(new: State) -> tuple[State, ...]:
    """The states from which ``new`` may be reached (the CAS guard's ``IN (...)`` list)."""
    return tuple(s for s, targets in TRANSITIONS.items() if new in targets)


def may_overwrite(state: State, status: str | None, new_status: str,
                  new_stop: str | None = None) -> bool:
    """Letta overwrites a cancelled run to completed when its step ends: accept that one. Not
    a pause: a paused run is cancelled after it paused, and that cancel is final (a pause
    seen after it is an old report: the run's one callback, sent before the cancel)."""
    return (state == State.DONE and status == Status.CANCELLED
            and new_status == Status.COMPLETED and new_stop != "requires_approval")


def ends_pause(state: State, status: str, metadata: dict | None) -> bool:
    """Whether an answer's run, now in ``state``, ends the pause it answers. Not when Letta
    takes it: Letta checks an answer only once its run starts, and fails it when it names
    other tool calls than those asked about; its agent then awaits the approval still, and
    the messages queued behind the pause must wait on."""
    if state not in ANSWERED:
        return False
    error = (metadata or {}).get("error") if status == Status.FAILED else None
    return not (isinstance(error, str) and error.startswith(REFUSED_ANSWER))


def state_for(status: str, stop_reason: str | None) -> State | None:
    """The tracker state a Letta observation leads to; None while Letta still works on it."""
    if status in LETTA_ACTIVE:
        return None
    if status == Status.COMPLETED and stop_reason == "requires_approval":
        return State.PAUSED
    if status == Status.CANCELLED:
        return State.CONFIRMING
    return State.DONE

