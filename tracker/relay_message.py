"""What the relay sends: Letta's callback body plus the ``tracker`` object, signed per the
Standard Webhooks spec (https://www.standardwebhooks.com)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from tracker import clock
from tracker.serialize import metadata_out, tracker_out
from tracker.store import RunRecord, User

SECRET_PREFIX = "whsec_"
USER_AGENT = "tracker-relay/0.1"


def callback_body(run: RunRecord, relay_state: str) -> dict[str, Any]:
    """Letta's callback shape (``run_id`` is the tracker's id) with the ``tracker`` object, so
    that a receiver written for Letta's callback keeps working."""
    return {
        "run_id": run.id,
        "status": run.status,
        "completed_at": _naive(run.completed_at or run.recorded_at),
        "metadata": {**metadata_out(run), "result": _result(run)},
        "tracker": tracker_out(run, relay_state),
    }


def _naive(stored: str | None) -> str | None:
    """Letta's callback form of a time: UTC without a zone suffix (a Python < 3.11 receiver's
    ``datetime.fromisoformat`` rejects the ``Z`` the tracker stores)."""
    dt = clock.parse(stored)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f") if dt else None


def _result(run: RunRecord) -> dict[str, Any]:
    # field for field what Letta puts in metadata.result (see letta-samples/*__callback.json)
    return {
        "messages": run.messages or [],
        "stop_reason": {"message_type": "stop_reason", "stop_reason": run.stop_reason},
        "usage": {"message_type": "usage_statistics", **(run.usage or {})},
        "logprobs": None,
        "turns": None,
    }


def encode(body: dict[str, Any]) -> bytes:
    """The exact bytes sent and signed (compact, ASCII-only JSON, as Letta sends it)."""
    return json.dumps(body, separators=(",", ":")).encode()


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` with a ``whsec_`` secret."""
    # written from the spec rather than taken from the standardwebhooks package, so that the
    # tests' verifier (that package) checks this code independently
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def secrets_of(user: User | None) -> list[str]:
    """The user's signing secrets: the current one, then the previous one during a rotation."""
    return [s for s in (user.webhook_secret, user.webhook_secret_old) if s] if user else []


def signed_headers(secrets: list[str], msg_id: str, timestamp: int,
                   body: bytes) -> dict[str, str]:
    """The request headers, with one signature per secret (space-separated, per the spec)."""
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, msg_id, timestamp, body) for s in secrets),
    }
