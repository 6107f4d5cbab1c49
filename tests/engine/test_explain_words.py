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
