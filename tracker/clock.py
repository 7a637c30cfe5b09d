"""Time in the tracker: UTC everywhere, ISO 8601 strings in storage, Letta's two formats parsed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime


def now() -> float:
    """Wall-clock seconds since the epoch (patched nowhere: tests move deadlines instead)."""
    return time.time()


def iso(ts: float | None = None) -> str:
    """A fixed-width UTC timestamp ending in Z, so that stored strings sort by time."""
    dt = datetime.fromtimestamp(now() if ts is None else ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(value: str | None) -> datetime | None:
    """Parse Letta's timestamps: ``...Z``, ``+00:00`` or naive (which Letta means as UTC)."""
    if not value:
        return None
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def to_iso(value: str | None) -> str | None:
    """Normalise a Letta timestamp to the tracker's stored form (None stays None)."""
    dt = parse(value)
    return iso(dt.timestamp()) if dt else None


def epoch(value: str | None) -> float | None:
    """Seconds since the epoch of a stored or Letta timestamp."""
    dt = parse(value)
    return dt.timestamp() if dt else None


async def nap(wakeup: asyncio.Event, seconds: float) -> None:
    """Sleep up to ``seconds``, or less when ``wakeup`` is set (background loops' idle)."""
    # not wait_for: on Python 3.11 it drops a cancellation that arrives as the wake-up does
    # (the loop then runs on, and shutdown waits for it forever); timeout() keeps it
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, seconds)):
            await wakeup.wait()
