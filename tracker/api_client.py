"""The tracker's REST API as a client sees it: what the CLI's client commands and
``tracker demo`` talk to a running tracker with, and the one-line errors they print."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tracker.errors import TrackerError


class ApiError(TrackerError):
    """The tracker answered with an error, or could not be reached; ``detail`` is one line.
    ``passing``: asking again later may well work (unreachable, no answer in time, a 5xx:
    a restart, a moment's database fault)."""

    def __init__(self, detail: str, passing: bool = False) -> None:
        super().__init__(detail)
        self.passing = passing


#: a page of a run's messages, read until one comes back shorter (the API's largest)
MESSAGES_PAGE = 1000


class TrackerClient:
    """The tracker's REST API on one aiohttp session."""

    def __init__(self, url: str, key: str | None, timeout_s: float = 30.0,
                 key_from: str = "--key") -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._key_from = key_from if key else None  # for the 401's hint
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> TrackerClient:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, params: Any = None, body: Any = None,
                   any_status: bool = False) -> Any:
        """One request; the decoded JSON answer, or ApiError with a one-line reason; with
        ``any_status``, whatever JSON answered (None for none), an error status too."""
        assert self._session is not None, "use TrackerClient as an async context manager"
        try:
            async with self._session.request(method, self.url + path, params=params,
                                             json=body) as resp:
                text = await resp.text()
                if resp.status >= 400 and not any_status:
                    raise ApiError(error_line(resp.status, resp.reason or "", text,
                                              self._key_from), passing=resp.status >= 500)
                return json.loads(text)
        except aiohttp.ClientConnectorError:
            raise ApiError(f"no tracker at {self.url} (is `tracker serve` running?)",
                           passing=True) from None
        except TimeoutError:
            raise ApiError(f"the tracker at {self.url} did not answer in time",
                           passing=True) from None
        except aiohttp.ClientError as e:
            raise ApiError(f"cannot talk to the tracker at {self.url}: {e}",
                           passing=True) from None
        except ValueError:
            if any_status:
                return None
            raise ApiError(f"{self.url} answered with something that is not JSON") from None

    async def submit(self, agent_id: str, text: str) -> dict:
        """Send one user message to an agent; returns the run."""
        body = {"messages": [{"role": "user", "content": text}]}
        # first: Letta answers the same route, and a message sent to Letta's URL reached the
        # agent untracked before its answer showed whose URL it was
        health = await self.call("GET", "/healthz", any_status=True)  # 503 while degraded
        if not (isinstance(health, dict) and {"status", "database", "version"} <= health.keys()):
            raise self._not_a_tracker()
        return self._run(await self.call("POST", f"/v1/agents/{agent_id}/messages/async",
                                         body=body))

    async def run(self, run_id: str, events: bool = False) -> dict:
        """One run, by tracker or Letta run id; with ``events``, its timeline under
        ``"events"`` (one request instead of two)."""
        run = self._run(await self.call("GET", f"/v1/runs/{run_id}",
                                        params={"include": "events"} if events else None))
        if events and not isinstance(run.get("events"), list):
            raise self._not_a_tracker()
        return run

    async def runs(self, params: list[tuple[str, str]] | None = None) -> list[dict]:
        """Runs matching the API's filters (repeat a key for a list filter)."""
        runs = await self.call("GET", "/v1/runs", params=params or [])
        if not isinstance(runs, list):
            raise self._not_a_tracker()
        return [self._run(r) for r in runs]

    def _run(self, data: Any) -> dict:
        """``data`` if it is a tracker's run: Letta answers the same routes with runs that
        have no ``tracker`` object, and reading it ended in a KeyError's traceback."""
        if not (isinstance(data, dict) and isinstance(data.get("tracker"), dict)
                and isinstance(data.get("id"), str)):
            raise self._not_a_tracker()
        return data

    def _not_a_tracker(self) -> ApiError:
        return ApiError(f"{self.url} answered, but does not look like a tracker (its runs have"
                        " no \"tracker\" object): is this Letta's URL?")

    async def messages(self, run_id: str) -> list[dict]:
        """The run's result messages, oldest first: all of them, page after page (a long
        run's reply, its last message, was past the first page's 100)."""
        messages: list[dict] = []
        while True:
            params: dict[str, Any] = {"order": "asc", "limit": MESSAGES_PAGE}
            if messages:  # a page never ends inside a group of messages sharing an id
                params["after"] = messages[-1]["id"]
            page = await self.call("GET", f"/v1/runs/{run_id}/messages", params=params)
            messages += page
            if len(page) < MESSAGES_PAGE:
                return messages


def error_line(status: int, reason: str, text: str, key_from: str | None = None) -> str:
    """An API error as one line: status, reason and the body's ``detail``; ``key_from``
    names where the key sent came from (None: no key was sent)."""
    if status == 401 and key_from:
        return f"401 {reason} — the API key from {key_from} was refused (revoked, mistyped," \
               " or another tracker's)"
    if status == 401:
        return f"401 {reason} — set TRACKER_API_KEY or pass --key"
    try:
        detail = json.loads(text).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI's validation errors: [{loc, msg, type}, ...]
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}"
                           for d in detail if isinstance(d, dict))
    return f"{status} {reason}: {detail}" if detail else f"{status} {reason}"
