"""The embedded store: one SQLite file in WAL mode with synchronous=FULL.

Tables (versioned by `MIGRATIONS`, recorded in `schema_migrations` and in
`PRAGMA user_version`):

* `ledger`: append-only, one row per settlement and one per reversal, in
  commit order (`seq`). A row holds its key (person, region, scheme, year),
  the signed accumulator deltas (a reversal row holds the negated deltas of
  the settlement it undoes), and for a settlement the claim as sent (the
  idempotency content) and the response as returned. UNIQUE(claim_id, kind)
  makes a second settlement or a second reversal of one claim_id impossible.
* `accumulators`: one row per key, the carried-in state plus the fold of the
  ledger's deltas for it, written in the same transaction as the ledger rows
  that change it.
* `carried`: accumulators carried in from a batch run (`accumulators import`).
* `persons`: the registry. `meta`: registry import fingerprint, creation time.

One writer process per file (an exclusive lock on PATH.lock): the writer's
own connection writes; readers use one connection per thread and see the
last committed state (WAL snapshots).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from typing import Callable, Iterable, Iterator, Optional, Sequence

from .base import (ACCUMULATOR_FIELDS, LEDGER_FIELDS, SCHEMA_VERSION, AccumulatorRow, Audit, LedgerConflict,
                   LedgerEntry, Migration, PersonRow, StoreError, check_schema_version, now_us)

MIGRATIONS = (
    Migration(1, "ledger, accumulators, persons, meta", (
        """CREATE TABLE IF NOT EXISTS meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE IF NOT EXISTS persons (
            person_id  TEXT PRIMARY KEY,
            region     TEXT NOT NULL,
            scheme     TEXT NOT NULL,
            birth_date INTEGER NOT NULL,          -- days since 1970-01-01
            identities TEXT NOT NULL              -- JSON [[identity, from_days|null, to_days|null], ...]
        ) WITHOUT ROWID""",
        """CREATE TABLE IF NOT EXISTS ledger (
            seq                   INTEGER PRIMARY KEY,   -- commit order, from 1
            kind                  TEXT NOT NULL CHECK (kind IN ('settle', 'reverse')),
            claim_id              TEXT NOT NULL,
            facility_id           TEXT NOT NULL,
            person_id             TEXT NOT NULL,
            region                TEXT NOT NULL,
            scheme                TEXT NOT NULL,
            year                  INTEGER NOT NULL,
            delta_admissions      INTEGER NOT NULL,
            delta_compliant_total INTEGER NOT NULL,
            delta                 BLOB NOT NULL,
            claim                 BLOB,
            response              BLOB,
            reason                TEXT,
            recorded_at_us        INTEGER NOT NULL,
            UNIQUE (claim_id, kind)
        )""",
        "CREATE INDEX IF NOT EXISTS ledger_key ON ledger (person_id, year)",
        """CREATE TABLE IF NOT EXISTS accumulators (
            person_id       TEXT NOT NULL,
            region          TEXT NOT NULL,
            scheme          TEXT NOT NULL,
            year            INTEGER NOT NULL,
            admissions      INTEGER NOT NULL,
            compliant_total INTEGER NOT NULL,
            state           BLOB NOT NULL,
            last_seq        INTEGER NOT NULL,
            PRIMARY KEY (person_id, region, scheme, year)
        ) WITHOUT ROWID""",
    )),
    Migration(2, "carried-in accumulators; ledger by year", (
        """CREATE TABLE IF NOT EXISTS carried (
            person_id       TEXT NOT NULL,
            region          TEXT NOT NULL,
            scheme          TEXT NOT NULL,
            year            INTEGER NOT NULL,
            admissions      INTEGER NOT NULL,
            compliant_total INTEGER NOT NULL,
            state           BLOB NOT NULL,
            last_seq        INTEGER NOT NULL,
            PRIMARY KEY (person_id, region, scheme, year)
        ) WITHOUT ROWID""",
        "CREATE INDEX IF NOT EXISTS ledger_year ON ledger (year, seq)",
    )),
)
assert MIGRATIONS[-1].version == SCHEMA_VERSION

INSERT_LEDGER = (f"INSERT INTO ledger ({', '.join(LEDGER_FIELDS)}) "
                 f"VALUES ({', '.join('?' * len(LEDGER_FIELDS))})")
UPSERT_ACC = (f"INSERT OR REPLACE INTO accumulators ({', '.join(ACCUMULATOR_FIELDS)}) "
              f"VALUES ({', '.join('?' * len(ACCUMULATOR_FIELDS))})")
INSERT_CARRIED = (f"INSERT INTO carried ({', '.join(ACCUMULATOR_FIELDS)}) "
                  f"VALUES ({', '.join('?' * len(ACCUMULATOR_FIELDS))})")
UPSERT_PERSON = "INSERT OR REPLACE INTO persons (person_id, region, scheme, birth_date, identities) VALUES (?, ?, ?, ?, ?)"
SELECT_LEDGER = f"SELECT {', '.join(LEDGER_FIELDS)} FROM ledger"
SELECT_ACC = f"SELECT {', '.join(ACCUMULATOR_FIELDS)} FROM accumulators"

#: WAL frames (pages) after which the checkpointer restarts the log: about 40 MB.
RESTART_FRAMES = 10_000
#: How long a RESTART checkpoint may wait for readers (and hold off the writer).
RESTART_WAIT_MS = 20
#: The WAL file is truncated to this size when the log restarts.
JOURNAL_SIZE_LIMIT = 64 << 20

#: SQLite's default limit on host parameters is 32766 (3.32+); stay far below.
IN_CHUNK = 500


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


def stored_version(conn: sqlite3.Connection) -> int:
    """The schema version of an open file: the last recorded migration, or (stores made before
    `schema_migrations` existed) PRAGMA user_version."""
    user = conn.execute("PRAGMA user_version").fetchone()[0]
    has = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone()
    rec = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0] if has else 0
    return max(user, rec)


def migrate(conn: sqlite3.Connection, path: str, upto: int = SCHEMA_VERSION) -> list:
    """Applies the pending migrations up to `upto`, each in its own transaction; returns their versions."""
    version = stored_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema version {version} is newer than this server's "
                         f"({SCHEMA_VERSION}); use a newer medsettle")
    done = []
    for m in MIGRATIONS:
        if m.version <= version or m.version > upto:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                         "name TEXT NOT NULL, applied_at_us INTEGER NOT NULL)")
            if version and not conn.execute("SELECT 1 FROM schema_migrations").fetchone():
                # a store of before the migrations table: record what it already had
                conn.executemany("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                                 [(x.version, x.name, now_us()) for x in MIGRATIONS if x.version <= version])
            for stmt in m.statements:
                conn.execute(stmt)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (m.version, m.name, now_us()))
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at_us', ?)", (str(now_us()),))
            conn.execute(f"PRAGMA user_version = {m.version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        done.append(m.version)
        version = m.version
    return done


class SQLiteGroup:
    """The writer's unit of work on SQLite: lookups on the writer's connection (the writer is
    the only one, so nothing changes under it), then one BEGIN IMMEDIATE ... COMMIT."""

    def __init__(self, store: "SQLiteStore"):
        self.store = store
        self.conn = store.conn
        self._seq = store.last_seq

    def ledger(self, claim_ids) -> dict:
        return _ledger(self.conn, claim_ids)

    def persons(self, person_ids) -> dict:
        return _persons(self.conn, person_ids)

    def lookup(self, claim_ids, person_ids) -> tuple:
        return (_ledger(self.conn, claim_ids) if claim_ids else {},
                _persons(self.conn, person_ids) if person_ids else {})

    def accumulators(self, keys) -> dict:
        keys = set(keys)
        out = {}
        for part in chunks(list({k[0] for k in keys})):
            for row in self.conn.execute("SELECT person_id, region, scheme, year, state FROM accumulators "
                                         f"WHERE person_id IN ({placeholders(len(part))})", part):
                if row[:4] in keys:
                    out[row[:4]] = row[4]
        return out

    def prepare(self, person_ids, entries: int, meta_keys=()) -> None:
        """The only writer needs no locks; dense numbers are taken one by one."""

    def meta(self, key: str) -> Optional[str]:
        return self.store.get_meta(key)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def commit(self, entries: Sequence[LedgerEntry], accumulators: Sequence[AccumulatorRow]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if entries:
                c.executemany(INSERT_LEDGER, entries)
            if accumulators:
                c.executemany(UPSERT_ACC, accumulators)
            c.execute("COMMIT")
        except BaseException as e:
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self.store.last_seq = self.store.max_seq(c)
            if isinstance(e, sqlite3.IntegrityError) and "ledger" in str(e):
                raise LedgerConflict(f"{self.store.location}: {e}") from e
            raise
        if entries:
            self.store.last_seq = max(self.store.last_seq, max(e.seq for e in entries))


class SQLiteStore(Audit):
    """Opens (creating, or checking the schema version of) a store file."""

    def __init__(self, path: str, *, exclusive: bool = False, create: bool = True, migrate_to: Optional[int] = None):
        self.path = self.location = os.fspath(path)
        d = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(d):
            raise StoreError(f"{self.path}: folder {d} does not exist")
        if not create and not os.path.exists(self.path):
            raise StoreError(f"{self.path}: no such store")
        self._lock_file = None
        if exclusive:  # one server per store file: a second writer would break idempotency
            f = open(self.path + ".lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                raise StoreError(f"{self.path}: another medsettle server is using this store") from None
            self._lock_file = f
        try:
            self.conn = connect(self.path)  # the writer's connection
            version = stored_version(self.conn)
            if version == 0 or migrate_to is not None:  # a new store is created at the current version
                self.migrated = migrate(self.conn, self.path, migrate_to or SCHEMA_VERSION)
            else:
                check_schema_version(self.path, version, self.path)
                self.migrated = []
        except BaseException:
            if getattr(self, "conn", None) is not None:
                self.conn.close()
            if self._lock_file is not None:
                self._lock_file.close()
            raise
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self.last_seq = self.max_seq()
        self._checkpointer = None

    # ------------------------------------------------------------------ schema

    def schema_version(self) -> int:
        return stored_version(self.conn)

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

    def close(self, checkpoint: Optional[bool] = None) -> None:
        """Closes the connections; `checkpoint` (default: when this process holds the store's
        lock, i.e. is its server) truncates the WAL first: a reader beside a running server
        must not hold off its writer for that."""
        if checkpoint is None:
            checkpoint = self._lock_file is not None
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

    def get_meta(self, key: str) -> Optional[str]:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ lookups (this thread's reader)

    def persons(self, person_ids: Iterable[str]) -> dict:
        return _persons(self.reader(), person_ids)

    def ledger(self, claim_ids: Iterable[str]) -> dict:
        return _ledger(self.reader(), claim_ids)

    def settled_by(self, facility_id: str, person_id: str) -> bool:
        """Has this facility settled this person (a `settle` entry in the ledger)? The person's
        entries through the ledger_key index (server/auth.py: who may read accumulators)."""
        return self.reader().execute("SELECT 1 FROM ledger WHERE person_id = ? AND facility_id = ? AND kind = 'settle' "
                                     "LIMIT 1", (person_id, facility_id)).fetchone() is not None

    def accumulators_of(self, person_id: str, year: Optional[int] = None) -> list:
        """The state blobs (Accumulators bytes) of a person's keys, of one year or all."""
        conn = self.reader()
        if year is None:
            cur = conn.execute("SELECT state FROM accumulators WHERE person_id = ? ORDER BY year, region, scheme",
                               (person_id,))
        else:
            cur = conn.execute("SELECT state FROM accumulators WHERE person_id = ? AND year = ? "
                               "ORDER BY region, scheme", (person_id, year))
        return [r[0] for r in cur]

    def iter_ledger(self, year: Optional[int] = None, batch: int = 10_000) -> Iterator[list]:
        """The ledger in seq order, `batch` entries at a time (keyset pages: bounded memory)."""
        conn = connect(self.path)  # its own snapshot-free connection: pages never hold a read lock long
        try:
            last = 0
            where = "" if year is None else " AND year = ?"
            while True:
                args = (last,) if year is None else (last, year)
                rows = conn.execute(f"{SELECT_LEDGER} WHERE seq > ?{where} ORDER BY seq LIMIT {int(batch)}",
                                    args).fetchall()
                if not rows:
                    return
                yield [LedgerEntry(*r) for r in rows]
                last = rows[-1][0]
        finally:
            conn.close()

    def iter_accumulators(self) -> Iterator[AccumulatorRow]:
        for r in self.reader().execute(SELECT_ACC):
            yield AccumulatorRow(*r)

    def iter_carried(self) -> Iterator[AccumulatorRow]:
        for r in self.reader().execute(f"SELECT {', '.join(ACCUMULATOR_FIELDS)} FROM carried"):
            yield AccumulatorRow(*r)

    # ------------------------------------------------------------------ writes (the writer's connection)

    @contextlib.contextmanager
    def group(self):
        yield SQLiteGroup(self)

    def upsert_persons(self, rows: Sequence[PersonRow]) -> None:
        self.import_persons([rows], {})

    def import_persons(self, parts: Iterable[Sequence[PersonRow]], meta: dict) -> int:
        c = self.conn
        count = 0
        c.execute("BEGIN IMMEDIATE")
        try:
            for rows in parts:
                c.executemany(UPSERT_PERSON, rows)
                count += len(rows)
            for k, v in meta.items():
                c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (k, v))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return count

    def update_meta(self, key: str, fn: Callable[[Optional[str]], dict]) -> dict:
        """BEGIN IMMEDIATE takes the file's write lock before the read: another writer of the
        file (a second process with the store open) waits until this one committed."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            entries = fn(row[0] if row else None)
            for k, v in entries.items():
                c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (k, v))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return entries

    def import_carried(self, parts: Iterable[Sequence[AccumulatorRow]]) -> int:
        c = self.conn
        count = 0
        c.execute("BEGIN IMMEDIATE")
        try:
            for rows in parts:
                for r in rows:
                    if c.execute("SELECT 1 FROM accumulators WHERE person_id = ? AND region = ? AND scheme = ? "
                                 "AND year = ?", r.key).fetchone():
                        raise StoreError(f"{self.location}: key {r.key} already has settlements or carried "
                                         f"accumulators; nothing was imported")
                try:
                    c.executemany(INSERT_CARRIED, rows)
                except sqlite3.IntegrityError:
                    raise StoreError(f"{self.location}: a key occurs twice in the carry table; nothing was "
                                     f"imported") from None
                c.executemany(UPSERT_ACC, rows)
                count += len(rows)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return count

    # ------------------------------------------------------------------ WAL checkpoints

    def checkpoint(self, mode: str = "PASSIVE"):
        return self.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()

    def start_background(self) -> None:
        self.start_checkpointer()

    def stop_autocheckpoint(self) -> None:
        """The writer's connection no longer checkpoints on commit (a Checkpointer does)."""
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self.conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")

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
        self.stop_autocheckpoint()
        stop = threading.Event()
        cp = Checkpointer(self.path, restart_frames)

        def run():
            try:
                while not stop.wait(interval):
                    try:
                        cp.round()
                    except sqlite3.Error:
                        pass
            finally:
                cp.close()

        t = threading.Thread(target=run, name="medsettle-checkpoint", daemon=True)
        t.start()
        self._checkpointer = (t, stop)
        self.checkpointer = cp


class Checkpointer:
    """The checkpointer thread's work on its own connection (SQLiteStore.start_checkpointer):
    a round is a PASSIVE checkpoint, then a RESTART once the log holds `restart_frames`."""

    def __init__(self, path: str, restart_frames: int = RESTART_FRAMES):
        self.conn = connect(path)
        self.conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        self.restart_frames = restart_frames
        self.restarts = 0

    def passive(self) -> int:
        """Copies what no reader still needs; returns the frames in the log."""
        return self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]

    def restart_if_long(self, frames: int) -> bool:
        """A RESTART checkpoint when the log holds restart_frames or more: it waits up to
        RESTART_WAIT_MS for the writer and readers, and the next commit starts the log over."""
        if frames < self.restart_frames:
            return False
        self.conn.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
        try:
            busy = self.conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
        finally:
            self.conn.execute("PRAGMA busy_timeout = 10000")
        self.restarts += not busy
        return not busy

    def round(self) -> bool:
        return self.restart_if_long(self.passive())

    def close(self) -> None:
        self.conn.close()


def _persons(conn: sqlite3.Connection, person_ids) -> dict:
    ids = list(set(person_ids))
    out = {}
    for part in chunks(ids):
        for row in conn.execute(f"SELECT person_id, region, scheme, birth_date, identities FROM persons "
                                f"WHERE person_id IN ({placeholders(len(part))})", part):
            out[row[0]] = PersonRow(*row)
    return out


def _ledger(conn: sqlite3.Connection, claim_ids) -> dict:
    ids = list(set(claim_ids))
    out: dict = {}
    for part in chunks(ids):
        for row in conn.execute(f"{SELECT_LEDGER} WHERE claim_id IN ({placeholders(len(part))})", part):
            e = LedgerEntry(*row)
            out.setdefault(e.claim_id, {})[e.kind] = e
    return out
