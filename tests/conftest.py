"""Shared fixtures: a real SQLite store in a temp dir, the simulator served over HTTP, and a
tracker app wired to both."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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
        "dispatch": {"retry_min_s": 0.1, "retry_max_s": 0.5},
        "relay": {"allow_private": True, "retry_schedule_s": [0, 0.2, 0.4]},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    cfg = load_config(None, environ={})
    return cfg.model_validate(data)


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
