"""``/v1/stats``: counts by status and state per agent, duration percentiles, sources."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max of ``values`` (nearest rank), in seconds."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "count": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": round(ordered[-1], 3),
            "count": len(ordered)}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Shape the store's raw counts and timestamps into the stats document."""
    by_status: dict[str, int] = defaultdict(int)
    by_state: dict[str, int] = defaultdict(int)
    via: dict[str, int] = defaultdict(int)
    agents: dict[str, dict[str, dict[str, int]]] = {}
    for row in raw["counts"]:
        n = row["n"]
        by_status[row["status"]] += n
        by_state[row["state"]] += n
        if row["completed_via"]:
            via[row["completed_via"]] += n
        agent = agents.setdefault(row["agent_id"], {"status": defaultdict(int),
                                                     "state": defaultdict(int)})
        agent["status"][row["status"]] += n
        agent["state"][row["state"]] += n
    durations = [r for r, _ in raw["durations"] if r is not None]
    to_completion = [t for _, t in raw["durations"] if t is not None]
    learnt = via.get("callback", 0) + via.get("poll", 0) + via.get("reconcile", 0)
    return {
        "total": sum(by_status.values()),
        "by_status": dict(by_status),
        "by_state": dict(by_state),
        "by_agent": {a: {k: dict(v) for k, v in c.items()} for a, c in agents.items()},
        "run_duration_s": percentiles(durations),
        "time_to_completion_s": percentiles(to_completion),
        "completed_via": dict(via),
        "callback_share": round(via.get("callback", 0) / learnt, 4) if learnt else None,
    }
