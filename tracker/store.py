"""The storage protocol: domain operations every backend implements, and ``open_store(url)``.

Callers never see SQL. State changes go through ``transition``, a compare-and-set guarded by
the state machine in ``tracker.states``, which also appends the event and (when asked) the
relay's outbox row in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tracker.states import State


@dataclass
class RunRecord:
    """One run as stored. ``request``, ``messages`` and ``usage`` are loaded on demand."""

    seq: int
    id: str
    user_id: str
    agent_id: str
    kind: str
    state: State
    status: str
    created_at: str
    stop_reason: str | None = None
    letta_run_id: str | None = None
    request_config: dict | None = None
    callback_url: str | None = None
    submitted_at: str | None = None
    completed_at: str | None = None
    recorded_at: str | None = None
    completed_via: str | None = None
    conversation_id: str | None = None
    base_template_id: str | None = None
    background: bool | None = None
    metadata: dict | None = None
    callback_sent_at: str | None = None
    callback_status_code: int | None = None
    callback_error: str | None = None
    ttft_ns: int | None = None
    total_duration_ns: int | None = None
    error: str | None = None
    error_code: int | None = None
    attempts: int = 0
    poll_count: int = 0
    next_check_at: float | None = None
    deadline_at: float | None = None
    needs_lookup: bool = False
    idempotency_key: str | None = None
    request_hash: str | None = None
    request: dict | None = None
    messages: list | None = None
    usage: dict | None = None


@dataclass
class NewRun:
    """What submit stores: the run is queued, nothing has been sent yet."""

    id: str
    user_id: str
    agent_id: str
    kind: str
    request: dict
    request_config: dict
    callback_url: str | None
    idempotency_key: str | None = None
    request_hash: str | None = None


@dataclass
class Event:
    """One observation on a run's timeline."""

    source: str
    kind: str
    detail: dict | None = None
    state: str | None = None
    status: str | None = None
    at: str | None = None
    run_id: str | None = None
    id: int | None = None


@dataclass
class RunFilter:
    """History query: Letta's list parameters plus the tracker's own."""

    user_id: str | None = None
    agent_id: str | None = None
    #: runs of any of these agents; ``agent_id``, when given, wins (as in Letta)
    agent_ids: Sequence[str] = ()
    statuses: Sequence[str] = ()
    states: Sequence[str] = ()
    stop_reason: str | None = None
    conversation_id: str | None = None
    background: bool | None = None
    active: bool | None = None
    completed_via: str | None = None
    callback_missed: bool | None = None
    created_after: str | None = None
    created_before: str | None = None
    before: str | None = None
    after: str | None = None
    limit: int = 100
    ascending: bool = False


@dataclass
class User:
    """A tracker user; every run and key belongs to one."""

    id: str
    name: str
    is_admin: bool
    created_at: str
    webhook_secret: str = ""
    webhook_secret_old: str | None = None


@dataclass
class ApiKey:
    """An API key as listed (never the key itself, which is stored only as a hash)."""

    id: str
    user_id: str
    user_name: str
    prefix: str
    created_at: str
    revoked_at: str | None
    is_admin: bool = False


@dataclass
class Delivery:
    """One relay delivery of a run's outcome to the user's callback_url."""

    id: str
    run_id: str
    user_id: str
    url: str
    state: str
    attempts: int
    next_attempt_at: float | None
    created_at: str
    finished_at: str | None = None
    last_status: int | None = None
    last_error: str | None = None
    #: the body its attempts send (kept from the first; None before it)
    body: bytes | None = None
    attempt_log: list[dict] = field(default_factory=list)


class Verdict:
    """What ``accept_callback`` made of a callback for one of our runs."""

    ACCEPTED = "accepted"      # durably in the inbox, to be applied
    NO_RUN = "no_run"          # the token's run is not (or no longer) stored
    OTHER_RUN = "other_run"    # the body names a Letta run that is not this run's
    UNVERIFIED = "unverified"  # the run has no Letta id yet: only Letta can vouch for it


@dataclass
class InboxItem:
    """A received callback waiting in the inbox."""

    id: int
    run_id: str
    received_at: float
    body: bytes


class Store(Protocol):
    """Domain operations on runs, events, users and deliveries."""

    #: False from a failed write until the next write succeeds (health reporting)
    writable: bool
    #: set by the service: whether writes are flooding in now (callbacks filed at a flood's
    #: rate, ``Applier.flooding``); upkeep that would hold every write waits while it is True
    flooding: Callable[[], bool]
    #: set by the service: whether the running code serves the only request in flight
    #: (``InFlight.lone``): its writes commit at once, with no wait for others to join
    alone: Callable[[], bool]

    async def open(self, migrate: bool = True) -> None: ...
    async def close(self) -> None: ...
    def lock_for_service(self) -> None: ...
    async def ping(self) -> bool: ...
    async def schema_version(self) -> int: ...
    async def migrate(self) -> list[int]: ...
    async def table_counts(self) -> dict[str, int]: ...
    async def setting(self, key: str, default: str) -> str: ...

    # runs
    async def submit(self, new: NewRun, event: Event,
                     claim: bool | None = None) -> tuple[RunRecord, bool]: ...
    async def get_run(self, run_id: str, user_id: str | None = None,
                      full: bool = False) -> RunRecord | None: ...
    async def claim(self, serial: bool, now: float, agent_id: str | None = None,
                    limit: int = 100) -> list[RunRecord]: ...
    #: compare-and-set on the run's state (in ``expect``), and with ``unless_status``, on its
    #: status not being that one
    async def transition(self, run_id: str, to: State | None, expect: Iterable[State],
                         fields: dict[str, Any], event: Event | None,
                         relay: bool = False,
                         unless_status: str | None = None) -> RunRecord | None: ...
    #: ``seen``: the next_check_at each run had when the caller read it; given, a run whose
    #: check another writer has set since (a cancel's "look soon") keeps that one
    async def reschedule(self, checks: Sequence[tuple[str, float, int]],
                         seen: Sequence[float | None] | None = None) -> None: ...
    async def due(self, states: Iterable[State], now: float, limit: int) -> list[RunRecord]: ...
    async def in_states(self, states: Iterable[State], limit: int = 10_000) -> list[RunRecord]: ...
    #: the seq of every run in ``states``, newest first (start-up's sweep: a read)
    async def seqs_in(self, states: Iterable[State]) -> list[int]: ...
    #: those of the runs with these seqs still in ``states``
    async def runs_at(self, states: Iterable[State], seqs: Sequence[int]) -> list[RunRecord]: ...
    #: the earliest next_check_at of runs in ``states`` (only those later than ``after``)
    async def next_due(self, states: Iterable[State],
                       after: float | None = None) -> float | None: ...
    async def list_runs(self, flt: RunFilter) -> list[RunRecord]: ...
    #: the same page, as the API's JSON array of runs (``tracker.serialize.run_out``)
    async def list_runs_json(self, flt: RunFilter) -> bytes: ...
    async def count_by_state(self, states: Iterable[State]) -> dict[str, int]: ...
    async def queued_by_agent(self, limit: int) -> dict[str, int]: ...
    async def events(self, run_id: str) -> list[Event]: ...
    async def add_event(self, run_id: str, event: Event) -> None: ...
    async def stats(self, user_id: str | None) -> dict[str, Any]: ...
    async def runs_by_id(self, run_ids: Sequence[str]) -> dict[str, RunRecord]: ...
    async def paused_by(self, agent_id: str) -> set[str]: ...
    async def run_by_key(self, user_id: str, idempotency_key: str) -> RunRecord | None: ...

    # Letta's callbacks, durable before they are answered and applied in batches after
    async def accept_callback(self, run_id: str, letta_run_id: str, body: bytes,
                              verified: bool = False) -> str: ...
    async def inbox(self, limit: int) -> list[InboxItem]: ...
    async def inbox_depth(self) -> int: ...
    async def forget_callbacks(self, ids: Sequence[int]) -> None: ...
    #: what filing a callback keeps in memory, loaded by the service at start-up
    async def warm_up(self) -> None: ...

    # users and keys
    async def create_user(self, name: str, is_admin: bool, webhook_secret: str) -> User: ...
    async def user_by_name(self, name: str) -> User | None: ...
    async def add_key(self, user_id: str, key_id: str, key_hash: str, prefix: str) -> None: ...
    async def user_for_key(self, key_hash: str) -> User | None: ...
    async def list_keys(self) -> list[ApiKey]: ...
    async def revoke_key(self, key_id_or_prefix: str) -> int: ...
    async def count_keys(self) -> int: ...
    async def rotate_webhook_secret(self, user_id: str, new_secret: str) -> None: ...
    async def get_user(self, user_id: str) -> User | None: ...

    # relay outbox
    #: due deliveries come without their bodies: ``delivery_body`` reads the one claimed
    async def due_deliveries(self, now: float, limit: int,
                             after: Delivery | None = None) -> list[Delivery]: ...
    async def delivery_body(self, delivery_id: str) -> bytes | None: ...
    async def next_delivery_due(self) -> float | None: ...
    async def record_attempt(self, delivery_id: str, attempt: dict, state: str,
                             next_attempt_at: float | None, claimed_at: float | None = None,
                             body: bytes | None = None) -> None: ...
    async def deliveries(self, run_id: str) -> list[Delivery]: ...
    async def delivery_state(self, run_id: str) -> str | None: ...
    async def redeliver(self, run_id: str, now: float) -> Delivery | None: ...

    # operations
    async def prune(self, before: str, batch: int, dry_run: bool = False) -> dict[str, int]: ...
    #: a consistent copy, its queued runs marked to be looked for at Letta before they are
    #: sent (the live service may send them after it); returns how many were marked
    async def backup(self, path: str) -> int: ...


def open_store(url: str, synchronous: str = "NORMAL", checkpoints: bool = True) -> Store:
    """Pick the backend by URL scheme (``sqlite:///path`` or ``sqlite:///:memory:``);
    ``synchronous`` is ``database.synchronous``; ``checkpoints`` False where the service's
    process checkpoints the database for this one (a callback worker's)."""
    if url.startswith("sqlite://"):
        from tracker.store_sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite://").removeprefix("/") or ":memory:",
                           synchronous, checkpoints)
    raise ValueError(f"unsupported database URL {url!r}: only sqlite:/// is available")


@dataclass(frozen=True)
class Add:
    """A field update that adds to the stored value (``poll_count = poll_count + n``)."""

    n: int = 1
