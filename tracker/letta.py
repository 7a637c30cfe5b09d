"""The Letta client: every call the tracker makes to Letta, on one pool of connections."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tracker import clock
from tracker.errors import LettaError, LettaUnavailable, NotFound
from tracker.letta_http import Answer, HttpPool, TransportError
from tracker.serialize import dumps

TERMINAL_FILTER = [("statuses", "completed"), ("statuses", "failed"), ("statuses", "cancelled")]
PAGE = 1000


def _decode(raw: bytes) -> Any:
    # not orjson: it reads an integer past 64 bits as a float, silently
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"detail": raw.decode(errors="replace")}


class LettaClient:
    """Letta's REST API as the tracker uses it; errors are typed, calls are counted."""

    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s
        self._pool: HttpPool | None = None
        self.calls: Counter[tuple[str, int | str]] = Counter()
        self.on_call: Any = None  # metrics hook: (endpoint, status) -> None

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
        (connection errors, timeouts, 5xx, 429) raise LettaUnavailable."""
        assert self._pool is not None, "client is not started"
        try:
            # encoded with orjson: on every submit's path
            answer = await self._pool.request(method, path, None if body is None
                                              else dumps(body), params)
        except TransportError as e:
            self._count(endpoint, "error" if e.sent else "unreachable")
            raise LettaUnavailable(f"Letta {'call failed' if e.sent else 'unreachable'}: {e}",
                                   sent=e.sent) from e
        self._count(endpoint, answer.status)
        return self._answered(answer)

    @staticmethod
    def _answered(answer: Answer) -> Any:
        data = _decode(answer.body)
        if answer.status < 300:
            return data
        detail = data.get("detail", data) if isinstance(data, dict) else data
        if answer.status == 429 or answer.status >= 500:
            # a 429 was refused at the door; a 5xx may have created the run
            wait = clock.parse_retry_after(answer.headers.get("retry-after"), clock.now())
            raise LettaUnavailable(f"Letta answered {answer.status}: {detail}", wait,
                                   sent=answer.status != 429)
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
        ids: set[str] = set()
        after = None
        while True:
            params = [("active", "true"), ("limit", str(PAGE)), ("order", "asc")]
            page = await self.list_runs(params + ([("after", after)] if after else []))
            ids.update(r["id"] for r in page)
            if len(page) < PAGE:
                return ids
            after = page[-1]["id"]

    async def recent_terminal(self, limit: int, after: str | None = None) -> list[dict]:
        """Finished runs, newest first, past ``after`` in that order (one call for many)."""
        params = [*TERMINAL_FILTER, ("limit", str(min(PAGE, limit))), ("order", "desc")]
        return await self.list_runs(params + ([("after", after)] if after else []))

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
            if len(page) < PAGE:
                return out
            after = page[-1]["id"]

    async def run_usage(self, run_id: str) -> dict:
        return await self._request("GET", f"/v1/runs/{run_id}/usage", "run_usage")

    async def cancel(self, agent_id: str, run_ids: list[str]) -> dict[str, str]:
        return await self._request("POST", f"/v1/agents/{agent_id}/messages/cancel", "cancel",
                                   {"run_ids": run_ids})

    async def agent_runs(self, agent_id: str, limit: int = 100) -> list[dict]:
        """An agent's most recent runs, newest first (used to find a run again by otid)."""
        return await self.list_runs([("agent_id", agent_id), ("limit", str(limit)),
                                     ("order", "desc")])
