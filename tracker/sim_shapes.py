"""Letta's JSON shapes, field for field as the recorded samples show them.

Key order follows the real server's responses; timestamps keep Letta's three formats:
`created_at` with `Z`, `completed_at`/callback times naive UTC, message `date` with `+00:00`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracker.sim_store import SimRun

LETTA_VERSION = "0.16.8"
USER_ID = "user-00000000-0000-4000-8000-000000000000"
ORG_ID = "org-00000000-0000-4000-8000-000000000000"
RUN_STATUSES = ("created", "running", "completed", "failed", "cancelled")
ACTIVE_STATUSES = frozenset({"created", "running"})
STOP_REASONS = (
    "end_turn",
    "error",
    "llm_api_error",
    "invalid_llm_response",
    "invalid_tool_call",
    "max_steps",
    "max_tokens_exceeded",
    "no_tool_call",
    "tool_rule",
    "cancelled",
    "insufficient_credits",
    "requires_approval",
    "context_window_overflow_in_system_prompt",
)


def utcnow() -> datetime:
    """Now, as the naive UTC datetime Letta stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso_z(moment: datetime) -> str:
    """`created_at` style: ISO with a `Z` suffix."""
    return moment.isoformat() + "Z"


def iso_naive(moment: datetime | None) -> str | None:
    """`completed_at` / `callback_sent_at` style: ISO without a zone."""
    return None if moment is None else moment.isoformat()


def iso_date(moment: datetime) -> str:
    """Message `date` style: whole seconds with `+00:00`."""
    return moment.replace(microsecond=0).isoformat() + "+00:00"


def new_id(prefix: str) -> str:
    """A Letta id, `<prefix>-<uuid4>`.

    Random even in a seeded simulator: a second simulator (a "new" Letta) must never hand out
    a run id an earlier one used, or a tracker's history would mix two runs.
    """
    return f"{prefix}-{uuid.uuid4()}"


def new_uuid() -> str:
    """A bare uuid4 (Letta's otid for a message sent without one)."""
    return str(uuid.uuid4())


def otid_from_id(message_id: str, index: int) -> str:
    """Letta's otid for the index-th LettaMessage cut from one stored message."""
    value = int(message_id.split("-", 1)[1].replace("-", ""), 16)
    # Letta clears the low 7 bits of the message uuid and puts the index there.
    text = f"{(value & ~0x7F) | (index & 0x7F):032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def run_json(run: SimRun, *, listed: bool = False) -> dict[str, Any]:
    """A Run as `GET /v1/runs/{id}` (or, with listed=True, `GET /v1/runs/`) serves it."""
    return {
        "id": run.id,
        "status": run.status,
        "created_at": iso_z(run.created_at),
        "completed_at": iso_naive(run.completed_at),
        "agent_id": run.agent_id,
        "conversation_id": None,
        "base_template_id": None,
        "background": True,
        "metadata": dict(run.metadata),
        "request_config": dict(run.request_config),
        "stop_reason": run.stop_reason,
        "callback_url": run.callback_url,
        "callback_sent_at": iso_naive(run.callback_sent_at),
        "callback_status_code": run.callback_status_code,
        "callback_error": run.callback_error,
        "ttft_ns": None,
        # Letta's list joins run_metrics.run_ns in here; the single-run GET never does.
        "total_duration_ns": run.run_ns if listed else None,
    }


def message_json(
    message_id: str, date: datetime, message_type: str, otid: str | None, run: SimRun, **fields: Any
) -> dict[str, Any]:
    """One LettaMessage: the common head, then the type's own fields."""
    head = {
        "id": message_id,
        "date": iso_date(date),
        "name": fields.pop("name", None),
        "message_type": message_type,
        "otid": otid,
        "sender_id": fields.pop("sender_id", None),
        "step_id": run.step_id,
        "is_err": None,
        "seq_id": None,
        "run_id": run.id,
    }
    return head | fields


def usage_json(run: SimRun) -> dict[str, Any]:
    """`GET /v1/runs/{id}/usage`."""
    completion, prompt = run.usage
    return {
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "total_tokens": completion + prompt,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def step_json(run: SimRun) -> dict[str, Any]:
    """The run's one step, as `GET /v1/runs/{id}/steps` lists it (async_basic__run_steps)."""
    completion, prompt = run.usage
    return {
        "id": run.step_id, "origin": None, "organization_id": ORG_ID, "provider_id": None,
        "run_id": run.id, "agent_id": run.agent_id, "provider_name": "openai",
        "provider_category": "base", "model": "fake-model",
        "model_handle": "openai-proxy/fake-model", "model_endpoint": "http://127.0.0.1:8399/v1",
        "context_window_limit": 30000, "completion_tokens": completion,
        "prompt_tokens": prompt, "total_tokens": completion + prompt,
        "cached_input_tokens": None, "cache_write_tokens": None, "reasoning_tokens": None,
        "completion_tokens_details": {"reasoning_tokens": 0},
        "prompt_tokens_details": {"cached_tokens": 0, "cache_read_tokens": 0,
                                  "cache_creation_tokens": 0},
        "stop_reason": run.stop_reason if run.step_status != "pending" else None,
        "tags": [], "tid": None, "trace_id": None, "request_id": None, "messages": [],
        "feedback": None, "project_id": None, "error_type": None, "error_data": None,
        "status": run.step_status,
    }


def usage_statistics(run: SimRun) -> dict[str, Any]:
    """The `usage` block of a callback's result."""
    completion, prompt = run.usage
    return {
        "message_type": "usage_statistics",
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "total_tokens": completion + prompt,
        # Letta counts the step row, which exists from the turn's start, even for a failed turn.
        "step_count": 1,
        "run_ids": None,
        "cached_input_tokens": None,
        "cache_write_tokens": None,
        "reasoning_tokens": None,
        "context_tokens": None,
    }


#: the stored messages of a run that Letta's callback carries at most (run_manager's
#: get_run_messages, called without a limit, defaults to its first 100)
CALLBACK_STORED_MESSAGES = 100


def callback_json(
    run: SimRun, status: str, stop_reason: str | None, completed_at: datetime
) -> dict[str, Any]:
    """The body Letta POSTs to `callback_url`."""
    metadata = dict(run.metadata)
    metadata["result"] = {
        # Letta reads them with get_run_messages' default limit: a longer run's are cut short
        "messages": run.first_messages(CALLBACK_STORED_MESSAGES),
        "stop_reason": {"message_type": "stop_reason", "stop_reason": stop_reason},
        "usage": usage_statistics(run),
        "logprobs": None,
        "turns": None,
    }
    return {
        "run_id": run.id,
        "status": status,
        "completed_at": iso_naive(completed_at),
        "metadata": metadata,
    }


def llm_error(status: int) -> str:
    """`metadata.error` of a run whose LLM call failed with `status`, in Letta's words."""
    body = (
        f"Error code: {status} - {{'error': {{'message': 'fake_llm forced error (status "
        f"{status})', 'type': 'server_error', 'param': None, 'code': None}}}}"
    )
    if status == 429:
        return f"RATE_LIMIT_EXCEEDED: Rate limited by OpenAI: {body}"
    if 400 <= status < 500:
        return f"INVALID_ARGUMENT: Bad request to OpenAI-compatible endpoint: {body}"
    return f"INTERNAL_SERVER_ERROR: OpenAI API error: {body}"
