"""Benchmark 2's peer: a bare aiohttp forwarder in front of the simulator.

    .venv/bin/python benchmarks/bare_proxy.py PORT LETTA_URL [asyncio|uvloop]

It takes a submit and POSTs its bytes on to Letta with one shared aiohttp client session (the
connector settings the tracker's Letta client had until it got a transport of its own,
``tracker.letta_http``, in the twenty-ninth session), then answers with Letta's status and
body. Nothing is parsed, checked or stored. So it costs what a service built on aiohttp alone
pays to stand in the path, before it does any of the tracker's work (kept so, that its figures
compare with the earlier sessions'). Its throughput against the direct path, in the
same run, is about as close to direct as such a service can get on this machine.
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web
from bare_server import serve

SESSION = web.AppKey("session", aiohttp.ClientSession)
LETTA = web.AppKey("letta", str)


async def submit(request: web.Request) -> web.Response:
    body = await request.read()
    url = f"{request.app[LETTA]}/v1/agents/{request.match_info['agent_id']}/messages/async"
    async with request.app[SESSION].post(url, data=body, headers={
            "Content-Type": "application/json"}) as resp:
        return web.Response(body=await resp.read(), status=resp.status,
                            content_type="application/json")


async def client(app: web.Application):
    # as the tracker's Letta client opened its session before tracker.letta_http
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=30))
    yield
    await app[SESSION].close()


def main() -> None:
    app = web.Application(client_max_size=1_048_576)
    app[LETTA] = sys.argv[2].rstrip("/")
    app.cleanup_ctx.append(client)
    app.router.add_post("/v1/agents/{agent_id}/messages/async", submit)
    # the tracker's loop unless told otherwise
    serve(app, int(sys.argv[1]), sys.argv[3] if len(sys.argv) > 3 else "uvloop")


if __name__ == "__main__":
    main()
