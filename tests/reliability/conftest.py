"""Fixtures of the reliability suite: real subprocesses, killed at teardown whatever happens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.reliability.harness import Client, SimProcess, TrackerProcess


class Processes:
    """Starts simulators, trackers and clients for one test; ``close`` ends every one."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sims: list[SimProcess] = []
        self.trackers: list[TrackerProcess] = []
        self.clients: list[Client] = []

    async def simulator(self, **kw) -> SimProcess:
        sim = await SimProcess.start(self.tmp, **kw)
        self.sims.append(sim)
        return sim

    def tracker(self, sim: SimProcess, env: dict[str, str] | None = None,
                name: str = "tracker") -> TrackerProcess:
        tmp = self.tmp / name
        tmp.mkdir(exist_ok=True)
        t = TrackerProcess(tmp, sim.url, env)
        self.trackers.append(t)
        return t

    def client(self, tracker: TrackerProcess, key: str, timeout: float = 30.0) -> Client:
        c = Client(tracker.url, key, timeout)
        self.clients.append(c)
        return c

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        for t in self.trackers:
            if t.proc is not None and not t.proc.alive:
                # shown with a failed test's output: why a tracker stopped answering
                print(f"tracker at {t.url} exited ({t.proc.proc.returncode}); its log ends:\n"
                      + t.log_text()[-3000:])
            await t.kill()
        for s in self.sims:
            await s.close()


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        await p.close()
