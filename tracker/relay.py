"""The relay: delivers each run's outcome to the user's own callback_url, signed and retried.

Deliveries come from the outbox table, written in the same transaction as the run's state
change, so a crash loses none. An attempt cut off by a crash or a stop stays pending and is sent
again on the next start with the same ``webhook-id``, so receivers can drop the duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver

from tracker import clock
from tracker.auth import new_webhook_secret
from tracker.config import Config
from tracker.relay_guard import GuardedResolver, RefusedDestination, check_url, destination
from tracker.relay_message import callback_body, encode, secrets_of, signed_headers
from tracker.relay_policy import Outcome, from_response, next_step
from tracker.store import Delivery, Store

log = logging.getLogger("tracker.relay")

#: rows read per page beyond those in flight
CLAIM_WINDOW_PER_SLOT = 16
#: pages read per loop at most. Rows of a destination at its limit are skipped, and one whose
#: webhook hangs may have thousands due: the loop reads on past them while slots are free, but
#: no further than this, so that such a backlog does not make every loop read all of it
SCAN_PAGES_PER_LOOP = 8
IDLE_S = 30.0
ERROR_PAUSE_S = 5.0
#: the longest a delivery whose attempts cannot be recorded is held back (doubling from
#: ERROR_PAUSE_S): the receiver is not sent it every few seconds while the store fails
HELD_MAX_S = 300.0
STOP_GRACE_S = 2.0


class Relay:
    """Background sender of outbox deliveries, bounded globally and per destination."""

    def __init__(self, cfg: Config, store: Store, wakeup: asyncio.Event,
                 resolver: AbstractResolver | None = None) -> None:
        self.r = cfg.relay
        self.store = store
        self.wakeup = wakeup
        self._dns = resolver  # where names are looked up (default: getaddrinfo); checked after
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, asyncio.Task] = {}
        #: finished while the loop's read of due deliveries was under way: that read may
        #: predate their recorded attempt, so they are not claimed from it
        self._finished_during_read: set[str] = set()
        self._busy: Counter[str] = Counter()
        self._users: Counter[str] = Counter()  # attempts in flight per user
        #: deliveries whose last attempt could not be recorded (the database failing), held
        #: back with that attempt; in memory, as nothing else can be written
        self._held: dict[str, _Held] = {}
        #: where the last loop's read stopped short of the end of what is due; the next one
        #: goes on from there, so a backlog longer than a loop's pages is crossed, not a wall
        self._sweep: Delivery | None = None
        self._loop_task: asyncio.Task | None = None
        self._resolver: GuardedResolver | None = None
        self.on_outcome: Callable[[str], None] | None = None  # metrics hook

    async def start(self) -> None:
        """Open the relay's own HTTP session, whose resolver enforces the SSRF guard."""
        # a thread per attempt slot: a lookup never waits for one that another attempt's
        # hung name holds (with 4, one user's hung names held them all, and every other
        # user's lookups waited, their attempts timing out)
        self._resolver = GuardedResolver(self.r.allow_private, self._dns,
                                         threads=self.r.concurrency)
        connector = aiohttp.TCPConnector(
            resolver=self._resolver,
            limit=self.r.concurrency, limit_per_host=self.r.per_destination)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.r.timeout_s),
            # no proxy from the environment: the guard must see the address really dialled;
            # no cookies: one user's endpoint must not set cookies sent to another's
            trust_env=False, cookie_jar=aiohttp.DummyCookieJar())

    async def run(self) -> None:
        """Loop: start the due deliveries, sleep until woken or the next one is due."""
        if self._session is None:
            await self.start()
        self._loop_task = asyncio.current_task()
        while True:
            self.wakeup.clear()
            self._finished_during_read.clear()
            try:
                await self._claim_due()
                wait = await self._idle_for()
            except Exception:
                log.exception("relay loop error; retrying")
                wait = ERROR_PAUSE_S
            await clock.nap(self.wakeup, wait)

    async def _claim_due(self) -> None:
        """Start what is due and the limits allow, oldest first, reading page after page."""
        now = clock.now()
        last = self._past_sweep(await self._page(now, None))
        for _ in range(SCAN_PAGES_PER_LOOP - 1):
            if last is None or len(self._inflight) >= self.r.concurrency:
                break
            last = await self._page(now, last)
        self._sweep = last

    async def _page(self, now: float, after: Delivery | None) -> Delivery | None:
        """Claim from one page of due deliveries; its last row if more may follow."""
        limit = self._window()
        due = await self.store.due_deliveries(now, limit, after)
        self._claim(due)
        return due[-1] if len(due) == limit else None

    def _past_sweep(self, last: Delivery | None) -> Delivery | None:
        # the oldest page is always read first (retries fall due there); the rest from where
        # the last loop stopped, unless the oldest page already reaches past it
        sweep = self._sweep
        if last is None or sweep is None or sweep.next_attempt_at <= last.next_attempt_at:
            return last
        return sweep

    def _window(self) -> int:
        return len(self._inflight) + self.r.concurrency * CLAIM_WINDOW_PER_SLOT

    def _claim(self, due: list[Delivery]) -> None:
        """Start what the limits allow; the rest stays pending for a later loop."""
        # admission here rather than tasks parked on semaphores: a parked task would hold its
        # row, and a dead destination's backlog would pile up as tasks
        for d in due:
            if len(self._inflight) >= self.r.concurrency:
                return
            dest = destination(d.url)
            if (d.id not in self._inflight and d.id not in self._finished_during_read
                    and self._busy[dest] < self.r.per_destination
                    and self._users[d.user_id] < self.r.per_user
                    and (d.id not in self._held or self._held[d.id].until <= clock.now())):
                self._start(d, dest)

    def _start(self, d: Delivery, dest: str) -> None:
        task = asyncio.create_task(self._send(d), name=f"tracker-relay-{d.id}")
        self._inflight[d.id] = task
        self._busy[dest] += 1
        self._users[d.user_id] += 1
        task.add_done_callback(lambda _: self._finished(d.id, dest, d.user_id))

    def _finished(self, delivery_id: str, dest: str, user_id: str) -> None:
        # only now, with the attempt recorded (its row rescheduled or closed), may the loop
        # see this delivery again: this is what keeps one in flight from being picked twice
        del self._inflight[delivery_id]
        self._finished_during_read.add(delivery_id)  # the wake-up below reads again
        for count, key in ((self._busy, dest), (self._users, user_id)):
            count[key] -= 1
            if not count[key]:
                del count[key]
        self.wakeup.set()

    async def _idle_for(self) -> float:
        nxt = await self.store.next_delivery_due()
        now = clock.now()
        self._forget_old_holds(now)
        held = min((h.until for h in self._held.values() if h.until > now), default=math.inf)
        if nxt is None or nxt <= now:
            # nothing pending, or all that is due waits for a slot (a finishing attempt, or a
            # new delivery, sets the wakeup) or is held back
            return min(held - now, IDLE_S)
        return min(nxt - now, held - now, IDLE_S)

    def _forget_old_holds(self, now: float) -> None:
        # a hold is dropped when its delivery's attempt is recorded; one whose delivery went
        # meanwhile (pruned with its run) would stay for good: none is still needed a longest
        # pause after it ended (the delivery is then held anew, from the shortest pause)
        for d_id in [d_id for d_id, h in self._held.items() if h.until + HELD_MAX_S < now]:
            del self._held[d_id]

    async def _send(self, d: Delivery) -> None:
        """One attempt at ``d``: check, sign, POST; record it, then schedule the next or
        finish. An attempt whose outcome could not be recorded (the store failing) is not
        made again: its outcome is recorded when the delivery next comes due."""
        held = self._held.get(d.id)
        if held:
            outcome, at = held.outcome, held.at
            d.body = d.body or held.body  # the message that attempt sent, kept with its record
        else:
            at = clock.iso()
            try:
                outcome = await self._attempt(d)
            except Exception as e:
                log.exception("delivery %s: attempt failed unexpectedly", d.id)
                # counted as an attempt, on the schedule: a fault that repeats (a bug, a URL
                # the checks let by) must not retry the delivery forever, holding its slot
                outcome = Outcome(error=f"internal error: {e!r}")
        try:
            await self._record(d, outcome, at)
        except Exception as e:
            # the receiver's answer (a 2xx, say) kept: sent again, or recorded as failed, it
            # would be told twice, or the delivery end failed though delivered. Held back,
            # longer each time, while the store fails
            log.warning("delivery %s: attempt %d's outcome not recorded (%s); recorded when it"
                        " comes due again", d.id, d.attempts + 1, e, extra={"run_id": d.run_id})
            pause = min(2 * held.pause if held else ERROR_PAUSE_S, HELD_MAX_S)
            self._held[d.id] = _Held(clock.now() + pause, pause, outcome, at, d.body)

    async def _record(self, d: Delivery, outcome: Outcome, at: str) -> None:
        state, next_at = next_step(d.attempts + 1, outcome, self.r.retry_schedule_s, clock.now())
        await self.store.record_attempt(d.id, outcome.record(at), state, next_at,
                                        claimed_at=d.next_attempt_at, body=d.body)
        self._held.pop(d.id, None)
        if self.on_outcome:
            self.on_outcome(str(state))
        log.info("delivery %s: attempt %d -> %s (%s)", d.id, d.attempts + 1, state,
                 outcome.status_code or outcome.error, extra={"run_id": d.run_id})

    async def _attempt(self, d: Delivery) -> Outcome:
        try:
            check_url(d.url, self.r.allow_private)
        except RefusedDestination as e:
            return Outcome(error=str(e), final=True)
        gone = Outcome(error="the run or its user's webhook secret is gone", final=True)
        if d.body is None and d.attempts:
            d.body = await self.store.delivery_body(d.id)
        if d.body is None:
            # the first attempt's body, kept with its record: every attempt under this
            # webhook-id sends the same message, though the run has moved on since
            run = await self.store.get_run(d.run_id, full=True)
            if run is None:
                return gone
            d.body = encode(callback_body(run, d.state))
        secrets = secrets_of(await self.store.get_user(d.user_id))
        if not secrets:
            return gone
        return await self._post(d.url, d.body,
                                signed_headers(secrets, d.id, int(clock.now()), d.body))

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        assert self._session is not None, "Relay.start() was not called"
        started = time.monotonic()
        try:
            async with self._session.post(url, data=body, headers=headers,
                                          allow_redirects=False) as resp:
                return from_response(resp.status, resp.headers.get("Retry-After"),
                                     resp.headers.get("Location"), _ms(started), clock.now())
        except TimeoutError:
            return Outcome(latency_ms=_ms(started),
                           error=f"no answer within {self.r.timeout_s:g}s")
        except aiohttp.ClientError as e:
            return _client_error(e, _ms(started))
        except ValueError as e:  # a URL or host name the client cannot use: never will
            return Outcome(latency_ms=_ms(started), error=f"{type(e).__name__}: {e}",
                           final=True)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the loop, give attempts in flight ``grace_s`` to finish, cancel the rest."""
        if self._loop_task and self._loop_task is not asyncio.current_task():
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        tasks = list(self._inflight.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session:
            await self._session.close()
            self._session = None
        if self._resolver is not None:  # the connector closes only a resolver it made
            await self._resolver.close()
            self._resolver = None


@dataclass
class _Held:
    """A delivery held back, with the attempt whose outcome could not be recorded."""

    until: float  # not attempted again before
    pause: float  # the pause that set ``until``: the next is twice as long
    outcome: Outcome
    at: str  # when the attempt was made
    body: bytes | None  # what it sent


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _client_error(e: aiohttp.ClientError, latency_ms: float) -> Outcome:
    """A failed request; a refused destination or a broken URL is not worth retrying."""
    if isinstance(e, aiohttp.ClientConnectorError) and isinstance(e.os_error,
                                                                  RefusedDestination):
        return Outcome(latency_ms=latency_ms, error=str(e.os_error), final=True)
    final = isinstance(e, aiohttp.InvalidURL)
    return Outcome(latency_ms=latency_ms, error=_error_text(e), final=final)


def _error_text(e: aiohttp.ClientError) -> str:
    """What went wrong, without the URL: aiohttp puts the whole of it in some errors' text,
    and a callback_url's path or query may be its secret (the capability URLs of chat
    services), which reached the log and every attempt's record."""
    if isinstance(e, aiohttp.ClientResponseError):
        text = f"{e.status}, {e.message}"
    elif isinstance(e, aiohttp.InvalidURL):
        text = "not a valid URL"
    else:
        text = str(e)
    return f"{type(e).__name__}: {text}"[:300]


async def rotate_secret(store: Store, user_id: str) -> str:
    """Give the user a new signing secret and return it; deliveries are signed with both the
    new and the previous one until the next rotation, so receivers can switch at leisure."""
    secret = new_webhook_secret()
    await store.rotate_webhook_secret(user_id, secret)
    return secret
