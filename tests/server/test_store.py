"""server/store.py: the WAL stays bounded under steady writes."""
from __future__ import annotations

import sqlite3
import time

from server.store import AccumulatorRow, LedgerEntry, SQLiteStore
from server.store.sqlite import Checkpointer


def _group(g: int, seq: int) -> tuple[list, list]:
    ledger, acc = [], []
    for k in range(12):
        seq += 1
        ledger.append(LedgerEntry(seq, "settle", f"c{g}-{k}", "H1", f"p{k}", "140600", "resident", 2023, 0, 100,
                                  b"d" * 80, b"c" * 120, b"r" * 600, None, 0))
        acc.append(AccumulatorRow(f"p{k}", "140600", "resident", 2023, 1, 100 * g, b"s" * 200, seq))
    return ledger, acc


def _log_frames(store: SQLiteStore) -> int:
    """Frames in the write-ahead log now (a PASSIVE checkpoint reports them)."""
    return store.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def _steady_writes(path: str, restart_frames: int, commits: int) -> tuple[int, int, int]:
    """Commits `commits` groups the way a busy server does, deterministically: each commit lands
    while a reader holds a snapshot from before it (a GetSettlement in flight; in production the
    writer's next transaction does the same), so the PASSIVE checkpoint right after it can never
    copy the log to its end and the log never starts over by itself. The checkpointer's RESTART
    runs once the reader is done, as the thread's RESTART waits (RESTART_WAIT_MS) for it.
    Returns (the most frames the log held, restarts, last seq)."""
    store = SQLiteStore(path)
    store.stop_autocheckpoint()
    cp = Checkpointer(path, restart_frames)
    reader = sqlite3.connect(path, isolation_level=None)
    seq, peak = 0, 0
    try:
        for i in range(commits):
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM ledger").fetchone()
            ledger, acc = _group(i, seq)
            with store.group() as g:
                g.commit(ledger, acc)
            seq += len(ledger)
            frames = cp.passive()
            reader.execute("COMMIT")
            cp.restart_if_long(frames)
            peak = max(peak, frames)
    finally:
        reader.close()
        cp.close()
        store.close(checkpoint=False)
    return peak, cp.restarts, seq


def test_checkpointer_restarts_the_log_under_steady_writes(tmp_path):
    """A writer committing back to back starves PASSIVE checkpoints of the moment
    when the log could start over; the checkpointer then restarts it itself."""
    commits = 120
    # without the RESTART (threshold never reached) every commit stays in the log: the starvation is real
    peak, restarts, _ = _steady_writes(str(tmp_path / "control.db"), 10**9, commits)
    assert restarts == 0 and peak >= commits, peak
    # with it the log holds at most the threshold and one commit's frames
    peak, restarts, seq = _steady_writes(str(tmp_path / "store.db"), 300, commits)
    assert restarts >= 2 and peak < 300 + 50, (peak, restarts)
    reopened = SQLiteStore(str(tmp_path / "store.db"))
    assert reopened.max_seq() == seq
    reopened.close()


def test_checkpointer_thread_runs_its_rounds(tmp_path):
    """The thread of start_checkpointer runs Checkpointer rounds: with the writer's own
    checkpoints off, the thread copies the log and restarts it, and the next commit
    starts the log over."""
    store = SQLiteStore(str(tmp_path / "store.db"))
    store.start_checkpointer(interval=0.01, restart_frames=1)
    seq = 0
    for i in range(20):
        ledger, acc = _group(i, seq)
        with store.group() as g:
            g.commit(ledger, acc)
        seq += len(ledger)
    before = store.checkpointer.restarts  # rounds during the commits may have restarted it already
    deadline = time.monotonic() + 30  # a bound, not a timing assumption: the thread runs every 10 ms
    while store.checkpointer.restarts == before and time.monotonic() < deadline:
        time.sleep(0.01)
    restarted = store.checkpointer.restarts > before
    ledger, acc = _group(20, seq)
    with store.group() as g:
        g.commit(ledger, acc)
    frames = _log_frames(store)
    store.close()
    assert restarted
    # every commit appends at least one frame: unless the log started over it holds all 21
    assert frames < 21, frames
