"""Query parameters of Letta's run listings, parsed and rejected the way FastAPI does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

from tracker.sim_errors import ErrorItem, choices_text, invalid, invalid_status, query_item
from tracker.sim_shapes import ACTIVE_STATUSES, RUN_STATUSES, STOP_REASONS
from tracker.sim_store import RunQuery, first_stored

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


@dataclass(frozen=True, slots=True)
class MessagePage:
    """The pagination of `GET /v1/runs/{id}/messages`."""

    before: str | None
    after: str | None
    limit: int
    ascending: bool


def run_query(query: MultiMapping[str]) -> RunQuery:
    """Parse `GET /v1/runs/` filters; a bad one is Letta's 422 (a bad status: its 400)."""
    read = _Reader(query)
    # plain strings to FastAPI: Letta converts them in the route
    statuses = query.getall("statuses", [])
    active = read.boolean("active")
    order = read.choice("order", ("asc", "desc"), "desc")
    # the deprecated `agent_ids`, all of them, unless `agent_id` is given (as in Letta's router)
    agent_ids = [query["agent_id"]] if query.get("agent_id") else query.getall("agent_ids", [])
    parsed = RunQuery(
        agent_ids=frozenset(agent_ids) or None,
        # Letta: `active` only applies when no statuses are given
        statuses=frozenset(statuses) if statuses else ACTIVE_STATUSES if active else None,
        background=read.boolean("background"),
        stop_reason=read.choice("stop_reason", STOP_REASONS, None, kind="enum"),
        conversation_id=query.get("conversation_id"),
        before=query.get("before"),
        after=query.get("after"),
        limit=read.integer("limit", 100, low=1, high=1000),
        # The deprecated `ascending=true` wins over `order`, as in Letta's router.
        ascending=bool(read.boolean("ascending")) or order == "asc",
    )
    read.choice("order_by", ("created_at",), "created_at")
    read.done()
    # once FastAPI has validated the rest, a bad status is a ValueError, Letta's 400
    # (routers/v1/runs.py, convert_statuses_to_enum)
    bad = [s for s in statuses if s not in RUN_STATUSES]
    if bad:
        raise invalid_status(bad[0])
    return parsed


def message_page(query: MultiMapping[str], order: str = "asc") -> MessagePage:
    """Parse the pagination of a run's messages (or steps: newest first by default); a bad
    value is Letta's 422."""
    read = _Reader(query)
    page = MessagePage(
        before=query.get("before"),
        after=query.get("after"),
        limit=read.integer("limit", 100),
        ascending=read.choice("order", ("asc", "desc"), order) == "asc",
    )
    read.choice("order_by", ("created_at",), "created_at")
    read.done()
    return page


def paginate(messages: list[dict[str, Any]], page: MessagePage) -> list[dict[str, Any]]:
    """A page of messages. The cursors (message ids) bound the sequence whatever the order,
    as in Letta (message_manager.list_messages): `after` keeps the later messages, `before`
    the earlier ones, and a newest-first page is the newest of them. The limit counts stored
    messages, as Letta's does: those cut from one stored message (sharing its id) come
    together, so a page can hold more than `limit` (and, filtered after, fewer)."""
    ids = [m["id"] for m in messages]
    # One stored message can yield several LettaMessages sharing its id: skip them all.
    start = len(ids) - ids[::-1].index(page.after) if page.after in ids else 0
    stop = ids.index(page.before) if page.before in ids else len(ids)
    chosen = messages[start:stop]
    return first_stored(chosen if page.ascending else chosen[::-1], max(page.limit, 0))


class _Reader:
    """Typed reads of query parameters that collect pydantic-style errors."""

    def __init__(self, query: MultiMapping[str]) -> None:
        self.query = query
        self.errors: list[ErrorItem] = []

    def done(self) -> None:
        if self.errors:
            raise invalid(self.errors)

    def integer(
        self, name: str, default: int, low: int | None = None, high: int | None = None
    ) -> int:
        text = self.query.get(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            msg = "Input should be a valid integer, unable to parse string as an integer"
            self.errors.append(query_item("int_parsing", name, text, msg))
            return default
        if high is not None and value > high:
            msg = f"Input should be less than or equal to {high}"
            self.errors.append(query_item("less_than_equal", name, text, msg, le=high))
        if low is not None and value < low:
            msg = f"Input should be greater than or equal to {low}"
            self.errors.append(query_item("greater_than_equal", name, text, msg, ge=low))
        return value

    def boolean(self, name: str) -> bool | None:
        text = self.query.get(name)
        if text is None or text.lower() in _TRUE | _FALSE:
            return None if text is None else text.lower() in _TRUE
        msg = "Input should be a valid boolean, unable to interpret input"
        self.errors.append(query_item("bool_parsing", name, text, msg))
        return None

    def choice(
        self, name: str, options: tuple[str, ...], default: str | None, kind: str = "literal_error"
    ) -> str | None:
        text = self.query.get(name)
        if text is None or text in options:
            return default if text is None else text
        expected = choices_text(options)
        msg = f"Input should be {expected}"
        self.errors.append(query_item(kind, name, text, msg, expected=expected))
        return default
