"""Letta's error answers: status codes and bodies exactly as the real server sends them.

Letta's validation handler answers 422 with `{"trace_id": "", "detail": "<repr of FastAPI's
error list>"}`: `detail` is a *string* (Python repr, tuple locs), not a list.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tracker.sim_shapes import ORG_ID, USER_ID

_UUID4 = "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
AGENT_ID_PATTERN = f"^agent-{_UUID4}$"
RUN_ID_PATTERN = f"^run-{_UUID4}$"
AGENT_ID_EXAMPLE = "agent-123e4567-e89b-42d3-8456-426614174000"

ErrorItem = dict[str, Any]


class SimError(Exception):
    """An HTTP error answer: status, JSON body and optional headers."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = headers or {}


def detail(status: int, message: str) -> SimError:
    """The plain FastAPI shape, `{"detail": message}`."""
    return SimError(status, {"detail": message})


def invalid(errors: list[ErrorItem]) -> SimError:
    """422 for a failed request validation, with Letta's id examples when an id was at fault."""
    body: dict[str, Any] = {"trace_id": "", "detail": repr(errors)}
    if any(e["type"] == "string_pattern_mismatch" for e in errors):
        body["examples"] = [AGENT_ID_EXAMPLE]
    return SimError(422, body)


def agent_id_mismatch(value: str) -> ErrorItem:
    """The path error for an agent id that is not `agent-<uuid4>`."""
    return {
        "type": "string_pattern_mismatch",
        "loc": ("path", "agent_id"),
        "msg": "String should match pattern 'agent-{uuid4}'",
        "input": value,
        "ctx": {"pattern": AGENT_ID_PATTERN},
    }


def json_invalid(position: int, message: str) -> ErrorItem:
    """FastAPI's error for a body that is not JSON."""
    return {
        "type": "json_invalid",
        "loc": ("body", position),
        "msg": "JSON decode error",
        "input": {},
        "ctx": {"error": message},
    }


def body_missing() -> ErrorItem:
    """FastAPI's error for an empty body where one is required."""
    return {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}


def query_item(kind: str, name: str, value: Any, msg: str, **ctx: Any) -> ErrorItem:
    """A query-parameter error in pydantic's shape."""
    item: ErrorItem = {"type": kind, "loc": ("query", name), "msg": msg, "input": value}
    if ctx:
        item["ctx"] = ctx
    return item


def choices_text(options: tuple[str, ...] | list[str]) -> str:
    """Pydantic's "'a', 'b' or 'c'" rendering of allowed values."""
    quoted = [f"'{o}'" for o in options]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def invalid_status(status: str) -> SimError:
    """400 of `GET /v1/runs/` for a status that is none: Letta's ValueError, in its words."""
    return detail(400, f"'{status}' is not a valid RunStatus")


def invalid_run_id(run_id: str) -> SimError:
    """400 for a run id that is not `run-<uuid4>`."""
    return detail(
        400,
        f"INVALID_ARGUMENT: Invalid run ID format: {run_id}. Expected format: 'run-<uuid4>'",
    )


def run_not_found(run_id: str, actor_created_at: datetime) -> SimError:
    """404 for an unknown run, with the actor repr Letta leaks into the message."""
    stamp = repr(actor_created_at.replace(tzinfo=UTC))
    actor = (
        f"id='{USER_ID}' organization_id='{ORG_ID}' name='default_user' "
        f"created_at={stamp} updated_at={stamp} is_deleted=False"
    )
    return detail(
        404,
        f"Run not found with id='['{run_id}']', access level in ['read'] for actor='{actor}'",
    )


def agent_not_found(agent_id: str) -> SimError:
    """404 of `GET /v1/agents/{id}` for an unknown agent."""
    return detail(404, f"Agent with ID {agent_id} not found")


def no_active_runs(agent_id: str) -> SimError:
    """409 of a cancel-all when nothing is active."""
    return detail(409, f"CONFLICT: No active runs to cancel for agent {agent_id}")
