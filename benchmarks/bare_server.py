"""The ceiling of benchmark 1: a bare aiohttp handler that only parses the JSON and answers 204.

    .venv/bin/python benchmarks/bare_server.py PORT

Served like the tracker (one process, aiohttp's default loop, no access log), on the same
route, so that the same load against both tells what the tracker's own work costs.
"""

from __future__ import annotations

import json
import sys

from aiohttp import web


async def callback(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.Response(status=204)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    app = web.Application(client_max_size=1_048_576)
    app.router.add_post("/callbacks/letta/{token}", callback)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
