"""Runs as served: Letta's Run schema with the tracker's id, plus the ``tracker`` object."""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import web

from tracker.store import Delivery, Event, RunRecord

DEFAULT_METADATA = {"run_type": "send_message_async", "lettuce": None}


def json_response(data: Any, status: int = 200) -> web.Response:
    """Every JSON answer of the API, errors included. orjson: a page of 100 runs (~110 KB)
    encodes in ~0.05 ms, where json.dumps took ~0.65 (a fifth of the tracker's time serving
    history); same JSON, UTF-8 not \\u-escaped."""
    try:
        body = orjson.dumps(data)
    except TypeError:  # what orjson refuses: integers beyond 64 bits, lone surrogates
        body = json.dumps(data).encode()
    return web.Response(body=body, status=status, content_type="application/json",
                        charset="utf-8")


def run_out(run: RunRecord, relay: str | None = None) -> dict[str, Any]:
    """One run in Letta's shape; ``status`` is always one of Letta's five values."""
    return {
        "id": run.id,
        "status": run.status,
        "created_at": run.created_at,
        "completed_at": run.completed_at,
        "agent_id": run.agent_id,
        "conversation_id": run.conversation_id,
        "base_template_id": run.base_template_id,
        "background": True if run.background is None else run.background,
        "metadata": run.metadata if run.metadata is not None else dict(DEFAULT_METADATA),
        "request_config": run.request_config,
        "stop_reason": run.stop_reason,
        "callback_url": run.callback_url,
        "callback_sent_at": run.callback_sent_at,
        "callback_status_code": run.callback_status_code,
        "callback_error": run.callback_error,
        "ttft_ns": run.ttft_ns,
        "total_duration_ns": run.total_duration_ns,
        "tracker": tracker_out(run, relay),
    }


def tracker_out(run: RunRecord, relay: str | None) -> dict[str, Any]:
    return {
        "state": run.state.value,
        "letta_run_id": run.letta_run_id,
        "user_id": run.user_id,
        "queued_at": run.created_at,
        "submitted_at": run.submitted_at,
        "completed_at": run.completed_at,
        "recorded_at": run.recorded_at,
        "completed_via": run.completed_via,
        "poll_count": run.poll_count,
        "attempts": run.attempts,
        "error": run.error,
        "error_code": run.error_code,
        # known only where it was looked up (one run's view); never guessed
        "relay": relay,
    }


def event_out(e: Event) -> dict[str, Any]:
    return {"id": e.id, "at": e.at, "source": e.source, "kind": e.kind, "state": e.state,
            "status": e.status, "detail": e.detail}


def delivery_out(d: Delivery) -> dict[str, Any]:
    return {"id": d.id, "run_id": d.run_id, "url": d.url, "state": d.state,
            "attempts": d.attempts, "created_at": d.created_at, "finished_at": d.finished_at,
            "last_status": d.last_status, "last_error": d.last_error,
            "attempt_log": d.attempt_log}


def page(items: list, before: str | None, after: str | None, limit: int,
         ascending: bool) -> list:
    """Letta's cursor pagination over a run's messages: cursors are message ids, positional
    in the requested order (``after`` = further along it)."""
    ordered = items if ascending else items[::-1]
    ids = [m.get("id") for m in ordered]
    # several messages of one step can share an id: skip past the last of them
    start = len(ids) - ids[::-1].index(after) if after in ids else 0
    stop = ids.index(before) if before in ids else len(ids)
    return ordered[start:stop][:limit]
