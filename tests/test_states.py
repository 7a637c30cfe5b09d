"""The state machine table: what may follow what, and what each Letta outcome leads to."""

from tracker.states import (
    FINAL,
    LANE_BUSY,
    REPORTED,
    TRANSITIONS,
    WATCHED,
    State,
    Status,
    can_move,
    may_overwrite,
    sources_of,
    state_for,
)


def test_final_states_have_no_way_out():
    for s in FINAL:
        assert TRANSITIONS[s] == frozenset()


def test_every_state_is_in_the_table():
    assert set(TRANSITIONS) == set(State)


def test_nothing_moves_back_to_queued_except_a_failed_send():
    assert sources_of(State.QUEUED) == (State.SUBMITTING,)


def test_letta_outcomes_map_to_states():
    assert state_for("created", None) is None
    assert state_for("running", None) is None
    assert state_for("completed", "end_turn") is State.DONE
    assert state_for("failed", "error") is State.DONE
    assert state_for("completed", "requires_approval") is State.PAUSED
    # a cancel is confirmed later: Letta may overwrite it to completed
    assert state_for("cancelled", "cancelled") is State.CONFIRMING


def test_fast_callback_can_finish_a_run_still_submitting():
    assert can_move(State.SUBMITTING, State.DONE)
    assert can_move(State.SUBMITTING, State.PAUSED)


def test_only_cancelled_to_completed_overwrites_a_final_run():
    assert may_overwrite(State.DONE, Status.CANCELLED, Status.COMPLETED)
    assert not may_overwrite(State.DONE, Status.COMPLETED, Status.CANCELLED)
    assert not may_overwrite(State.DONE, Status.FAILED, Status.COMPLETED)
    assert not may_overwrite(State.CANCELLED, Status.CANCELLED, Status.COMPLETED)
    # a pause reported after its cancel is an old report: the cancel of a paused run is final
    assert not may_overwrite(State.DONE, Status.CANCELLED, Status.COMPLETED, "requires_approval")
    assert may_overwrite(State.DONE, Status.CANCELLED, Status.COMPLETED, "end_turn")


def test_sets_are_consistent():
    assert not (WATCHED & FINAL)
    assert WATCHED <= LANE_BUSY
    assert State.PAUSED in REPORTED and State.CONFIRMING not in REPORTED
