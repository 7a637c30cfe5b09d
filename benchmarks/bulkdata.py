"""Bulk history for benchmark 3: a database of N runs and ~5 N events, written straight into
SQLite at the tracker's latest schema (which the tracker itself creates first).

The spread is meant to look like a month of a real deployment: a few users, each owning some
agents of very unequal activity (Zipf-like), mostly completed runs learnt from callbacks, some
failures, cancels, polls and reconciles, a handful still active at the end of the month, and a
timeline of events per run. ``created_at`` strings increase with ``seq`` as the tracker writes
them. The result is cached under benchmarks/out/ by its parameters and the schema version.

    .venv/bin/python benchmarks/bulkdata.py --runs 1000000   # build (or find) the database
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import time
import uuid
from contextlib import closing
from pathlib import Path

import harness as h

DAY = 86400.0
MONTH_END = 1_795_000_000.0  # a fixed "now", so that cached databases are reproducible
USERS = ("acme", "globex", "initech", "umbrella", "hooli")
# (status, stop_reason, state, weight)
OUTCOMES = (
    ("completed", "end_turn", "done", 880),
    ("completed", "max_steps", "done", 20),
    ("failed", "error", "done", 40),
    ("failed", "error", "rejected", 5),
    ("failed", "error", "lost", 2),
    ("cancelled", "cancelled", "done", 20),
    ("completed", "requires_approval", "paused", 3),
)
VIA = (("callback", 86), ("poll", 12), ("reconcile", 2))

RUN_SQL = (
    "INSERT INTO runs (seq, id, user_id, agent_id, kind, state, status, stop_reason,"
    " letta_run_id, request_config, callback_url, created_at, submitted_at, completed_at,"
    " recorded_at, completed_via, metadata, callback_sent_at, callback_status_code,"
    " callback_error, total_duration_ns, error, error_code, attempts, poll_count,"
    " next_check_at, deadline_at, idempotency_key, request_hash)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
    " ?, ?)")
PAYLOAD_SQL = "INSERT INTO run_payloads (seq, request, messages, usage) VALUES (?, ?, ?, ?)"
EVENT_SQL = ("INSERT INTO run_events (run_id, at, source, kind, state, status, detail)"
             " VALUES (?, ?, ?, ?, ?, ?, ?)")
REQUEST_CONFIG = json.dumps({"use_assistant_message": True,
                             "assistant_message_tool_name": "send_message",
                             "assistant_message_tool_kwarg": "message",
                             "include_return_message_types": None})
METADATA = json.dumps({"run_type": "send_message_async", "lettuce": None})


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _weighted(rng: random.Random, table: tuple, n: int) -> list:
    return rng.choices([t[:-1] if len(t) > 2 else t[0] for t in table],
                       weights=[t[-1] for t in table], k=n)


class Generator:
    """Rows of one run and its events (messages text built once, varied per run)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.texts = [h.prose(rng, rng.randint(60, 400)) for _ in range(200)]
        self.replies = [h.prose(rng, rng.randint(150, 900)) for _ in range(200)]

    def messages(self, letta_id: str, when: str, otid: str, text: str) -> str:
        rng = self.rng
        step = f"step-{_uid(rng)}"
        head = {"name": None, "sender_id": None, "step_id": step, "is_err": None,
                "seq_id": None, "run_id": letta_id}
        msgs = [dict(head, id=f"message-{_uid(rng)}", date=when, message_type="user_message",
                     otid=otid, content=text),
                dict(head, id=f"message-{_uid(rng)}", date=when, message_type="reasoning_message",
                     otid=_uid(rng), source="reasoner_model",
                     reasoning="The user wants a status update; check memory first.",
                     signature=None),
                dict(head, id=f"message-{_uid(rng)}", date=when, message_type="assistant_message",
                     otid=_uid(rng), content=rng.choice(self.replies))]
        return json.dumps(msgs, separators=(",", ":"))

    def run(self, created: float, user: tuple[str, str], agent: str, outcome: tuple,
            via: str, active: bool) -> tuple[tuple, tuple, list[tuple]]:
        """The run's row (RUN_SQL without its seq), its payload (PAYLOAD_SQL's) and events."""
        rng = self.rng
        run_id, letta_id, otid = f"run-{_uid(rng)}", f"run-{_uid(rng)}", _uid(rng)
        text = rng.choice(self.texts)
        request = json.dumps({"messages": [{"role": "user", "content": text, "otid": otid}]},
                             separators=(",", ":"))
        status, stop, state = outcome
        submitted = created + rng.uniform(0.005, 0.05)
        duration = rng.lognormvariate(1.0, 0.8)
        completed = submitted + duration
        lag = 0.2 if via == "callback" else rng.uniform(0.5, 6.0)
        recorded = completed + lag
        hook = "https://hooks.example.com/letta" if rng.random() < 0.1 else None
        # checks that found it still running (the poller looks after a grace period)
        polls = rng.randint(0, 4)
        if active:
            status, stop, state, via = rng.choice(("created", "running")), None, "submitted", None
        rejected = state == "rejected"
        done = not active and not rejected
        user_id, _ = user
        row = (
            run_id, user_id, agent, "message", state, status, stop,
            None if rejected else letta_id, REQUEST_CONFIG, hook, h.iso(created),
            None if rejected else h.iso(submitted),
            h.iso(completed) if done else None, None if active else h.iso(recorded),
            ("dispatch" if rejected else via), METADATA,
            h.iso(completed + 0.2) if done else None,
            (200 if via == "callback" else None) if done else None,
            None if via == "callback" or not done else "ConnectError('All connection attempts"
                                                       " failed')",
            int(duration * 1e9) if done else None,
            "Letta answered 422" if rejected else None, 422 if rejected else None,
            1, polls + (via != "callback"), (created + 3600 if active else None), created + 3600,
            (f"idem-{_uid(rng)}" if rng.random() < 0.2 else None), None)
        payload = (
            request, self.messages(letta_id, h.iso(created), otid, text) if done else None,
            json.dumps({"completion_tokens": rng.randint(5, 400), "prompt_tokens":
                        rng.randint(2000, 9000), "total_tokens": 0, "prompt_tokens_details": None,
                        "completion_tokens_details": None}) if done else None)
        return row, payload, self.events(run_id, created, submitted, recorded, status, stop,
                                         state, via, polls, letta_id, active, rejected)

    def events(self, run_id: str, created: float, submitted: float, recorded: float,
               status: str, stop: str | None, state: str, via: str | None, polls: int,
               letta_id: str, active: bool, rejected: bool) -> list[tuple]:
        ev = [(run_id, h.iso(created), "api", "submit", "queued", "created", None)]
        if rejected:
            return ev + [(run_id, h.iso(submitted), "dispatch", "rejected", state, status,
                          '{"status_code": 422}')]
        ev.append((run_id, h.iso(submitted), "dispatch", "submitted", "submitted", "created",
                   json.dumps({"letta_run_id": letta_id})))
        if active:
            return ev
        span = max(0.001, recorded - submitted)
        for i in range(polls):
            at = submitted + span * (i + 1) / (polls + 1)
            ev.append((run_id, h.iso(at), "poll", "still_active", "submitted", "running",
                       '{"status": "running"}'))
        detail = json.dumps({"status": status, "stop_reason": stop})
        ev.append((run_id, h.iso(recorded), via, "completed", state, status, detail))
        if self.rng.random() < 0.15:  # a late duplicate: callback after a poll, or vice versa
            ev.append((run_id, h.iso(recorded + 0.5), "callback" if via != "callback" else "poll",
                       "confirmed", state, status, detail))
        return ev


def insert_runs(c: sqlite3.Connection, rows: list[tuple], payloads: list[tuple],
                sql: str = RUN_SQL) -> None:
    """Runs (rows of ``sql`` without their seq, its first column) and their payloads
    (PAYLOAD_SQL's, without the seq they are keyed by)."""
    base = c.execute("SELECT coalesce(max(seq), 0) FROM runs").fetchone()[0] + 1
    c.executemany(sql, [(base + i, *row) for i, row in enumerate(rows)])
    c.executemany(PAYLOAD_SQL, [(base + i, *p) for i, p in enumerate(payloads)])


def path_for(runs: int) -> Path:
    return h.OUT / f"history-{runs}-{h.cache_tag()}.db"


def build(runs: int, agents_n: int = 200, log: bool = True) -> tuple[Path, dict]:
    """The cached database of ``runs`` runs (built when missing); and its keys and facts."""
    db = path_for(runs)
    meta_path = db.with_suffix(".json")
    if db.exists() and meta_path.exists():
        return db, json.loads(meta_path.read_text())
    started = time.monotonic()
    tmp = h.fresh_db(db.with_suffix(".building"))
    keys = {"admin": h.create_key(tmp, "bench-admin", admin=True)}
    for name in USERS:
        keys[name] = h.create_key(tmp, name)
    with closing(sqlite3.connect(tmp)) as c:
        users = dict(c.execute("SELECT name, id FROM users").fetchall())
    rng = random.Random(3)
    gen = Generator(rng)
    agent_ids = [f"agent-{_uid(rng)}" for _ in range(agents_n)]
    owner = {a: USERS[i % len(USERS)] for i, a in enumerate(agent_ids)}
    weights = [1 / (i + 1) ** 0.9 for i in range(agents_n)]  # Zipf-like activity
    start = MONTH_END - 30 * DAY
    step = 30 * DAY / runs
    n_events = 0
    with closing(sqlite3.connect(tmp)) as c:
        c.execute("PRAGMA synchronous = OFF")
        c.execute("PRAGMA cache_size = -1500000")
        chunk = 50_000
        for lo in range(0, runs, chunk):
            rows, payloads, events = [], [], []
            n = min(chunk, runs - lo)
            agents = rng.choices(agent_ids, weights=weights, k=n)
            outcomes = _weighted(rng, OUTCOMES, n)
            vias = _weighted(rng, VIA, n)
            for i in range(n):
                k = lo + i
                created = start + k * step + rng.uniform(0, step * 0.9)
                active = k >= runs - max(1, runs // 2000)  # the last few are still running
                user = (users[owner[agents[i]]], owner[agents[i]])
                row, payload, ev = gen.run(created, user, agents[i], outcomes[i], vias[i],
                                           active)
                rows.append(row)
                payloads.append(payload)
                events.extend(ev)
            with c:
                insert_runs(c, rows, payloads)
                c.executemany(EVENT_SQL, events)
            n_events += len(events)
            if log:
                print(f"  generated {lo + n:,} runs, {n_events:,} events"
                      f" ({time.monotonic() - started:.0f}s)", flush=True)
        c.execute("ANALYZE")  # as a deployment would, after loading this much
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        facts = {"runs": runs, "events": n_events, "agents": agent_ids[:20],
                 "users": users, "start": start, "end": MONTH_END,
                 "build_s": round(time.monotonic() - started, 1)}
    tmp.rename(db)
    meta_path.write_text(json.dumps({"keys": keys, **facts}, indent=1))
    return db, {"keys": keys, **facts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1_000_000)
    args = ap.parse_args()
    db, meta = build(args.runs)
    print(f"{db}: {meta['runs']:,} runs, {meta['events']:,} events,"
          f" {db.stat().st_size / 2**20:,.0f} MiB (built in {meta['build_s']}s)")


if __name__ == "__main__":
    main()
