"""How the command line shows runs: tables, fields, timestamps, the assistant's reply."""

from __future__ import annotations

import json
import os
from datetime import datetime

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracker import clock
from tracker.states import State, Status

VIA_STYLE = {"callback": "green", "poll": "yellow", "reconcile": "magenta"}


def console(stderr: bool = False) -> Console:
    """A rich console; piped output is not wrapped at 80 columns, which would split ids."""
    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = 200
    return out


def when(ts: str | None, style: str = "short") -> str:
    """A timestamp in local time: ``short`` (the day only if not today), ``time`` (to the
    millisecond) or ``full`` (date and time to the millisecond)."""
    dt = clock.parse(ts)
    if dt is None:
        return ""
    local = dt.astimezone()
    ms = f".{local.microsecond // 1000:03d}"
    if style == "full":
        return local.strftime("%Y-%m-%d %H:%M:%S") + ms
    if style == "time":
        return local.strftime("%H:%M:%S") + ms
    fmt = "%H:%M:%S" if local.date() == datetime.now().date() else "%Y-%m-%d %H:%M"
    return local.strftime(fmt)


def duration(run: dict) -> str:
    """Seconds from queued to completed; empty while the run is active."""
    start, end = clock.epoch(run.get("created_at")), clock.epoch(run.get("completed_at"))
    return f"{end - start:.1f}s" if start and end else ""


def via(run: dict) -> Text:
    """How the tracker learnt the run's outcome, coloured."""
    source = run["tracker"].get("completed_via") or ""
    return Text(source, style=VIA_STYLE.get(source, ""))


def data(value: object) -> Text:
    """A value from the API as a table cell: a plain string would be read as rich markup,
    and a ``[/x]`` in a callback_url crashed ``runs show``, a ``[type=missing]`` in an
    error vanished from it."""
    return value if isinstance(value, Text) else Text(str(value))


#: the runs table's columns as shown, and (``RUN_COLUMNS_DROPPED``) the order a terminal too
#: narrow for all of them drops them in, the least wanted first
RUN_COLUMNS = ("id", "agent", "status", "state", "created", "duration", "learnt via", "polls")
RUN_COLUMNS_DROPPED = ("polls", "duration", "created", "agent", "learnt via")
#: the narrowest an agent id is cut to (``agent-5ab4…``): enough to tell agents apart
AGENT_MIN = 11


def runs_table(runs: list[dict], names: dict[str, str] | None = None,
               width: int | None = None) -> Table:
    """The history as a table; ``names`` shows agents by name instead of id. Narrower than
    ``width``, it leaves out columns (``RUN_COLUMNS_DROPPED``) rather than cut every cell to
    a letter: at 80 columns, the id, status, state and how the outcome was learnt show in
    full."""
    rows = []
    for r in runs:
        t = r["tracker"]
        agent = (names or {}).get(r["agent_id"], r["agent_id"])
        rows.append(tuple(map(data, (r["id"], agent, r["status"], t["state"],
                                     when(r["created_at"]), duration(r), via(r),
                                     t.get("poll_count") or 0))))
    least = {name: _least_width(name, [row[i] for row in rows])
             for i, name in enumerate(RUN_COLUMNS)}
    shown = list(RUN_COLUMNS)
    for dropped in RUN_COLUMNS_DROPPED:
        # each column adds its padding (2) and a rule (1) to the table's left edge
        if width is None or sum(least[n] + 3 for n in shown) + 1 <= width:
            break
        shown.remove(dropped)
    table = Table(*shown)
    for name, column in zip(shown, table.columns, strict=True):
        # a run id is copied into other commands: never wrapped; the agent id is cut short
        # (``runs show`` has it in full); the others are never cut
        column.no_wrap = name != "agent"
        column.min_width = least[name]
    picked = [RUN_COLUMNS.index(name) for name in shown]
    for row in rows:
        table.add_row(*(row[i] for i in picked))
    return table


def _least_width(name: str, cells: list[Text]) -> int:
    """The narrowest a runs table column may be: its longest cell (the agent's: cut to
    ``AGENT_MIN``), and its header."""
    longest = max((c.cell_len for c in cells), default=0)
    if name == "agent":
        longest = min(AGENT_MIN, longest)
    return max(longest, len(name))


def events_table(events: list[dict]) -> Table:
    """A run's timeline as a table."""
    table = Table("at", "source", "kind", "state", "status", "detail", title="timeline")
    for e in events:
        detail = json.dumps(e["detail"], separators=(",", ":")) if e.get("detail") else ""
        table.add_row(*map(data, (when(e["at"], "time"), e["source"], e["kind"],
                                  e.get("state") or "", e.get("status") or "", detail)))
    return table


def run_fields(run: dict) -> Table:
    """A run's main fields, one per line."""
    t = run["tracker"]
    grid = Table.grid(padding=(0, 2))
    rows = [("id", run["id"]), ("agent", run["agent_id"]), ("status", run["status"]),
            ("stop reason", run.get("stop_reason")), ("tracker state", t["state"]),
            ("letta run", t.get("letta_run_id")), ("queued", when(t.get("queued_at"), "full")),
            ("submitted", when(t.get("submitted_at"), "full")),
            ("completed", when(run.get("completed_at"), "full")),
            ("duration", duration(run)), ("learnt via", via(run)),
            ("polls", t.get("poll_count")), ("attempts", t.get("attempts")),
            ("error", t.get("error")), ("callback_url", run.get("callback_url")),
            ("relay", t.get("relay"))]
    for name, value in rows:
        if value is not None and str(value):  # (an empty Text is no "": str first)
            grid.add_row(Text(name, style="bold"), data(value))
    return grid


def completed(run: dict) -> bool:
    """The run finished and Letta says it completed."""
    return run["tracker"]["state"] == State.DONE and run["status"] == Status.COMPLETED


def print_outcome(run: dict, messages: list[dict]) -> None:
    """The assistant's reply, or why there is none."""
    out, t = console(), run["tracker"]
    took = f" in {duration(run)}" if duration(run) else ""
    learnt = f", learnt via {t['completed_via']}" if t.get("completed_via") else ""
    out.print(Text(f"{run['id']} {run['status']} ({t['state']}){took}{learnt}", style="dim"))
    for text in assistant_texts(messages):
        out.print(text, markup=False)
    if t["state"] == State.PAUSED:
        out.print("paused: the agent waits for an approval or a client tool's result")
    elif not completed(run):
        reason = t.get("error") or run.get("stop_reason") or run["status"]
        out.print(Text(f"run {run['id']} did not complete: {reason}", style="red"))


def assistant_texts(messages: list[dict]) -> list[str]:
    """The text of each assistant message (content is a string or a list of parts)."""
    texts = []
    for m in messages:
        if m.get("message_type") != "assistant_message":
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        texts.append(str(content or ""))
    return texts
