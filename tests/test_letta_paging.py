"""Paging Letta's run listings: the simulator's cursors against Letta 0.16.8's, and the client
paging every listing onward whichever way a Letta reads `before` and `after`; and the client's
reading of Letta's transient refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import tracker.letta
import tracker.poller
from tests.conftest import eventually, make_config
from tracker.errors import LettaError, LettaUnavailable
from tracker.letta import LettaClient
from tracker.letta_http import Answer
from tracker.manager import Manager
from tracker.poller import Poller, _Paging
from tracker.simulator import Faults, Simulator

PAGE = 3
DIRECTIONS = pytest.mark.parametrize("documented", [False, True],
                                     ids=["letta-0.16.8", "documented"])


@pytest.fixture
async def sim(aiohttp_server):
    """conftest's simulator, which also meets a database lock or deadlock at the next submits
    when told to (``sim.locks``: for each, whether the run was committed before it)."""
    s = Simulator(seed=7, faults=Faults(run_duration_s=(0.05, 0.15), callback_lag_s=0.05))
    s.locks = []
    app = s.app()
    app.middlewares.append(database_lock(s))
    s.server = await aiohttp_server(app)
    s.url = str(s.server.make_url("")).rstrip("/")
    return s


def database_lock(sim):
    """Letta's answer to a database lock or deadlock (app.py's handlers): 409, Retry-After: 1."""

    @web.middleware
    async def lock(request: web.Request, handler):
        if not (request.method == "POST" and request.path.endswith("/messages/async")
                and sim.locks):
            return await handler(request)
        if sim.locks.pop(0):
            await handler(request)
        detail = "A database deadlock was detected. Please retry your request."
        return web.json_response({"detail": detail}, status=409, headers={"Retry-After": "1"})

    return lock


@pytest.fixture
async def letta(sim):
    client = LettaClient(sim.url)
    await client.start()
    yield client
    await client.close()


@pytest.fixture
def small_pages(monkeypatch) -> None:
    for module in (tracker.letta, tracker.poller):
        monkeypatch.setattr(module, "PAGE", PAGE)


async def send(letta: LettaClient, agent: str, n: int, text: str = "hi") -> list[str]:
    """``n`` runs sent to the simulator, one after the other: their ids, oldest first."""
    body = {"messages": [{"role": "user", "content": text}]}
    return [(await letta.send_async(agent, body))["id"] for _ in range(n)]


async def finished(sim, run_ids: list[str]) -> None:
    await eventually(lambda: all(sim.store.get(i).status == "completed" for i in run_ids))


def listings(letta: LettaClient) -> int:
    return letta.calls[("list_runs", 200)]


# -- the simulator ---------------------------------------------------------------------------


async def test_the_runs_listing_cursors_move_as_in_letta_0_16_8_or_as_documented(
        sim, letta, agent):
    """Letta 0.16.8 filters `after` with forward=not ascending and `before` with
    forward=ascending (run_manager_helper): `before` gives the runs beyond the cursor in the
    listing's order, `after` those on its near side. Its docs say the reverse; the simulator
    does that when asked (documented_cursors)."""
    runs = await send(letta, agent, 5)

    async def ids(*params: tuple[str, str]) -> list[str]:
        return [r["id"] for r in await letta.list_runs([("agent_id", agent), *params])]

    for documented in (False, True):
        sim.store.documented_cursors = documented
        onward, near = ("after", "before") if documented else ("before", "after")
        assert await ids() == runs[::-1]
        assert await ids((onward, runs[2])) == [runs[1], runs[0]]
        assert await ids((near, runs[2])) == [runs[4], runs[3]]
        assert await ids((onward, runs[2]), ("order", "asc")) == [runs[3], runs[4]]
        assert await ids((near, runs[2]), ("order", "asc")) == [runs[0], runs[1]]
        assert await ids((onward, runs[4]), (near, runs[0])) == [runs[3], runs[2], runs[1]]
        assert await ids((onward, runs[2]), ("limit", "1")) == [runs[1]]


async def test_the_runs_listing_takes_every_agent_of_agent_ids(sim, letta):
    """Letta filters by all of the (deprecated) `agent_ids` (`agent_id IN (...)`), unless
    `agent_id` is given, which wins; the simulator read the first one only."""
    a1, a2, a3 = (sim.create_agent(name)["id"] for name in ("a1", "a2", "a3"))
    runs = {a: await send(letta, a, 2, "[[delay=60]] busy") for a in (a1, a2, a3)}

    async def ids(*params: tuple[str, str]) -> set[str]:
        return {r["id"] for r in await letta.list_runs(list(params))}

    both = {*runs[a1], *runs[a2]}
    assert await ids(("agent_ids", a1), ("agent_ids", a2)) == both
    assert await ids(("agent_ids", a1), ("agent_ids", a2), ("active", "true")) == both
    newest = {runs[a2][1], runs[a2][0], runs[a1][1]}
    assert await ids(("agent_ids", a2), ("agent_ids", a1), ("limit", "3")) == newest
    assert await ids(("agent_id", a3), ("agent_ids", a1), ("agent_ids", a2)) == set(runs[a3])
    assert await ids(("agent_ids", a3)) == set(runs[a3])


# -- the client against the simulator --------------------------------------------------------


@DIRECTIONS
async def test_every_active_run_is_listed_a_call_a_page(sim, letta, agent, small_pages,
                                                         documented):
    """Seven active runs among finished ones, three a page: three calls. Against the
    documented direction the first onward page is asked again with `after`, once in the
    client's life. (Paged with `after` against 0.16.8, the second page was the first one's
    oldest runs: the rest were never listed.)"""
    sim.store.documented_cursors = documented
    active, ended = [], []
    for _ in range(7):
        ended += await send(letta, agent, 1)
        active += await send(letta, agent, 1, "[[delay=60]] busy")
    await finished(sim, ended)
    assert await letta.active_run_ids() == set(active)
    assert listings(letta) == 3 + documented
    assert await letta.active_run_ids() == set(active)
    assert listings(letta) == 2 * 3 + documented


@DIRECTIONS
async def test_the_sweep_pages_finished_runs_onward_each_page_once(
        sim, letta, agent, small_pages, store, tmp_path: Path, documented):
    """The poller's sweep finds finished runs chunk after chunk, newest first, its paging going
    on where the last chunk's stopped: ten runs, four pages, a call each (one more against the
    documented direction, once), and none once it ended. (Paged with `after` against 0.16.8,
    the second page was the newest runs again, short: the listing seemed to end and older runs
    took a call each.)"""
    sim.store.documented_cursors = documented
    runs = await send(letta, agent, 10)
    await finished(sim, runs)
    cfg = make_config(tmp_path)
    poller = Poller(cfg, Manager(cfg, store, letta, lambda run_id: f"/cb/{run_id}"), letta)
    paging = _Paging()
    for chunk in (runs[6:], runs[3:6], runs[:3]):  # newest first, as the sweep's chunks
        found = await poller._finished_runs(set(chunk), paging)
        assert found.keys() == set(chunk)
    assert paging.ended and listings(letta) == 4 + documented  # the fourth page, short
    assert await poller._finished_runs({"run-gone"}, paging) == {}
    assert listings(letta) == 4 + documented


# -- the client against a SQLite-backed Letta ------------------------------------------------


def sqlite_letta(runs: list[dict], documented: bool) -> web.Application:
    """Letta's runs listing on SQLite (0.16.8's cursors, or the documented ones): the
    cursor's created_at is cut to whole seconds, as a string, and compared with the stored
    ones, so that onward pages repeat (asc) or skip (desc) the cursor's same-second runs."""

    def page(query) -> list[dict]:
        asc = query.get("order") == "asc"
        listed = sorted(runs, key=lambda r: (r["created_at"], r["id"]), reverse=not asc)
        for name in ("before", "after"):
            cursor = next((r for r in runs if r["id"] == query.get(name)), None)
            if cursor is not None:
                forward = asc if (name == "before") != documented else not asc
                listed = [r for r in listed if _cursor_filter(r, cursor, forward)]
        return listed[:int(query["limit"])]

    async def list_runs(request: web.Request) -> web.Response:
        return web.json_response(page(request.query))

    app = web.Application()
    app.router.add_get("/v1/runs/", list_runs)
    return app


def _cursor_filter(run: dict, cursor: dict, forward: bool) -> bool:
    # agent_manager_helper._cursor_filter, with the cut time 0.16.8 gives it on SQLite
    cut = cursor["created_at"][:19]
    if forward:
        return run["created_at"] > cut or run["created_at"] == cut and run["id"] > cursor["id"]
    return run["created_at"] < cut or run["created_at"] == cut and run["id"] < cursor["id"]


def same_second_runs(seconds: int, each: int) -> list[dict]:
    """``each`` active runs in each of ``seconds`` seconds, oldest first."""
    return [{"id": f"run-{s:02d}{i:02d}", "status": "running",
             "created_at": f"2026-01-01 00:00:{s:02d}.{i + 1:06d}"}
            for s in range(seconds) for i in range(each)]


@pytest.fixture
async def on_sqlite(aiohttp_server, small_pages):
    """A client of a SQLite-backed Letta holding ``runs``."""
    clients = []

    async def start(runs: list[dict], documented: bool) -> LettaClient:
        server = await aiohttp_server(sqlite_letta(runs, documented))
        client = LettaClient(str(server.make_url("")))
        await client.start()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


@DIRECTIONS
async def test_onward_pages_that_repeat_the_cursors_second_list_every_run(on_sqlite,
                                                                         documented):
    """Two active runs a second, three a page: each onward page begins with the cursor's
    second again, and still moves on."""
    runs = same_second_runs(5, 2)
    letta = await on_sqlite(runs, documented)
    assert await letta.active_run_ids() == {r["id"] for r in runs}
    assert listings(letta) == 5 + documented


async def test_more_than_a_page_in_one_second_ends_the_listing(on_sqlite):
    """Five runs in one second, three a page: no cursor gets past them, whichever way it
    reads. The listing ends with what it has (the runs it misses take a call each) instead of
    asking for the same page forever."""
    for documented in (False, True):
        letta = await on_sqlite(same_second_runs(1, 5), documented)
        async with asyncio.timeout(5):
            assert len(await letta.active_run_ids()) == PAGE
        assert listings(letta) <= 3


# -- Letta's transient refusals ---------------------------------------------------------------


def test_a_4xx_with_retry_after_is_letta_unavailable_for_that_long():
    """Letta's 409 for a database lock or deadlock says Retry-After: 1; its other 409s (a
    conversation busy, an approval pending, nothing to cancel) say no such thing."""
    locked = Answer(409, {"retry-after": "1"}, b'{"detail": "locked"}')
    with pytest.raises(LettaUnavailable) as e:
        LettaClient._answered(locked)
    assert (e.value.retry_after, e.value.sent) == (1.0, True)
    with pytest.raises(LettaError) as refused:
        LettaClient._answered(Answer(409, {}, b'{"detail": "busy"}'))
    assert refused.value.status == 409


@pytest.mark.parametrize("header, wait", [("0", 1.0), ("Thu, 01 Jan 1970 00:00:00 GMT", 1.0),
                                          ("9" * 400, 600.0),
                                          ("Fri, 31 Dec 9999 23:59:59 GMT", 600.0)],
                         ids=["zero", "past date", "huge", "far date"])
def test_retry_after_is_kept_within_bounds(header: str, wait: float):
    """0 (or a past date) had the run sent again as fast as Letta answered; a far one paused
    the poller, every run's polling with it, until a restart."""
    with pytest.raises(LettaUnavailable) as e:
        LettaClient._answered(Answer(429, {"retry-after": header}, b'{"detail": "slow"}'))
    assert e.value.retry_after == wait


@pytest.mark.parametrize("body, answered", [(b'{"detail": "boom"}', True),
                                            (b"<html>500 Internal Server Error</html>", False)],
                         ids=["letta's", "a proxy's"])
def test_a_5xx_is_lettas_answer_only_in_lettas_words(body: bytes, answered: bool):
    """A proxy's own 500 page counted as Letta's answer: the run was looked up after a second,
    where Letta, still at work on the request behind the proxy, may create it later."""
    with pytest.raises(LettaUnavailable) as e:
        LettaClient._answered(Answer(500, {}, body))
    assert (e.value.sent, e.value.answered) == (True, answered)


@pytest.mark.parametrize("status", [301, 307, 308, 408, 425])
def test_a_redirect_or_request_timeout_is_not_a_refusal(status: int):
    """A proxy redirecting http to https, a server's parting 408 read as the answer to the
    request just written: neither processed the request, and each rejected the message."""
    answer = Answer(status, {"location": "https://letta.example/v1/x"}, b"")
    with pytest.raises(LettaUnavailable) as e:
        LettaClient._answered(answer)
    assert e.value.sent is False


@pytest.mark.parametrize("body", [b"", b"<html>ok</html>", b"\x1f\x8b\x08\x00gzipped"])
def test_a_2xx_that_is_not_json_is_not_an_answer(body: bytes):
    """A proxy's page, a gzipped body or nothing was returned as data: a send's answer was
    read as a run without an id, a listing as a dict whose keys were runs."""
    with pytest.raises(LettaUnavailable) as e:
        LettaClient._answered(Answer(200, {}, body))
    assert (e.value.sent, e.value.answered) == (True, False)
    assert LettaClient._answered(Answer(200, {}, b'{"id": "run-1"}')) == {"id": "run-1"}


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not committed"])
async def test_a_database_lock_at_submit_is_retried_not_rejected(start_tracker, sim, agent,
                                                                 committed):
    """Letta's 409 with Retry-After rejected the run for good. The lock may have broken the
    request after the run was committed: the run is looked for at Letta before it is sent
    again, and ends submitted once either way."""
    sim.locks.append(committed)
    t = await start_tracker()
    run = await t.submit(agent)
    assert run["tracker"]["state"] == "queued"
    done = await t.wait_state(run["id"], "done")
    assert done["status"] == "completed" and len(sim.received) == 1
    events = await (await t.get(f"/v1/runs/{run['id']}/events")).json()
    assert ("found_in_letta" in [e["kind"] for e in events]) == committed


# -- the simulator's run messages --------------------------------------------------------------


async def test_a_page_letta_lists_short_of_its_stored_rows_is_not_the_last(aiohttp_server,
                                                                          small_pages):
    """Letta's limit counts stored rows, then drops each legacy send_message return whose
    call is on the same page: a full page of 3 rows listed 2 messages, taken for the last
    page, and the rest of the run (its answer) was never read."""
    rows = [f"message-{i}" for i in range(10)]  # odd rows: returns of the row before's call

    async def messages(request: web.Request) -> web.Response:
        after = request.query.get("after")
        start = rows.index(after) + 1 if after else 0
        page = rows[start:start + int(request.query["limit"])]
        shown = [r for i, r in enumerate(page) if not (i and int(r[-1]) % 2)]
        return web.json_response([{"id": r} for r in shown])

    got = [m["id"] for m in await messages_from(aiohttp_server, messages)]
    # each page's rows but the returns whose calls it holds: pages 0-2, 3-5, 5-7, 7-9, 9
    assert got == [f"message-{i}" for i in (0, 2, 3, 4, 5, 6, 7, 8, 9)]


async def test_the_run_messages_cursors_bound_the_sequence_whatever_the_order(sim, letta,
                                                                             agent):
    """Letta keeps the messages whose sequence_id is greater than `after`'s and less than
    `before`'s, in either order; the simulator read them as positions in a newest-first
    list, the other way."""
    texts = [{"role": "user", "content": t} for t in ("one", "two", "three")]
    run = await letta.send_async(agent, {"messages": texts})
    await finished(sim, [run["id"]])
    ids = [m["id"] for m in await letta.run_messages(run["id"])]
    assert len(ids) == 4

    async def page(**params: str) -> list[str]:
        url = f"{sim.url}/v1/runs/{run['id']}/messages"
        async with aiohttp.ClientSession() as session, session.get(url, params=params) as got:
            return [m["id"] for m in await got.json()]

    assert await page(order="desc", after=ids[0], limit="2") == [ids[3], ids[2]]
    assert await page(order="desc", before=ids[3]) == [ids[2], ids[1], ids[0]]
    assert await page(order="desc", after=ids[0], before=ids[3]) == [ids[2], ids[1]]
    assert await page(order="asc", after=ids[0], limit="2") == [ids[1], ids[2]]
    assert await page(order="asc", before=ids[3]) == ids[:3]


async def test_a_messages_cursor_that_does_not_move_ends_the_paging(aiohttp_server, small_pages):
    """A Letta (or proxy) that ignores `after` answers the same full page each time: the
    paging went on for ever, its list growing."""
    asked = []

    async def messages(request: web.Request) -> web.Response:
        asked.append(request.query.get("after"))
        return web.json_response([{"id": f"message-{i}"} for i in range(PAGE)])

    got = await messages_from(aiohttp_server, messages)
    assert len(asked) == 2 and len(got) == 2 * PAGE


async def messages_from(aiohttp_server, handler) -> list[dict]:
    """``LettaClient.run_messages`` of a Letta whose messages route is ``handler``."""
    app = web.Application()
    app.router.add_get("/v1/runs/{run_id}/messages", handler)
    server = await aiohttp_server(app)
    client = LettaClient(str(server.make_url("")).rstrip("/"))
    await client.start()
    try:
        return await asyncio.wait_for(client.run_messages("run-1"), 5)
    finally:
        await client.close()
