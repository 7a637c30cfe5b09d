"""Shared fixtures: a real SQLite store in a temp dir, the simulator served over HTTP, and a
tracker app wired to both."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tracker import auth
from tracker.config import Config, load_config
from tracker.store import open_store

AGENT = "agent-5ba2cc7c-8cbf-4f37-8066-eda14a61a538"


@pytest.fixture
async def store(tmp_path: Path):
    s = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    await s.open()
    yield s
    await s.close()


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A test config: database in tmp_path, fast polling; ``sections`` override keys."""
    data: dict[str, dict[str, Any]] = {
        "database": {"url": f"sqlite:///{tmp_path / 'tracker.db'}"},
        "polling": {"grace_s": 0.3, "min_interval_s": 0.2, "max_interval_s": 1.0,
                    "callback_wait_s": 0.3, "cancel_confirm_s": 1.0},
        "dispatch": {"retry_min_s": 0.1, "retry_max_s": 0.5, "lookup_after_s": 0.2},
        "relay": {"allow_private": True, "retry_schedule_s": [0, 0.2, 0.4]},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    cfg = load_config(None, environ={})
    return cfg.model_validate(data)


def record_commits(store) -> list[tuple[int, bool]]:
    """The group commits ``store`` makes from now on, each as (its writes, whether the drain
    made it rather than a lone write's own task)."""
    commits: list[tuple[int, bool]] = []
    commit_batch = store._commit_batch

    async def counted(ops):
        commits.append((len(ops), asyncio.current_task() is store._drainer))
        return await commit_batch(ops)

    store._commit_batch = counted
    return commits


async def user_key(t: Tracker, name: str, admin: bool = False) -> str:
    """A new user's API key on the tracker under test."""
    _, key = await auth.create_key(t.svc.store, name, admin)
    return key


async def eventually(check: Callable[[], Any], timeout: float = 10.0, every: float = 0.05):
    """Await ``check()`` until it returns something truthy (tests of background work)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


class Tracker:
    """A running tracker app under test, with its admin key and the simulator behind it."""

    def __init__(self, client, app, key: str, sim) -> None:
        self.client = client
        self.app = app
        self.key = key
        self.sim = sim

    async def callbacks_applied(self) -> None:
        """Wait until every callback answered so far is applied (the inbox is empty)."""
        async def empty() -> bool:
            return await self.svc.store.inbox_depth() == 0
        await eventually(empty)

    @property
    def svc(self):
        from tracker.wiring import SERVICES

        return self.app[SERVICES]

    def _headers(self, key: str | None, extra: dict | None) -> dict:
        return {"Authorization": f"Bearer {key or self.key}", **(extra or {})}

    async def post(self, path: str, body: Any = None, key: str | None = None,
                   headers: dict | None = None):
        return await self.client.post(path, json=body, headers=self._headers(key, headers))

    async def get(self, path: str, key: str | None = None, **params: Any):
        return await self.client.get(path, params=params or None,
                                     headers=self._headers(key, None))

    async def raw_status(self, method: str, path: str, headers: dict[str, bytes],
                         body: bytes = b"") -> int:
        """The status of a request written byte for byte (aiohttp's client refuses header
        bytes that are not UTF-8)."""
        url = self.client.make_url("/")
        reader, writer = await asyncio.open_connection(url.host, url.port)
        lines = [f"{method} {path} HTTP/1.1".encode(), f"Host: {url.host}".encode(),
                 f"Content-Length: {len(body)}".encode(), b"Connection: close",
                 *(name.encode() + b": " + value for name, value in headers.items())]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        status = int((await reader.readline()).split()[1])
        writer.close()
        return status

    async def submit(self, agent_id: str, text: str = "hi", **body: Any) -> dict:
        resp = await self.post(f"/v1/agents/{agent_id}/messages/async",
                               {"messages": [{"role": "user", "content": text}], **body})
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def run(self, run_id: str) -> dict:
        resp = await self.get(f"/v1/runs/{run_id}")
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def wait_state(self, run_id: str, *states: str, timeout: float = 10.0) -> dict:
        async def check():
            run = await self.run(run_id)
            return run if run["tracker"]["state"] in states else None

        return await eventually(check, timeout)


@pytest.fixture
async def sim(aiohttp_server):
    from tracker.simulator import Faults, Simulator

    s = Simulator(seed=7, faults=Faults(run_duration_s=(0.05, 0.15), callback_lag_s=0.05))
    server = await aiohttp_server(s.app())
    s.url = str(server.make_url("")).rstrip("/")
    s.server = server
    return s


@pytest.fixture
async def webhook(aiohttp_server):
    """A user's callback_url receiver: (its URL, the JSON bodies it got, in order)."""
    delivered: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        delivered.append(await request.json())
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    return str((await aiohttp_server(app)).make_url("/hook")), delivered


@pytest.fixture
def agent(sim) -> str:
    return sim.create_agent("test")["id"]


@pytest.fixture
def start_tracker(aiohttp_client, unused_tcp_port_factory, sim, tmp_path):
    """Start a tracker on the simulator; call again (same tmp db) to model a restart."""

    async def start(**sections: dict[str, Any]) -> Tracker:
        from tracker.app import FIRST_KEY, create_app

        port = unused_tcp_port_factory()
        server = {"host": "127.0.0.1", "port": port, **sections.pop("server", {})}
        letta = {"base_url": sim.url, **sections.pop("letta", {})}
        cfg = make_config(tmp_path, server=server, letta=letta, **sections)
        app = create_app(cfg)
        client = await aiohttp_client(app, server_kwargs={"port": port})
        key = app[FIRST_KEY][0] if app[FIRST_KEY] else start.key
        start.key = key
        tracker = Tracker(client, app, key, sim)
        # start-up reconcile done and the loop asleep: tests then see inline dispatch
        await asyncio.wait_for(tracker.svc.dispatcher.idle.wait(), 10)
        return tracker

    start.key = None
    return start
