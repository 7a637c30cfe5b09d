"""Small HTTP proxies put on the wire between Letta and the tracker, to disturb it for real.

- ``CallbackChaos`` stands where the tracker's public URL points: Letta's callbacks reach it
  and it drops, duplicates, delays past the grace period or reorders them before passing them on.
- ``LettaProxy`` stands in front of Letta: it can hold Letta's answer to a submit, so that the
  run's callback reaches the tracker before the submit's response does.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


@dataclass
class ChaosLog:
    """What the chaos proxy did with each callback, and what the tracker answered."""

    actions: dict[str, str] = field(default_factory=dict)  # token -> action
    answers: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    bodies: dict[str, bytes] = field(default_factory=dict)


class CallbackChaos:
    """Receives Letta's callbacks and passes them on to the tracker, badly."""

    ACTIONS = ("forward", "drop", "duplicate", "late", "reorder")

    def __init__(self, seed: int, weights: tuple[int, ...] = (3, 2, 2, 2, 2),
                 late_s: tuple[float, float] = (0.8, 1.5)) -> None:
        self.rng = random.Random(seed)
        self.weights = weights
        self.late_s = late_s
        self.target = ""  # the tracker's base URL, set once it is known
        self.log = ChaosLog()
        self._held: list[tuple[str, bytes]] = []
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/callbacks/letta/{token}", self.receive)
        app.on_cleanup.append(self._close)
        return app

    async def receive(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        body = await request.read()
        action = self.rng.choices(self.ACTIONS, self.weights)[0]
        self.log.actions[token] = action
        self.log.bodies[token] = body
        if action == "forward":
            self._spawn(self.forward(token, body))
        elif action == "duplicate":
            for _ in range(3):  # at the same moment: the CAS must settle the race
                self._spawn(self.forward(token, body))
            self._spawn(self._later(0.5, token, body))
        elif action == "late":
            self._spawn(self._later(self.rng.uniform(*self.late_s), token, body))
        elif action == "reorder":
            self._held.append((token, body))
            if len(self._held) >= 3:
                self._release()
            else:
                self._spawn(self._release_later(1.0))
        # Letta only records what it was answered; it never retries
        return web.json_response({"ok": True})

    def _release(self) -> None:
        held, self._held = self._held, []
        for token, body in reversed(held):  # newest first: out of order
            self._spawn(self.forward(token, body))

    async def _release_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._release()

    async def _later(self, delay: float, token: str, body: bytes) -> None:
        await asyncio.sleep(delay)
        await self.forward(token, body)

    async def forward(self, token: str, body: bytes) -> int:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.post(f"{self.target}/callbacks/letta/{token}", data=body,
                                      headers={"Content-Type": "application/json"}) as r:
            await r.read()
            self.log.answers[token].append(r.status)
            return r.status

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait until nothing is held or in flight."""
        while self._tasks or self._held:
            if self._held and not self._tasks:
                self._release()
            await asyncio.sleep(0.05)

    async def _close(self, app: web.Application) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._session is not None:
            await self._session.close()


class LettaProxy:
    """Passes every request on to Letta; can hold Letta's answer to messages/async."""

    def __init__(self, target: str, hold_submit_s: float | tuple[float, float] = 0.0,
                 seed: int = 0) -> None:
        self.target = target.rstrip("/")
        self.hold_submit_s = hold_submit_s  # seconds, or a (min, max) range drawn per answer
        self.rng = random.Random(seed)
        self.on_submit_answered = None  # async callback, run while the answer is held
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._close)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(request.method, self.target + request.path_qs,
                                         data=await request.read(), headers=headers) as r:
            body = await r.read()
            status = r.status
            out_headers = {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}
        if request.path.endswith("/messages/async") and status < 300:
            if self.on_submit_answered is not None:
                await self.on_submit_answered(body)
            hold = self.hold_submit_s
            await asyncio.sleep(self.rng.uniform(*hold) if isinstance(hold, tuple) else hold)
        return web.Response(body=body, status=status, headers=out_headers)

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
