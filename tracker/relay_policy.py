"""The relay's verdict on one attempt: delivered, retry (and when), or failed for good."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from tracker.clock import parse_retry_after

JITTER = 0.2
#: a receiver's Retry-After is honoured up to this; beyond it the delivery would stall for good
MAX_RETRY_AFTER_S = 86_400.0


class DeliveryState(StrEnum):
    """Where a delivery is (the ``state`` column of the outbox)."""

    #: waiting for its next attempt (or in flight now)
    PENDING = "pending"
    #: a 2xx answer arrived within the timeout
    DELIVERED = "delivered"
    #: gave up: schedule exhausted, 410 Gone, or the destination is refused
    FAILED = "failed"


@dataclass
class Outcome:
    """What one attempt got back."""

    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None
    retry_after: float | None = None
    #: retrying cannot help (refused destination, 410 Gone, run or secret missing)
    final: bool = False

    @property
    def delivered(self) -> bool:
        """A 2xx answer (the timeout already cut off late ones)."""
        return self.status_code is not None and 200 <= self.status_code < 300

    def record(self, at: str) -> dict:
        """The attempt as the store records it."""
        return {"at": at, "status_code": self.status_code, "latency_ms": self.latency_ms,
                "error": self.error}


def from_response(status: int, retry_after: str | None, location: str | None,
                  latency_ms: float, now: float) -> Outcome:
    """Classify an HTTP answer; 410 means the receiver wants no more of these."""
    error = f"redirect to {location!r} not followed" if 300 <= status < 400 else None
    return Outcome(status_code=status, latency_ms=latency_ms, error=error,
                   retry_after=parse_retry_after(retry_after, now), final=status == 410)


def jittered(delay: float, rng: random.Random | None = None) -> float:
    """``delay`` +/- 20%, so that deliveries failed together do not retry together."""
    return max(0.0, delay * (1 + (rng or random).uniform(-JITTER, JITTER)))


def next_step(attempts_done: int, outcome: Outcome, schedule: Sequence[float],
              now: float) -> tuple[DeliveryState, float | None]:
    """The delivery's new state and next attempt time after ``attempts_done`` attempts.

    ``schedule[k]`` is the wait before attempt k+1, so its length is the number of attempts.
    """
    if outcome.delivered:
        return DeliveryState.DELIVERED, None
    if outcome.final or attempts_done >= len(schedule):
        return DeliveryState.FAILED, None
    delay = jittered(schedule[attempts_done])
    if outcome.retry_after is not None:
        delay = max(delay, min(outcome.retry_after, MAX_RETRY_AFTER_S))
    return DeliveryState.PENDING, now + delay
