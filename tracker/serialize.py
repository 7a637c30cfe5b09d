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
    return encoded_response(dumps(data), status)


def dumps(data: Any) -> bytes:
    try:
        return orjson.dumps(data)
    except TypeError:  # what orjson refuses: integers beyond 64 bits, lone surrogates
        return json.dumps(data).encode()


def encoded_response(body: bytes, status: int = 200) -> web.Response:
    """An answer whose JSON is already encoded (UTF-8)."""
    return web.Response(body=body, status=status, content_type="application/json",
                        charset="utf-8")


#: The API's run, key by key: the run field (its stored column) each key shows as it is, or
#: None where ``run_out`` computes it. One list for ``run_out`` and for the JSON that SQLite
#: builds for history pages (``tracker.sqlite_queries.RUN_JSON``); a test keeps them equal.
RUN_SHAPE: tuple[tuple[str, str | None], ...] = (
    ("id", "id"), ("status", "status"), ("created_at", "created_at"),
    ("completed_at", "completed_at"), ("agent_id", "agent_id"),
    ("conversation_id", "conversation_id"), ("base_template_id", "base_template_id"),
    ("background", None), ("metadata", None), ("request_config", "request_config"),
    ("stop_reason", "stop_reason"), ("callback_url", "callback_url"),
    ("callback_sent_at", "callback_sent_at"), ("callback_status_code", "callback_status_code"),
    ("callback_error", "callback_error"), ("ttft_ns", "ttft_ns"),
    ("total_duration_ns", "total_duration_ns"), ("tracker", None),
)
#: the ``tracker`` object, likewise
TRACKER_SHAPE: tuple[tuple[str, str | None], ...] = (
    ("state", None), ("letta_run_id", "letta_run_id"), ("user_id", "user_id"),
    ("queued_at", "created_at"), ("submitted_at", "submitted_at"),
    ("completed_at", "completed_at"), ("recorded_at", "recorded_at"),
    ("completed_via", "completed_via"), ("poll_count", "poll_count"),
    ("attempts", "attempts"), ("error", "error"), ("error_code", "error_code"),
    # known only where it was looked up (one run's view); never guessed
    ("relay", None),
)


def run_out(run: RunRecord, relay: str | None = None) -> dict[str, Any]:
    """One run in Letta's shape; ``status`` is always one of Letta's five values."""
    out = {key: getattr(run, field) if field else None for key, field in RUN_SHAPE}
    out["background"] = True if run.background is None else run.background
    out["metadata"] = metadata_out(run)
    out["tracker"] = tracker_out(run, relay)
    return out


def metadata_out(run: RunRecord) -> dict[str, Any]:
    """The run's Letta metadata, or Letta's default while it has none."""
    return run.metadata if run.metadata is not None else dict(DEFAULT_METADATA)


def tracker_out(run: RunRecord, relay: str | None) -> dict[str, Any]:
    out = {key: getattr(run, field) if field else None for key, field in TRACKER_SHAPE}
    out["state"] = run.state.value
    out["relay"] = relay
    return out


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
    # and a page never ends inside such a group: the next page starts past all of it
    end = min(stop, start + limit)
    while start < end < stop and ids[end] == ids[end - 1]:
        end += 1
    return ordered[start:end]
