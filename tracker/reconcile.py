"""Recovery: find again the Letta run a send may have created, and heal what a crash left.

A run caught between "sent to Letta" and "Letta's answer stored" must never be sent twice:
its Letta run is found by our callback URL (unique per run) or by the otids we set.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tracker import clock
from tracker.errors import Conflict, NotFound
from tracker.states import Source, State
from tracker.store import RunRecord

if TYPE_CHECKING:  # the manager's cancel looks runs up here too
    from tracker.manager import Manager
    from tracker.poller import Poller

log = logging.getLogger("tracker.reconcile")

#: runs per agent in the first page of the look for a lost send: ours is nearly always
#: among the newest, and the look then costs one call
LOOKBACK = 100
#: runs per page past the first (Letta's most), and pages at most: the look never runs away
#: (other clients, or many runs of the agent sent meanwhile, may bury ours deep)
DEEP_PAGE, MAX_PAGES = 1000, 20
#: how much earlier than our row Letta's run may seem created, our clocks disagreeing: the
#: paging stops at runs older than that, which ours cannot be among
SKEW_S = 300.0
#: created-time slack between our clock and Letta's when matching by otid
CLOCK_SLACK_S = 5.0


def names_token(callback_url: object, token: str) -> bool:
    """Whether a Letta run's callback_url is the one we gave it for the run of ``token``. The
    token is compared, not the whole URL: its base changes with ``callbacks.workers``, the port
    or ``callbacks.public_url``, from one start of the tracker to the next."""
    return str(callback_url).endswith(f"/callbacks/letta/{token}")


async def find_in_letta(manager: Manager, run: RunRecord) -> dict | None:
    """The Letta run this run became, if it did: by our callback URL's token, else by otid."""
    candidates = await manager.letta.agent_runs(run.agent_id, LOOKBACK)
    token = manager.callback_url(run.id).rpartition("/")[2]
    found = await _by_token(manager, run, candidates, token)
    return found or await _by_otid(manager, run, candidates[:10])


async def _by_token(manager: Manager, run: RunRecord, page: list[dict],
                    token: str) -> dict | None:
    """The agent's Letta run named by ``token``, from ``page`` (its newest) onward, page by
    page, back to the runs created before ours could have been sent, or Letta's last."""
    since = (clock.epoch(run.created_at) or 0) - SKEW_S
    limit, pages = LOOKBACK, 1
    while True:
        found = next((r for r in page if names_token(r.get("callback_url"), token)), None)
        if found or len(page) < limit or _created(page[-1]) < since:
            return found
        if pages == MAX_PAGES:
            log.warning("lookup of run %s stopped after %d pages of agent %s's runs at Letta;"
                        " taken for not sent", run.id, pages, run.agent_id)
            return None
        page = await _next_page(manager, run.agent_id, page, limit)
        limit, pages = DEEP_PAGE, pages + 1


async def _next_page(manager: Manager, agent_id: str, page: list[dict],
                     limit: int) -> list[dict]:
    """The agent's runs after ``page`` (newest first). A SQLite-backed Letta cuts a cursor's
    time to its whole second, so a page onward from the page's last run left out the other
    runs of that run's second, ours perhaps (sent twice, then). The cursor is the page's newest
    run of a later second than its last: the runs between come again, which costs nothing
    here. A first page all of one second is read again, deeper, with no cursor."""
    last_second = int(_created(page[-1]))
    cursor = next((r for r in reversed(page) if int(_created(r)) > last_second), None)
    if cursor is None:
        if limit < DEEP_PAGE:
            return await manager.letta.agent_runs(agent_id, DEEP_PAGE)
        cursor = page[-1]  # more than Letta's biggest page in one second: no better cursor
    return await manager.letta.agent_runs(agent_id, DEEP_PAGE, cursor)


def _created(letta_run: dict) -> float:
    return clock.epoch(letta_run.get("created_at")) or 0.0


async def _by_otid(manager: Manager, run: RunRecord, candidates: list[dict]) -> dict | None:
    """The candidate carrying one of the otids we set on the run's messages, if any."""
    otids = {m.get("otid") for m in (run.request or {}).get("messages") or []} - {None}
    created = (clock.epoch(run.created_at) or 0) - CLOCK_SLACK_S
    for r in candidates:
        if otids and _created(r) >= created:
            try:
                messages = await manager.letta.run_messages(r["id"])
            except NotFound:
                continue  # deleted since the listing: Letta holds nothing of it any more
            if otids & {m.get("otid") for m in messages}:
                return r
    return None


async def attach_or_requeue(manager: Manager, run: RunRecord, source: str) -> bool:
    """For a run that may have reached Letta: attach it to its Letta run, or queue it to be
    sent again (it never arrived, so this is not a second send)."""
    found = await find_in_letta(manager, run)
    if found is not None:
        try:
            await manager.mark_submitted(run, found, source, "found_in_letta")
            return True
        except Conflict:
            # another tracker run's Letta run, matched by otid: a client that set the same
            # otids on two messages; ours is not at Letta (its callback token is nowhere)
            pass
    if run.id in manager.called_back:
        # its callback came meanwhile, which Letta could not vouch for (``Manager.look_now``):
        # Letta has the run, and this look missed it; sent again, it went twice. Look again
        await manager.requeue(run, clock.now() + manager.cfg.dispatch.retry_min_s,
                              needs_lookup=True, error="not found in Letta, but its callback"
                              " came: looked for again", kind="not_found_in_letta",
                              source=source)
        return False
    await manager.requeue(run, clock.now(), needs_lookup=False, error=None,
                          kind="not_found_in_letta", source=source)
    return False


async def reconcile(manager: Manager, poller: Poller) -> dict[str, int]:
    """On start-up: queue runs cut off mid-send to be looked up at Letta (the dispatcher
    looks, then attaches or sends them), and check every submitted run at once."""
    counts = {"requeued": 0, "checked": 0}
    for run in await manager.store.in_states((State.SUBMITTING,)):
        if run.id in manager.sending:
            continue  # a submit since start-up, sending it now: not cut off
        # cut off mid-send: a Letta slow to take it may create it after a quick restart, so
        # a look now could miss it and send it again; looked up as a send that got no
        # answer is, no sooner than dispatch.lookup_after_s (unless its callback came)
        await manager.requeue(run, manager.look_at(run.id), needs_lookup=True,
                              error="cut off mid-send", kind="cut_off", source=Source.RECONCILE)
        counts["requeued"] += 1
    counts["checked"] = await poller.sweep()
    manager.dispatch_wakeup.set()
    return counts
