"""Recovery: find again the Letta run a send may have created, and heal what a crash left.

A run caught between "sent to Letta" and "Letta's answer stored" must never be sent twice:
its Letta run is found by our callback URL (unique per run) or by the otids we set.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tracker import clock
from tracker.errors import LettaUnavailable, NotFound
from tracker.states import Source, State
from tracker.store import RunRecord

if TYPE_CHECKING:  # the manager's cancel looks runs up here too
    from tracker.manager import Manager
    from tracker.poller import Poller

log = logging.getLogger("tracker.reconcile")

#: runs per agent Letta lists when looking for a lost send; ours is among the newest
LOOKBACK = 100
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
    for r in candidates:
        if names_token(r.get("callback_url"), token):
            return r
    otids = {m.get("otid") for m in (run.request or {}).get("messages") or []} - {None}
    created = (clock.epoch(run.created_at) or 0) - CLOCK_SLACK_S
    for r in candidates[:10]:
        if otids and (clock.epoch(r.get("created_at")) or 0) >= created:
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
    if found is None:
        await manager.requeue(run, clock.now(), needs_lookup=False, error=None,
                              kind="not_found_in_letta", source=source)
        return False
    await manager.mark_submitted(run, found, source, "found_in_letta")
    return True


async def reconcile(manager: Manager, poller: Poller) -> dict[str, int]:
    """On start-up: re-find runs cut off mid-send, and check every submitted run at once."""
    counts = {"attached": 0, "requeued": 0, "checked": 0}
    for run in await manager.store.in_states((State.SUBMITTING,)):
        try:
            attached = await attach_or_requeue(manager, run, Source.RECONCILE)
        except LettaUnavailable as e:
            log.warning("reconcile: Letta unavailable (%s); run requeued for lookup", e)
            await manager.requeue(run, clock.now(), needs_lookup=True, error=str(e))
            attached = False
        counts["attached" if attached else "requeued"] += 1
    counts["checked"] = await poller.sweep()
    manager.dispatch_wakeup.set()
    return counts
