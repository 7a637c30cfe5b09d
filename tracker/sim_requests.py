"""Reading request bodies and path ids the way Letta's FastAPI routes do, with the same 422
error items when something does not validate."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pydantic
from aiohttp import web

from tracker.letta_request import AsyncMessageRequest
from tracker.sim_errors import (
    AGENT_ID_PATTERN,
    ErrorItem,
    agent_id_mismatch,
    body_missing,
    invalid,
    json_invalid,
)

_AGENT_ID = re.compile(AGENT_ID_PATTERN)


def agent_id_errors(agent_id: str) -> list[ErrorItem]:
    """The path error for a malformed agent id, if any."""
    return [] if _AGENT_ID.fullmatch(agent_id) else [agent_id_mismatch(agent_id)]


async def json_body(request: web.Request, *, required: bool = True) -> tuple[Any, list[ErrorItem]]:
    """The parsed JSON body, or FastAPI's errors for a missing or undecodable one."""
    raw = await request.read()
    if not raw.strip():
        return (None, [body_missing()]) if required else ({}, [])
    try:
        return json.loads(raw), []
    except json.JSONDecodeError as exc:
        return None, [json_invalid(exc.pos, exc.msg)]
    except UnicodeDecodeError as exc:
        return None, [json_invalid(exc.start, "Invalid UTF-8")]


def async_body_errors(body: Any) -> list[ErrorItem]:
    """Validate a messages/async body with the tracker's model of Letta's request."""
    try:
        AsyncMessageRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        return [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    return []


def object_body_errors(body: Any) -> list[ErrorItem]:
    """The error for a body that must be a JSON object and is not."""
    if isinstance(body, dict):
        return []
    msg = "Input should be a valid dictionary or object to extract fields from"
    return [{"type": "model_attributes_type", "loc": ("body",), "msg": msg, "input": body}]


def run_ids_errors(body: dict[str, Any]) -> list[ErrorItem]:
    """Check the cancel body's `run_ids`: a list of strings, or null."""
    run_ids = body.get("run_ids")
    if run_ids is None:
        return []
    if not isinstance(run_ids, list):
        msg = "Input should be a valid list"
        return [{"type": "list_type", "loc": ("body", "run_ids"), "msg": msg, "input": run_ids}]
    msg = "Input should be a valid string"
    return [
        {"type": "string_type", "loc": ("body", "run_ids", i), "msg": msg, "input": v}
        for i, v in enumerate(run_ids)
        if not isinstance(v, str)
    ]


def input_messages(body: dict[str, Any], new_otid: Callable[[], str]) -> list[dict[str, Any]]:
    """The request's messages (`input` is sugar for one user message), each with an otid."""
    messages = body.get("messages")
    if messages is None:
        messages = [{"role": "user", "content": body.get("input")}]
    # Letta assigns an otid to a message sent without one; it shows in the run's messages.
    return [{**m, "otid": m.get("otid") or new_otid()} for m in messages]


def request_config(body: dict[str, Any]) -> dict[str, Any]:
    """The run's request_config: the four message-format options with Letta's defaults."""
    return {
        "use_assistant_message": body.get("use_assistant_message", True),
        "assistant_message_tool_name": body.get("assistant_message_tool_name", "send_message"),
        "assistant_message_tool_kwarg": body.get("assistant_message_tool_kwarg", "message"),
        "include_return_message_types": body.get("include_return_message_types"),
    }


def raise_if(errors: list[ErrorItem]) -> None:
    """Raise Letta's 422 when there are errors."""
    if errors:
        raise invalid(errors)
