"""The ledger a real-time server exported, cleared at year end (issues 16 and 17 together):
claims settled through the group writer, one reversed, the ledger exported with `medsettle
ledger export`, then `engine.clearing.clear` over the year's data with one amount corrected
and one claim missing. Everything else must match the counter to the fen."""
from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.clearing.clear import clear
from srv_helpers import engine_table, pb, persons_pb
from test_group_writer import reverse, run, settle
from test_ledger_io import cli, gw, year_claims  # noqa: F401  (gw: the fixture)
from server.registry import person_from_pb, persons_table


def test_exported_ledger_reconciles_with_the_year(gw, store, store_factory, ps, tmp_path):  # noqa: F811
    offered = year_claims()
    answers = []
    for k in range(0, len(offered), 9):
        answers += run(gw, *[settle(r, facility="H7") for r in offered[k:k + 9]])
    rows = [r for r, a in zip(offered, answers) if isinstance(a, bytes)]
    paid = {r["claim_id"]: pb.SettleResponse.FromString(a).result for r, a in zip(offered, answers)
            if isinstance(a, bytes)}
    reversed_id = rows[-1]["claim_id"]  # the newest claim of its person: nothing after it moves
    run(gw, reverse(reversed_id, facility="H7", reason="entered twice"))
    ledger = tmp_path / "ledger.parquet"
    assert cli("ledger", "export", "--store", store_factory.target, "-o", str(ledger)) == 0

    # the year's data: the reversed claim left out, the last claim of another person missing,
    # one person's last claim corrected upward (its in-scope amount by 1,000 yuan)
    others = [r for r in rows if r["claim_id"] != reversed_id]
    last = {}
    for r in others:
        last[r["person_id"]] = r
    persons = [p for p in last if p != rows[-1]["person_id"]]
    missing, corrected = last[persons[0]]["claim_id"], last[persons[1]]["claim_id"]
    year = []
    for r in others:
        if r["claim_id"] == missing:
            continue
        if r["claim_id"] == corrected:
            r = dict(r, in_scope_amount=r["in_scope_amount"] + 1000_00, total_amount=r["total_amount"] + 1000_00)
        year.append(r)
    claims = tmp_path / "claims.parquet"
    pq.write_table(engine_table(year), claims)
    registry = tmp_path / "persons.parquet"
    pq.write_table(persons_table(person_from_pb(i, p) for i, p in enumerate(persons_pb())), registry)

    summary = clear(2024, claims, ps, tmp_path / "out", registry=registry, ledger=ledger, charts=False,
                    stream=None)
    recon = summary["reconciliation"] if "reconciliation" in summary else summary
    assert recon["reversed_left_out"] == 1
    assert recon["ledger_only"] == 1 and recon["year_only"] == 0
    assert recon["matched_with_difference"] == 1
    assert recon["matched_exactly"] == len(year) - 1
    diff = pq.read_table(tmp_path / "out" / "reconciliation" / "claims.parquet")
    by_id = {r["claim_id"]: r for r in diff.to_pylist()}
    assert set(by_id) == {missing, corrected}
    assert by_id[missing]["match"] == "ledger_only"
    assert by_id[missing]["paid_basic_pay"] == paid[missing].basic_pay
    c = by_id[corrected]
    # 1,000 yuan more in scope: what the funds pay more (>= 0, caps permitting) and the rest on the patient
    assert c["match"] == "both" and c["diff_total"] >= 0
    assert c["diff_personal_pay"] == 1000_00 - c["diff_total"]
    assert int(pc.sum(diff.column("diff_total")).as_py()) == sum(r["diff_total"] for r in by_id.values())
