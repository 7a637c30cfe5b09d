"""Benchmark 1, callback ingest: Letta's completion callbacks fired at the tracker by wrk.

Runs are pre-created in state ``submitted`` (straight into SQLite, before the tracker starts);
each gets one realistic ~2 KB callback body on its own signed URL. In every repeat, the same
wrk load (same requests, connections and duration) goes to a bare aiohttp handler that only
parses the JSON and answers 204, on asyncio's loop and on uvloop (the tracker's), and to the
tracker, one after the other: the tracker between the two, their order alternating between
repeats. The faster of the two bare handlers is the repeat's ceiling. After the tracker's
measured load, a durability pass of its own (outside the figures): wrk fires the callbacks
the load did not send, and once the tracker has filed 5,000 of them it is killed with SIGKILL
(its callback workers too; no graceful shutdown), wrk still firing. Every run whose callback
wrk got a 2xx for, in the load or the pass, must then be ``done`` or have its callback in the
inbox; the tracker is started again on that database, and once its inbox is empty (in 300 s,
or the benchmark reports a failure) every one of them must be ``done``. A peer, after the
tracker in each repeat: the same bare handler on uvloop committing each callback's body to
one narrow SQLite table before its 204 (the least a tracker that answers only what it has
stored does).

    .venv/bin/python benchmarks/callback_ingest.py [--quick] [--repeats N] [--connections C]
        [--workers N]

With ``--workers N`` the tracker runs N callback worker processes (``callbacks.workers``)
and wrk fires at their port; the CPU figure then adds up the tracker's and its workers'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
import uuid
from contextlib import closing
from pathlib import Path

import bulkdata
import harness as h

from tracker.callbacks import CallbackSigner

SECRET = "bench-callback-secret"
SAMPLE = h.ROOT.parent / "shared" / "letta-samples" / "async_basic__callback.json"
SCRIPT = h.HERE / "replay.lua"
#: the bare handler's two loops: asyncio's own, and uvloop (the tracker's default)
LOOPS = ["asyncio", "uvloop"]
#: the durability pass kills the tracker once it has filed this many of the pass's callbacks:
#: under a second of load here, well past wrk's start and the tracker's answers' warm-up
KILL_AFTER = 5_000
#: how long the restarted tracker may take to apply its inbox (a full run's took 36-42 s here)
#: before the benchmark reports the rest as not applied
DRAIN_TIMEOUT = 300.0


def callback_body(rng: random.Random, letta_run_id: str, at: float) -> str:
    """Letta's callback for a finished run (shape of the recorded sample), ~2 KB."""
    body = json.loads(SAMPLE.read_text())["body_json"] if SAMPLE.exists() else _fallback()
    body["run_id"] = letta_run_id
    body["completed_at"] = h.iso(at)[:-1]  # Letta sends a naive timestamp
    user, reply = body["metadata"]["result"]["messages"]
    step = f"step-{uuid.UUID(int=rng.getrandbits(128))}"
    for m in (user, reply):
        m.update(run_id=letta_run_id, step_id=step,
                 id=f"message-{uuid.UUID(int=rng.getrandbits(128))}")
    user["content"] = h.prose(rng, 300)
    reply["content"] = h.prose(rng, 900)
    return json.dumps(body, separators=(",", ":"))


def _fallback() -> dict:
    msg = {"id": "", "date": "2026-01-01T00:00:00+00:00", "name": None, "otid": str(uuid.uuid4()),
           "sender_id": None, "step_id": "", "is_err": None, "seq_id": None, "run_id": ""}
    return {"run_id": "", "status": "completed", "completed_at": "", "metadata": {
        "run_type": "send_message_async", "lettuce": None, "result": {
            "messages": [dict(msg, message_type="user_message", content=""),
                         dict(msg, message_type="assistant_message", content="")],
            "stop_reason": {"message_type": "stop_reason", "stop_reason": "end_turn"},
            "usage": {"message_type": "usage_statistics", "completion_tokens": 5,
                      "prompt_tokens": 2051, "total_tokens": 2056, "step_count": 1},
            "logprobs": None, "turns": None}}}


def prepare(n: int, n_agents: int, history: int) -> tuple[Path, Path]:
    """A template database with ``history`` finished runs and ``n`` submitted runs over
    ``n_agents`` agents, and the wrk request file of the submitted runs' callbacks; both
    cached under benchmarks/out/ by their parameters."""
    key = f"{n}-{n_agents}-{history}-{h.cache_tag()}"
    db = h.OUT / f"ingest-template-{key}.db"
    reqs = h.OUT / f"ingest-requests-{key}.txt"
    if db.exists() and reqs.exists():
        return db, reqs
    h.OUT.mkdir(exist_ok=True)
    tmp = h.fresh_db(h.OUT / "ingest-building.db")
    h.create_key(tmp, "bench", admin=True)
    with closing(sqlite3.connect(tmp)) as c:
        user_id = c.execute("SELECT id FROM users").fetchone()[0]
    rng = random.Random(7)
    signer = CallbackSigner(SECRET, "http://127.0.0.1")
    now = time.time()
    agents = [f"agent-{uuid.UUID(int=rng.getrandbits(128))}" for _ in range(n_agents)]
    rows, payloads, lines = [], [], []
    for i in range(n):
        run_id = f"run-{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        letta_id = f"run-{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        agent = agents[i % len(agents)]
        request = {"messages": [{"role": "user", "content": h.prose(rng, 300),
                                 "otid": str(uuid.UUID(int=rng.getrandbits(128)))}]}
        created = now - 60 + i * 1e-4
        rows.append((run_id, user_id, agent, "submitted", "running", letta_id,
                     json.dumps({"use_assistant_message": True}), h.iso(created),
                     h.iso(created + 0.01), now + 86400, now + 86400))
        payloads.append((json.dumps(request), None, None))
        lines.append(f"POST\t/callbacks/letta/{signer.token(run_id)}\t"
                     f"{callback_body(rng, letta_id, created + 2)}\n")
    with closing(sqlite3.connect(tmp)) as c:
        c.execute("PRAGMA synchronous = OFF")
        add_history(c, history, user_id, agents, rng)
        with c:
            bulkdata.insert_runs(c, rows, payloads, sql=(
                "INSERT INTO runs (seq, id, user_id, agent_id, state, status, letta_run_id,"
                " request_config, created_at, submitted_at, next_check_at, deadline_at,"
                " attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)"))
        c.execute("ANALYZE")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    rng.shuffle(lines)  # callbacks arrive in completion order, not creation order
    reqs.write_text("".join(lines))
    tmp.rename(db)
    return db, reqs


def add_history(c: sqlite3.Connection, n: int, user_id: str, agents: list[str],
                rng: random.Random) -> None:
    """``n`` finished runs (and their events) over the past month, as a live database has."""
    gen = bulkdata.Generator(rng)
    now = time.time()
    for lo in range(0, n, 20_000):
        rows, payloads, events = [], [], []
        for k in range(lo, min(n, lo + 20_000)):
            outcome = rng.choice(bulkdata.OUTCOMES[:3])[:3]
            row, payload, ev = gen.run(now - 30 * 86400 + k * (30 * 86400 - 120) / n,
                                       (user_id, ""), rng.choice(agents), outcome,
                                       rng.choice(("callback", "poll")), False)
            rows.append(row)
            payloads.append(payload)
            events += ev
        with c:
            bulkdata.insert_runs(c, rows, payloads)
            c.executemany(bulkdata.EVENT_SQL, events)


def measure_ceiling(procs: h.Procs, reqs: Path, args: argparse.Namespace, loop: str,
                    durable: bool = False) -> dict:
    """The bare handler on ``loop``; ``durable``, the peer that commits each callback first."""
    db = [str(h.no_db(h.OUT / "ingest-durable-peer.db"))] if durable else []
    url, p = procs.bare("durable-peer" if durable else f"ceiling-{loop}", "bare_server.py",
                        loop, *db)
    cpu = h.CpuMeter(p.pid)
    res = h.wrk(url, SCRIPT, args.connections, args.duration, env={
        "BENCH_REQUESTS": str(reqs), "BENCH_THREADS": "1", "BENCH_CLOSE": args.close})
    res.update(cpu.stop(res))
    procs.stop(p)
    return res


def measure_tracker(procs: h.Procs, template: Path, reqs: Path, args: argparse.Namespace) -> dict:
    db = h.copy_db(template, h.OUT / "ingest-run.db")
    acked = [h.OUT / "ingest-acked.txt", h.OUT / "ingest-acked-kill.txt"]  # load's, pass's
    for f in acked:
        f.unlink(missing_ok=True)
    cb_port = h.free_port()
    log = h.OUT / f"{procs.tag}-tracker.log"
    start = log.stat().st_size if log.exists() else 0  # the harness appends
    url, p = procs.tracker("tracker", db, "http://127.0.0.1:9", env={
        "TRACKER_CALLBACKS__SECRET": SECRET,
        "TRACKER_CALLBACKS__WORKERS": str(args.workers),
        "TRACKER_CALLBACKS__PORT": str(cb_port),
        "TRACKER_DATABASE__SYNCHRONOUS": args.synchronous,
        "TRACKER_DISPATCH__PER_AGENT": args.per_agent,
        **({"TRACKER_CALLBACKS__APPLY_MAX_LAG_S": str(args.apply_max_lag)}
           if args.apply_max_lag is not None else {})})
    if args.workers:  # Letta's callbacks go to the workers' port
        url = f"http://{h.HOST}:{cb_port}"
    wait_reconciled(log, start)
    steady(db, p.pid)
    since = h.iso(time.time())
    cpu = h.CpuMeter(p.pid, children=True)  # its workers' too
    spy = h.py_spy(procs, p.pid, "ingest-tracker") if args.profile else None
    wal = h.wal_sampler(db)
    res = h.wrk(url, SCRIPT, args.connections, args.duration, env={
        "BENCH_REQUESTS": str(reqs), "BENCH_THREADS": "1", "BENCH_ACKED": str(acked[0]),
        "BENCH_CLOSE": args.close})
    res.update(cpu.stop(res))
    res["wal_mb"] = wal.stop()
    h.end_py_spy(procs, spy)
    # The SIGKILL comes in a pass of its own, after the measured load: an answer sent before
    # its commit is lost only by a kill while callbacks are coming in (killed after the load,
    # its commit had long landed), and a kill inside the measured load would cut its figures
    # short. The pass fires the callbacks the load did not send (1 wrk thread: its slice is
    # the file), so each is a run's first.
    sent = args.runs if res["wrapped"] else res["furthest"]
    res["kill"] = kill_under_load(procs, p, db, url, reqs, acked[1], sent, args)
    ids = acked_ids(acked)
    res.update(durability(db, ids, since))
    res.update(after_restart(procs, db))
    res["not_applied"] = not_applied(db, ids)
    return res


def kill_under_load(procs: h.Procs, tracker: subprocess.Popen, db: Path, url: str, reqs: Path,
                    acked: Path, sent: int, args: argparse.Namespace) -> dict:
    """The durability pass: wrk fires the callbacks from line ``sent`` of ``reqs`` on, and
    the tracker (its callback workers too) is killed with SIGKILL once it has filed
    ``KILL_AFTER`` of them (a quarter of what is left at most, so that wrk is still firing);
    wrk is stopped after. Returns wrk's figures (the 2xx answers, in ``acked``, are the
    callbacks answered before the kill), ``under_load`` (whether the kill came with wrk
    firing) and ``filed`` (of the pass's callbacks, at the kill)."""
    after = min(KILL_AFTER, (args.runs - sent) // 4)
    if after < 100:  # no callback left to fire: the check would test nothing
        kill_all(procs, tracker)
        return {"under_load": False, "filed": 0, "ok": 0, "errors_after": 0,
                "why": f"only {args.runs - sent:,} callbacks left unsent (raise --runs)"}
    seq0 = inbox_seq(db)
    wrk = procs.start("wrk-kill", h.wrk_argv(url, SCRIPT, args.connections, 600), env={
        "BENCH_REQUESTS": str(reqs), "BENCH_THREADS": "1", "BENCH_ACKED": str(acked),
        "BENCH_CLOSE": args.close, "BENCH_SKIP": str(sent)}, stdout=subprocess.PIPE)
    under_load = wait_filed(db, seq0 + after, wrk, timeout=120)
    filed = inbox_seq(db) - seq0  # (the tracker's last commit may land after the read)
    why = ("" if under_load else "wrk ended first" if wrk.poll() is not None
           else f"the tracker filed {filed:,} of {after:,} in 120 s")
    kill_all(procs, tracker)
    time.sleep(0.5)  # wrk goes on, finding nobody: its socket errors show it was firing
    procs.stop(wrk, sig=signal.SIGINT, timeout=60)  # SIGINT: wrk still runs done()
    assert wrk.stdout is not None
    res = h.wrk_figures(wrk.stdout.read().decode())
    return {**res, "under_load": under_load, "filed": filed, "why": why,
            "errors_after": h.socket_errors(res)}


def wait_filed(db: Path, target: int, wrk: subprocess.Popen, timeout: float) -> bool:
    """Wait, while ``wrk`` runs, until the inbox's AUTOINCREMENT counter reaches ``target``
    (one row of sqlite_sequence: a count would scan the inbox, see inbox_empty); whether it
    did with wrk still running."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and wrk.poll() is None:
        if inbox_seq(db) >= target:
            return True
        time.sleep(0.01)
    return False


def inbox_seq(db: Path) -> int:
    """How many callbacks were ever filed in the inbox (its ids' AUTOINCREMENT counter)."""
    with closing(sqlite3.connect(db, timeout=30)) as c:
        row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'callback_inbox'"
                        ).fetchone()
    return row[0] if row else 0


def kill_all(procs: h.Procs, tracker: subprocess.Popen) -> None:
    """SIGKILL the tracker and its callback workers at once, as a crash would: a worker left
    alive would go on answering (and filing) callbacks."""
    for pid in [tracker.pid, *descendants(tracker.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    procs.stop(tracker, sig=signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except FileNotFoundError:  # gone meanwhile
        return []
    return kids + [d for k in kids for d in descendants(k)]


def after_restart(procs: h.Procs, db: Path) -> dict:
    """Start the tracker again on the killed one's database: the callbacks it answered but
    had not applied yet are applied from the inbox. Returns how long that took, and whether
    the inbox was emptied within ``DRAIN_TIMEOUT``."""
    filed = inbox_depth(db)
    started = time.monotonic()
    _, p = procs.tracker("tracker-restart", db, "http://127.0.0.1:9",
                         env={"TRACKER_CALLBACKS__SECRET": SECRET})
    wal = h.wal_sampler(db)
    drained = False
    while not (drained := inbox_empty(db)) and time.monotonic() - started < DRAIN_TIMEOUT:
        time.sleep(0.1)
    took = time.monotonic() - started
    procs.stop(p)
    return {"inbox_at_kill": filed, "inbox_drain_s": took, "drained": drained,
            "drain_wal_mb": wal.stop()}


def inbox_depth(db: Path) -> int:
    with closing(sqlite3.connect(db, timeout=30)) as c:
        return c.execute("SELECT count(*) FROM callback_inbox").fetchone()[0]


def inbox_empty(db: Path) -> bool:
    """Not a count: counting scans the inbox (~200 MB), and a read that long, ten times a
    second, kept the tracker's checkpoints from starting the WAL over (it grew to 1.5-2.5 GB
    while the inbox was applied)."""
    with closing(sqlite3.connect(db, timeout=30)) as c:
        return c.execute("SELECT 1 FROM callback_inbox LIMIT 1").fetchone() is None


def wait_reconciled(log: Path, start: int, timeout: float = 300) -> None:
    """Wait for the tracker's log, from ``start`` on, to say its start-up reconcile is done:
    the process going idle does not tell (its writes may wait on the database)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(log, "rb") as f:
            f.seek(start)
            if b"reconciled after start" in f.read():
                return
        time.sleep(0.2)
    raise RuntimeError(f"the tracker did not log its start-up reconcile in {timeout:.0f}s")


def steady(db: Path, pid: int) -> None:
    """Measure steady-state ingest, not start-up: once the start-up reconcile is done (see
    wait_reconciled) and the tracker idle, put the runs' next checks back in the future (a
    template older than a day has them all due, and with Letta out of reach here the poller
    would keep retrying them), and wait until the tracker is idle again. The start-up sweep
    of every run in flight stays: its next chunk is tried after each back-off pause (a read
    of 2,000 runs and one refused connection, every 2 s doubling up to 300 s)."""
    h.settle(pid)
    with closing(sqlite3.connect(db, timeout=30)) as c, c:
        c.execute("UPDATE runs SET next_check_at = ? WHERE state = 'submitted'",
                  (time.time() + 86400,))
    time.sleep(5.5)  # the poller naps at most 5 s before it looks at the check times again
    h.settle(pid)


def acked_ids(files: list[Path]) -> list[str]:
    """The run ids of the callbacks answered 2xx, as wrk received them (replay.lua's files)."""
    return [line for f in files if f.exists() for line in f.read_text().splitlines() if line]


def acked_table(c: sqlite3.Connection, ids: list[str]) -> None:
    c.execute("CREATE TEMP TABLE acked (id TEXT PRIMARY KEY)")
    c.executemany("INSERT OR IGNORE INTO acked VALUES (?)", [(i,) for i in ids])


def durability(db: Path, ids: list[str], since: str) -> dict:
    """Right after the SIGKILL: the answered callbacks neither applied nor in the inbox."""
    with closing(sqlite3.connect(db)) as c:
        acked_table(c, ids)
        done = c.execute("SELECT count(*) FROM runs WHERE state = 'done' AND recorded_at >= ?",
                         (since,)).fetchone()[0]
        # answered, but neither applied nor waiting in the inbox (or no run at all): lost
        lost = c.execute("SELECT count(*) FROM acked a LEFT JOIN runs r ON r.id = a.id"
                         " WHERE r.id IS NULL OR (r.state != 'done' AND a.id NOT IN"
                         " (SELECT run_id FROM callback_inbox))").fetchone()[0]
        events = c.execute("SELECT count(*) FROM run_events WHERE source = 'callback'"
                           " AND at >= ?", (since,)).fetchone()[0]
    return {"acked": len(ids), "acked_unique": len(set(ids)), "done": done,
            "lost_at_kill": lost, "callback_events": events}


def not_applied(db: Path, ids: list[str]) -> int:
    """After the restart: the answered callbacks whose run is not ``done``, wherever the
    callback is (one still in the inbox was never applied: not excused, as at the kill)."""
    with closing(sqlite3.connect(db)) as c:
        acked_table(c, ids)
        return c.execute("SELECT count(*) FROM acked a LEFT JOIN runs r ON r.id = a.id"
                         " WHERE r.state IS NOT 'done'").fetchone()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short repeat (smoke check)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per side")
    # enough that no callback is sent twice at ~9,000/s for 10 s (Letta sends one per run)
    ap.add_argument("--runs", type=int, default=250_000,
                    help="pre-created runs (callbacks): enough that none is sent twice")
    ap.add_argument("--agents", type=int, default=0,
                    help="agents the runs belong to (default: one per run, as with serial"
                         " dispatch every in-flight run is on its own agent)")
    ap.add_argument("--history", type=int, default=100_000,
                    help="finished runs already in the database")
    ap.add_argument("--per-agent", default="serial", choices=["serial", "parallel"])
    ap.add_argument("--synchronous", default="NORMAL", choices=["NORMAL", "FULL"])
    ap.add_argument("--new-connections", dest="close", action="store_const", const="1",
                    default="", help="a new TCP connection per callback, as Letta's httpx"
                                     " client per callback does (default: keep-alive)")
    ap.add_argument("--apply-max-lag", type=float, default=None,
                    help="the tracker's callbacks.apply_max_lag_s (default: its default); a"
                         " lag shorter than the load shows a flood longer than the default's")
    ap.add_argument("--workers", type=int, default=0,
                    help="the tracker's callbacks.workers: processes taking the callbacks on"
                         " a port of their own (default 0: the tracker's process takes them)")
    ap.add_argument("--profile", action="store_true",
                    help="sample the tracker with py-spy during its load (out/profile-*.txt)")
    args = ap.parse_args()
    if args.quick:  # runs enough that the load (4,000-10,000/s here) leaves the pass some
        args.repeats, args.duration, args.runs, args.history = 1, 3.0, 60_000, 20_000
    h.banner("callback ingest", args)
    if not h.have_wrk():
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    template, reqs = prepare(args.runs, args.agents or args.runs, args.history)
    body = len(reqs.open().readline().split("\t")[2])
    print(f"{args.history:,} finished runs in the database, {args.runs:,} pre-created runs,"
          f" body ~{body} bytes,"
          f" {args.agents or args.runs:,} agents, dispatch {args.per_agent},"
          f" {args.connections} {'new' if args.close else 'keep-alive'} connections,"
          f" {args.duration:g}s per side, wrk 1 thread, apply_max_lag_s"
          f" {'default' if args.apply_max_lag is None else f'{args.apply_max_lag:g}'},"
          f" callback workers {args.workers}",
          flush=True)
    rows = []
    with h.Procs("ingest") as procs:
        for i in range(args.repeats):
            order = LOOPS if i % 2 == 0 else LOOPS[::-1]
            got = {order[0]: measure_ceiling(procs, reqs, args, order[0]),
                   "tracker": measure_tracker(procs, template, reqs, args),
                   "durable": measure_ceiling(procs, reqs, args, "uvloop", durable=True),
                   order[1]: measure_ceiling(procs, reqs, args, order[1])}
            c = got["ceiling"] = max((got[loop] for loop in LOOPS), key=h.rate)
            t = got["tracker"]
            rows.append(got)
            print(f"repeat {i + 1}: ceiling {h.rate(c):,.0f}/s"
                  f" p99 {c['latency_us']['p99'] / 1e3:.1f} ms ("
                  + ", ".join(f"{loop} {h.rate(got[loop]):,.0f}/s" for loop in LOOPS)
                  + f"; durable peer {h.rate(got['durable']):,.0f}/s) | tracker {h.rate(t):,.0f}/s"
                  f" p99 {t['latency_us']['p99'] / 1e3:.1f} ms,"
                  f" non-2xx {t['bad']} {t['codes']}, socket errors {h.socket_errors(t)},"
                  f" wrapped {t['wrapped']},"
                  f" WAL at most {t['wal_mb']:.0f} MB", flush=True)
            print(f"  {durability_line(t)}", flush=True)
    report(rows, args)
    if args.profile:
        print("\n" + h.profile_summary("ingest-tracker"))


def durability_line(t: dict) -> str:
    """What the durability pass did and found, in a line (the load's figures are apart)."""
    k = t["kill"]
    kill = (f"SIGKILL with wrk firing, {k['filed']:,} of the pass's callbacks filed and"
            f" {k['ok']:,} answered by then, {k['errors_after']:,} wrk socket errors after it"
            if k["under_load"] else f"SIGKILL NOT under load ({k['why']})")
    drain = (f"inbox applied {t['inbox_drain_s']:.1f}s after the restart" if t["drained"] else
             f"inbox NOT applied in {DRAIN_TIMEOUT:.0f}s after the restart")
    return (f"durability pass (after the measured load, outside its figures): {kill};"
            f" {t['acked']:,} answered in all, {t['done']:,} done and {t['inbox_at_kill']:,}"
            f" in the inbox at the kill, {t['lost_at_kill']} lost; {drain}"
            f" (WAL at most {t['drain_wal_mb']:.0f} MB), {t['not_applied']} not done after it")


def report(rows: list[dict[str, dict]], args: argparse.Namespace) -> None:
    """``rows``: per repeat, each side's figures by name ("ceiling", "tracker", each loop)."""
    ratio = h.median(h.rate(r["tracker"]) / h.rate(r["ceiling"]) for r in rows)
    lat = lambda side, q: h.median(r[side]["latency_us"][q] / 1e3 for r in rows)  # noqa: E731

    def per_cb(side: str, key: str) -> float:  # µs a callback answered (CpuMeter's)
        return h.median(r[side][key] for r in rows)

    def side_row(label: str, side: str) -> tuple:
        return (label, h.median(h.rate(r[side]) for r in rows), lat(side, "p50"),
                lat(side, "p90"), lat(side, "p99"), lat(side, "max"), per_cb(side, "cpu_us"))

    def cpu_row(label: str, side: str) -> tuple:
        busy = h.median(r[side]["loop_busy"] for r in rows)
        return (label, per_cb(side, "cpu_us"), per_cb(side, "loop_user_us"),
                per_cb(side, "loop_sys_us"), f"{busy:.0%}")

    p99 = lat("tracker", "p99")
    errors = sum(r["tracker"]["bad"] + h.socket_errors(r["tracker"]) for r in rows)
    print(h.table(f"callback ingest: median of {len(rows)} repeat(s), {args.connections} "
                  f"connections, synchronous={args.synchronous}",
                  ["side", "callbacks/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
                   "server CPU µs/req"],
                  [side_row("ceiling (bare aiohttp, parse + 204; the faster loop)", "ceiling"),
                   *(side_row(f"  bare aiohttp on {loop}", loop) for loop in LOOPS),
                   side_row("durable peer (the same, committing each callback first; uvloop)",
                            "durable"),
                   side_row("tracker (uvloop)", "tracker")]))
    print(h.table("callback ingest: where the CPU goes (median µs a callback answered)",
                  ["side", "all threads", "event loop's thread: user", "system",
                   "the loop's thread busy"],
                  [cpu_row("ceiling", "ceiling"), cpu_row("durable peer", "durable"),
                   cpu_row("tracker" + (" (its process; workers in all threads)"
                                        if args.workers else ""), "tracker")]))
    print(h.table("callback ingest: targets", ["figure", "value", "target", ""], [
        ("tracker / ceiling (median of per-repeat ratios)", ratio, ">= 0.5",
         h.verdict(ratio >= 0.5)),
        ("tracker p99 latency, ms", p99, "< 50", h.verdict(p99 < 50)),
        *durability_targets([r["tracker"] for r in rows]),
        ("non-2xx answers and wrk's socket errors: connect, read, write, timeout (all"
         " repeats)", errors, "0", h.verdict(errors == 0)),
        ("durable peer / ceiling (the least a tracker that stores first does)",
         h.median(h.rate(r["durable"]) / h.rate(r["ceiling"]) for r in rows), "(peer)", ""),
        ("tracker / durable peer", h.median(h.rate(r["tracker"]) / h.rate(r["durable"])
                                            for r in rows), "(peer)", ""),
    ]))
    print(h.table("callback ingest: durability per repeat (the load's answers and the pass's,"
                  " killed under load)", [
        "repeat", "2xx answers (of them in the pass)", "distinct runs", "done at SIGKILL",
        "in the inbox at SIGKILL", "2xx but lost at SIGKILL", "applied after restart in s",
        "2xx but not done after", "WAL at most, MB: load / applying"],
        [(i + 1, f"{t['acked']:,} ({t['kill']['ok']:,})", t["acked_unique"], t["done"],
          t["inbox_at_kill"], t["lost_at_kill"],
          t["inbox_drain_s"] if t["drained"] else f"not in {DRAIN_TIMEOUT:.0f}",
          t["not_applied"], f"{t['wal_mb']:.0f} / {t['drain_wal_mb']:.0f}")
         for i, t in enumerate(r["tracker"] for r in rows)]))


def durability_targets(runs: list[dict]) -> list[tuple]:
    """The durability rows of the targets, over each repeat's tracker figures."""
    killed = sum(t["kill"]["under_load"] for t in runs)
    lost = max(t["lost_at_kill"] for t in runs)
    stuck = sum(not t["drained"] for t in runs)
    not_done = max(t["not_applied"] for t in runs)
    return [
        ("repeats whose SIGKILL came with wrk firing (else the checks below test little)",
         killed, f"{len(runs)}", h.verdict(killed == len(runs))),
        ("2xx answers lost at the SIGKILL (neither done nor in the inbox; worst repeat)", lost,
         "0", h.verdict(lost == 0)),
        (f"restarts whose inbox was not applied in {DRAIN_TIMEOUT:.0f} s", stuck, "0",
         h.verdict(stuck == 0)),
        ("2xx answers whose run is not done after the restart (worst repeat)", not_done, "0",
         h.verdict(not_done == 0))]


if __name__ == "__main__":
    main()
