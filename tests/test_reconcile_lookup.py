"""Looking a send cut off mid-way up at Letta: found there however many runs of its agent
Letta took after it, and the look one call while it is among the agent's newest."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import aiohttp
import pytest

from tests.test_completion import _died_after_letta_got_it, kinds
from tracker import clock
from tracker.letta import LettaClient
from tracker.reconcile import find_in_letta


async def _submit_straight(sim, agent: str, n: int) -> None:
    """``n`` runs of ``agent`` sent to Letta by someone else, not through the tracker."""
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            body = {"messages": [{"role": "user", "content": f"someone else's {i}"}]}
            async with session.post(f"{sim.url}/v1/agents/{agent}/messages/async",
                                    json=body) as resp:
                assert resp.status == 200, await resp.text()


def _count_listings(monkeypatch) -> list[tuple[int, bool]]:
    """The agent run listings the tracker asks Letta for: (limit, whether paged onward)."""
    listings: list[tuple[int, bool]] = []
    original = LettaClient.agent_runs

    async def counted(self, agent_id, limit, *last):
        listings.append((limit, bool(last)))
        return await original(self, agent_id, limit, *last)

    monkeypatch.setattr(LettaClient, "agent_runs", counted)
    return listings


@pytest.mark.parametrize(("newer", "listings"), [(0, [100]), (150, [100, 1000])],
                         ids=["among the newest", "behind 150 newer"])
async def test_a_run_cut_off_mid_send_is_found_behind_the_newer_runs_of_its_agent(
        start_tracker, sim, agent, monkeypatch, newer, listings):
    """Letta took the run and the tracker died before recording its answer; then others sent
    the agent more runs than Letta's first page holds. Start-up's look pages on past them,
    finds the run by its callback URL and attaches it: sent once. Found among the newest, the
    look is one listing; behind them, one more, of Letta's biggest page."""
    run = await _died_after_letta_got_it(start_tracker, sim, agent)
    await _submit_straight(sim, agent, newer)
    looks = _count_listings(monkeypatch)
    t = await start_tracker()
    done = await t.wait_state(run["id"], "done")
    ours = [r for r in sim.received if "someone else's" not in r.raw.decode()]
    assert len(ours) == 1 and max(sim.otid_counts().values()) == 1
    assert len(sim.received) == newer + 1
    assert done["tracker"]["letta_run_id"] == ours[0].run_id
    assert "found_in_letta" in await kinds(t, run["id"])
    # the second onward from a cursor, or, the first page all of one second, from the newest
    assert [limit for limit, _ in looks] == listings and not looks[0][1]


async def test_a_run_cut_off_mid_send_is_found_on_a_letta_that_cuts_cursors_to_seconds(
        start_tracker, sim, agent):
    """A SQLite-backed Letta cuts a listing cursor's time to its whole second: paged onward
    from the first page's last run, the look skipped the other runs of that second, ours
    among them when 150 newer came in the same second: not found, and sent twice."""
    sim.store.second_cursors = True
    run = await _died_after_letta_got_it(start_tracker, sim, agent)
    await _submit_straight(sim, agent, 150)
    # ours and the 150 in one second, in the order Letta took them
    runs = sorted((r for r in sim.store.runs() if r.agent_id == agent), key=lambda r: r.seq)
    second = runs[0].created_at.replace(microsecond=0)
    for i, r in enumerate(runs):
        r.created_at = second + timedelta(microseconds=1000 * (i + 1))
    t = await start_tracker()
    done = await t.wait_state(run["id"], "done")
    ours = [r for r in sim.received if "someone else's" not in r.raw.decode()]
    assert len(ours) == 1 and done["tracker"]["letta_run_id"] == ours[0].run_id
    assert "found_in_letta" in await kinds(t, run["id"])


@pytest.mark.parametrize(("apart_s", "pages"), [(0.1, 4), (0.0, 20)],
                         ids=["back to ours", "bounded"])
async def test_the_look_for_a_run_never_sent_stops_where_it_could_not_be(apart_s, pages):
    """A run Letta never got: the look pages back to the agent's runs created 5 minutes
    before ours (our clocks may disagree that much), here 4 pages, a run every 0.1 s; with
    no end to runs that recent, it stops at 20 pages, however many Letta still has."""
    now = clock.now()

    class Letta:  # an agent whose runs never end, one each apart_s back from now
        listed: list[int] = []

        async def agent_runs(self, agent_id, limit, last=None):
            self.listed.append(limit)
            start = 0 if last is None else last["n"] + 1
            return [{"id": f"run-{n}", "n": n, "created_at": clock.iso(now - n * apart_s),
                     "callback_url": "http://t/callbacks/letta/other"}
                    for n in range(start, start + limit)]

    letta = Letta()
    manager = SimpleNamespace(letta=letta, callback_url=lambda run_id: "http://t/cb")
    run = SimpleNamespace(id="run-1", agent_id="agent-1", created_at=clock.iso(now), request={})
    assert await find_in_letta(manager, run) is None
    assert letta.listed == [100] + [1000] * (pages - 1)
