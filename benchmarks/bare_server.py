"""The ceiling of benchmark 1: a bare aiohttp handler that only parses the JSON and answers 204.

    .venv/bin/python benchmarks/bare_server.py PORT [asyncio|uvloop] [DB]

With ``DB`` (a new file), benchmark 1's durable peer: each callback's body is also committed
to one narrow table before the 204 (SQLite as the tracker's writer is set up, concurrent
callbacks sharing a commit: ``bare_store_proxy.Writes``). The least a tracker that answers
only what it has stored does.

Served like the tracker (one process, no access log), on the same route, so that the same load
against both tells what the tracker's own work costs. The tracker runs on uvloop, so the
benchmark measures this handler on both loops and takes the faster as the ceiling (on this
handler uvloop gains little: aiohttp's parser and the handler dominate).
"""

from __future__ import annotations

import json
import sys

from aiohttp import web

from tracker.cli import event_loop

INBOX = web.AppKey("inbox", object)


async def callback(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.Response(status=204)


async def durable_callback(request: web.Request) -> web.Response:
    """The durable peer's: the ceiling's, and the body committed before the 204."""
    raw = await request.read()
    json.loads(raw)
    await request.app[INBOX].write([("INSERT INTO inbox (token, body) VALUES (?, ?)",
                                     (request.match_info["token"], raw))])
    return web.Response(status=204)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def serve(app: web.Application, port: int, loop: str) -> None:
    """Serve ``app`` like the tracker (one process, no access log), with a /healthz to wait on."""
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                loop=event_loop(loop))


def main() -> None:
    app = web.Application(client_max_size=1_048_576)
    if len(sys.argv) > 3:
        from bare_store_proxy import Writes, connect  # here: it imports this module
        db = connect(sys.argv[3])
        db.execute("CREATE TABLE inbox (id INTEGER PRIMARY KEY, token TEXT, body BLOB)")
        app[INBOX] = Writes(db)
    app.router.add_post("/callbacks/letta/{token}", durable_callback if INBOX in app else callback)
    serve(app, int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "asyncio")


if __name__ == "__main__":
    main()
