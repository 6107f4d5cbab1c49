"""The summary an office reads (issue 13 item 3): per policy and fund, in yuan with thousands
separators on stdout, the same figures in integer fen with --summary-json; checked against a
plain-Python count of the results."""
from __future__ import annotations

import contextlib
import io
import json
import re
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import engine
from engine import _columns
from engine.cli import main
from engine.generate import generate_claims
from engine.schema import format_yuan
from engine.summary import AMOUNTS, Summary

N = 8000


@pytest.fixture(scope="module")
def ps():
    return engine.load_policies(None)


@pytest.fixture(scope="module")
def claims(ps):
    return generate_claims(ps, N, seed=12, invalid_rate=0.1)


@pytest.fixture(scope="module")
def run_summary(tmp_path_factory, claims):
    d = tmp_path_factory.mktemp("summary")
    pq.write_table(claims, d / "c.parquet")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["settle", str(d / "c.parquet"), "-o", str(d / "r.parquet"), "--batch-size", "1500",
                     "--summary-json", str(d / "s.json")])
    assert code == 0
    return out.getvalue(), json.loads((d / "s.json").read_text())


def expected_figures(ps, claims, accumulators=None):
    """Per policy id (an error row under the policy of its region, scheme and year), by hand."""
    res = engine.settle(claims, ps, accumulators=accumulators).results.to_pylist()
    per = defaultdict(lambda: {"claims": 0, "ok": 0, "errors": Counter(), "persons": set(), "cap_hits": 0,
                               "amounts_fen": Counter()})
    for c, r in zip(claims.to_pylist(), res):
        pid = r["policy_id"]
        if pid is None and c["settle_time"] is not None:
            t = c["settle_time"]
            versions = ps.versions(c["region"], c["scheme"], t.year)
            p = ps.in_force(c["region"], c["scheme"], t.date()) or (versions[0] if versions else None)
            pid = p.id if p is not None else None
        for e in (per[pid], per["total"]):
            e["claims"] += 1
            if r["status"] == "ok":
                e["ok"] += 1
            else:
                e["errors"][r["status"]] += 1
            if c["person_id"] is not None:
                e["persons"].add(c["person_id"])
            e["cap_hits"] += r["cap_hit"]
            for a in AMOUNTS:
                e["amounts_fen"][a] += r[a]
    return per


def assert_figures(got, want):
    rows = {p["policy_id"]: p for p in got["policies"]}
    assert set(rows) == set(want) - {"total"}
    for pid, g in [*rows.items(), ("total", got)]:
        w = want[pid]
        assert g["claims"] == w["claims"] and g["ok"] == w["ok"] and g["cap_hits"] == w["cap_hits"], pid
        assert g["errors"] == dict(w["errors"]), pid
        assert g["persons"] == len(w["persons"]), pid
        assert g["amounts_fen"] == {a: w["amounts_fen"][a] for a in AMOUNTS}, pid
        assert all(isinstance(v, int) for v in g["amounts_fen"].values())
    assert list(got["errors"]) == [c for c in engine.STATUSES if c in got["errors"]]  # spec order


def test_json_figures(ps, claims, run_summary):
    _, got = run_summary
    assert_figures(got, expected_figures(ps, claims))


def test_persons_with_carried_accumulators(ps, claims, tmp_path):
    """Persons come from the settler's key table; keys carried in are not this file's persons
    unless one of its claims names them, and a person with error rows only still counts."""
    first, second = claims.slice(0, N // 2), claims.slice(N // 2)
    pq.write_table(first, tmp_path / "a.parquet")
    pq.write_table(second, tmp_path / "b.parquet")
    assert main(["settle", str(tmp_path / "a.parquet"), "-o", str(tmp_path / "ra.parquet"),
                 "--accumulators-out", str(tmp_path / "acc.parquet")]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["settle", str(tmp_path / "b.parquet"), "-o", str(tmp_path / "rb.parquet"), "--batch-size",
                     "700", "--accumulators-in", str(tmp_path / "acc.parquet"),
                     "--summary-json", str(tmp_path / "s.json")]) == 0
    got = json.loads((tmp_path / "s.json").read_text())
    acc = pq.read_table(tmp_path / "acc.parquet")
    carried = set(acc.column("person_id").to_pylist())
    here = {p for p in second.column("person_id").to_pylist() if p is not None}
    assert carried - here and carried & here  # both kinds of carried key are there
    assert got["persons"] == len(here)
    assert_figures(got, expected_figures(ps, second, accumulators=acc))


def test_summary_without_a_settler(ps, claims):
    """Results settled elsewhere: every row's (policy, person) is counted, the same figures."""
    settled = engine.settle(claims, ps).results.combine_chunks()
    s = Summary(policies=ps)
    for res, cl in zip(settled.to_batches(max_chunksize=3000), claims.combine_chunks().to_batches(max_chunksize=3000)):
        s.add(res, cl)
    assert_figures(s.figures(), expected_figures(ps, claims))


def test_table_in_yuan(ps, claims, run_summary):
    text, got = run_summary
    assert text.startswith(f"claims {N:,}   persons {got['persons']:,}   ok {got['ok']:,}")
    lines = text.splitlines()
    for p in got["policies"] + [dict(got, policy_id="total")]:
        if p["policy_id"] is None:
            continue
        row = [ln for ln in lines if ln.startswith(p["policy_id"] + " ")]
        assert len(row) == 2, p["policy_id"]  # once in the counts, once in the amounts
        counts, amounts = row[0].split()[1:], row[1].split()[1:]
        assert counts[:3] == [f"{p['claims']:,}", f"{p['persons']:,}", f"{p['ok']:,}"]
        assert amounts == [*[format_yuan(p["amounts_fen"][a]) for a in AMOUNTS], f"{p['cap_hits']:,}"]
    assert re.search(r"\d,\d{3},\d{3}\.\d\d", text)  # thousands separators on the yuan figures


def test_empty_summary():
    s = Summary()
    f = s.figures()
    assert f["claims"] == 0 and f["policies"] == [] and f["amounts_fen"]["basic_pay"] == 0
    assert s.lines()[0].startswith("claims 0")


# --------------------------------------------------------------------------- the Cython passes, against numpy


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_dictionary_codes(dtype):
    """`_columns.dictionary_codes` is remap[indices] with the null code where the bitmap says
    null, at any bit offset (a sliced array)."""
    values = pa.array(["b", "a", None, "c"] * 50)[7:190].dictionary_encode()
    indices = values.indices.cast(pa.from_numpy_dtype(dtype))
    remap = np.array([5, 3, 9, 2], dtype=np.int32)  # three entries, then null's code
    raw = np.frombuffer(indices.buffers()[1], dtype=dtype)[indices.offset:indices.offset + len(indices)]
    out = np.empty(len(indices), dtype=np.int32)
    _columns.dictionary_codes(raw, np.frombuffer(indices.buffers()[0], np.uint8), indices.offset, remap, out)
    valid = np.asarray(indices.is_valid(), dtype=bool)
    assert (out == np.where(valid, remap[np.where(valid, raw, 0)], remap[-1])).all()
    assert (out == remap[-1]).sum() == values.null_count > 0
    out2 = np.empty(4, dtype=np.int32)
    _columns.dictionary_codes(np.array([2, 0, 1, 2], dtype=dtype), np.zeros(0, np.uint8), 0, remap, out2)
    assert out2.tolist() == [9, 5, 3, 9]


def test_summary_tally_against_numpy():
    """One pass of counts, sums, cap hits and gathered rows equals np.bincount / np.add.at."""
    rng = np.random.default_rng(7)
    n, policies, statuses, width = 5000, 6, 4, 3
    policy = rng.integers(0, policies, n).astype(np.int32)
    status = rng.choice([0, 0, 0, 1, 2, 3], n).astype(np.int32)
    amounts = [rng.integers(-10**12, 10**12, n) for _ in range(width)]
    cap = rng.random(n + 5) < 0.3
    cap_bits = np.packbits(cap, bitorder="little")
    gather = np.array([0, 1, 0, 0, 1, 0], dtype=np.uint8)
    counts = np.ones((policies, statuses), dtype=np.int64)  # added to, not overwritten
    sums = np.ones((policies, statuses, width + 1), dtype=np.int64)
    gathered = np.empty(n, dtype=np.int64)
    k = _columns.summary_tally(policy, status, 0, amounts, cap_bits, 5, gather, counts, sums, gathered)

    want_counts = np.ones((policies, statuses), dtype=np.int64)
    np.add.at(want_counts, (policy, status), 1)
    want_sums = np.ones((policies, statuses, width + 1), dtype=np.int64)
    for j, a in enumerate(amounts):
        np.add.at(want_sums[:, :, j], (policy, status), a)
    np.add.at(want_sums[:, :, width], (policy, status), cap[5:5 + n].astype(np.int64))
    assert (counts == want_counts).all() and (sums == want_sums).all()
    assert gathered[:k].tolist() == np.flatnonzero((status != 0) | gather[policy].astype(bool)).tolist()

    with pytest.raises(ValueError):  # a code outside the counts is refused, not written past them
        _columns.summary_tally(np.array([policies], np.int32), np.zeros(1, np.int32), 0,
                               [np.zeros(1, np.int64)] * width, cap_bits, 0, gather, counts, sums, gathered)
    with pytest.raises(ValueError):
        _columns.summary_tally(policy, status, 0, amounts[:2], cap_bits, 0, gather, counts, sums, gathered)


def test_chunk_tally_against_numpy():
    """The settling thread's tally off the kernel's arrays: counts and cap hits as np.add.at
    gives them (code = policy index + 1), error rows gathered, and each ok row of a versioned
    policy marking its key slot with its version's bit; a code or slot outside the tables is
    refused, not written past them."""
    rng = np.random.default_rng(11)
    n, codes, statuses, width = 6000, 5, 4, 9
    policy = rng.integers(-1, codes - 1, n).astype(np.int32)  # -1: no policy (code 0)
    status = rng.choice([0, 0, 0, 0, 1, 2, 3], n).astype(np.int8)
    cap = (rng.random(n) < 0.3).astype(np.uint8)
    versioned = np.array([0, 0, 1, 1, 0], dtype=np.uint8)
    version_bit = np.array([0, 0, 1, 2, 0], dtype=np.uint64)
    slot = rng.integers(0, 700, n).astype(np.int64)
    bits = np.zeros(700, dtype=np.uint64)
    counts = np.ones((codes, statuses), dtype=np.int64)  # added to, not overwritten
    sums = np.ones((codes, statuses, width + 1), dtype=np.int64)
    gathered = np.empty(n, dtype=np.int64)
    k = _columns.chunk_tally(policy, status, 0, cap, versioned, slot, version_bit, bits, counts, sums, gathered)

    code = policy + 1
    want_counts = np.ones((codes, statuses), dtype=np.int64)
    np.add.at(want_counts, (code, status), 1)
    want_sums = np.ones((codes, statuses, width + 1), dtype=np.int64)
    np.add.at(want_sums[:, :, width], (code, status), cap.astype(np.int64))
    assert (counts == want_counts).all() and (sums == want_sums).all()  # amounts: Settler.keep_totals
    assert gathered[:k].tolist() == np.flatnonzero(status != 0).tolist()
    want_bits = np.zeros(700, dtype=np.uint64)
    marked = (status == 0) & versioned[code].astype(bool)
    np.bitwise_or.at(want_bits, slot[marked], version_bit[code[marked]])
    assert (bits == want_bits).all() and np.count_nonzero(bits & np.uint64(1)) and np.count_nonzero(bits & np.uint64(2))

    one = (np.zeros(1, np.uint8), versioned)
    with pytest.raises(ValueError):  # a policy index outside the counts
        _columns.chunk_tally(np.array([codes], np.int32), np.zeros(1, np.int8), 0, *one, np.zeros(1, np.int64),
                             version_bit, bits, counts, sums, gathered)
    with pytest.raises(ValueError):  # a key slot outside the version bits
        _columns.chunk_tally(np.array([1], np.int32), np.zeros(1, np.int8), 0, *one, np.array([700], np.int64),
                             version_bit, bits, counts, sums, gathered)
    with pytest.raises(ValueError):  # columns of other lengths
        _columns.chunk_tally(policy, status[:-1], 0, cap, versioned, slot, version_bit, bits, counts, sums, gathered)


def test_settler_totals_are_the_results_sums(ps, claims):
    """Settler.keep_totals adds up, per policy, what the ok rows paid while the results are
    built: the same as summing the results' columns by policy_id, in schema.PAID_TOTALS order;
    error rows add nothing. Without keep_totals nothing is kept."""
    from engine.schema import PAID_TOTALS

    settler = engine.Settler(ps)
    totals = settler.keep_totals()
    assert settler.keep_totals() is totals  # asked twice: the same table
    results = pa.Table.from_batches(list(settler.settle_batches(claims.to_batches(max_chunksize=700))))
    ok = results.filter(pc.equal(results.column("status"), "ok"))
    ids = [p.id for p in ps.policies]
    want = np.zeros_like(totals)
    by = ok.group_by("policy_id").aggregate([(a, "sum") for a in PAID_TOTALS])
    for row in by.to_pylist():
        want[ids.index(row["policy_id"]) + 1] = [row[f"{a}_sum"] for a in PAID_TOTALS]
    assert (totals == want).all() and totals[1:].any() and not totals[0].any()
    assert engine.Settler(ps).totals is None

    with pytest.raises(ValueError, match="9 columns"):
        _columns.result_columns(*[np.zeros(0, t) for t in (np.int8, np.int32, np.int64)],
                                np.zeros((5, 0), np.int64), np.zeros(0, np.int64), np.zeros((0, 1), np.int64),
                                np.zeros(0, np.int32), *[np.zeros(0, np.int64)] * 3, np.zeros(1, np.int32),
                                np.zeros(0, np.int64), np.zeros((2, 8), np.int64))


def test_carried_person_with_an_error_row_only(ps, claims, tmp_path):
    """A person whose key was carried in and who has only an error row in this file counts once
    under its policy: the key table's carried slots are not this call's persons."""
    rows = engine.settle(claims, ps).results.to_pylist()
    ok = [(c, r) for c, r in zip(claims.to_pylist(), rows) if r["status"] == "ok"]
    first, policy = ok[0][0], ok[0][1]["policy_id"]
    other = next(c for c, r in ok if r["policy_id"] == policy and c["person_id"] != first["person_id"]
                 and c["settle_time"] >= first["settle_time"])  # a key this call adds
    pq.write_table(pa.Table.from_pylist([first], schema=claims.schema), tmp_path / "a.parquet")
    bad = dict(first, claim_id=first["claim_id"] + "-2", total_amount=first["total_amount"] + 1)
    second = pa.Table.from_pylist([bad, other], schema=claims.schema)
    pq.write_table(second, tmp_path / "b.parquet")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["settle", str(tmp_path / "a.parquet"), "-o", str(tmp_path / "ra.parquet"),
                     "--accumulators-out", str(tmp_path / "acc.parquet")]) == 0
        assert main(["settle", str(tmp_path / "b.parquet"), "-o", str(tmp_path / "rb.parquet"),
                     "--accumulators-in", str(tmp_path / "acc.parquet"),
                     "--summary-json", str(tmp_path / "s.json")]) == 0
    got = json.loads((tmp_path / "s.json").read_text())
    assert got["ok"] == 1 and got["persons"] == 2
    assert [(p["policy_id"], p["persons"]) for p in got["policies"]] == [(policy, 2)]
    assert_figures(got, expected_figures(ps, second, accumulators=pq.read_table(tmp_path / "acc.parquet")))


def test_find_keys_against_a_dict():
    """`AccumulatorKeys.find_keys` finds what `intern_keys` added, at its slot, and nothing else
    (keys longer than a slot keeps inline included), adding nothing."""
    from engine._hashing import AccumulatorKeys

    def buffers(people):
        arr = pa.array(people, pa.large_binary())
        return np.frombuffer(arr.buffers()[1], np.int64), np.frombuffer(arr.buffers()[2] or b"\0", np.uint8)

    people = [f"person-{i}".encode() * (1 + i % 4) for i in range(3000)]
    policy = np.array([i % 5 for i in range(3000)], dtype=np.int32)
    table = AccumulatorKeys()
    arr = pa.array(people, pa.binary())
    slots = np.empty(len(people), dtype=np.int64)
    table.intern_keys(np.frombuffer(arr.buffers()[1], np.int32), np.frombuffer(arr.buffers()[2], np.uint8),
                      policy, slots)
    held = dict(zip(zip(policy.tolist(), people), slots.tolist()))
    asked = people[::3] + [b"nobody", b""] + people[:50]
    asked_policy = np.array([*policy[::3].tolist(), 0, 1, *((policy[:50] + 1) % 5).tolist()], dtype=np.int32)
    asked_policy[5] = -1  # no policy: never found
    offsets, data = buffers(asked)
    out = np.empty(len(asked), dtype=np.int64)
    table.find_keys(offsets, data, asked_policy, out)
    want = [-1 if p < 0 else held.get((p, who), -1) for p, who in zip(asked_policy.tolist(), asked)]
    assert out.tolist() == want and sum(w >= 0 for w in want) > 900
    assert len(table) == len(held)  # nothing added


def test_key_policies_read_in_place():
    """`AccumulatorKeys.key_policies` gives each key's policy index (its 4-byte prefix) from any
    key on, as the exported arena holds it; keys past the table are refused."""
    from engine._hashing import AccumulatorKeys

    people = [f"p{i % 700}".encode() for i in range(2000)]
    policy = np.array([(i * 7) % 11 - (i % 3 == 0) * 2 for i in range(2000)], dtype=np.int32)
    policy[policy < 0] = 2**31 - 1  # a large index reads back whole
    table = AccumulatorKeys()
    arr = pa.array(people, pa.binary())
    slots = np.empty(len(people), dtype=np.int64)
    table.intern_keys(np.frombuffer(arr.buffers()[1], np.int32), np.frombuffer(arr.buffers()[2], np.uint8),
                      policy, slots)
    starts, arena = table.export()
    want = [int(np.frombuffer(arena[a:a + 4].tobytes(), np.int32)[0]) for a in starts[:-1].tolist()]
    for first in (0, 1, 17, len(table)):
        out = np.empty(len(table) - first, dtype=np.int32)
        table.key_policies(first, out)
        assert out.tolist() == want[first:]
    assert set(want) == set(policy.tolist()) and len(table) > 700
    with pytest.raises(ValueError):
        table.key_policies(1, np.empty(len(table), dtype=np.int32))


def test_intern_spans_as_intern_ids():
    """`ClaimIds.intern_spans` (the person ids of key-table entries, read in place past their
    policy bytes) gives the ids `intern_ids` gives the same strings cut out; a span shorter
    than the bytes skipped is refused."""
    from engine._hashing import ClaimIds

    rng = np.random.default_rng(5)
    people = [f"p{rng.integers(0, 400)}".encode() * int(rng.integers(1, 5)) for _ in range(2000)] + [b""]
    arena = b"".join(int(rng.integers(0, 9)).to_bytes(4, "little") + p for p in people)
    starts = np.cumsum([0] + [4 + len(p) for p in people]).astype(np.int64)
    spans = ClaimIds()
    got = np.empty(len(people), dtype=np.int64)
    spans.intern_spans(starts, 4, np.frombuffer(arena, np.uint8), got)
    plain = ClaimIds()
    arr = pa.array(people, pa.binary())
    want = np.empty(len(people), dtype=np.int64)
    plain.intern_ids(np.frombuffer(arr.buffers()[1], np.int32), np.frombuffer(arr.buffers()[2], np.uint8), want)
    assert got.tolist() == want.tolist() and len(spans) == len(set(people))
    with pytest.raises(ValueError):
        spans.intern_spans(np.array([0, 3], np.int64), 4, np.frombuffer(arena, np.uint8), np.empty(1, np.int64))


def test_counted_while_settling_as_add(ps, claims):
    """The counts taken on the settling thread from the kernel's outputs (`Settler.each`) are
    those `add` takes from the results; a policy set whose year starts with a version after
    1 January (where the kernel's version in force and policy_rows part for an early date) is
    counted by `add`, and still right."""
    from engine.model import PolicySet
    from engine.summary import _lookup_places_rows

    batches = claims.combine_chunks().to_batches(max_chunksize=1500)
    figures = []
    for hook in (True, False):
        settler = engine.Settler(ps)
        s = Summary(settler)
        settler.each = s.counted_while_settling() if hook else None
        assert (settler.each is not None) == hook
        for res, c in zip(settler.settle_batches(iter(batches)), batches):
            s.add(res, c)
        figures.append(s.figures())
    assert figures[0] == figures[1]
    assert_figures(figures[0], expected_figures(ps, claims))

    late = PolicySet(tuple(p for p in ps.policies if p.id != "tibet-resident-2019"))
    assert _lookup_places_rows(ps) and not _lookup_places_rows(late)
    settler = engine.Settler(late)
    s = Summary(settler)
    assert s.counted_while_settling() is None
    for res, c in zip(settler.settle_batches(iter(batches)), batches):
        s.add(res, c)
    assert_figures(s.figures(), expected_figures(late, claims))


def test_versioned_year_persons_from_key_slots(ps, claims):
    """The ok rows of a year with several versions are counted per version by their key slots'
    bits, not gathered (only error rows are): persons per version as a hand count, with a
    person in two versions of a year, and error rows of a person an ok row already counts."""
    batches = claims.combine_chunks().to_batches(max_chunksize=1500)
    settler = engine.Settler(ps)
    s = Summary(settler)
    settler.each = s.counted_while_settling()
    for res, c in zip(settler.settle_batches(iter(batches)), batches):
        s.add(res, c)
    got = s.figures()
    assert_figures(got, expected_figures(ps, claims))
    versioned = [c for c in range(1, len(s._names)) if s._versioned[c]]
    assert versioned and all(bin(int(b)).count("1") <= len(versioned) for b in s._version_bits)
    assert any(bin(int(b)).count("1") >= 2 for b in s._version_bits)  # a person in two versions
    gathered = sum(len(p) for p, _ in s._pairs)
    errors = got["claims"] - got["ok"]
    assert gathered <= errors  # no ok row of a versioned year gathered
    counted = {r["policy_id"]: r["persons"] for r in got["policies"]}
    for c in versioned:
        assert counted[s._names[c]] >= int(np.count_nonzero(s._version_bits & s._version_bit[c])) > 0
