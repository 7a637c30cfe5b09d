"""The Letta client: every call the tracker makes to Letta, on one pool of connections."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from textwrap import shorten
from typing import Any

from tracker import clock
from tracker.errors import LettaError, LettaUnavailable, NotFound
from tracker.letta_http import Answer, HttpPool, TransportError
from tracker.serialize import dumps

TERMINAL_FILTER = [("statuses", "completed"), ("statuses", "failed"), ("statuses", "cancelled")]
PAGE = 1000
#: statuses a gateway in front of Letta answers with, on its own (see _answered)
GATEWAY = frozenset({502, 503, 504})
#: statuses that say the request was not processed, to be made again as it was: a redirect
#: (a proxy sending http to https: followed by nobody here), Request Timeout (a server's
#: parting 408 on an idle connection, read as the answer to the request just written), Too
#: Early. Refusals, they rejected every message for good
NOT_PROCESSED = frozenset({*range(300, 400), 408, 425})
#: a Retry-After is kept within these (seconds): 0, or a date in the past, had runs sent
#: again as fast as Letta answered, and a far one (a year, a 400-digit number) paused the
#: poller, every run's polling with it, until a restart
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1.0, 600.0
#: the sort key of Letta's run listings, for a run without created_at (none seen)
_NEVER = datetime.min.replace(tzinfo=UTC)


def _decode(raw: bytes) -> tuple[Any, bool]:
    """The body's JSON, and whether it was JSON (else its text as FastAPI's ``detail``)."""
    # not orjson: it reads an integer past 64 bits as a float, silently
    try:
        return (json.loads(raw), True) if raw else (None, False)
    except ValueError:
        return {"detail": raw.decode(errors="replace")}, False


def _lettas(data: Any, is_json: bool) -> bool:
    """Whether an error's body (as ``_decode`` read it) is Letta's own: JSON with a
    ``detail`` (FastAPI's shape)."""
    return is_json and isinstance(data, dict) and "detail" in data


def _excerpt(raw: bytes) -> str:
    """The start of a body that is not Letta's, for the error that tells of it."""
    return shorten(raw.decode(errors="replace"), 120)


def _beyond(run: dict, last: dict, ascending: bool) -> bool:
    """Whether ``run`` comes after ``last`` in a run listing's order (created_at, then id,
    as Letta sorts)."""
    key, mark = _sort_key(run), _sort_key(last)
    return key > mark if ascending else key < mark


def _sort_key(run: dict) -> tuple[datetime, str]:
    return clock.parse(run.get("created_at")) or _NEVER, run["id"]


class LettaClient:
    """Letta's REST API as the tracker uses it; errors are typed, calls are counted."""

    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s
        self._pool: HttpPool | None = None
        self.calls: Counter[tuple[str, int | str]] = Counter()
        self.on_call: Any = None  # metrics hook: (endpoint, status) -> None
        #: the cursor that pages a run listing onward, in either order: `before` in Letta
        #: 0.16.8, the reverse of its docs, which another Letta may follow (see _runs_beyond)
        self._onward = "before"
        self._onward_sure = False  # a page moved with it: never switched from then on

    async def start(self) -> None:
        self._pool = HttpPool(self.base_url, self._headers, self._timeout_s, limit=100)

    async def close(self) -> None:
        if self._pool:
            await self._pool.close()
            self._pool = None

    def _count(self, endpoint: str, status: int | str) -> None:
        self.calls[(endpoint, status)] += 1
        if self.on_call:
            self.on_call(endpoint, status)

    async def _request(self, method: str, path: str, endpoint: str, body: Any = None,
                       params: list[tuple[str, str]] | None = None) -> Any:
        """One call; 2xx returns the JSON, 4xx raises LettaError/NotFound, the rest
        (connection errors, timeouts, 5xx, 429, 401, a 4xx with Retry-After) raise
        LettaUnavailable."""
        assert self._pool is not None, "client is not started"
        try:
            # encoded with orjson: on every submit's path
            answer = await self._pool.request(method, path, None if body is None
                                              else dumps(body), params)
        except TransportError as e:
            self._count(endpoint, "error" if e.sent else "unreachable")
            raise LettaUnavailable(f"Letta {'call failed' if e.sent else 'unreachable'}: {e}",
                                   sent=e.sent, answered=False) from e
        self._count(endpoint, answer.status)
        return self._answered(answer)

    @staticmethod
    def _answered(answer: Answer) -> Any:
        data, is_json = _decode(answer.body)
        if answer.status < 300:
            if not is_json:
                # a proxy's page (HTML, or gzipped) or nothing: not Letta's answer, whose
                # every 2xx is JSON. Returned as data, a send's was read as a run without an id
                raise LettaUnavailable(f"Letta's address answered {answer.status} without"
                                       f" JSON: {_excerpt(answer.body)!r}", sent=True,
                                       answered=False)
            return data
        if answer.status in NOT_PROCESSED:
            where = answer.headers.get("location")
            raise LettaUnavailable(f"Letta's address answered {answer.status}"
                                   + (f" (to {where}; check letta.base_url)" if where else ""),
                                   sent=False)
        lettas = _lettas(data, is_json)
        if answer.status == 404 and not lettas:
            # not Letta's "not found" (always FastAPI's JSON detail): a proxy's page for a
            # Letta it has no route to now (a restart behind Traefik, say). Taken as Letta's,
            # every run polled meanwhile was given up as lost and every message sent refused
            raise LettaUnavailable(f"Letta's address answered 404 not as Letta does: "
                                   f"{_excerpt(answer.body)}", sent=True, answered=False)
        detail = data.get("detail", data) if isinstance(data, dict) else data
        retry_after = answer.headers.get("retry-after")
        # refused at the door, before any work: a 429, or a 401 for our key (a rotation, a
        # typo in letta.api_key), which says nothing of the request: it goes again later
        refused = answer.status in (401, 429)
        if refused or answer.status >= 500 or (retry_after and answer.status != 404):
            # a 5xx may have created the run, and so may a 4xx saying when to try again:
            # Letta's 409 for a database lock or deadlock, met anywhere in the request,
            # perhaps after the run was committed
            wait = clock.parse_retry_after(retry_after, clock.now())
            if wait is not None:
                wait = min(max(wait, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)
            # a 502, 503 or 504 is often a gateway's, answering for a Letta still at work on
            # the request (its own timeout shorter than ours): no answer from Letta itself;
            # nor is any error whose body is not Letta's JSON (a proxy's HTML 500 page)
            raise LettaUnavailable(f"Letta answered {answer.status}: {detail}", wait,
                                   sent=not refused,
                                   answered=answer.status not in GATEWAY and lettas)
        if answer.status == 404:
            raise NotFound(detail)
        raise LettaError(answer.status, detail)

    async def send_async(self, agent_id: str, body: dict) -> dict:
        """POST messages/async; returns Letta's Run."""
        return await self._request("POST", f"/v1/agents/{agent_id}/messages/async",
                                   "messages_async", body)

    async def get_run(self, run_id: str) -> dict:
        return await self._request("GET", f"/v1/runs/{run_id}", "get_run")

    async def list_runs(self, params: list[tuple[str, str]]) -> list[dict]:
        return await self._request("GET", "/v1/runs/", "list_runs", params=params)

    async def active_run_ids(self) -> set[str]:
        """Ids of every run Letta still works on (one call per thousand)."""
        params = [("active", "true"), ("limit", str(PAGE)), ("order", "asc")]
        ids: set[str] = set()
        last = None
        while True:
            page = await self._runs_beyond(params, last, ascending=True)
            ids.update(r["id"] for r in page)
            if len(page) < PAGE:
                return ids
            last = page[-1]

    async def recent_terminal(self, limit: int, last: dict | None = None) -> list[dict]:
        """Finished runs, newest first, beyond the run ``last`` (a page's last) in that
        order (one call for many)."""
        params = [*TERMINAL_FILTER, ("limit", str(min(PAGE, limit))), ("order", "desc")]
        return await self._runs_beyond(params, last, ascending=False)

    async def _runs_beyond(self, params: list[tuple[str, str]], last: dict | None,
                           ascending: bool) -> list[dict]:
        """The page of a run listing beyond the run ``last`` in its order; [] when nothing
        comes beyond it. Letta 0.16.8 pages onward with `before` and lists the runs on the
        near side with `after`; another Letta may do as the docs say: a page that does not
        move past ``last`` is asked again with the other cursor, once in the client's life."""
        if last is None:
            return await self.list_runs(params)
        page = await self._page_beyond(params, self._onward, last, ascending)
        if page is not None:
            self._onward_sure |= bool(page)
            return page
        if self._onward_sure:
            # the cursor's same-second runs again: a SQLite-backed Letta cuts the cursor's
            # time to whole seconds; with more than a page in one second, no way past them
            return []
        other = "after" if self._onward == "before" else "before"
        page = await self._page_beyond(params, other, last, ascending)
        if page:
            self._onward, self._onward_sure = other, True
        return page or []

    async def _page_beyond(self, params: list[tuple[str, str]], cursor: str, last: dict,
                           ascending: bool) -> list[dict] | None:
        """The page listed with ``cursor`` at ``last``; None when it holds runs but does not
        reach past ``last`` (its last run is beyond it otherwise: a paging always ends)."""
        page = await self.list_runs([*params, (cursor, last["id"])])
        return page if not page or _beyond(page[-1], last, ascending) else None

    async def run_messages(self, run_id: str) -> list[dict]:
        """All of a run's messages, following Letta's cursor pagination."""
        out: list[dict] = []
        after = None
        while True:
            params = [("limit", str(PAGE)), ("order", "asc")] + (
                [("after", after)] if after else [])
            page = await self._request("GET", f"/v1/runs/{run_id}/messages", "run_messages",
                                       params=params)
            out.extend(page)
            # Letta's limit counts stored rows, and a legacy agent's send_message return is
            # dropped from a page that holds its call (to_letta_messages_from_list): a full
            # page of rows lists from half as many messages on (each dropped row's call lists
            # one at least). Shorter than that, the page was the last
            if len(page) < PAGE // 2 or page[-1]["id"] == after:
                return out  # (the second: a cursor that did not move, paged for ever)
            after = page[-1]["id"]

    async def has_messages(self, run_id: str) -> bool:
        """Whether Letta has stored any message of the run yet (a step's are stored at its
        end)."""
        return bool(await self._request("GET", f"/v1/runs/{run_id}/messages", "run_messages",
                                        params=[("limit", "1")]))

    async def newest_step(self, run_id: str) -> dict | None:
        """The run's newest step (its status ``pending`` while it runs), None before any."""
        steps = await self._request("GET", f"/v1/runs/{run_id}/steps", "run_steps",
                                    params=[("limit", "1"), ("order", "desc")])
        return steps[0] if steps else None

    async def run_usage(self, run_id: str) -> dict:
        return await self._request("GET", f"/v1/runs/{run_id}/usage", "run_usage")

    async def cancel(self, agent_id: str, run_ids: list[str]) -> dict[str, str]:
        return await self._request("POST", f"/v1/agents/{agent_id}/messages/cancel", "cancel",
                                   {"run_ids": run_ids})

    async def agent_runs(self, agent_id: str, limit: int = 100,
                         last: dict | None = None) -> list[dict]:
        """An agent's runs, newest first: its newest, or those beyond the run ``last`` (a
        page's last) in that order (to find a lost send again)."""
        params = [("agent_id", agent_id), ("limit", str(limit)), ("order", "desc")]
        return await self._runs_beyond(params, last, ascending=False)
