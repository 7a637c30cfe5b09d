"""Shared helpers of the benchmark scripts: processes, load generation, figures, tables.

Every process a benchmark starts (tracker, simulator, ceiling server, wrk) listens on or talks
to 127.0.0.1 only, is owned by a ``Procs`` context, and is ended by its own pid when the
benchmark ends, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
OUT.mkdir(exist_ok=True)
PY = sys.executable
HOST = "127.0.0.1"
# BENCH_TRACKER_SRC=/path/to/a/copy: run that tracker package instead (to try a change out)
SRC = os.environ.get("BENCH_TRACKER_SRC", "")
# BENCH_LOG_LEVEL=WARNING: the tracker's log level (its default, INFO, writes a line for each
# run's submit and end: part of what a deployment pays, so measured unless asked otherwise)
LOG_LEVEL = os.environ.get("BENCH_LOG_LEVEL", "INFO")
if SRC:
    sys.path.insert(0, SRC)


def package_env(src: str | None) -> dict[str, str]:
    """The environment that has a child import the tracker package in ``src`` (none: the
    tree's, or ``BENCH_TRACKER_SRC``'s): a copy being compared (submit_compare.py)."""
    return {"PYTHONPATH": src} if src else {}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    if SRC and "PYTHONPATH" not in (extra or {}):  # a process given its own copy keeps it
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def schema_version() -> int:
    """The tracker's latest schema version."""
    out = subprocess.run([PY, "-c", "from tracker.migrations import LATEST; print(LATEST)"],
                         cwd=OUT, env=child_env(), capture_output=True, text=True, check=True)
    return int(out.stdout)


def cache_tag() -> str:
    """What cached databases are keyed by besides their parameters: the schema version and a
    digest of the migrations' text (a migration being edited, or an experiment's, is not the
    schema another build had at the same version)."""
    code = ("import hashlib; from tracker.migrations import LATEST, MIGRATIONS;"
            " print(LATEST, hashlib.sha1(''.join(MIGRATIONS).encode()).hexdigest()[:8])")
    out = subprocess.run([PY, "-c", code], cwd=OUT, env=child_env(), capture_output=True,
                         text=True, check=True)
    version, digest = out.stdout.split()
    return f"v{version}-{digest}"


# --- figures ---------------------------------------------------------------------------------

def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (readable on a terminal, pasteable into BENCHMARKS.md)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    out = [f"\n### {title}\n", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def machine() -> str:
    """One line describing where the figures were measured."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()} ({interpreter()}), load average {load} at start")


def interpreter() -> str:
    """The interpreter every process runs on, and how fast it runs plain Python here: how it
    was built moves every figure that is not a ratio (two builds of Python 3.11 on one machine
    took 0.66 and 1.00 s: BENCHMARKS.md). The gauge is the sessions' own (``python3 -c``
    summing ``range(10_000_000)`` in a loop, at module level), the best of three."""
    code = compile("s = 0\nfor i in range(10_000_000): s += i", "<gauge>", "exec")

    def once() -> float:
        start = time.perf_counter()
        exec(code, {})  # module-level names, as under ``python3 -c``
        return time.perf_counter() - start

    return f"{Path(PY).resolve()}, gauge {min(once() for _ in range(3)):.2f} s"


def tree() -> str:
    """The tracker code measured: commit, and whether tracker/ has uncommitted changes."""
    if SRC:
        return f"tracker from {SRC}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tracker"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' + uncommitted changes in tracker/' if dirty else ''}"


def banner(name: str, args: Any) -> None:
    print(f"# {name}  ({'quick' if getattr(args, 'quick', False) else 'full'} mode)")
    print(f"machine: {machine()}")
    print(f"code: {tree()}; tracker log level {LOG_LEVEL}", flush=True)


# --- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers 2xx (or fail if ``proc`` died first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status < 300:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not come up in {timeout}s")


def http_json(method: str, url: str, body: Any = None, headers: dict | None = None,
              timeout: float = 60.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read()
    return json.loads(text) if text else None


class Procs:
    """Owns the child processes of one benchmark; ends each by its pid on exit."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.procs: list[subprocess.Popen] = []
        OUT.mkdir(exist_ok=True)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in reversed(self.procs):
            self.stop(p)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              stdout: int | None = None) -> subprocess.Popen:
        log = open(OUT / f"{self.tag}-{name}.log", "ab")  # noqa: SIM115 (closed with the proc)
        p = subprocess.Popen(argv, cwd=OUT, env=child_env(env),
                             stdout=stdout if stdout is not None else log, stderr=log,
                             stdin=subprocess.DEVNULL)
        p._bench_log = log  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait()
        with contextlib.suppress(Exception):
            p._bench_log.close()  # type: ignore[attr-defined]
        if p in self.procs:
            self.procs.remove(p)

    # -- the real things --------------------------------------------------------------------

    def simulator(self, name: str, agents: int = 1, run_duration: tuple[float, float] = (1, 1),
                  callback_drop: float = 0.0, extra: Sequence[str] = ()
                  ) -> tuple[str, list[str], subprocess.Popen]:
        """Start ``tracker simulate``; returns its base URL, the agent ids it printed, and
        its process."""
        port = free_port()
        p = self.start(name, [PY, "-m", "tracker", "simulate", "--host", HOST, "--port",
                              str(port), "--agents", str(agents), "--seed", "1",
                              "--run-duration", str(run_duration[0]), str(run_duration[1]),
                              "--callback-drop", str(callback_drop), *extra],
                       stdout=subprocess.PIPE)
        agent_ids = []
        assert p.stdout is not None
        for raw in p.stdout:
            line = raw.decode().strip()
            if line.startswith("agent-"):
                agent_ids.append(line)
            elif "listening" in line:
                break
        else:
            raise RuntimeError(f"simulator {name} exited before listening")
        p.stdout.close()
        return f"http://{HOST}:{port}", agent_ids, p

    def bare(self, name: str, script: str, *argv: str) -> tuple[str, subprocess.Popen]:
        """Start ``benchmarks/<script> PORT *argv`` (a bare server with a /healthz) on a free
        port; returns its base URL and process."""
        port = free_port()
        p = self.start(name, [PY, str(HERE / script), str(port), *argv])
        url = f"http://{HOST}:{port}"
        wait_http(url + "/healthz", proc=p)
        return url, p

    def tracker(self, name: str, db: Path, letta_url: str, port: int | None = None,
                env: dict[str, str] | None = None, script: str | None = None,
                src: str | None = None) -> tuple[str, subprocess.Popen]:
        """Start ``tracker serve`` on ``db`` (or ``benchmarks/<script>``, which serves the
        tracker configured the same way), with the package in ``src`` if given; returns its
        base URL and process."""
        port = port or free_port()
        argv = [PY, str(HERE / script)] if script else [PY, "-m", "tracker", "serve"]
        p = self.start(name, argv, env={
            **tracker_env(db, letta_url), "TRACKER_SERVER__PORT": str(port), **(env or {}),
            **package_env(src)})
        url = f"http://{HOST}:{port}"
        wait_http(url + "/healthz", proc=p)
        return url, p


def tracker_env(db: Path, letta_url: str = "http://127.0.0.1:9") -> dict[str, str]:
    return {"TRACKER_DATABASE__URL": f"sqlite:///{db}", "TRACKER_LETTA__BASE_URL": letta_url,
            "TRACKER_SERVER__HOST": HOST, "TRACKER_LOGGING__LEVEL": LOG_LEVEL,
            "TRACKER_RELAY__ALLOW_PRIVATE": "true"}


def tracker_cli(db: Path, *argv: str, src: str | None = None) -> str:
    """Run a tracker command on ``db`` (with the tracker package in ``src``, if given);
    returns its stdout."""
    out = subprocess.run([PY, "-m", "tracker", *argv], cwd=OUT,
                         env=child_env({**tracker_env(db), **package_env(src)}),
                         capture_output=True, text=True, check=True)
    return out.stdout


def no_db(path: Path) -> Path:
    """``path`` with no database there (nor its WAL and shared memory files)."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return path


def fresh_db(path: Path, src: str | None = None) -> Path:
    """A new database at the tracker's latest schema (created by the tracker itself: the
    one in ``src``, if given, so that a copy being compared gets its own schema)."""
    tracker_cli(no_db(path), "db", "migrate", src=src)  # (db status makes no database)
    return path


def create_key(db: Path, name: str, admin: bool = False, src: str | None = None) -> str:
    """A new API key (the last line ``tracker keys create`` prints)."""
    args = ["keys", "create", name] + (["--admin"] if admin else [])
    return tracker_cli(db, *args, src=src).strip().splitlines()[-1]


def copy_db(src: Path, dst: Path) -> Path:
    for suffix in ("-wal", "-shm"):
        Path(str(dst) + suffix).unlink(missing_ok=True)
    shutil.copyfile(src, dst)
    # the copy (1 GB for benchmark 1) and what ran before it would otherwise be written back
    # by the kernel ~30 s later, inside the load that follows and on the tracker's side only
    # (the bare handlers write nothing). Measured with 4 GB left dirty before benchmark 1:
    # 102 against 109 µs of CPU a callback (medians of 3 runs), within the noise, but a cost
    # the ceiling never pays (BENCHMARKS-HISTORY.md)
    os.sync()
    return dst


def count(db: Path, sql: str, params: Sequence[Any] = ()) -> int:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute(sql, params).fetchone()[0]


class MaxSampler(threading.Thread):
    """The largest value ``measure()`` gave, sampled every ``every`` s until ``stop()``."""

    def __init__(self, measure: Callable[[], float], every: float) -> None:
        super().__init__(daemon=True)
        self.measure, self.every, self.max = measure, every, 0.0
        self._stop_flag = threading.Event()

    def run(self) -> None:
        while not self._stop_flag.is_set():
            self.max = max(self.max, self.measure())
            time.sleep(self.every)

    def stop(self) -> float:
        self._stop_flag.set()
        self.join()
        return self.max


def file_mb(path: str) -> float:
    """A file's size in MB; 0 when it is not there (the WAL before the first write)."""
    try:
        return os.path.getsize(path) / 1e6
    except OSError:
        return 0.0


def wal_sampler(db: Path) -> MaxSampler:
    """A started sampler of the largest size, in MB, of ``db``'s WAL file."""
    sampler = MaxSampler(lambda: file_mb(f"{db}-wal"), 0.25)
    sampler.start()
    return sampler


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def settle(pid: int, busy: float = 0.05, timeout: float = 60.0) -> None:
    """Wait until a process uses under ``busy`` of a core over half a second."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        c0 = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - c0 < busy * 0.5:
            return


def cpu_times(pid: int, loop_thread: bool = False) -> tuple[float, float]:
    """User and system CPU seconds a process has used so far; with ``loop_thread``, only its
    main thread's (the event loop's, in the tracker and the bare servers: the one a
    single-process server's rate is bound by, where SQLite's writes and commits run too)."""
    path = f"/proc/{pid}/task/{pid}/stat" if loop_thread else f"/proc/{pid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # a child gone meanwhile
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time a process has used so far (with ``children``, plus what its
    live child processes have used: the tracker's callback workers)."""
    own = sum(cpu_times(pid))
    if not children:
        return own
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except FileNotFoundError:  # gone meanwhile
        return own
    return own + sum(cpu_seconds(k, children=True) for k in kids)


class CpuMeter:
    """The CPU a server uses over a load: all its processes' (with ``children``: the tracker's
    callback workers), and its event loop's thread's, user and system apart."""

    def __init__(self, pid: int, children: bool = False) -> None:
        self.pid, self.children = pid, children
        self.start = self._now()

    def _now(self) -> tuple[float, float, float]:
        return (cpu_seconds(self.pid, self.children), *cpu_times(self.pid, loop_thread=True))

    def stop(self, load: dict) -> dict[str, float]:
        """Since the meter started, over ``load`` (``wrk``'s result): ``cpu_us`` (all
        threads), ``loop_user_us`` and ``loop_sys_us``, each a request answered, and
        ``loop_busy``, the loop's thread's share of the load's own duration (wrk first reads
        its requests file, for a second or more, while the server waits)."""
        cpu, user, system = (b - a for a, b in zip(self.start, self._now(), strict=True))
        per_request = 1e6 / max(1, load["ok"])
        wall = load["duration_us"] / 1e6
        return {"cpu_us": cpu * per_request, "loop_user_us": user * per_request,
                "loop_sys_us": system * per_request,
                "loop_busy": (user + system) / wall if wall > 0 else 0.0}


# --- wrk -------------------------------------------------------------------------------------

def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def rate(res: dict) -> float:
    """Successful requests per second of one ``wrk`` result."""
    return res["ok"] / (res["duration_us"] / 1e6)


def wrk(url: str, script: Path, connections: int, duration_s: float, threads: int = 1,
        env: dict[str, str] | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """Run wrk with a script whose ``done()`` prints one JSON line; returns it parsed."""
    out = subprocess.run(wrk_argv(url, script, connections, duration_s, threads, timeout_s),
                         env={**os.environ, **(env or {})}, capture_output=True, text=True,
                         timeout=duration_s + 120)
    return wrk_figures(out.stdout, out.stderr)


def wrk_argv(url: str, script: Path, connections: int, duration_s: float, threads: int = 1,
             timeout_s: float = 10.0) -> list[str]:
    """wrk's command line; started on its own (``wrk`` waits for it), SIGINT ends it early
    and it still runs the script's ``done()``."""
    seconds = lambda x: f"{max(1, round(x))}s"  # noqa: E731 (wrk takes whole seconds)
    return ["wrk", "-t", str(threads), "-c", str(connections), "-d", seconds(duration_s),
            "--timeout", seconds(timeout_s), "-s", str(script), url]


def wrk_figures(stdout: str, stderr: str = "") -> dict[str, Any]:
    """The JSON line a wrk script's ``done()`` printed, parsed."""
    for line in stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"wrk printed no figures:\n{stdout}\n{stderr}")


def socket_errors(res: dict) -> int:
    """The requests of a ``wrk`` result that got no answer: its connect, read and write errors
    and timeouts (a non-2xx answer is counted apart, in ``bad``)."""
    return sum(res["errors"][k] for k in ("connect", "read", "write", "timeout"))


# --- realistic content -----------------------------------------------------------------------

WORDS = (
    "the", "agent", "checked", "the", "customer's", "order", "history", "and", "found",
    "two", "pending", "refunds", "that", "were", "issued", "last", "week", "but", "never",
    "settled", "so", "it", "drafted", "a", "reply", "explaining", "the", "delay", "and",
    "asked", "the", "billing", "tool", "to", "retry", "the", "settlement", "before", "the",
    "end", "of", "the", "day", "while", "keeping", "the", "shipping", "address",
    "unchanged", "and", "noting", "the", "ticket", "number", "for", "follow", "up",
    "memory", "updated", "with", "preference", "for", "email", "contact", "instead", "of",
    "phone", "calls",
)


def prose(rng: Any, n_chars: int) -> str:
    """Plausible message text of about ``n_chars`` characters."""
    out: list[str] = []
    size = 0
    while size < n_chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    text = " ".join(out)
    return text[0].upper() + text[1:n_chars - 1] + "."


def iso(ts: float) -> str:
    """The tracker's stored timestamp form (fixed width, sorts by time)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


# --- profiling -------------------------------------------------------------------------------

def py_spy(procs: Procs, pid: int, name: str, seconds: float = 600) -> subprocess.Popen | None:
    """Sample ``pid`` with py-spy (if installed) for ``seconds`` or until ``end_py_spy``,
    into out/profile-<name>.txt (collapsed stacks); read it with ``profile_summary``."""
    exe = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy is not installed (.venv/bin/pip install py-spy): no profile")
        return None
    return procs.start(f"py-spy-{name}", [
        exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", "250", "--format", "raw", "--nonblocking", "--threads",
        "--output", str(OUT / f"profile-{name}.txt")])


def end_py_spy(procs: Procs, spy: subprocess.Popen | None) -> None:
    """Stop sampling now (SIGINT makes py-spy write what it has)."""
    if spy is not None:
        procs.stop(spy, sig=signal.SIGINT, timeout=30)


def profile_summary(name: str, top: int = 25) -> str:
    """Inclusive and self shares of the hottest frames of a ``py_spy`` profile."""
    path = OUT / f"profile-{name}.txt"
    if not path.exists():
        return f"(no profile {path})"
    incl: dict[str, int] = {}
    self_: dict[str, int] = {}
    per_thread: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_text)
        frames = stack.split(";")
        total += n
        thread = frames[0].split(": ", 1)[-1]
        per_thread[thread] = per_thread.get(thread, 0) + n
        for f in set(frames[1:]):
            incl[f] = incl.get(f, 0) + n
        self_[frames[-1]] = self_.get(frames[-1], 0) + n
    share = lambda d: sorted(d.items(), key=lambda kv: -kv[1])  # noqa: E731
    out = [f"profile {name}: {total} samples at 250 Hz; by thread: "
           + ", ".join(f"{t} {n / total:.0%}" for t, n in share(per_thread))]
    out += ["inclusive:"] + [f"  {n / total:6.1%}  {f}" for f, n in share(incl)[:top]
                             if "threading.py" not in f and "runpy" not in f]
    out += ["self:"] + [f"  {n / total:6.1%}  {f}" for f, n in share(self_)[:top]]
    return "\n".join(out)


# --- async clients ---------------------------------------------------------------------------

async def submit_many(base_url: str, key: str, jobs: Sequence[tuple[str, Any]],
                      concurrency: int = 64) -> list[dict]:
    """POST each (agent_id, text) to ``messages/async`` at ``base_url``; the Runs answered.
    A text may be a function, called just before its request is sent."""
    import asyncio

    import aiohttp

    slots = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, connector=conn, headers=headers) as s:
        async def one(agent: str, text: Any) -> dict:
            await slots.acquire()
            content = text() if callable(text) else text
            try:
                return await send(agent, content)
            finally:
                slots.release()

        async def send(agent: str, text: str) -> dict:
            async with s.post(f"/v1/agents/{agent}/messages/async",
                              json={"messages": [{"role": "user", "content": text}]}) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"submit answered {r.status}: {body}")
                return body

        return await asyncio.gather(*(one(a, t) for a, t in jobs))


def epoch(stamp: str | None) -> float | None:
    """Seconds since the epoch of a Letta or tracker timestamp (naive means UTC)."""
    from datetime import UTC, datetime

    if not stamp:
        return None
    dt = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
