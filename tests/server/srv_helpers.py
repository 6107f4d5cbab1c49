"""Helpers for the server tests: a server on a background thread (real socket,
real client), policies written as the spec's policy mappings, claims and
persons as messages, and the engine's view of the same claims."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pyarrow as pa

import engine
from server._proto import settlement_pb2 as pb
from server._proto import settlement_pb2_grpc as pb_grpc
from server.client import claim_pb, person_pb, result_dict, to_us
from server.errors import error_from_rpc

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- policies

#: A resident policy of region 000001 for 2024 exercising most mechanisms: repeat
#: admissions, segments, class ratios, year-axis layers with caps, identities and
#: adjustments, a guarantee layer.
POLICY_2024 = {
    "id": "t-resident-2024", "region": "000001", "scheme": "resident", "year": 2024,
    "identities": ["extreme_poverty", "low_income", "monitored"],
    "repeat_admission": {"factors": [1.0, 0.5], "floor": 100},
    "disease_groups": {"two": ["I10-I15", "E10-E14"]},
    "layers": [
        {"name": "basic", "fund": "basic",
         "cap_groups": {"inpatient": 5000, "outpatient": 300, "two": 200},
         "rules": [
             {"match": {"visit_type": ["inpatient"], "facility_level": ["primary"]}, "deductible": 150,
              "repeat_admission": True, "ratio": 0.85, "cap_group": "inpatient"},
             {"match": {"visit_type": ["inpatient"]}, "deductible": 800, "repeat_admission": True,
              "segments": [{"upto": 2000, "ratio": 0.6}, {"ratio": 0.7}], "cap_group": "inpatient"},
             {"match": {"visit_type": ["chronic"], "disease_group": ["two"]}, "ratio": 0.5, "cap_group": "two"},
             {"match": {"visit_type": ["chronic"]}, "axis": "year", "deductible": 600, "ratio": 0.65,
              "cap_group": "inpatient"},
             {"match": {"visit_type": ["outpatient"]}, "ratio": {"class_a": 0.55, "class_b": 0.45},
              "cap_group": "outpatient"},
             {"match": {"visit_type": ["maternity"]}, "fixed_amount": 1500},
         ],
         "adjustments": [{"match": {"identity": ["extreme_poverty", "low_income"], "locality": ["county"]},
                          "deductible_factor": 0, "ratio_add": 0.05}]},
        {"name": "critical_illness", "fund": "critical_illness", "cap_groups": {"year": 8000},
         "rules": [{"match": {"visit_type": ["inpatient", "chronic"]}, "axis": "year", "deductible": 1500,
                    "segments": [{"upto": 5000, "ratio": 0.6}, {"ratio": 0.7}], "cap_group": "year"}],
         "adjustments": [{"match": {"identity": ["extreme_poverty", "low_income"]}, "deductible_factor": 0.5,
                          "ratio_add": 0.05}]},
        {"name": "assistance", "fund": "medical_aid", "cap_groups": {"year": 3000},
         "rules": [{"match": {"holds": ["extreme_poverty"]}, "axis": "year", "ratio": 1.0, "cap_group": "year"},
                   {"match": {"holds": ["low_income"]}, "axis": "year", "ratio": 0.7, "cap_group": "year"},
                   {"match": {"holds": ["monitored"], "visit_type": ["inpatient"]}, "axis": "year",
                    "deductible": 500, "ratio": 0.6, "cap_group": "year"}]},
        {"name": "zero_pay", "fund": "guarantee",
         "rules": [{"match": {"identity": ["extreme_poverty"], "locality": ["county"],
                              "visit_type": ["inpatient"]}, "max_personal_share": 0.0}]},
    ],
}

#: An employee policy of the same region (a person may change scheme).
POLICY_EMP_2024 = {
    "id": "t-employee-2024", "region": "000001", "scheme": "employee", "year": 2024,
    "layers": [{"name": "basic", "fund": "basic", "cap_groups": {"all": 40000},
                "rules": [{"match": {"visit_type": ["inpatient", "chronic", "outpatient"]}, "deductible": 1000,
                           "ratio": 0.9, "cap_group": "all"}]},
               {"name": "large", "fund": "supplementary", "cap_groups": {"year": 20000},
                "rules": [{"match": {"visit_type": ["inpatient"]}, "axis": "year", "deductible": 5000,
                           "ratio": 0.8, "cap_group": "year"}]}],
}

#: 2025 policy of the same region (a claim's year picks the policy and the accumulators).
POLICY_2025 = dict(POLICY_2024, id="t-resident-2025", year=2025)


def policy_set(*mappings) -> engine.PolicySet:
    mappings = mappings or (POLICY_2024, POLICY_EMP_2024, POLICY_2025)
    return engine.PolicySet(policies=tuple(engine.parse_policy(m, f"{m['id']}.yaml") for m in mappings))


def write_policies(folder: Path, *mappings) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for m in mappings or (POLICY_2024, POLICY_EMP_2024, POLICY_2025):
        (folder / f"{m['id']}.yaml").write_text(yaml.safe_dump(m, allow_unicode=True, sort_keys=False))
    return folder


# ---------------------------------------------------------------- persons and claims

D = dt.date
T = dt.datetime

#: (person_id, region, scheme, birth_date, spells)
PERSONS = [
    ("p-plain", "000001", "resident", D(1960, 7, 1), []),
    ("p-poor", "000001", "resident", D(1950, 2, 28), [("extreme_poverty", None, None)]),
    ("p-low", "000001", "resident", D(1990, 3, 15), [("low_income", D(2024, 1, 1), D(2024, 6, 30))]),
    ("p-mon", "000001", "resident", D(2000, 1, 1), [("monitored", D(2023, 1, 1), None),
                                                    ("low_income", D(2024, 9, 1), None)]),
    ("p-emp", "000001", "employee", D(1975, 12, 31), []),
    ("p-kid", "000001", "resident", D(2020, 2, 29), []),
]


def persons_pb(persons=PERSONS) -> list:
    return [person_pb(pid, region, scheme, birth, spells) for pid, region, scheme, birth, spells in persons]


def age_at(birth: dt.date, t: dt.datetime) -> int:
    return t.year - birth.year - ((t.month, t.day) < (birth.month, birth.day))


def identities_at(spells, t: dt.datetime):
    d = t.date()
    ids = [n for n, lo, hi in spells if (lo is None or lo <= d) and (hi is None or d <= hi)]
    return ids or None


def claim_row(claim_id, person_id, settle_time, visit_type="inpatient", facility_level="secondary",
              locality="county", in_scope=10_000_00, self_funded=0, over_limit=0, class_b_copay=0,
              in_scope_class_b=0, referred=False, disease_code=None, total=None) -> dict:
    """A claim as a spec section 2 row, without the registry columns."""
    return dict(claim_id=claim_id, person_id=person_id, settle_time=settle_time, visit_type=visit_type,
                facility_level=facility_level, locality=locality, referred=referred, disease_code=disease_code,
                total_amount=(self_funded + over_limit + class_b_copay + in_scope) if total is None else total,
                self_funded_amount=self_funded, over_limit_amount=over_limit,
                class_b_copay_amount=class_b_copay, in_scope_amount=in_scope,
                in_scope_class_b_amount=in_scope_class_b)


def engine_table(rows: list, persons=PERSONS) -> pa.Table:
    """The rows as an engine claims table, with region, scheme, age and identities filled in
    from `persons` here in the test (independently of the server's registry code)."""
    by_id = {p[0]: p for p in persons}
    full = []
    for r in rows:
        pid, region, scheme, birth, spells = by_id[r["person_id"]]
        full.append(dict(r, region=region, scheme=scheme, age=age_at(birth, r["settle_time"]),
                         identities=identities_at(spells, r["settle_time"])))
    return pa.Table.from_pylist(full, schema=engine.CLAIMS_SCHEMA)


def settle_request(row: dict, facility_id: str = "F1") -> pb.SettleRequest:
    return pb.SettleRequest(claim=claim_pb(row, facility_id=facility_id))


def engine_results(ps, rows: list, persons=PERSONS, chunks: bool = False):
    """(results as dicts, closing accumulators in Store.fold_ledger form) of engine.settle;
    chunks=True settles one claim per chunk in the given order (the server's commit order)."""
    table = engine_table(rows, persons)
    claims = table.to_batches(max_chunksize=1) if chunks else table
    res = engine.settle(claims, ps)
    return res.results.to_pylist(), acc_fold(res.accumulators)


def acc_fold(table: pa.Table) -> dict:
    out = {}
    for r in table.to_pylist():
        layers = {(e["layer"], e["cap_group"]): [e["position"], e["paid"], e["deductible_charged"]]
                  for e in r["layers"] if e["position"] or e["paid"] or e["deductible_charged"]}
        out[(r["person_id"], r["region"], r["scheme"], r["year"])] = (
            r["admissions"], r["compliant_total"],
            dict(sorted(layers.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))))
    return out


def norm(results: list) -> list:
    keys = ("claim_id", "status", "policy_id", "identity", "deductible_applied", "basic_pay", "supplementary_pay",
            "critical_illness_pay", "medical_aid_pay", "guarantee_pay", "fund_pay_total", "personal_pay",
            "compliant_personal_pay", "layer_pays", "cap_hit")
    return [{k: r[k] for k in keys} for r in results]


def nonzero(fold: dict) -> dict:
    """Drop keys whose every value is 0 (a fully reversed key)."""
    return {k: v for k, v in fold.items() if v[0] or v[1] or v[2]}


# ---------------------------------------------------------------- servers


class ThreadedServer:
    """server.app.Server on its own event loop thread, on 127.0.0.1:<free port>."""

    def __init__(self, ps, store_path, **kw):
        from server.app import Server

        self._kw = kw
        self.srv = Server(ps, str(store_path), **kw)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.srv.start(), self.loop).result(30)
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.SettlementStub(self.channel)
        self.registry = pb_grpc.RegistryStub(self.channel)

    @property
    def store(self):
        return self.srv.store

    def stop(self, grace: float = 5.0):
        if self.srv is None:
            return
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.srv.stop(grace), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self.srv = None


def start_subprocess_server(store: Path, *, policies: Path | None = None, registry: Path | None = None,
                            extra=(), env=None) -> tuple[subprocess.Popen, int]:
    """`python -m server ...` as a child process; returns (process, port) once it serves."""
    port_file = Path(str(store) + ".port")
    if port_file.exists():
        port_file.unlink()
    cmd = [sys.executable, "-m", "server", "--store", str(store), "--port", "0", "--port-file", str(port_file),
           "--log-level", "WARNING", *extra]
    if policies is not None:
        cmd += ["--policies", str(policies)]
    if registry is not None:
        cmd += ["--registry", str(registry)]
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not port_file.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise RuntimeError(f"server exited {proc.returncode}: {err[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("server did not start in 60 s")
        time.sleep(0.02)
    return proc, int(port_file.read_text())


def ledger_size(store) -> int:
    """Ledger entries in the store (sequence numbers may have gaps on PostgreSQL)."""
    return sum(len(part) for part in store.iter_ledger())


def rpc_error(fn, *args, **kw):
    """Calls fn expecting a gRPC error; returns (status code, ErrorDetail)."""
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code(), error_from_rpc(e)
    raise AssertionError("the call succeeded")


__all__ = ["POLICY_2024", "POLICY_EMP_2024", "POLICY_2025", "PERSONS", "ThreadedServer", "acc_fold", "age_at",
           "claim_row", "engine_results", "engine_table", "identities_at", "ledger_size", "nonzero", "norm", "persons_pb",
           "policy_set", "result_dict", "rpc_error", "settle_request", "start_subprocess_server", "to_us",
           "write_policies", "T", "D", "pb", "signal"]
