"""Time in the tracker: UTC everywhere, ISO 8601 strings in storage, Letta's two formats parsed."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def now() -> float:
    """Wall-clock seconds since the epoch (patched nowhere: tests move deadlines instead)."""
    return time.time()


#: the last whole second ``iso`` formatted, and its text up to the seconds: formatting a
#: datetime costs ~2 µs, paid several times by every submit and callback. One tuple, read
#: once per call: the writer's thread formats times too
_second: tuple[float, str] = (math.nan, "")


def iso(ts: float | None = None) -> str:
    """A fixed-width UTC timestamp ending in Z, so that stored strings sort by time (to the
    microsecond, rounded as ``datetime.fromtimestamp`` rounds)."""
    frac, whole = math.modf(now() if ts is None else ts)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        whole, us = whole + 1, us - 1_000_000
    elif us < 0:
        whole, us = whole - 1, us + 1_000_000
    global _second
    second = _second
    if second[0] != whole:
        second = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{second[1]}.{us:06d}Z"


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


#: delay-seconds as HTTP has it (a whole number), or with a fraction, as some servers send
_SECONDS = re.compile(r"\d+(\.\d+)?")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP-date, which a
    proxy in front of the server may send), or None when it says neither."""
    value = (value or "").strip()
    if _SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
