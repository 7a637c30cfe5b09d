"""Benchmark 2's floor peer: the bare forwarder plus the least a tracker must store.

    .venv/bin/python benchmarks/bare_store_proxy.py PORT LETTA_URL DB [asyncio|uvloop]

``bare_proxy.py``'s forwarder, on the same route and client, doing only what no tracker can
leave out of a submit:
- the body parsed, and a callback URL of the run's own put in it;
- the run written and committed before Letta is called (SQLite, WAL, ``synchronous =
  NORMAL``, as the tracker's default);
- Letta's answer parsed for its run id, and that written and committed before answering.

The writes of requests in flight share commits, as the tracker's group commit does (one turn
of the loop's gathering). One table, its primary key the only index; no events, no key, no
checks, no log, no metrics, no ordering. So its throughput against direct, in the same run, is
about the most a tracker built on aiohttp and SQLite could reach on this machine.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
import uuid

from aiohttp import web
from bare_proxy import LETTA, SESSION, client
from bare_server import serve

DB = web.AppKey("db", "Writes")


class Writes:
    """One connection on the loop's thread; concurrent writes share a commit."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode = WAL", "synchronous = NORMAL"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, agent_id TEXT,"
                        " state TEXT, request TEXT, letta_run_id TEXT, created_at REAL,"
                        " submitted_at REAL)")
        self.queue: list[tuple[str, tuple, asyncio.Future]] = []

    async def write(self, sql: str, params: tuple) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((sql, params, fut))
        if len(self.queue) == 1:
            asyncio.get_running_loop().call_soon(self.commit)
        await fut

    def commit(self) -> None:
        batch, self.queue = self.queue, []
        try:
            self.db.execute("BEGIN")
            for sql, params, _ in batch:
                self.db.execute(sql, params)
            self.db.execute("COMMIT")
        except sqlite3.Error as e:  # a benchmark's peer: each request fails, none hangs
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            for *_, fut in batch:
                fut.set_exception(e)
            return
        for *_, fut in batch:
            fut.set_result(None)


async def submit(request: web.Request) -> web.Response:
    agent_id = request.match_info["agent_id"]
    body = json.loads(await request.read())
    run_id = f"run-{uuid.uuid4()}"
    body["callback_url"] = f"http://127.0.0.1:1/callbacks/letta/{run_id}"
    data = json.dumps(body)
    db = request.app[DB]
    await db.write("INSERT INTO runs VALUES (?, ?, 'submitting', ?, NULL, ?, NULL)",
                   (run_id, agent_id, data, time.time()))
    url = f"{request.app[LETTA]}/v1/agents/{agent_id}/messages/async"
    async with request.app[SESSION].post(url, data=data, headers={
            "Content-Type": "application/json"}) as resp:
        answer = await resp.read()
    letta_run = json.loads(answer)
    await db.write("UPDATE runs SET state = 'submitted', letta_run_id = ?, submitted_at = ?"
                   " WHERE id = ?", (letta_run.get("id"), time.time(), run_id))
    return web.Response(body=answer, status=resp.status, content_type="application/json")


def main() -> None:
    app = web.Application(client_max_size=1_048_576)
    app[LETTA] = sys.argv[2].rstrip("/")
    app[DB] = Writes(sys.argv[3])
    app.cleanup_ctx.append(client)
    app.router.add_post("/v1/agents/{agent_id}/messages/async", submit)
    serve(app, int(sys.argv[1]), sys.argv[4] if len(sys.argv) > 4 else "uvloop")


if __name__ == "__main__":
    main()
