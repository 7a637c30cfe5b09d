"""The fake LLM behind the simulator: how long a turn takes, how it ends, what it says.

Text markers work like the fake LLM used to record the samples: `[[delay=N]]` makes the turn
take N seconds, `[[fail]]` / `[[fail=429]]` fails it, `[[approval]]` pauses it for a tool
approval, `[[never]]` loses it (the run stays `created`). An agent paused for an approval
refuses any other message, and an approval when nothing awaits one, as Letta does: the run
fails at once with Letta's words.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tracker.letta_request import PAUSE_ANSWERS, message_kind
from tracker.sim_faults import Faults, chance
from tracker.sim_shapes import llm_error, message_json, new_id, otid_from_id
from tracker.sim_store import SimAgent, SimRun

REPLY = "Hello from fake LLM."
_MARKER = re.compile(r"\[\[(delay|fail|approval|never)(?:=([^\]]*))?\]\]")
_INPUT_TYPES = {
    "user": "user_message",
    "system": "system_message",
    "assistant": "assistant_message",
}


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """What a run's turn will do, decided when the run is created."""

    duration_s: float
    outcome: str  # "ok", "fail", "approval" or "never"
    fail_status: int = 500
    error: str | None = None  # a failure's own words (else the LLM error of fail_status)


@dataclass(frozen=True, slots=True)
class TurnResult:
    """What the finished turn leaves on the run."""

    status: str
    stop_reason: str
    messages: list[dict[str, Any]]
    usage: tuple[int, int]
    error: str | None = None


#: Letta's run error when a message comes while the agent awaits an approval (its
#: PendingApprovalError), and when an approval comes while none is awaited (a ValueError)
PENDING_APPROVAL = ("CONFLICT: Cannot send a new message: The agent is waiting for approval on a"
                    " tool call. Please approve or deny the pending request before continuing.")
NO_APPROVAL_PENDING = ("Cannot process approval response: No tool call is currently awaiting"
                       " approval. Please send a regular message to interact with the agent.")
INVALID_APPROVAL = ("Invalid approval response. Approval response message does not contain any"
                    " approvals.")
#: such a refusal comes before any LLM call: the run fails at once
REFUSED_S = 0.05


def is_answer(inputs: list[dict[str, Any]]) -> bool:
    """Letta reads the first input: an approval (or tool return) answers a pause."""
    return bool(inputs) and message_kind(inputs[0]) in PAUSE_ANSWERS


def refusal(inputs: list[dict[str, Any]], awaited: dict[str, Any] | None) -> TurnPlan | None:
    """The plan of a turn Letta refuses for the agent's approval state, or None; ``awaited``:
    the approval request message the agent waits on, if any."""
    if is_answer(inputs) != (awaited is not None):
        return TurnPlan(REFUSED_S, "fail", error=PENDING_APPROVAL if awaited
                        else NO_APPROVAL_PENDING)
    error = awaited and wrong_answer(inputs[0], awaited)
    return TurnPlan(REFUSED_S, "fail", error=error) if error else None


def wrong_answer(answer: dict[str, Any], request: dict[str, Any]) -> str | None:
    """Letta's words refusing an approval (or tool return) that does not answer the tool
    calls ``request`` asks about (agents/helpers.py, validate_approval_tool_call_ids): the
    agent goes on waiting. None when it answers them."""
    approvals = _approvals(answer)
    if not approvals:
        return INVALID_APPROVAL
    expected = [c["tool_call_id"] for c in request.get("tool_calls") or ()]
    got = [a.get("tool_call_id") for a in approvals]
    # the request's message id stands for its one tool call (what Letta once asked for)
    if set(expected) ^ set(got) and not (len(expected) == 1 and got[0] == request["id"]):
        return f"Invalid tool call IDs. Expected '{expected}', but received '{got}'."
    return None


def plan_turn(inputs: list[dict[str, Any]], faults: Faults, rng: random.Random) -> TurnPlan:
    """Decide duration and outcome: markers first, then the fault rates."""
    markers = dict(_MARKER.findall(" ".join(_texts(inputs))))
    duration = _duration(markers.get("delay"), faults, rng)
    if "never" in markers:
        return TurnPlan(duration, "never")
    if "fail" in markers:
        return TurnPlan(duration, "fail", _status(markers["fail"]))
    if "approval" in markers:
        return TurnPlan(duration, "approval")
    if chance(rng, faults.never_finish_rate):
        return TurnPlan(duration, "never")
    if chance(rng, faults.fail_rate):
        return TurnPlan(duration, "fail")
    return TurnPlan(duration, "ok")


def turn_result(plan: TurnPlan, run: SimRun, agent: SimAgent, now: datetime) -> TurnResult:
    """The messages, usage and status the turn ends with."""
    if plan.outcome == "fail":
        # Letta keeps no messages of a failed turn, not even the user's.
        return TurnResult("failed", "error", [], (0, 0),
                          plan.error or llm_error(plan.fail_status))
    inputs = [_input_message(m, run) for m in run.inputs]
    prompt = 2051 + 60 * agent.turns + sum(len(t) for t in _texts(run.inputs)) // 4
    if plan.outcome == "approval":
        reply = [_approval_request(run, new_id("message"), now, new_id("call"))]
        return TurnResult("completed", "requires_approval", inputs + reply, (20, prompt))
    reply = _reply(run, new_id("message"), now, legacy=agent.agent_type != "letta_v1_agent")
    return TurnResult("completed", "end_turn", inputs + reply, (5 + 43 * (len(reply) > 1), prompt))



def _duration(marker: str | None, faults: Faults, rng: random.Random) -> float:
    if marker is not None:
        try:
            return max(0.0, float(marker))
        except ValueError:
            pass
    low, high = faults.run_duration_s
    return low if low == high else rng.uniform(low, high)


def _status(marker: str) -> int:
    return int(marker) if marker.isdigit() else 500


def _texts(inputs: list[dict[str, Any]]) -> list[str]:
    texts: list[str] = []
    for message in inputs:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and "text" in p)
    return texts


def _input_message(message: dict[str, Any], run: SimRun) -> dict[str, Any]:
    """A message the run was given, as Letta lists it back."""
    if message_kind(message) not in PAUSE_ANSWERS:
        return message_json(
            new_id("message"),
            run.created_at,
            _INPUT_TYPES.get(message.get("role"), "user_message"),
            message["otid"],
            run,
            name=message.get("name"),
            sender_id=message.get("sender_id"),
            content=message.get("content"),
        )
    # Letta stores the answer as a new Message without the request's otid, and lists it with
    # the deprecated fields taken from its first approval (a tool return is none)
    approvals = [_approval_json(a) for a in _approvals(message)]
    first = next((a for a in approvals if a["type"] == "approval"), {})
    return message_json(
        new_id("message"),
        run.created_at,
        "approval_response_message",
        None,
        run,
        approve=first.get("approve"),
        approval_request_id=first.get("tool_call_id"),
        reason=first.get("reason"),
        approvals=approvals,
    )


def _approvals(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """An approval's (or tool return's) answers, as Letta reads them
    (ApprovalCreate.migrate_deprecated_fields makes the deprecated fields one approval)."""
    if message_kind(answer) == "tool_return":  # Letta makes it an approval of its returns
        return [{**r, "type": "tool"} for r in answer.get("tool_returns") or ()]
    approvals = answer.get("approvals")
    if not approvals and answer.get("approve") is not None and (
            answer.get("approval_request_id") is not None):
        return [{"type": "approval", "tool_call_id": answer["approval_request_id"],
                 "approve": answer["approve"], "reason": answer.get("reason")}]
    return approvals or []


def _approval_json(answer: dict[str, Any]) -> dict[str, Any]:
    """One ApprovalReturn or ToolReturn, every field present, as Letta lists it."""
    if answer.get("type", "approval") == "approval":
        return {"type": "approval", "tool_call_id": answer["tool_call_id"],
                "approve": answer["approve"], "reason": answer.get("reason")}
    return {"type": "tool", "tool_return": answer["tool_return"], "status": answer["status"],
            "tool_call_id": answer["tool_call_id"], "stdout": answer.get("stdout"),
            "stderr": answer.get("stderr")}


def _reply(run: SimRun, message_id: str, now: datetime, *, legacy: bool) -> list[dict[str, Any]]:
    # Legacy agents answer through send_message: a reasoning and an assistant message cut
    # from one stored message, sharing its id, with otids indexed 0 and 1.
    parts: list[tuple[str, dict[str, Any]]] = [("assistant_message", {"content": REPLY})]
    if legacy:
        thought = {"source": "non_reasoner_model", "reasoning": "fake inner thought"}
        parts.insert(0, ("reasoning_message", thought | {"signature": None}))
    return [
        message_json(message_id, now, kind, otid_from_id(message_id, i), run, **fields)
        for i, (kind, fields) in enumerate(parts)
    ]


def _approval_request(run: SimRun, message_id: str, now: datetime, call_id: str) -> dict:
    call = {"name": "fake_client_tool", "arguments": "{}", "tool_call_id": call_id}
    otid = otid_from_id(message_id, 0)
    return message_json(
        message_id, now, "approval_request_message", otid, run, tool_call=call, tool_calls=[call]
    )
