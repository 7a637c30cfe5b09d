"""Retention: prune runs (with their events, results and deliveries) that finished more than
an age ago, and are not awaiting a webhook retry: a run that waited long before it finished
is kept as long as any other, and the relay's last retries to a user's endpoint that is down
(its default schedule spans ~27 h) are never deleted under it.

The store deletes in batches of ``batch_size`` runs per transaction and yields between them,
so a large first prune never holds the writer long enough to delay requests.
"""

from __future__ import annotations

import asyncio
import logging
import re

from tracker import clock
from tracker.config import RetentionConfig
from tracker.errors import TrackerError
from tracker.store import Store

log = logging.getLogger("tracker.retention")

DAY = 86_400.0
UNITS = {"d": DAY, "h": 3600.0, "m": 60.0, "s": 1.0}
_AGE = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m`` or ``45s`` as seconds; ValueError for anything else."""
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"invalid age {text!r}: use a number and a unit, e.g. 30d, 12h, 90m, 45s")
    seconds = float(match[1]) * UNITS[match[2]]
    if seconds <= 0:
        raise ValueError(f"invalid age {text!r}: must be more than zero")
    return seconds


def cutoff(age_s: float) -> str:
    """The stored-timestamp form of the instant ``age_s`` seconds ago."""
    return clock.iso(clock.now() - age_s)


class Retention:
    """Background pruning every ``interval_s`` when ``keep_days`` is set; off otherwise."""

    def __init__(self, cfg: RetentionConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Prune now, then every ``interval_s``, until ``stop()``."""
        if self.cfg.keep_days is None:
            return
        log.info("retention: keeping finished runs %g days, pruning every %gs",
                 self.cfg.keep_days, self.cfg.interval_s)
        while not self._stopping.is_set():
            try:
                await self.prune_once()
            except Exception:
                log.exception("retention: prune pass failed; retrying next interval")
            await clock.nap(self._stopping, self.cfg.interval_s)

    async def prune_once(self) -> dict[str, int]:
        """One pass: delete runs that finished more than ``keep_days`` ago (and are not awaiting
        a webhook retry); returns rows per table."""
        if self.cfg.keep_days is None:
            return {}
        before = cutoff(self.cfg.keep_days * DAY)
        try:
            removed = await self.store.prune(before, self.cfg.batch_size)
        except TrackerError as e:
            # the database is busy or read-only: the next pass tries again
            log.warning("retention: prune failed, retrying in %gs: %s", self.cfg.interval_s, e)
            return {}
        if removed.get("runs"):
            log.info("retention: removed %d runs finished before %s (%s)",
                     removed["runs"], before, _rows(removed))
        return removed

    def stop(self) -> None:
        """End ``run()`` once the current pass is over (cancel the task to stop mid-pass)."""
        self._stopping.set()


def _rows(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {table}" for table, n in counts.items())
