"""Acceptance: the real ``tracker`` command in a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.reliability import harness
from tests.reliability.harness import free_port
from tracker.errors import ConfigError


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env.update(extra)
    return env


async def wait_healthy(url: str, timeout: float = 15.0,
                       proc: asyncio.subprocess.Process | None = None) -> dict:
    """The tracker's health once it answers (``harness.wait_healthy``; ``proc``: that
    tracker, whose exit ends the wait at once)."""
    return await harness.wait_healthy(
        url, timeout, alive=None if proc is None else lambda: proc.returncode is None)


async def serve_until_sigterm(tmp_path: Path, check, **env: str) -> tuple[int, str, str]:
    """``tracker serve`` in ``tmp_path``: once healthy, ``check(url, health)``, then SIGTERM;
    returns its exit code, everything it printed, and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", "serve", "--port", str(port), cwd=tmp_path,
        env=clean_env(**env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await check(url, await wait_healthy(url, proc=proc))
        proc.send_signal(signal.SIGTERM)
        out = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
    except (AssertionError, RuntimeError, TimeoutError) as e:
        # what the tracker printed says why (a rare failure under the whole suite's load
        # left nothing else to go on)
        if proc.returncode is None:
            proc.kill()
        printed = (await proc.communicate())[0].decode()
        raise AssertionError(f"{e!r}\n--- tracker serve printed ---\n{printed}") from e
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode is not None
    return proc.returncode, out, url


async def test_serve_starts_with_no_config_and_stops_cleanly(tmp_path: Path):
    async def check(url: str, health: dict) -> None:
        assert health["database"] is True and health["version"]
        async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/runs") as resp:
            assert resp.status == 401

    code, out, url = await serve_until_sigterm(tmp_path, check)
    assert code == 0, out
    assert "database sqlite:///tracker.db" in out and "Letta at http://localhost:8283" in out
    assert "event loop uvloop" in out  # installed with the tracker: the default
    # said once start-up (migrations included) is done, not before
    assert out.index("first start: created admin API key") < out.index(
        f"listening on {url}")
    assert "tracker stopped; database closed" in out
    assert "Traceback" not in out
    # the default database sits in the working directory and was closed cleanly
    db = sqlite3.connect(tmp_path / "tracker.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert not (tmp_path / "tracker.db-wal").exists() or \
        (tmp_path / "tracker.db-wal").stat().st_size == 0


async def test_serve_runs_on_pythons_own_loop_when_configured(tmp_path: Path):
    async def check(url: str, health: dict) -> None:
        assert health["database"] is True

    code, out, _ = await serve_until_sigterm(tmp_path, check,
                                             TRACKER_SERVER__EVENT_LOOP="asyncio")
    assert code == 0, out
    assert "event loop asyncio" in out and "tracker stopped; database closed" in out


async def test_a_second_serve_on_the_same_database_is_refused(tmp_path: Path):
    """Two services on one database would each take the other's sends in flight for a
    crash's leftovers and send them again: the second one must not start."""
    refusal: dict = {}

    async def check(url: str, health: dict) -> None:
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tracker", "serve", "--port", str(free_port()), cwd=tmp_path,
            env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            refusal["out"] = (await asyncio.wait_for(second.communicate(), 20))[0].decode()
        finally:
            if second.returncode is None:  # it started: the refusal this test is about failed
                second.kill()
        refusal["code"] = second.returncode
        assert (await wait_healthy(url))["database"] is True  # the first one goes on

    code, out, _ = await serve_until_sigterm(tmp_path, check)
    assert code == 0, out
    assert refusal["code"] == 1, refusal["out"]
    lock = tmp_path / "tracker.db.lock"
    assert f"another tracker serves this database (pid {int(lock.read_text())}, holding" \
        f" {lock}): stop it first" in refusal["out"], refusal["out"]
    assert "Traceback" not in refusal["out"]
    assert "listening" not in refusal["out"]
    # the first one's stop let go of the database: the next one starts
    code, out, _ = await serve_until_sigterm(tmp_path, lambda url, health: asyncio.sleep(0))
    assert code == 0 and "tracker stopped; database closed" in out, out


async def test_a_database_that_cannot_be_opened_stops_startup_with_one_line(tmp_path: Path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", "serve", "--port", str(free_port()), cwd=tmp_path,
        env=clean_env(TRACKER_DATABASE__URL="sqlite:///no/such/dir/t.db"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
    assert proc.returncode == 1, out
    assert out.splitlines()[-1] == (
        f"tracker: cannot open database no/such/dir/t.db: its lock file"
        f" {tmp_path}/no/such/dir/t.db.lock: No such file or directory"), out
    assert "Traceback" not in out and "cannot listen" not in out


def test_event_loop_choice(monkeypatch):
    import uvloop

    from tracker.cli import event_loop

    for choice, kind in (("auto", uvloop.Loop), ("uvloop", uvloop.Loop),
                         ("asyncio", asyncio.BaseEventLoop)):
        loop = event_loop(choice)
        assert isinstance(loop, kind), choice
        assert isinstance(loop, uvloop.Loop) == (choice != "asyncio"), choice
        loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    loop = event_loop("auto")
    assert type(loop).__module__.startswith("asyncio")
    loop.close()
    with pytest.raises(ConfigError, match='server.event_loop is "uvloop" but uvloop is not'):
        event_loop("uvloop")


async def test_bad_config_stops_startup_with_one_line(tmp_path: Path):
    (tmp_path / "bad.toml").write_text('[polling]\nmin_interval_s = "often"\n')
    for args, env in ((["--config", "bad.toml"], {}),
                      ([], {"TRACKER_SERVER__PORT": "not-a-port"}),
                      ([], {"TRACKER_SERVER__EVENT_LOOP": "fastest"}),
                      (["--config", "missing.toml"], {})):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tracker", "serve", *args, cwd=tmp_path,
            env=clean_env(**env), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        lines = err.decode().strip().splitlines()
        assert proc.returncode == 2, err
        assert len(lines) == 1 and lines[0].startswith("tracker: "), lines
        assert "Traceback" not in err.decode()


async def test_a_taken_port_stops_startup_with_one_error_line(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tracker", "serve", "--port", str(port), cwd=tmp_path,
            env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
    assert proc.returncode == 1, out
    assert f"cannot listen on 127.0.0.1:{port}" in out and "address already in use" in out.lower()
    # nothing started before the port was had: no database opened, no queued run sent to
    # Letta telling it to call back on a port this process never got
    assert not (tmp_path / "tracker.db").exists() and "starting" not in out, out
    assert "listening on" not in out and "Traceback" not in out


async def db_migrate(env: dict[str, str]) -> None:
    """The database made: only `db migrate` and `serve` make one."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", "db", "migrate", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert await proc.wait() == 0


async def test_keys_create_prints_the_key_last_and_db_status(tmp_path: Path):
    env = clean_env(TRACKER_DATABASE__URL=f"sqlite:///{tmp_path / 't.db'}")
    await db_migrate(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", "keys", "create", "ops", "--admin", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    key = out.decode().strip().splitlines()[-1]
    assert key.startswith("tk_") and len(key) > 30
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", "db", "status", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    text = out.decode()
    from tracker.migrations import LATEST

    assert f"schema version {LATEST} (latest {LATEST})" in text and "api_keys" in text
    # only the hash is stored
    db = sqlite3.connect(tmp_path / "t.db")
    stored = [r[0] for r in db.execute("SELECT key_hash FROM api_keys")]
    assert key not in stored and all(len(h) == 64 for h in stored)


async def test_webhook_secret_is_shown_at_key_creation_and_rotates(tmp_path: Path):
    env = clean_env(TRACKER_DATABASE__URL=f"sqlite:///{tmp_path / 't.db'}")

    async def run(*args: str) -> list[str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tracker", "keys", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        return out.decode().strip().splitlines()

    await db_migrate(env)
    created = await run("create", "dora")
    first = next(line.strip() for line in created if line.strip().startswith("whsec_"))
    rotated = (await run("rotate-webhook-secret", "dora"))[-1]
    assert rotated.startswith("whsec_") and rotated != first
    db = sqlite3.connect(tmp_path / "t.db")
    assert db.execute("SELECT webhook_secret, webhook_secret_old FROM users").fetchone() == (
        rotated, first)
