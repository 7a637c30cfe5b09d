"""Schema migrations for the SQLite store: version N is ``MIGRATIONS[N - 1]``.

A migration is appended, never edited: databases in the field were built from the old text.
``PRAGMA user_version`` holds the version a database is at.
"""

from __future__ import annotations

V1 = """
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE runs (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    id                   TEXT NOT NULL UNIQUE,
    user_id              TEXT NOT NULL,
    agent_id             TEXT NOT NULL,
    kind                 TEXT NOT NULL DEFAULT 'message',
    state                TEXT NOT NULL,
    status               TEXT NOT NULL DEFAULT 'created',
    stop_reason          TEXT,
    letta_run_id         TEXT UNIQUE,
    request              TEXT NOT NULL,
    request_config       TEXT,
    callback_url         TEXT,
    created_at           TEXT NOT NULL,
    submitted_at         TEXT,
    completed_at         TEXT,
    recorded_at          TEXT,
    completed_via        TEXT,
    conversation_id      TEXT,
    base_template_id     TEXT,
    background           INTEGER,
    metadata             TEXT,
    callback_sent_at     TEXT,
    callback_status_code INTEGER,
    callback_error       TEXT,
    ttft_ns              INTEGER,
    total_duration_ns    INTEGER,
    messages             TEXT,
    usage                TEXT,
    error                TEXT,
    error_code           INTEGER,
    attempts             INTEGER NOT NULL DEFAULT 0,
    poll_count           INTEGER NOT NULL DEFAULT 0,
    next_check_at        REAL,
    deadline_at          REAL,
    needs_lookup         INTEGER NOT NULL DEFAULT 0
);

-- history queries: newest first by (created_at, seq) under each filter
CREATE INDEX runs_created ON runs (created_at);
CREATE INDEX runs_agent ON runs (agent_id, created_at);
CREATE INDEX runs_status ON runs (status, created_at);
CREATE INDEX runs_state ON runs (state, created_at);
-- the dispatcher's queue (a partial index: it stays as small as the queue)
CREATE INDEX runs_queue ON runs (agent_id, seq) WHERE state = 'queued';
-- the poller's and dispatcher's due lists
CREATE INDEX runs_check ON runs (state, next_check_at);

CREATE TABLE run_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  TEXT NOT NULL,
    at      TEXT NOT NULL,
    source  TEXT NOT NULL,
    kind    TEXT NOT NULL,
    state   TEXT,
    status  TEXT,
    detail  TEXT
);
CREATE INDEX run_events_run ON run_events (run_id, id);
"""

V2 = """
CREATE TABLE users (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE,
    is_admin            INTEGER NOT NULL DEFAULT 0,
    created_at          TEXT NOT NULL,
    webhook_secret      TEXT NOT NULL,
    webhook_secret_old  TEXT
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id),
    key_hash    TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

ALTER TABLE runs ADD COLUMN idempotency_key TEXT;
ALTER TABLE runs ADD COLUMN request_hash TEXT;
CREATE UNIQUE INDEX runs_idempotency ON runs (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_user ON runs (user_id, created_at);
CREATE INDEX runs_via ON runs (completed_via, created_at);
CREATE INDEX runs_letta_status ON runs (agent_id, status, created_at);
-- two multi-value filters, as partial indexes so their pages need no sort
CREATE INDEX runs_missed ON runs (created_at) WHERE completed_via IN ('poll', 'reconcile');
CREATE INDEX runs_active ON runs (created_at) WHERE status IN ('created', 'running');

CREATE TABLE deliveries (
    id              TEXT PRIMARY KEY,
    run_id          TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    url             TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    created_at      TEXT NOT NULL,
    finished_at     TEXT,
    last_status     INTEGER,
    last_error      TEXT
);
CREATE INDEX deliveries_run ON deliveries (run_id);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';

CREATE TABLE delivery_attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id TEXT NOT NULL,
    at          TEXT NOT NULL,
    status_code INTEGER,
    latency_ms  REAL,
    error       TEXT
);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id, id);
"""

# v3: counts kept by triggers in the same transaction as every change, so that /v1/stats reads
# a few hundred rows instead of grouping a million; and finished runs by completion time.
_COUNT_KEY = "user_id = {r}.user_id AND agent_id = {r}.agent_id AND state = {r}.state" \
             " AND status = {r}.status AND completed_via = coalesce({r}.completed_via, '')"
_COUNT_ADD = """INSERT INTO run_counts VALUES ({r}.user_id, {r}.agent_id, {r}.state, {r}.status,
        coalesce({r}.completed_via, ''), 1) ON CONFLICT DO UPDATE SET n = n + 1;"""
V3 = f"""
CREATE TABLE run_counts (
    user_id       TEXT NOT NULL,
    agent_id      TEXT NOT NULL,
    state         TEXT NOT NULL,
    status        TEXT NOT NULL,
    completed_via TEXT NOT NULL,
    n             INTEGER NOT NULL,
    PRIMARY KEY (user_id, agent_id, state, status, completed_via)
) WITHOUT ROWID;

INSERT INTO run_counts
    SELECT user_id, agent_id, state, status, coalesce(completed_via, ''), count(*)
    FROM runs GROUP BY 1, 2, 3, 4, 5;

CREATE TRIGGER runs_count_insert AFTER INSERT ON runs BEGIN
    {_COUNT_ADD.format(r="NEW")}
END;

CREATE TRIGGER runs_count_update AFTER UPDATE OF state, status, completed_via ON runs
WHEN OLD.state IS NOT NEW.state OR OLD.status IS NOT NEW.status
     OR OLD.completed_via IS NOT NEW.completed_via
BEGIN
    UPDATE run_counts SET n = n - 1 WHERE {_COUNT_KEY.format(r="OLD")};
    {_COUNT_ADD.format(r="NEW")}
END;

CREATE TRIGGER runs_count_delete AFTER DELETE ON runs BEGIN
    UPDATE run_counts SET n = n - 1 WHERE {_COUNT_KEY.format(r="OLD")};
END;

CREATE INDEX runs_recorded ON runs (recorded_at) WHERE recorded_at IS NOT NULL;
"""

# v4: the live runs (the dispatcher's and the poller's work) in a partial index that stays as
# small as the work in flight. Statistics only give SQLite the average rows per state, so on a
# table that is almost all `done` it scans the table rather than use (state, ...) indexes.
LIVE_STATES_SQL = ("state IN ('queued', 'submitting', 'submitted', 'stuck', 'confirming',"
                   " 'paused')")
V4 = f"""
CREATE INDEX runs_live ON runs (state, next_check_at, agent_id) WHERE {LIVE_STATES_SQL};
DROP INDEX runs_check;
"""

# v5: Letta's callbacks as received, verified and durable, waiting to be applied. Answering
# Letta only needs this append (a few µs); the state change follows in batches off its path.
V5 = """
CREATE TABLE callback_inbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT NOT NULL,
    received_at REAL NOT NULL,
    body        BLOB NOT NULL
);
"""

# v6: a run's request and result (its wide part, ~2 KB of messages) move to a table of their
# own, keyed by the run's seq. A history page reads only the narrow rows: ~10 to a page
# instead of 1 or 2, so 100 runs are ~10 page reads instead of ~100 scattered ones. SQLite
# drops columns by rebuilding the table (which also packs the rows); its indexes and
# triggers are made again as they were, and the AUTOINCREMENT high-water mark is kept.
# A run's payload goes when the run does (a trigger: every delete, prune's or another's).
_RUN_COLS_V6 = """seq, id, user_id, agent_id, kind, state, status, stop_reason, letta_run_id,
    request_config, callback_url, created_at, submitted_at, completed_at, recorded_at,
    completed_via, conversation_id, base_template_id, background, metadata, callback_sent_at,
    callback_status_code, callback_error, ttft_ns, total_duration_ns, error, error_code,
    attempts, poll_count, next_check_at, deadline_at, needs_lookup, idempotency_key,
    request_hash"""
V6 = f"""
CREATE TABLE run_payloads (
    seq      INTEGER PRIMARY KEY,  -- runs.seq
    request  TEXT NOT NULL,
    messages TEXT,
    usage    TEXT
);
INSERT INTO run_payloads SELECT seq, request, messages, usage FROM runs;

CREATE TABLE runs_v6 (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    id                   TEXT NOT NULL UNIQUE,
    user_id              TEXT NOT NULL,
    agent_id             TEXT NOT NULL,
    kind                 TEXT NOT NULL DEFAULT 'message',
    state                TEXT NOT NULL,
    status               TEXT NOT NULL DEFAULT 'created',
    stop_reason          TEXT,
    letta_run_id         TEXT UNIQUE,
    request_config       TEXT,
    callback_url         TEXT,
    created_at           TEXT NOT NULL,
    submitted_at         TEXT,
    completed_at         TEXT,
    recorded_at          TEXT,
    completed_via        TEXT,
    conversation_id      TEXT,
    base_template_id     TEXT,
    background           INTEGER,
    metadata             TEXT,
    callback_sent_at     TEXT,
    callback_status_code INTEGER,
    callback_error       TEXT,
    ttft_ns              INTEGER,
    total_duration_ns    INTEGER,
    error                TEXT,
    error_code           INTEGER,
    attempts             INTEGER NOT NULL DEFAULT 0,
    poll_count           INTEGER NOT NULL DEFAULT 0,
    next_check_at        REAL,
    deadline_at          REAL,
    needs_lookup         INTEGER NOT NULL DEFAULT 0,
    idempotency_key      TEXT,
    request_hash         TEXT
);
INSERT INTO runs_v6 ({_RUN_COLS_V6}) SELECT {_RUN_COLS_V6} FROM runs ORDER BY seq;
-- seqs of deleted newest runs are not given out again
DELETE FROM sqlite_sequence WHERE name = 'runs_v6';
INSERT INTO sqlite_sequence (name, seq) SELECT 'runs_v6', seq FROM sqlite_sequence
    WHERE name = 'runs';
DROP TABLE runs;
ALTER TABLE runs_v6 RENAME TO runs;

CREATE INDEX runs_created ON runs (created_at);
CREATE INDEX runs_agent ON runs (agent_id, created_at);
CREATE INDEX runs_status ON runs (status, created_at);
CREATE INDEX runs_state ON runs (state, created_at);
CREATE INDEX runs_queue ON runs (agent_id, seq) WHERE state = 'queued';
CREATE UNIQUE INDEX runs_idempotency ON runs (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_user ON runs (user_id, created_at);
CREATE INDEX runs_via ON runs (completed_via, created_at);
CREATE INDEX runs_letta_status ON runs (agent_id, status, created_at);
CREATE INDEX runs_missed ON runs (created_at) WHERE completed_via IN ('poll', 'reconcile');
CREATE INDEX runs_active ON runs (created_at) WHERE status IN ('created', 'running');
CREATE INDEX runs_recorded ON runs (recorded_at) WHERE recorded_at IS NOT NULL;
CREATE INDEX runs_live ON runs (state, next_check_at, agent_id) WHERE {LIVE_STATES_SQL};

CREATE TRIGGER runs_count_insert AFTER INSERT ON runs BEGIN
    {_COUNT_ADD.format(r="NEW")}
END;

CREATE TRIGGER runs_count_update AFTER UPDATE OF state, status, completed_via ON runs
WHEN OLD.state IS NOT NEW.state OR OLD.status IS NOT NEW.status
     OR OLD.completed_via IS NOT NEW.completed_via
BEGIN
    UPDATE run_counts SET n = n - 1 WHERE {_COUNT_KEY.format(r="OLD")};
    {_COUNT_ADD.format(r="NEW")}
END;

CREATE TRIGGER runs_count_delete AFTER DELETE ON runs BEGIN
    UPDATE run_counts SET n = n - 1 WHERE {_COUNT_KEY.format(r="OLD")};
END;

CREATE TRIGGER runs_payload_delete AFTER DELETE ON runs BEGIN
    DELETE FROM run_payloads WHERE seq = OLD.seq;
END;

-- the new indexes have no statistics yet, and history pages depend on them
ANALYZE runs;
"""

# runs_via indexed every run, most with no completed_via yet (queued, in flight): each submit
# paid an entry there that no query reads (``completed_via = ?`` implies it is not NULL)
V7 = """
DROP INDEX runs_via;
CREATE INDEX runs_via ON runs (completed_via, created_at) WHERE completed_via IS NOT NULL;
ANALYZE runs_via;
"""

# a delivery's body, kept from its first attempt: every attempt under its webhook-id sends the
# same bytes (Standard Webhooks: one id, one message), though the run it reports moved on since
# (paused, then done) and its own record changed (the run shows each attempt)
V8 = """
ALTER TABLE deliveries ADD COLUMN body BLOB;
"""

MIGRATIONS: list[str] = [V1, V2, V3, V4, V5, V6, V7, V8]
LATEST = len(MIGRATIONS)
