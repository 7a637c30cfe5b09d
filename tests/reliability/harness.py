"""The real things, as subprocesses: the Letta simulator (`tracker simulate`) and the tracker
(`tracker serve`), plus an HTTP client that knows both.

The simulator keeps its state in memory, so one simulator outlives any number of tracker
restarts; what it received is read back from its `/_sim/*` control routes. Every process is
started with `asyncio.create_subprocess_exec` and killed by whoever started it (the fixtures
in this directory's conftest), never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HOST = "127.0.0.1"
#: the callback secret every subprocess tracker uses, so tests can mint tokens themselves
CALLBACK_SECRET = "reliability-callback-secret-0123456789"
#: fast clocks for tests; a test overrides any of these with its own ``env``
FAST = {
    "TRACKER_POLLING__GRACE_S": "0.5",
    "TRACKER_POLLING__MIN_INTERVAL_S": "0.3",
    "TRACKER_POLLING__MAX_INTERVAL_S": "2",
    "TRACKER_POLLING__CALLBACK_WAIT_S": "0.3",
    "TRACKER_POLLING__CANCEL_CONFIRM_S": "1",
    "TRACKER_DISPATCH__RETRY_MIN_S": "0.1",
    "TRACKER_DISPATCH__RETRY_MAX_S": "1",
    "TRACKER_DISPATCH__LOOKUP_AFTER_S": "0.5",
    "TRACKER_LETTA__TIMEOUT_S": "5",
    "TRACKER_CALLBACKS__SECRET": CALLBACK_SECRET,
}
FINAL_STATES = frozenset({"done", "rejected", "cancelled", "lost"})


def free_port() -> int:
    """A port nobody listens on now (the tracker needs a fixed one: Letta calls it back)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any TRACKER_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Proc:
    """One subprocess, its stderr in a log file."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the process."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                await self.kill()
        await self.proc.wait()


async def spawn(name: str, args: list[str], env: dict[str, str], log: Path,
                stdout: int | None = asyncio.subprocess.PIPE) -> Proc:
    with log.open("ab") as f:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tracker", *args, env=env, stdout=stdout, stderr=f,
            stdin=asyncio.subprocess.DEVNULL)
    return Proc(name, proc, log)


class SimProcess:
    """`tracker simulate` in a subprocess, and its `/_sim/*` controls."""

    def __init__(self, proc: Proc, url: str, agents: list[str]) -> None:
        self.proc = proc
        self.url = url
        self.agents = agents
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    async def start(cls, tmp: Path, agents: int = 20, seed: int = 1,
                    run_duration: tuple[float, float] = (0.05, 0.3),
                    extra: Iterable[str] = ()) -> SimProcess:
        args = ["simulate", "--host", HOST, "--port", "0", "--agents", str(agents),
                "--seed", str(seed), "--run-duration", *map(str, run_duration), *extra]
        proc = await spawn("simulator", args, clean_env(), tmp / "simulator.log")
        ids: list[str] = []
        try:
            while True:
                line = await asyncio.wait_for(proc.proc.stdout.readline(), 30)
                text = line.decode().strip()
                if not line:
                    raise RuntimeError("simulator exited: " + proc.log.read_text()[-2000:])
                if text.startswith("Letta simulator listening on "):
                    url = text.rsplit(" ", 1)[1]
                    return cls(proc, url, ids)
                ids.append(text)
        except BaseException:
            await proc.kill()
            raise

    async def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self._http

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        async with (await self.http()).request(method, self.url + path, json=body) as r:
            assert r.status < 300, (path, r.status, await r.text())
            return await r.json()

    async def runs(self) -> list[dict]:
        """Every run Letta received, in creation order: id, agent_id, status, otids..."""
        return await self._call("GET", "/_sim/runs")

    async def stats(self) -> dict:
        return await self._call("GET", "/_sim/stats")

    async def faults(self, **changes: Any) -> dict:
        return await self._call("POST", "/_sim/faults", changes)

    async def letta_runs(self, agent_id: str) -> list[dict]:
        """The agent's runs through Letta's own list API (timestamps), oldest first."""
        return await self._call("GET", f"/v1/runs/?agent_id={agent_id}&limit=1000&order=asc")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        await self.proc.stop(5)


async def wait_healthy(url: str, timeout: float,
                       alive: Callable[[], bool] | None = None) -> dict:
    """The body of the tracker's /healthz once it answers 200. Raises RuntimeError as soon as
    ``alive`` says its process has exited (as one that could not take its port does), and
    TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    # each try short: whatever else holds the port may never answer
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while True:
            if alive is not None and not alive():
                raise RuntimeError("tracker exited before it was healthy")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with s.get(url + "/healthz") as r:
                    if r.status == 200:
                        return await r.json()
            if time.monotonic() >= deadline:
                raise TimeoutError("tracker did not become healthy")
            await asyncio.sleep(0.05)


class TrackerProcess:
    """`tracker serve` in a subprocess, restartable on the same port and database."""

    def __init__(self, tmp: Path, letta_url: str, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.db = tmp / "t.db"
        self.log = tmp / "tracker.log"
        self.env = clean_env({
            "TRACKER_DATABASE__URL": f"sqlite:///{self.db}",
            "TRACKER_LETTA__BASE_URL": letta_url,
            "TRACKER_SERVER__HOST": HOST,
            "TRACKER_SERVER__PORT": str(self.port),
            **FAST, **(env or {}),
        })
        self.proc: Proc | None = None
        self.starts = 0

    async def cli(self, *args: str, check: bool = True) -> str:
        """Run ``tracker ARGS`` against the same config; its stdout."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tracker", *args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"tracker {' '.join(args)}: {proc.returncode} {err.decode()}")
        return out.decode()

    async def create_key(self, name: str = "tester", admin: bool = True) -> str:
        """A new API key, made by `tracker keys create` (the key is the last line); the
        database made first if need be (only `db migrate` and `serve` make one)."""
        await self.cli("db", "migrate")
        args = ["keys", "create", name] + (["--admin"] if admin else [])
        return (await self.cli(*args)).strip().splitlines()[-1]

    async def start(self, timeout: float = 30.0) -> None:
        """Start `tracker serve` and wait for /healthz to answer 200."""
        assert self.proc is None or not self.proc.alive
        proc = self.proc = await spawn("tracker", ["serve"], self.env, self.log, stdout=None)
        self.starts += 1
        try:
            await wait_healthy(self.url, timeout, alive=lambda: proc.alive)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}: {self.log.read_text()[-3000:]}") from e

    async def kill(self) -> None:
        if self.proc is not None:
            await self.proc.kill()

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Client:
    """A tracker API client with one key (a test makes one per simulated user or worker)."""

    def __init__(self, base_url: str, key: str, timeout: float = 30.0) -> None:
        self.base = base_url
        self.headers = {"Authorization": f"Bearer {key}"}
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def close(self) -> None:
        await self.http.close()

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      headers: dict | None = None, **kw: Any) -> tuple[int, Any]:
        """(status, parsed JSON body or text)."""
        async with self.http.request(method, self.base + path, json=json_body,
                                     headers={**self.headers, **(headers or {})}, **kw) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text

    async def submit(self, agent: str, text: str, otid: str,
                     idempotency_key: str | None = None) -> tuple[int, Any]:
        body = {"messages": [{"role": "user", "content": text, "otid": otid}]}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return await self.request("POST", f"/v1/agents/{agent}/messages/async", json_body=body,
                                  headers=headers)

    async def run(self, run_id: str) -> dict:
        status, body = await self.request("GET", f"/v1/runs/{run_id}")
        assert status == 200, (run_id, status, body)
        return body

    async def events(self, run_id: str) -> list[dict]:
        status, body = await self.request("GET", f"/v1/runs/{run_id}/events")
        assert status == 200, (run_id, status, body)
        return body

    async def all_runs(self, **params: str) -> list[dict]:
        """Every run the key may see, oldest first, paging with ``after=<last id>``."""
        out: list[dict] = []
        after = None
        while True:
            query = {"limit": "1000", "order": "asc", **params, **({"after": after} if after
                                                                    else {})}
            status, page = await self.request("GET", "/v1/runs", params=query)
            assert status == 200, (status, page)
            out.extend(page)
            if len(page) < 1000:
                return out
            after = page[-1]["id"]


async def wait_until(check, timeout: float, every: float = 0.2, what: str = "condition"):
    """Await ``check()`` -> (done, detail) until done; the last detail goes in the error."""
    deadline = time.monotonic() + timeout
    while True:
        done, detail = await check()
        if done:
            return detail
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s: {str(detail)[:3000]}")
        await asyncio.sleep(every)


@dataclass
class Submitted:
    """What the clients know: otid -> acked run id, and each client's (agent, otid) order."""

    acked: dict[str, str] = field(default_factory=dict)
    by_client: dict[int, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)
    retries: int = 0


async def wait_all_final(reader: Client, expected: int, timeout: float, context: str) -> None:
    """Until the history holds ``expected`` runs (at least), every one in a final state."""

    async def check():
        runs = await reader.all_runs()
        pending = [(r["id"], r["tracker"]["state"]) for r in runs
                   if r["tracker"]["state"] not in FINAL_STATES]
        return not pending and len(runs) >= expected, (len(runs), pending[:20])

    await wait_until(check, timeout, 0.5, f"every run final ({context})")


async def verify_exactly_once(reader: Client, sim: SimProcess, out: Submitted,
                              context: str) -> list[dict]:
    """Every acked submit is in the history once (and nothing else is), reached Letta once
    (by otid), and ended in the state Letta gave it. Returns the simulator's runs."""
    runs = await reader.all_runs()
    by_id = {r["id"]: r for r in runs}
    assert len(runs) == len(by_id) == len(out.acked), (context, len(runs), len(by_id))
    assert set(by_id) == set(out.acked.values()), context
    sim_runs = await sim.runs()
    assert (await sim.stats())["otid_duplicates"] == {}, context
    otids_at_letta = Counter(o for sr in sim_runs for o in sr["otids"])
    assert otids_at_letta == Counter(list(out.acked)), (
        context, "at Letta but never acked:", set(otids_at_letta) - set(out.acked),
        "acked but never at Letta:", set(out.acked) - set(otids_at_letta))
    sim_by_otid = {o: sr for sr in sim_runs for o in sr["otids"]}
    wrong = []
    for otid, run_id in out.acked.items():
        run, sr = by_id[run_id], sim_by_otid[otid]
        mine = (run["tracker"]["letta_run_id"], run["status"], run["stop_reason"],
                run["tracker"]["state"])
        if mine != (sr["id"], sr["status"], sr["stop_reason"], "done"):
            wrong.append((run_id, mine, sr))
    assert not wrong, (context, len(wrong), wrong[:5])
    return sim_runs


async def verify_order(reader: Client, sim: SimProcess, out: Submitted, sim_runs: list[dict],
                       context: str) -> None:
    """Per agent: Letta got the messages in the tracker's order, which is each client's own
    order, and one at a time (each run began after the previous one ended)."""
    otid_of = {run_id: otid for otid, run_id in out.acked.items()}
    at_letta: dict[str, list[str]] = defaultdict(list)
    for sr in sim_runs:  # the simulator lists runs in the order it created them
        at_letta[sr["agent_id"]].extend(sr["otids"])
    for agent in sim.agents:
        tracked = [otid_of[r["id"]] for r in await reader.all_runs(agent_id=agent)]
        assert at_letta[agent] == tracked, (context, agent)
        for n, sent in out.by_client.items():
            mine = [otid for a, otid in sent if a == agent]
            assert [o for o in tracked if o in set(mine)] == mine, (context, agent, n)
        letta = await sim.letta_runs(agent)
        for prev, nxt in zip(letta, letta[1:], strict=False):
            # completed_at is naive UTC, created_at the same with a Z
            assert prev["completed_at"] and prev["completed_at"] <= nxt["created_at"][:-1], (
                context, "overlapping runs at Letta", agent, prev["id"], nxt["id"])
