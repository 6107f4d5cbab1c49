"""The shared store: a PostgreSQL database that several server instances use at once.

Same tables and guarantees as the SQLite store (server/store/sqlite.py), the
same numbered migrations. What differs because several writers share it:

* **Per-person serialisation.** A group locks every person whose keys it
  touches before it reads their accumulators: one transaction-scoped
  advisory lock per person (`pg_advisory_xact_lock` of a 64-bit hash of the
  person id; all of a person's keys at once), the group's settling persons
  in ascending order in one statement, so two groups never deadlock on them
  and a key is never settled from a stale read; the lock also covers keys
  that have no row yet (a row lock could not). A hash collision only
  serialises two persons more than needed. Persons named only by the
  ledger (reversals) are locked afterwards; a deadlock that this may cause
  with another instance is detected by PostgreSQL and the group re-run.
  Locks end with the transaction (also when an instance dies: PostgreSQL
  rolls its transaction back).
* **Idempotency across instances.** The ledger keeps UNIQUE(claim_id, kind).
  When another instance committed one of the group's claim ids first, the
  insert fails, nothing of the group is stored, and the writer runs the
  group again (`LedgerConflict`): the claim is then answered from the ledger
  (a replay, `DUPLICATE_CLAIM`, or `already_reversed`).
* **Sequence numbers** come from the sequence `ledger_seq`, taken after the
  group's locks: unique, and increasing in commit order for any one key;
  across keys and instances they are only roughly time-ordered and may have
  gaps (numbers of a group that failed).
* **Connections.** The writer holds one connection of its own (reopened
  after a failure); reads use a psycopg_pool pool of `pool_size`
  connections, checked before use. When the database cannot be reached, a
  call fails with `StoreUnavailable` (UNAVAILABLE, retry) and the next one
  reconnects: no restart needed.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
from typing import Callable, Iterable, Iterator, Optional, Sequence

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from .base import (ACCUMULATOR_FIELDS, LEDGER_FIELDS, SCHEMA_VERSION, AccumulatorRow, Audit, LedgerConflict,
                   LedgerEntry, Migration, PersonRow, StoreError, StoreUnavailable, check_schema_version, now_us)

log = logging.getLogger("medsettle.server")

MIGRATIONS = (
    Migration(1, "ledger, accumulators, persons, meta", (
        """CREATE TABLE IF NOT EXISTS meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS persons (
            person_id  TEXT PRIMARY KEY,
            region     TEXT NOT NULL,
            scheme     TEXT NOT NULL,
            birth_date INTEGER NOT NULL,
            identities TEXT NOT NULL
        )""",
        "CREATE SEQUENCE IF NOT EXISTS ledger_seq",
        """CREATE TABLE IF NOT EXISTS ledger (
            seq                   BIGINT PRIMARY KEY,
            kind                  TEXT NOT NULL CHECK (kind IN ('settle', 'reverse')),
            claim_id              TEXT NOT NULL,
            facility_id           TEXT NOT NULL,
            person_id             TEXT NOT NULL,
            region                TEXT NOT NULL,
            scheme                TEXT NOT NULL,
            year                  INTEGER NOT NULL,
            delta_admissions      BIGINT NOT NULL,
            delta_compliant_total BIGINT NOT NULL,
            delta                 BYTEA NOT NULL,
            claim                 BYTEA,
            response              BYTEA,
            reason                TEXT,
            recorded_at_us        BIGINT NOT NULL,
            UNIQUE (claim_id, kind)
        )""",
        "CREATE INDEX IF NOT EXISTS ledger_key ON ledger (person_id, year)",
        """CREATE TABLE IF NOT EXISTS accumulators (
            person_id       TEXT NOT NULL,
            region          TEXT NOT NULL,
            scheme          TEXT NOT NULL,
            year            INTEGER NOT NULL,
            admissions      BIGINT NOT NULL,
            compliant_total BIGINT NOT NULL,
            state           BYTEA NOT NULL,
            last_seq        BIGINT NOT NULL,
            PRIMARY KEY (person_id, region, scheme, year)
        )""",
    )),
    Migration(2, "carried-in accumulators; ledger by year", (
        """CREATE TABLE IF NOT EXISTS carried (
            person_id       TEXT NOT NULL,
            region          TEXT NOT NULL,
            scheme          TEXT NOT NULL,
            year            INTEGER NOT NULL,
            admissions      BIGINT NOT NULL,
            compliant_total BIGINT NOT NULL,
            state           BYTEA NOT NULL,
            last_seq        BIGINT NOT NULL,
            PRIMARY KEY (person_id, region, scheme, year)
        )""",
        "CREATE INDEX IF NOT EXISTS ledger_year ON ledger (year, seq)",
    )),
)
assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))

#: The advisory lock that serialises migrations of one database (any instance, any command).
MIGRATION_LOCK = 0x6D65_6473_6D69_6772  # "medsmigr"

INSERT_LEDGER = (f"INSERT INTO ledger ({', '.join(LEDGER_FIELDS)}) "
                 f"VALUES ({', '.join(['%s'] * len(LEDGER_FIELDS))})")
UPSERT_ACC = (f"INSERT INTO accumulators ({', '.join(ACCUMULATOR_FIELDS)}) "
              f"VALUES ({', '.join(['%s'] * len(ACCUMULATOR_FIELDS))}) "
              "ON CONFLICT (person_id, region, scheme, year) DO UPDATE SET admissions = EXCLUDED.admissions, "
              "compliant_total = EXCLUDED.compliant_total, state = EXCLUDED.state, last_seq = EXCLUDED.last_seq")
INSERT_CARRIED = (f"INSERT INTO carried ({', '.join(ACCUMULATOR_FIELDS)}) "
                  f"VALUES ({', '.join(['%s'] * len(ACCUMULATOR_FIELDS))})")
UPSERT_PERSON = ("INSERT INTO persons (person_id, region, scheme, birth_date, identities) VALUES (%s, %s, %s, %s, %s) "
                 "ON CONFLICT (person_id) DO UPDATE SET region = EXCLUDED.region, scheme = EXCLUDED.scheme, "
                 "birth_date = EXCLUDED.birth_date, identities = EXCLUDED.identities")
SELECT_LEDGER = f"SELECT {', '.join(LEDGER_FIELDS)} FROM ledger"
# a group's rows as one statement each (column arrays through unnest): parsed and planned once,
# not once per row as executemany's statements are
LEDGER_TYPES = ("bigint", "text", "text", "text", "text", "text", "text", "integer", "bigint", "bigint", "bytea",
                "bytea", "bytea", "text", "bigint")
ACC_TYPES = ("text", "text", "text", "integer", "bigint", "bigint", "bytea", "bigint")
INSERT_LEDGER_ARRAYS = (f"INSERT INTO ledger ({', '.join(LEDGER_FIELDS)}) SELECT * FROM unnest("
                        + ", ".join(f"%s::{t}[]" for t in LEDGER_TYPES) + ")")
UPSERT_ACC_ARRAYS = (f"INSERT INTO accumulators ({', '.join(ACCUMULATOR_FIELDS)}) SELECT * FROM unnest("
                     + ", ".join(f"%s::{t}[]" for t in ACC_TYPES) + ") "
                     "ON CONFLICT (person_id, region, scheme, year) DO UPDATE SET admissions = EXCLUDED.admissions, "
                     "compliant_total = EXCLUDED.compliant_total, state = EXCLUDED.state, last_seq = EXCLUDED.last_seq")

#: How long a group waits for another instance's lock on one of its keys before it is re-run.
LOCK_TIMEOUT_MS = 5000
#: Seconds to wait for a connection (the database down answers UNAVAILABLE after this).
CONNECT_TIMEOUT_S = 3
#: Sequence numbers taken at once by a group that did not say how many it needs (`prepare`);
#: unused ones are left as gaps.
SEQ_BLOCK = 64

#: Tries of an update_meta that meets a serialization failure or a lock timeout.
META_ATTEMPTS = 3
#: Errors after which a group is re-run (nothing was stored).
RETRY_ERRORS = (pg_errors.UniqueViolation, pg_errors.DeadlockDetected, pg_errors.LockNotAvailable,
                pg_errors.SerializationFailure)


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def person_lock(person_id: str) -> int:
    """A signed 64-bit advisory-lock id for a person (all their accumulator keys)."""
    h = hashlib.blake2b(person_id.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big", signed=True)


def meta_lock(key: str) -> int:
    """The advisory-lock id of a `meta` entry (its own name space: "meta:" + key)."""
    return person_lock("meta:" + key)


def _entry(row) -> LedgerEntry:
    return LedgerEntry(*row)


def stored_version(conn: psycopg.Connection) -> int:
    has = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
    if not has:
        return 0
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]


def migrate(conn: psycopg.Connection, location: str, upto: int = SCHEMA_VERSION) -> list:
    """Applies the pending migrations up to `upto`, each in its own transaction, holding the
    database's migration lock (other instances wait); returns the versions applied."""
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    conn.commit()
    try:
        version = stored_version(conn)
        conn.commit()
        if version > SCHEMA_VERSION:
            raise StoreError(f"{location}: store schema version {version} is newer than this server's "
                             f"({SCHEMA_VERSION}); use a newer medsettle")
        done = []
        for m in MIGRATIONS:
            if m.version <= version or m.version > upto:
                continue
            with conn.transaction():
                conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                             "name TEXT NOT NULL, applied_at_us BIGINT NOT NULL)")
                for stmt in m.statements:
                    conn.execute(stmt)
                conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s)", (m.version, m.name, now_us()))
                conn.execute("INSERT INTO meta (key, value) VALUES ('created_at_us', %s) ON CONFLICT DO NOTHING",
                             (str(now_us()),))
            done.append(m.version)
        return done
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        conn.commit()


class PostgresGroup:
    """The writer's unit of work on PostgreSQL: one transaction from the first lookup to the
    commit. The persons the group settles are locked, and their accumulators read, in the
    same round trip as the ledger and registry lookups (a pipeline runs its statements in
    order, so the accumulators are read by a statement that starts once the locks are held);
    persons that only the ledger names (reversals) are locked and read in a second one. The
    rows and the COMMIT go in one more."""

    def __init__(self, store: "PostgresStore", conn: psycopg.Connection):
        self.store = store
        self.conn = conn
        self._seqs: list = []
        self._block = SEQ_BLOCK
        self._prepared: list = []
        self._locked: set = set()
        self._acc_rows: dict = {}
        self._meta_keys: list = []
        self._meta: dict = {}

    def prepare(self, person_ids, entries: int, meta_keys=()) -> None:
        self._prepared = sorted(set(person_ids))
        self._block = max(1, entries)
        self._meta_keys = list(meta_keys)

    def meta(self, key: str) -> Optional[str]:
        """Read in the lookups' round trip when `prepare` named it (the facility registry's version,
        checked by every group), else now on the group's connection."""
        if key not in self._meta:
            row = self.conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
            self._meta[key] = row[0] if row else None
        return self._meta[key]

    def ledger(self, claim_ids) -> dict:
        return self.lookup(claim_ids, ())[0]

    def persons(self, person_ids) -> dict:
        return self.lookup((), person_ids)[1]

    def _lock_and_read(self, person_ids: list) -> tuple:
        """Statements (in the open pipeline) that lock `person_ids` and then read their rows."""
        if self.store.isolation == "locks":
            self.conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k",
                              (sorted({person_lock(p) for p in person_ids}),))
        self._locked.update(person_ids)
        return self.conn.execute("SELECT person_id, region, scheme, year, state FROM accumulators "
                                 "WHERE person_id = ANY(%s)", (person_ids,))

    def lookup(self, claim_ids, person_ids) -> tuple:
        claim_ids, person_ids = list(set(claim_ids)), list(set(person_ids))
        prepared, self._prepared = self._prepared, []
        with self.conn.pipeline():
            lc = self.conn.execute(f"{SELECT_LEDGER} WHERE claim_id = ANY(%s)", (claim_ids,)) if claim_ids else None
            pc = self.conn.execute("SELECT person_id, region, scheme, birth_date, identities FROM persons "
                                   "WHERE person_id = ANY(%s)", (person_ids,)) if person_ids else None
            ac = self._lock_and_read(prepared) if prepared else None
            sc = (self.conn.execute("SELECT nextval('ledger_seq') FROM generate_series(1, %s)", (self._block,))
                  if prepared else None)
            meta_keys, self._meta_keys = self._meta_keys, []
            mc = (self.conn.execute("SELECT key, value FROM meta WHERE key = ANY(%s)", (meta_keys,))
                  if meta_keys else None)
        if mc is not None:
            self._meta.update(dict.fromkeys(meta_keys))
            self._meta.update(mc.fetchall())
        ledger: dict = {}
        for row in (lc.fetchall() if lc is not None else ()):
            e = _entry(row)
            ledger.setdefault(e.claim_id, {})[e.kind] = e
        persons = {r[0]: PersonRow(*r) for r in (pc.fetchall() if pc is not None else ())}
        for row in (ac.fetchall() if ac is not None else ()):
            self._acc_rows[row[:4]] = row[4]
        if sc is not None:
            self._seqs = sorted((r[0] for r in sc.fetchall()), reverse=True)
        return ledger, persons

    def accumulators(self, keys) -> dict:
        keys = set(keys)
        missing = sorted({k[0] for k in keys} - self._locked)
        if missing:  # persons the ledger named (reversals): lock and read them now
            with self.conn.pipeline():
                ac = self._lock_and_read(missing)
            for row in ac.fetchall():
                self._acc_rows[row[:4]] = row[4]
        return {k: v for k, v in self._acc_rows.items() if k in keys}

    def next_seq(self) -> int:
        if not self._seqs:
            self._seqs = [r[0] for r in self.conn.execute(
                "SELECT nextval('ledger_seq') FROM generate_series(1, %s)", (self._block,))]
            self._seqs.sort(reverse=True)
        return self._seqs.pop()

    def commit(self, entries: Sequence[LedgerEntry], accumulators: Sequence[AccumulatorRow]) -> None:
        try:
            with self.conn.pipeline():
                if entries:
                    self.conn.execute(INSERT_LEDGER_ARRAYS, [list(c) for c in zip(*entries)])
                if accumulators:
                    self.conn.execute(UPSERT_ACC_ARRAYS, [list(c) for c in zip(*accumulators)])
                self.conn.commit()
        except RETRY_ERRORS as e:  # another instance committed one of these claim ids first
            _rollback(self.conn)
            raise LedgerConflict(f"{self.store.location}: {_first_line(e)}") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            _rollback(self.conn)
            raise StoreUnavailable(f"{self.store.location}: {_first_line(e)}; the outcome of the commit is "
                                   "unknown: retry (a committed claim is then answered from the ledger)") from None


class PostgresStore(Audit):
    """A store in a PostgreSQL database (see the module doc)."""

    def __init__(self, url: str, *, create: bool = True, migrate_to: Optional[int] = None, pool_size: int = 4,
                 isolation: str = "locks"):
        if isolation not in ("locks", "serializable"):
            raise ValueError(f"isolation must be 'locks' or 'serializable', not {isolation!r}")
        #: "locks": READ COMMITTED groups with per-key advisory locks (the server's mode);
        #: "serializable": SERIALIZABLE groups without locks, re-run on a serialization failure
        #: (kept to measure the alternative: benchmarks/bench_pg_locking.py)
        self.isolation = isolation
        self.url = url
        self.location = redact(url)
        self.pool_size = max(1, pool_size)
        self._pool: Optional[ConnectionPool] = None
        self._pool_lock = threading.Lock()
        self._wconn: Optional[psycopg.Connection] = None
        try:
            conn = self._connect()
        except StoreUnavailable:
            raise
        try:
            version = stored_version(conn)
            conn.commit()
            if (version == 0 and create) or migrate_to is not None:
                self.migrated = migrate(conn, self.location, migrate_to or SCHEMA_VERSION)
            else:
                check_schema_version(self.location, version, "URL")
                self.migrated = []
        except BaseException:
            conn.close()
            raise
        self._wconn = conn

    # ------------------------------------------------------------------ connections

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S, application_name="medsettle")
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"{self.location}: cannot connect ({_first_line(e)}); retry later") from None
        except psycopg.ProgrammingError as e:  # a malformed URL
            raise StoreError(f"{self.location}: {_first_line(e)}") from None
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        conn.commit()
        return conn

    def _writer(self) -> psycopg.Connection:
        conn = self._wconn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._wconn = conn = self._connect()
        if self.isolation == "serializable" and conn.isolation_level != psycopg.IsolationLevel.SERIALIZABLE:
            conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        return conn

    def _readers(self) -> ConnectionPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(self.url, min_size=1, max_size=self.pool_size, open=True,
                                            timeout=CONNECT_TIMEOUT_S, check=ConnectionPool.check_connection,
                                            # a lost connection is re-made in the background for up to 30 s;
                                            # after that the next read that finds the pool short opens one
                                            reconnect_timeout=30,
                                            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S,
                                                    "application_name": "medsettle-read"},
                                            name="medsettle-read")
            return self._pool

    @contextlib.contextmanager
    def _read(self):
        try:
            with self._readers().connection() as conn:
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise StoreUnavailable(f"{self.location}: {_first_line(e)}; retry later") from None
        except Exception as e:
            if type(e).__name__ == "PoolTimeout":
                raise StoreUnavailable(f"{self.location}: no connection to the database; retry later") from None
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    def start_background(self) -> None:
        """Nothing runs beside the writer (PostgreSQL checkpoints itself)."""

    def schema_version(self) -> int:
        with self._read() as c:
            return stored_version(c)

    # ------------------------------------------------------------------ reads

    def persons(self, person_ids: Iterable[str]) -> dict:
        with self._read() as c:
            return {r[0]: PersonRow(*r) for r in c.execute(
                "SELECT person_id, region, scheme, birth_date, identities FROM persons WHERE person_id = ANY(%s)",
                (list(set(person_ids)),))}

    def ledger(self, claim_ids: Iterable[str]) -> dict:
        out: dict = {}
        with self._read() as c:
            for row in c.execute(f"{SELECT_LEDGER} WHERE claim_id = ANY(%s)", (list(set(claim_ids)),)):
                e = _entry(row)
                out.setdefault(e.claim_id, {})[e.kind] = e
        return out

    def settled_by(self, facility_id: str, person_id: str) -> bool:
        """Has this facility settled this person (a `settle` entry in the ledger)? The person's
        entries through the ledger_key index (server/auth.py: who may read accumulators)."""
        with self._read() as c:
            return c.execute("SELECT 1 FROM ledger WHERE person_id = %s AND facility_id = %s AND kind = 'settle' "
                             "LIMIT 1", (person_id, facility_id)).fetchone() is not None

    def accumulators_of(self, person_id: str, year: Optional[int] = None) -> list:
        with self._read() as c:
            if year is None:
                cur = c.execute("SELECT state FROM accumulators WHERE person_id = %s ORDER BY year, region, scheme",
                                (person_id,))
            else:
                cur = c.execute("SELECT state FROM accumulators WHERE person_id = %s AND year = %s "
                                "ORDER BY region, scheme", (person_id, year))
            return [bytes(r[0]) for r in cur]

    def get_meta(self, key: str) -> Optional[str]:
        with self._read() as c:
            row = c.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return row[0] if row else None

    def max_seq(self) -> int:
        with self._read() as c:
            return c.execute("SELECT COALESCE(MAX(seq), 0) FROM ledger").fetchone()[0]

    def iter_ledger(self, year: Optional[int] = None, batch: int = 10_000) -> Iterator[list]:
        last = 0
        where = "" if year is None else " AND year = %s"
        while True:
            with self._read() as c:
                args = (last,) if year is None else (last, year)
                rows = c.execute(f"{SELECT_LEDGER} WHERE seq > %s{where} ORDER BY seq LIMIT {int(batch)}",
                                 args).fetchall()
            if not rows:
                return
            yield [_entry(r) for r in rows]
            last = rows[-1][0]

    def _iter_acc(self, table: str) -> Iterator[AccumulatorRow]:
        with self._read() as c:
            rows = c.execute(f"SELECT {', '.join(ACCUMULATOR_FIELDS)} FROM {table}").fetchall()
        for r in rows:
            yield AccumulatorRow(*r)

    def iter_accumulators(self) -> Iterator[AccumulatorRow]:
        return self._iter_acc("accumulators")

    def iter_carried(self) -> Iterator[AccumulatorRow]:
        return self._iter_acc("carried")

    # ------------------------------------------------------------------ writes

    @contextlib.contextmanager
    def group(self):
        conn = self._writer()
        try:
            yield PostgresGroup(self, conn)
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()  # nothing to commit (lookups only): end the transaction, release the locks
        except RETRY_ERRORS as e:
            _rollback(conn)
            raise LedgerConflict(f"{self.location}: {_first_line(e)}") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            _rollback(conn)
            raise StoreUnavailable(f"{self.location}: {_first_line(e)}; nothing was recorded, retry") from None
        except BaseException:
            _rollback(conn)
            raise

    def _write_tx(self, fn):
        conn = self._writer()
        try:
            with conn.transaction():
                return fn(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            _rollback(conn)
            raise StoreUnavailable(f"{self.location}: {_first_line(e)}; nothing was stored, retry") from None
        finally:
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                _rollback(conn)

    def upsert_persons(self, rows: Sequence[PersonRow]) -> None:
        self.import_persons([rows], {})

    def import_persons(self, parts: Iterable[Sequence[PersonRow]], meta: dict) -> int:
        def tx(conn):
            count = 0
            with conn.cursor() as cur:
                for rows in parts:
                    if rows:
                        cur.executemany(UPSERT_PERSON, rows)
                    count += len(rows)
                for k, v in meta.items():
                    cur.execute("INSERT INTO meta (key, value) VALUES (%s, %s) "
                                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (k, v))
            return count

        return self._write_tx(tx)

    def update_meta(self, key: str, fn: Callable[[Optional[str]], dict]) -> dict:
        """An advisory lock of the key (held to the end of the transaction), then the read: an
        instance merging the same entry waits, and reads what this one committed (READ
        COMMITTED: each statement sees the last commit). The row itself cannot be locked, it
        may not exist yet. Re-run (fn is called again) after a serialization failure or a lock
        timeout, at most META_ATTEMPTS times."""
        def tx(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (meta_lock(key),))
            row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
            entries = fn(row[0] if row else None)
            with conn.cursor() as cur:
                for k, v in entries.items():
                    cur.execute("INSERT INTO meta (key, value) VALUES (%s, %s) "
                                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (k, v))
            return entries

        for attempt in range(1, META_ATTEMPTS + 1):
            conn = self._writer()
            try:
                with conn.transaction():
                    return tx(conn)
            except RETRY_ERRORS as e:  # before OperationalError: they are of it
                _rollback(conn)
                if attempt == META_ATTEMPTS:
                    raise StoreError(f"{self.location}: meta {key!r} was not updated ({_first_line(e)}); "
                                     "nothing was stored, retry") from None
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                _rollback(conn)
                raise StoreUnavailable(f"{self.location}: {_first_line(e)}; nothing was stored, retry") from None
            finally:
                if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    _rollback(conn)

    def import_carried(self, parts: Iterable[Sequence[AccumulatorRow]]) -> int:
        def tx(conn):
            count = 0
            for rows in parts:
                rows = list(rows)
                locks = sorted({person_lock(r.person_id) for r in rows})
                conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k", (locks,))
                keys = {r.key for r in rows}
                for hit in conn.execute("SELECT person_id, region, scheme, year FROM accumulators "
                                        "WHERE person_id = ANY(%s)", (list({r.person_id for r in rows}),)):
                    if tuple(hit) in keys:
                        raise StoreError(f"{self.location}: key {tuple(hit)} already has settlements or carried "
                                         f"accumulators; nothing was imported")
                try:
                    with conn.cursor() as cur:
                        cur.executemany(INSERT_CARRIED, rows)
                        cur.executemany(UPSERT_ACC, rows)
                except pg_errors.UniqueViolation:
                    raise StoreError(f"{self.location}: a key occurs twice in the carry table; nothing was "
                                     f"imported") from None
                count += len(rows)
            return count

        return self._write_tx(tx)


def _rollback(conn: psycopg.Connection) -> None:
    try:
        if not conn.closed:
            conn.rollback()
    except psycopg.Error:
        pass


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
