"""`explain` in the office's words (issue 13 item 4): rules numbered from 1 with their
conditions as written in the policy file and the source comment of each number, the
adjustments that applied (checked against the kernel's own factors), an error claim's
failed check, a duplicate shown as such, and --format json."""
from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import engine
from engine.cli import main
from engine.detail import status_detail
from engine.explain import PolicySource, _comment, explain, format_explanation
from engine.generate import generate_claims
from engine.model import BP


@pytest.fixture(scope="module")
def ps():
    return engine.load_policies(None)


@pytest.fixture(scope="module")
def claims(ps):
    c = generate_claims(ps, 6000, seed=21, invalid_rate=0.05)
    return c


@pytest.fixture(scope="module")
def settled(ps, claims):
    return engine.settle(claims, ps).results


def one_claim(ps, policy_id, **kw):
    p = ps.by_id(policy_id)
    row = dict(claim_id="E1", person_id="P1", region=p.region, scheme=p.scheme,
               settle_time=dt.datetime(p.year, 5, 1, 9), visit_type="inpatient", facility_level="primary",
               locality="county", referred=True, disease_code="K35.800", age=50, identities=[],
               total_amount=2_000_000, self_funded_amount=0, over_limit_amount=0, class_b_copay_amount=0,
               in_scope_amount=2_000_000, in_scope_class_b_amount=0)
    row.update(kw)
    return pa.Table.from_pylist([row], schema=engine.CLAIMS_SCHEMA)


def test_rule_as_written_with_its_sources(ps):
    ex = explain(one_claim(ps, "shuozhou-resident-2022"), ps, "E1")
    basic = ex["layers"][0]
    assert basic["rule_number"] == basic["rule_index"] + 1 == 1
    assert basic["conditions"] == "{visit_type: [inpatient], facility_level: [primary]}"
    assert basic["comment"] == "乡镇卫生院/社区卫生服务中心"
    numbers = {n["key"]: (n["value"], n["comment"]) for n in basic["numbers"]}
    assert numbers["deductible"] == ("150", "assumed: typical Shanxi 一级医疗机构起付线")
    assert numbers["ratio"][0] == "0.85"
    assert numbers["cap_group pool"][0] == "200000"
    text = format_explanation(ex)
    assert "rule 1 of " in text and "when {visit_type: [inpatient], facility_level: [primary]}" in text
    assert "deductible: 150  -- assumed: typical Shanxi 一级医疗机构起付线" in text
    assert "rule 0" not in text


def test_every_explained_rule_is_the_files_text(ps, claims, settled):
    """For a spread of ok claims: each layer's conditions text is the `match:` of that rule in its
    file, and each number listed is on a line of the file with its comment."""
    ok = [r["claim_id"] for r in settled.to_pylist() if r["status"] == "ok"][::60]
    for cid in ok:
        ex = explain(claims, ps, cid)
        text = open(ex["policy_file"], encoding="utf-8").read()
        for e in ex["layers"]:
            if "rule_index" not in e:
                continue
            assert e["conditions"].split(";")[0].strip() in text
            for n in e["numbers"]:
                line = next(ln for ln in text.splitlines() if n["value"] in ln and (not n["comment"] or n["comment"] in ln))
                assert line


def test_adjustments_listed_are_the_ones_the_kernel_applied(ps, claims, settled):
    """The adjustments whose conditions explain finds true give the kernel's traced factors:
    deductible factor, replaced ratio, added ratio."""
    seen = 0
    rows = [r["claim_id"] for r in settled.to_pylist() if r["status"] == "ok" and r["identity"]]
    for cid in rows[:80]:
        for e in explain(claims, ps, cid)["layers"]:
            if "deductible" not in e:
                continue
            g, rr, ra = BP, None, 0
            for a in e["adjustments"]:
                if a["deductible_factor"] is not None:
                    g = (g * a["deductible_factor"] + BP // 2) // BP
                if a["ratio"] is not None:
                    rr, ra = a["ratio"], 0
                ra += a["ratio_add"] or 0
                seen += 1
            assert (g, rr, ra) == (e["adjustment_factor"], e["ratio_replace"], e["ratio_add"]), (cid, e["layer"])
    assert seen > 0


def test_error_claim_names_the_failed_check(ps, claims, settled):
    for code in ("AMOUNT_MISMATCH", "INVALID_AMOUNT", "UNKNOWN_IDENTITY"):
        i = next(i for i, s in enumerate(settled.column("status").to_pylist()) if s == code)
        cid = claims.column("claim_id")[i].as_py()
        ex = explain(claims, ps, cid)
        want = status_detail(claims.slice(i, 1), settled.slice(i, 1), ps)[0].as_py()
        assert ex["failed_check"] == want
        assert f"failed check: {want}" in format_explanation(ex)


def test_duplicate_is_shown_as_such(capsys, tmp_path, ps, claims):
    dup = pa.concat_tables([claims, claims.slice(10, 1)])
    path = tmp_path / "c.parquet"
    pq.write_table(dup, path)
    cid = claims.column("claim_id")[10].as_py()
    assert main(["explain", str(path), "--claim-id", cid]) == 0
    out = capsys.readouterr().out
    assert f"claim {cid} (row 11)" in out
    assert f"row {dup.num_rows} (DUPLICATE_CLAIM, not settled)" in out


def test_json_format(capsys, tmp_path, ps, claims, settled):
    path = tmp_path / "c.parquet"
    pq.write_table(claims, path)
    cid = next(r["claim_id"] for r in settled.to_pylist() if r["status"] == "ok")
    assert main(["explain", str(path), "--claim-id", cid, "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = explain(claims, ps, cid)
    assert got["result"] == want["result"] and got["layers"] == want["layers"]
    assert got["claim"]["settle_time"] == want["claim"]["settle_time"].isoformat()


def test_policy_built_in_memory(ps):
    """Without a file, the conditions are written from the rule (and numbers have no comment)."""
    p = ps.by_id("shuozhou-resident-2022")
    bare = engine.PolicySet(policies=(engine.parse_policy(_as_mapping(p), ""),))
    ex = explain(one_claim(bare, "shuozhou-resident-2022"), bare, "E1")
    assert ex["layers"][0]["conditions"] == "{visit_type: [inpatient], facility_level: [primary]}"
    assert ex["layers"][0]["comment"] is None


def _as_mapping(p):
    return yaml.safe_load(open(p.path, encoding="utf-8"))


def test_comment_parsing(tmp_path):
    assert _comment("ratio: 0.85  # seed 002: 85%") == "seed 002: 85%"
    assert _comment("title: 'a # b'  # real") == "real"
    assert _comment("url: x#y") is None
    f = tmp_path / "p.yaml"
    f.write_text("a:\n  - {b: 1}  # one\n  - c: 2\n    d: 3  # three\n")
    src = PolicySource(f)
    assert src.written(src.node("a", 1)) == "c: 2; d: 3"
    assert src.comment(src.node("a", 1, "d")) == "three" and src.comment(src.node("a", 0)) == "one"
    assert src.node("a", 5) is None and src.node("x") is None


# --------------------------------------------------------------------------- nested caps (revision 2)

def _claims(ps, *rows):
    """Claims of person P1 under shuozhou-resident-2022, one chunk, in settle_time order."""
    p = ps.by_id("shuozhou-resident-2022")
    out = []
    for i, kw in enumerate(rows):
        one = one_claim(ps, p.id, claim_id=f"N{i + 1}", settle_time=dt.datetime(p.year, 3, 1 + i, 9),
                        total_amount=kw["amount"], in_scope_amount=kw["amount"],
                        **{k: v for k, v in kw.items() if k != "amount"})
        out.append(one)
    return pa.concat_tables(out)


def _groups(entry):
    return [(g["cap_group"], g["cap"], g["paid_before"], g["room"], g["binding"]) for g in entry["cap_groups"]]


def test_nested_caps_each_group_and_the_one_that_limited(ps):
    """The chronic rule's `cap_group: [chronic, pool]`: after an admission that used all but
    377.50 of the pool, a chronic claim (raw 2,860.00) is limited by the outer pool, not by its
    own chronic limit; each group is listed with its cap, paid before and room."""
    claims = _claims(ps, dict(amount=23_500_000), dict(amount=500_000, visit_type="chronic"))
    ex = explain(claims, ps, "N2")
    basic = ex["layers"][0]
    assert basic["kind"] == "segments" and basic["cap_group"] == "chronic"
    pool_paid = ex["layers"][0]["paid_before"]
    assert pool_paid == (23_500_000 - 15_000) * 8500 // BP == 19_962_250
    assert _groups(basic) == [("chronic", 2_000_000, 0, 2_000_000, False),
                              ("pool", 20_000_000, pool_paid, 37_750, True)]
    assert (basic["raw"], basic["pay"], basic["cap"]) == (286_000, 37_750, 20_000_000)
    assert basic["limited_by"] == "pool" and basic["cap_factor"] == BP and basic["uncapped"] is False
    numbers = {n["key"]: n["value"] for n in basic["numbers"]}
    assert numbers["cap_group chronic"] == "20000" and numbers["cap_group pool"] == "200000"
    text = format_explanation(ex)
    assert "nested caps (each limits the pay, each grows by it; chronic holds the position" in text
    assert "cap chronic: 20,000.00 a year, paid before 0.00, room 20,000.00\n" in text
    assert "cap pool: 200,000.00 a year, paid before 199,622.50, room 377.50  <- limits the pay" in text
    assert "raw 2,860.00; pays 377.50 (cap hit: pool)" in text
    # both groups grew by the pay
    after = {(e["layer"], e["cap_group"]): e["paid"] for e in ex["accumulators_after"]["layers"]}
    assert after[("basic", "chronic")] == 37_750 and after[("basic", "pool")] == 20_000_000

    # alone, the same kind of claim is limited by its own chronic limit
    ex = explain(_claims(ps, dict(amount=4_000_000, visit_type="chronic")), ps, "N1")
    basic = ex["layers"][0]
    assert _groups(basic) == [("chronic", 2_000_000, 0, 2_000_000, True), ("pool", 20_000_000, 0, 20_000_000, False)]
    assert (basic["raw"], basic["pay"], basic["limited_by"]) == ((4_000_000 - 60_000) * 6500 // BP, 2_000_000,
                                                                  "chronic")
    assert "cap chronic: 20,000.00 a year, paid before 0.00, room 20,000.00  <- limits the pay" in \
        format_explanation(ex)


def test_cap_factor_and_uncapped_adjustments_shown(ps, tmp_path):
    """An adjustment's cap_factor scales every cap of the nested rule (shown as cap x factor);
    `uncapped: true` (critical illness for low-income persons) lifts the caps."""
    p = ps.by_id("shuozhou-resident-2022")
    doc = _as_mapping(p)
    doc["layers"][0].setdefault("adjustments", []).append(
        {"match": {"identity": ["extreme_poverty"]}, "cap_factor": 1.5})
    folder = tmp_path / "pol"
    folder.mkdir()
    (folder / "shuozhou-resident-2022.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    mine = engine.load_policies(folder)
    claims = _claims(mine, dict(amount=6_000_000, visit_type="chronic", identities=["extreme_poverty"]))
    ex = explain(claims, mine, "N1")
    basic = ex["layers"][0]
    assert basic["cap_factor"] == 15_000 and [a["cap_factor"] for a in basic["adjustments"]] == [15_000]
    assert _groups(basic) == [("chronic", 3_000_000, 0, 3_000_000, True), ("pool", 30_000_000, 0, 30_000_000, False)]
    assert (basic["pay"], basic["cap"], basic["limited_by"]) == (3_000_000, 3_000_000, "chronic")
    text = format_explanation(ex)
    assert "cap chronic: 20,000.00 x cap factor 150% = 30,000.00 a year" in text
    assert "cap pool: 200,000.00 x cap factor 150% = 300,000.00 a year" in text

    ex = explain(_claims(ps, dict(amount=80_000_000, identities=["low_income"])), ps, "N1")
    ci = ex["layers"][1]
    assert ci["layer"] == "critical_illness" and ci["uncapped"] is True and ci["cap"] is None
    assert [a["uncapped"] for a in ci["adjustments"]] == [True]
    assert ci["pay"] == ci["raw"] > 40_000_000  # above the 400,000 yuan cap it would have had
    text = format_explanation(ex)
    assert "caps lifted for this claim (uncapped): year 400,000.00 a year" in text
    assert "uncapped: true (lifts every cap of the rule for this claim)" in text


def test_nested_caps_json_format(capsys, tmp_path, ps):
    claims = _claims(ps, dict(amount=23_500_000), dict(amount=500_000, visit_type="chronic"))
    path = tmp_path / "n.parquet"
    pq.write_table(claims, path)
    assert main(["explain", str(path), "--claim-id", "N2", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    basic = got["layers"][0]
    assert basic["cap_groups"] == explain(claims, ps, "N2")["layers"][0]["cap_groups"]
    assert [g["cap_group"] for g in basic["cap_groups"]] == ["chronic", "pool"]
    assert [g["binding"] for g in basic["cap_groups"]] == [False, True]
    assert basic["limited_by"] == "pool" and basic["cap_factor"] == BP and basic["uncapped"] is False
