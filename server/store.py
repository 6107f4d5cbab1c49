"""The durable store: one SQLite file in WAL mode with synchronous=FULL.

Tables (schema version `SCHEMA_VERSION`, kept in `PRAGMA user_version` and in
`meta`):

* `ledger`: append-only, one row per settlement and one per reversal, in
  commit order (`seq`). A row holds its key (person, region, scheme, year),
  the signed accumulator deltas (a reversal row holds the negated deltas of
  the settlement it undoes), and for a settlement the claim as sent (the
  idempotency content) and the response as returned. UNIQUE(claim_id, kind)
  makes a second settlement or a second reversal of one claim_id impossible.
* `accumulators`: one row per key, the fold of the ledger's deltas for it,
  written in the same transaction as the ledger rows that change it.
* `persons`: the registry.
* `meta`: schema version, registry import fingerprint.

Only the writer (server/batcher.py) writes the ledger and accumulators, on its
own connection; readers use one connection per thread and see the last
committed state (WAL snapshots).
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Iterable, Optional

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS persons (
    person_id  TEXT PRIMARY KEY,
    region     TEXT NOT NULL,
    scheme     TEXT NOT NULL,
    birth_date INTEGER NOT NULL,          -- days since 1970-01-01
    identities TEXT NOT NULL              -- JSON [[identity, from_days|null, to_days|null], ...]
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS ledger (
    seq                   INTEGER PRIMARY KEY,   -- commit order, from 1
    kind                  TEXT NOT NULL CHECK (kind IN ('settle', 'reverse')),
    claim_id              TEXT NOT NULL,
    facility_id           TEXT NOT NULL,
    person_id             TEXT NOT NULL,
    region                TEXT NOT NULL,
    scheme                TEXT NOT NULL,
    year                  INTEGER NOT NULL,
    delta_admissions      INTEGER NOT NULL,      -- signed: a reversal carries the negated deltas
    delta_compliant_total INTEGER NOT NULL,
    delta                 BLOB NOT NULL,         -- medsettle.v1.AccumulatorDelta (signed, as the columns above)
    claim                 BLOB,                  -- settle: medsettle.v1.Claim as sent (deterministic bytes)
    response              BLOB,                  -- settle: medsettle.v1.SettleResponse as returned
    reason                TEXT,                  -- reverse: the caller's reason
    recorded_at_us        INTEGER NOT NULL,      -- server clock, µs since the Unix epoch (UTC)
    UNIQUE (claim_id, kind)
);
CREATE INDEX IF NOT EXISTS ledger_key ON ledger (person_id, year);

CREATE TABLE IF NOT EXISTS accumulators (
    person_id       TEXT NOT NULL,
    region          TEXT NOT NULL,
    scheme          TEXT NOT NULL,
    year            INTEGER NOT NULL,
    admissions      INTEGER NOT NULL,
    compliant_total INTEGER NOT NULL,
    state           BLOB NOT NULL,               -- medsettle.v1.Accumulators (admissions, total and layers)
    last_seq        INTEGER NOT NULL,            -- ledger seq of the last change
    PRIMARY KEY (person_id, region, scheme, year)
) WITHOUT ROWID;
"""

LEDGER_COLUMNS = ("seq", "kind", "claim_id", "facility_id", "person_id", "region", "scheme", "year",
                  "delta_admissions", "delta_compliant_total", "delta", "claim", "response", "reason",
                  "recorded_at_us")
INSERT_LEDGER = f"INSERT INTO ledger ({', '.join(LEDGER_COLUMNS)}) VALUES ({', '.join('?' * len(LEDGER_COLUMNS))})"
UPSERT_ACC = ("INSERT OR REPLACE INTO accumulators (person_id, region, scheme, year, admissions, compliant_total, "
              "state, last_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
UPSERT_PERSON = "INSERT OR REPLACE INTO persons (person_id, region, scheme, birth_date, identities) VALUES (?, ?, ?, ?, ?)"

#: WAL frames (pages) after which the checkpointer restarts the log: about 40 MB.
RESTART_FRAMES = 10_000
#: How long a RESTART checkpoint may wait for readers (and hold off the writer).
RESTART_WAIT_MS = 20
#: The WAL file is truncated to this size when the log restarts.
JOURNAL_SIZE_LIMIT = 64 << 20

#: SQLite's default limit on host parameters is 32766 (3.32+); stay far below.
IN_CHUNK = 500


class StoreError(RuntimeError):
    pass


def now_us() -> int:
    return time.time_ns() // 1000


def connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the store's pragmas (autocommit mode: transactions are explicit)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{path}: cannot switch to WAL mode (got {mode})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB
    return conn


def placeholders(n: int) -> str:
    return ",".join("?" * n)


def chunks(seq: list, n: int = IN_CHUNK):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


class Store:
    """Opens (creating or checking the schema of) the store file."""

    def __init__(self, path: str, *, exclusive: bool = False):
        self.path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(d):
            raise StoreError(f"{self.path}: folder {d} does not exist")
        self._lock_file = None
        if exclusive:  # one server per store file: a second writer would break idempotency
            import fcntl

            f = open(self.path + ".lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                raise StoreError(f"{self.path}: another medsettle server is using this store") from None
            self._lock_file = f
        self.conn = connect(self.path)  # the writer's connection
        self._migrate()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self.last_seq = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM ledger").fetchone()[0]
        self._checkpointer = None

    # ------------------------------------------------------------------ schema

    def _migrate(self) -> None:
        c = self.conn
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: store schema version {version} is newer than this server's "
                             f"({SCHEMA_VERSION}); use a newer medsettle")
        if version == SCHEMA_VERSION:
            return
        c.execute("BEGIN IMMEDIATE")
        try:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at_us', ?)", (str(now_us()),))
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ readers

    def reader(self) -> sqlite3.Connection:
        """This thread's read connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self, checkpoint: bool = True) -> None:
        if self._checkpointer is not None:
            t, stop = self._checkpointer
            stop.set()
            t.join(10)
            self._checkpointer = None
        with self._readers_lock:
            for r in self._readers:
                try:
                    r.close()
                except sqlite3.Error:
                    pass
            self._readers.clear()
        if checkpoint:
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
        self.conn.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def max_seq(self, conn: Optional[sqlite3.Connection] = None) -> int:
        """The last committed ledger sequence number (0 when empty)."""
        return (conn or self.conn).execute("SELECT COALESCE(MAX(seq), 0) FROM ledger").fetchone()[0]

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str, conn: Optional[sqlite3.Connection] = None) -> Optional[str]:
        row = (conn or self.conn).execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ lookups (any connection)

    @staticmethod
    def persons(conn: sqlite3.Connection, person_ids: Iterable[str]) -> dict:
        """person_id -> stored row (person_id, region, scheme, birth_date, identities)."""
        ids = list(set(person_ids))
        out = {}
        for part in chunks(ids):
            for row in conn.execute(f"SELECT person_id, region, scheme, birth_date, identities FROM persons "
                                    f"WHERE person_id IN ({placeholders(len(part))})", part):
                out[row[0]] = row
        return out

    @staticmethod
    def ledger_rows(conn: sqlite3.Connection, claim_ids: Iterable[str]) -> dict:
        """claim_id -> {kind: row dict} for the ledger rows of those claims."""
        ids = list(set(claim_ids))
        out: dict = {}
        for part in chunks(ids):
            cur = conn.execute(f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger "
                               f"WHERE claim_id IN ({placeholders(len(part))})", part)
            for row in cur:
                d = dict(zip(LEDGER_COLUMNS, row))
                out.setdefault(d["claim_id"], {})[d["kind"]] = d
        return out

    @staticmethod
    def accumulator_rows(conn: sqlite3.Connection, keys: Iterable[tuple]) -> dict:
        """(person_id, region, scheme, year) -> state (Accumulators bytes) for those of `keys` that are stored."""
        keys = set(keys)
        persons = list({k[0] for k in keys})
        out = {}
        for part in chunks(persons):
            for row in conn.execute("SELECT person_id, region, scheme, year, state "
                                    f"FROM accumulators WHERE person_id IN ({placeholders(len(part))})", part):
                if row[:4] in keys:
                    out[row[:4]] = row[4]
        return out

    @staticmethod
    def accumulators_of(conn: sqlite3.Connection, person_id: str, year: Optional[int] = None) -> list:
        """The state blobs (Accumulators bytes) of a person's keys, of one year or all."""
        if year is None:
            cur = conn.execute("SELECT state FROM accumulators WHERE person_id = ? ORDER BY year, region, scheme",
                               (person_id,))
        else:
            cur = conn.execute("SELECT state FROM accumulators WHERE person_id = ? AND year = ? "
                               "ORDER BY region, scheme", (person_id, year))
        return [r[0] for r in cur]

    # ------------------------------------------------------------------ writes (the writer's connection)

    def commit_group(self, ledger_rows: list, acc_rows: list, person_rows: list = ()) -> None:
        """One transaction: ledger rows, accumulator rows, registry rows. Raises on failure
        (after rolling back); nothing of the group is then stored."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if person_rows:
                c.executemany(UPSERT_PERSON, person_rows)
            if ledger_rows:
                c.executemany(INSERT_LEDGER, ledger_rows)
            if acc_rows:
                c.executemany(UPSERT_ACC, acc_rows)
            c.execute("COMMIT")
        except BaseException:
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    def upsert_persons(self, rows: list) -> None:
        self.commit_group([], [], rows)

    def checkpoint(self, mode: str = "PASSIVE", conn: Optional[sqlite3.Connection] = None):
        return (conn or self.conn).execute(f"PRAGMA wal_checkpoint({mode})").fetchone()

    def start_checkpointer(self, interval: float = 1.0, restart_frames: int = RESTART_FRAMES) -> None:
        """Moves WAL checkpoints off the commit path: the writer's connection stops
        checkpointing on commit, and a thread with its own connection runs a PASSIVE
        checkpoint every `interval` seconds (it never blocks the writer or the readers).

        Under steady load a PASSIVE checkpoint never finds the log fully copied
        when the writer begins its next transaction, so the log would never start
        over and would grow without bound (and every page read would probe a
        longer WAL index). Once it holds `restart_frames` frames, the thread
        follows the PASSIVE checkpoint with a RESTART: that copies only the
        frames committed meanwhile and holds off the writer for about one
        fsync of the database file; if readers keep it busy past
        RESTART_WAIT_MS it gives up until the next round."""
        if self._checkpointer is not None:
            return
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self.conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        stop = threading.Event()

        def run():
            conn = connect(self.path)
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            try:
                while not stop.wait(interval):
                    try:
                        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        if frames >= restart_frames:
                            conn.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
                            try:
                                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                            finally:
                                conn.execute("PRAGMA busy_timeout = 10000")
                    except sqlite3.Error:
                        pass
            finally:
                conn.close()

        t = threading.Thread(target=run, name="medsettle-checkpoint", daemon=True)
        t.start()
        self._checkpointer = (t, stop)

    # ------------------------------------------------------------------ audit

    def fold_ledger(self, conn: Optional[sqlite3.Connection] = None) -> dict:
        """The accumulators implied by the ledger (every settlement's deltas, minus every
        reversal's): key -> (admissions, compliant_total, {(layer, cap_group or None):
        [position, paid, deductible_charged]}), all-zero layer entries left out."""
        from ._proto import settlement_pb2 as pb

        conn = conn or self.conn
        out: dict = {}
        for p, r, s, y, da, dc, blob in conn.execute(
                "SELECT person_id, region, scheme, year, delta_admissions, delta_compliant_total, delta "
                "FROM ledger ORDER BY seq"):
            acc = out.setdefault((p, r, s, y), [0, 0, {}])
            d = pb.AccumulatorDelta.FromString(blob)
            if (d.admissions, d.compliant_total) != (da, dc):
                raise StoreError(f"ledger row of {p}: delta columns disagree with the delta blob")
            acc[0] += da
            acc[1] += dc
            for e in d.layers:
                v = acc[2].setdefault((e.layer, e.cap_group or None), [0, 0, 0])
                v[0] += e.position
                v[1] += e.paid
                v[2] += e.deductible_charged
        return {k: (a, c, _clean(l)) for k, (a, c, l) in out.items()}

    def stored_accumulators(self, conn: Optional[sqlite3.Connection] = None) -> dict:
        """The accumulators table, in the form of `fold_ledger`."""
        from ._proto import settlement_pb2 as pb

        conn = conn or self.conn
        out = {}
        for p, r, s, y, a, c, blob in conn.execute(
                "SELECT person_id, region, scheme, year, admissions, compliant_total, state FROM accumulators"):
            st = pb.Accumulators.FromString(blob)
            if (st.admissions, st.compliant_total) != (a, c):
                raise StoreError(f"accumulators of {p}: columns disagree with the state blob")
            out[(p, r, s, y)] = (a, c, _clean({(e.layer, e.cap_group or None): [e.position, e.paid,
                                                                                   e.deductible_charged]
                                               for e in st.layers}))
        return out


def _clean(layers: dict) -> dict:
    return {k: v for k, v in sorted(layers.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")) if any(v)}
