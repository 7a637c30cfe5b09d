"""Reading requests: JSON bodies and query strings, refused in Letta's (FastAPI's) shapes."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from tracker.errors import BadRequest, Invalid, TrackerError
from tracker.letta_request import AGENT_ID_PATTERN, RUN_ID_PATTERN

M = TypeVar("M", bound=BaseModel)
_AGENT_RE = re.compile(AGENT_ID_PATTERN)
_RUN_RE = re.compile(RUN_ID_PATTERN)


class UnsupportedMediaType(TrackerError):
    status = 415


#: deeper JSON than this is refused: no honest request needs it, and validating or hashing it
#: would recurse past Python's stack
MAX_DEPTH = 64
#: the longest Idempotency-Key taken (a UUID is 36; Stripe's limit is 255)
IDEMPOTENCY_KEY_MAX = 255


class _NonFinite(ValueError):
    pass


def _refuse_constant(token: str) -> Any:
    raise _NonFinite(token)


#: one decoder, built once: json.loads with any keyword builds a new one per call (~1.4 µs)
_STRICT = json.JSONDecoder(parse_constant=_refuse_constant)


def _text(raw: bytes) -> str:
    """``raw`` decoded as json.loads decodes bytes (UTF-8, -16 or -32, by their start);
    strictly: an encoded lone surrogate is not text (no UTF-8 store can hold it)."""
    return raw.decode(json.detect_encoding(raw))


def loads(raw: bytes, what: str = "request body", strict: bool = True) -> Any:
    """Parse JSON, refusing malformed, non-UTF-8 or too deeply nested input with a 400;
    ``strict``, also NaN and Infinity, which Python's json takes but JSON has not (stored,
    they would make the run unreadable to SQLite's JSON functions, which build history)."""
    try:
        text = _text(raw)
        data = _STRICT.decode(text) if strict else json.loads(text)
    except _NonFinite as e:
        raise BadRequest(f"{what} is not valid JSON: {e} is not a JSON number") from None
    except (ValueError, RecursionError):
        raise BadRequest(f"{what} is not valid JSON") from None
    # JSON's \u escapes can spell half of a surrogate pair, which no UTF-8 text (our
    # database, our answers, Letta's) can hold; only bodies with such an escape are walked
    # (looked for in the text: a UTF-16 body's bytes spell it with zeros between)
    if ("\\ud" in text or "\\uD" in text) and _holds_lone_surrogate(data):
        raise BadRequest(f"{what} is not valid JSON: a \\u escape is half of a surrogate pair")
    # nesting deeper than MAX_DEPTH needs more opening brackets than that: counting them
    # (in C) spares most bodies the walk
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _depth_exceeds(data, MAX_DEPTH):
        raise BadRequest(f"{what} is nested more than {MAX_DEPTH} levels deep")
    return data


def _holds_lone_surrogate(data: Any) -> bool:
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode()
            except UnicodeEncodeError:
                return True
        elif isinstance(node, dict):
            stack.extend((*node.keys(), *node.values()))
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _depth_exceeds(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(
            node, list) else ()
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False


def errors_of(e: ValidationError, where: str) -> list[dict]:
    """FastAPI's 422 detail list: loc, msg, type."""
    return [{"loc": [where, *err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in e.errors(include_url=False, include_context=False, include_input=False)]


def within(limit: int, size: int | None) -> None:
    """413 when a body's ``size`` (its declared length, or what was read) is past ``limit``."""
    if (size or 0) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, 413 past ``limit`` bytes: at once when its declared length is; sent chunked
    (no length said), as soon as what came is. The app's own limit (``client_max_size``) is
    the largest of the routes' (a callback's, 64 MiB): read whole first, a chunked submit
    was held to that, 64 MiB a connection, before its 413."""
    within(limit, request.content_length)
    if request.content_length is not None:
        raw = await request.read()
        within(limit, len(raw))  # its length said, but gzipped: what it unpacks to
        return raw
    chunks, size = [], 0
    async for chunk in request.content.iter_any():  # unpacked, when gzipped
        size += len(chunk)
        within(limit, size)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, limit: int, optional: bool = False) -> Any:
    """The body as JSON: 413 past ``limit`` bytes, 415 for a non-JSON content type, 400 when
    malformed."""
    # media types are case-insensitive (RFC 9110)
    ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
    raw = await read_body(request, limit)
    if optional and not raw.strip():
        return None
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {ctype}")
    return loads(raw)


def validate(model: type[M], data: Any, where: str = "body") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise Invalid(errors_of(e, where)) from None


def agent_id(request: web.Request) -> str:
    """The path's agent id, 422 when it is not ``agent-<uuid4>`` (as Letta answers)."""
    value = request.match_info["agent_id"]
    if not _AGENT_RE.fullmatch(value):
        raise Invalid([{"loc": ["path", "agent_id"], "type": "string_pattern_mismatch",
                        "msg": f"String should match pattern '{AGENT_ID_PATTERN}'"}])
    return value


def run_id(request: web.Request) -> str:
    """The path's run id (ours or Letta's), 400 when it is not ``run-<uuid4>``, with Letta's
    words: a client sees what Letta would tell it, not a 404 for an id that cannot exist."""
    value = request.match_info["run_id"]
    if not _RUN_RE.fullmatch(value):
        raise BadRequest(f"INVALID_ARGUMENT: Invalid run ID format: {value}."
                         " Expected format: 'run-<uuid4>'")
    return value


def idempotency_key(request: web.Request) -> str | None:
    """The ``Idempotency-Key`` header, or None; 422 when it is longer than
    ``IDEMPOTENCY_KEY_MAX`` or its bytes are not UTF-8 (it is stored and shown as text)."""
    value = request.headers.get("Idempotency-Key") or None
    if value is None:
        return None
    if len(value) > IDEMPOTENCY_KEY_MAX or _holds_lone_surrogate(value):
        raise Invalid([{"loc": ["header", "Idempotency-Key"], "type": "invalid_header",
                        "msg": f"Idempotency-Key must be UTF-8 text of at most"
                               f" {IDEMPOTENCY_KEY_MAX} characters"}])
    return value


def query(request: web.Request, model: type[M]) -> M:
    """Query parameters into ``model``; list fields take repeated keys (``?statuses=a&...``)."""
    data: dict[str, Any] = {}
    for name in set(request.query):
        if name not in model.model_fields:
            raise Invalid([{"loc": ["query", name], "msg": "Unknown query parameter",
                            "type": "extra_forbidden"}])
        field = model.model_fields[name]
        many = "list" in str(field.annotation)
        data[name] = request.query.getall(name) if many else request.query[name]
    return validate(model, data, "query")
