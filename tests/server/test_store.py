"""server/store.py: the WAL stays bounded under steady writes."""
from __future__ import annotations

import time

from server.store import AccumulatorRow, LedgerEntry, SQLiteStore


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


def test_checkpointer_restarts_the_log_under_steady_writes(tmp_path):
    """A writer committing back to back starves PASSIVE checkpoints of the moment
    when the log could start over; the checkpointer then restarts it itself."""
    store = SQLiteStore(str(tmp_path / "store.db"))
    store.start_checkpointer(interval=0.02, restart_frames=300)
    # at least 1.5 s and 200 commits (a slow shared disk takes longer to reach them)
    seq, commits, start = 0, 0, time.monotonic()
    try:
        while time.monotonic() < start + 1.5 or (commits < 200 and time.monotonic() < start + 60):
            ledger, acc = _group(commits, seq)
            with store.group() as g:
                g.commit(ledger, acc)
            seq += len(ledger)
            commits += 1
            time.sleep(0.001)  # a writer settles its next group between commits
        frames = _log_frames(store)
    finally:
        store.close()
    assert commits > 150
    # every commit appends at least one frame: without restarts the log would hold them all
    assert frames < min(commits, 1500), (frames, commits)
    reopened = SQLiteStore(str(tmp_path / "store.db"))
    assert reopened.max_seq() == seq
    reopened.close()
