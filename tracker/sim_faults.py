"""Fault settings of the Letta simulator: what goes wrong, and how often."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_RATES = (
    "callback_drop",
    "fail_rate",
    "never_finish_rate",
    "api_429_rate",
    "api_5xx_rate",
    "response_drop",
)
_SECONDS = ("callback_delay_s", "callback_lag_s", "callback_timeout_s", "retry_after_s",
            "accept_delay_s")
_RANGES = ("run_duration_s", "answer_time_s")


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault knobs; rates are probabilities in [0, 1], drawn from the simulator's seeded RNG."""

    # Seconds a turn takes (uniform); a `[[delay=N]]` marker in the text overrides it.
    run_duration_s: tuple[float, float] = (0.3, 1.0)
    # Seconds the async submit takes to answer once its run is created (uniform): the real
    # server takes 0.05-0.11 (letta-behaviour.md); instant by default, for fast tests.
    answer_time_s: tuple[float, float] = (0.0, 0.0)
    # Seconds the async submit waits before it creates its run (a server whose workers or
    # database pool are saturated): the run is created even if the client gave up meanwhile.
    accept_delay_s: float = 0.0
    # The callback never arrives; the run records it like an unreachable receiver.
    callback_drop: float = 0.0
    # Extra wait before the callback POST, on top of callback_lag_s.
    callback_delay_s: float = 0.0
    # Letta marks the run terminal about this long before it POSTs the callback.
    callback_lag_s: float = 0.2
    # Letta's httpx timeout for the callback POST; tests shorten it to stay fast.
    callback_timeout_s: float = 5.0
    # The turn fails like an LLM 500 after Letta's retries.
    fail_rate: float = 0.0
    # The run stays `created` forever (lost in-process task).
    never_finish_rate: float = 0.0
    # The API answers 429 with a Retry-After header of retry_after_s.
    api_429_rate: float = 0.0
    retry_after_s: float = 1.0
    # The API answers 500, 502 or 503 without doing anything.
    api_5xx_rate: float = 0.0
    # The API does the work, then drops the connection before answering (a lost response).
    response_drop: float = 0.0
    # Every /v1 request has its connection closed unanswered, like a dead server.
    down: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values."""
        data = dataclasses.asdict(self)
        for name in _RANGES:
            data[name] = list(data[name])
        return data

    def merged(self, changes: Mapping[str, Any]) -> Faults:
        """A copy with `changes` applied; unknown names or bad values raise ValueError."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(sorted(unknown))}")
        values = {name: _coerce(name, value) for name, value in changes.items()}
        return dataclasses.replace(self, **values)


def chance(rng: random.Random, rate: float) -> bool:
    """Draw an event of probability `rate`."""
    # No draw for 0 or 1, so an unused knob does not shift the seeded sequence.
    if rate <= 0.0 or rate >= 1.0:
        return rate >= 1.0
    return rng.random() < rate


def _coerce(name: str, value: Any) -> Any:
    if name == "down":
        if not isinstance(value, bool):
            raise ValueError("down must be true or false")
        return value
    if name in _RANGES:
        return _seconds_range(name, value)
    number = _number(name, value)
    if name in _RATES and not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1")
    if name in _SECONDS and number < 0:
        raise ValueError(f"{name} must not be negative")
    return number


def _seconds_range(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, int | float):
        value = (value, value)
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"{name} must be [min, max]")
    low, high = (_number(name, v) for v in value)
    if not 0 <= low <= high:
        raise ValueError(f"{name} must satisfy 0 <= min <= max")
    return (low, high)


def _number(name: str, value: Any) -> float:
    # bool is an int subclass; "true" as a rate is a caller's mistake, not 1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    return float(value)
