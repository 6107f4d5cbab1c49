"""`medsettle call`: try the settlement server from a shell, JSON in and JSON out.

    medsettle call settle|presettle --server HOST:PORT (--claim JSON | --claim @FILE | --claim -
                                                        | --claims-file CLAIMS --claim-id ID) [--facility-id F]
    medsettle call reverse --server HOST:PORT --claim-id ID --facility-id F [--reason TEXT]
    medsettle call get --server HOST:PORT --claim-id ID
    medsettle call accumulators --server HOST:PORT --person-id P [--year Y]
    medsettle call person --server HOST:PORT --person-id P
    TLS: --tls-ca PEM (verify the server), --tls-cert PEM --tls-key PEM (client certificate, mTLS),
         --tls-server-name NAME (the name in the server's certificate, if not HOST)

A claim is a spec section 2 row as JSON: `settle_time` an ISO local wall time
("2024-03-01T09:30:00") or `settle_time_us`, enums by their spec names
("inpatient"), amounts in integer fen. The columns the server takes from its
registry (region, scheme, age, identities) may be present, as in a claims
file's row, and are not sent. The answer is the response message as JSON:
field names as in the .proto, enums by name, int64 as JSON numbers, every
field present. A failed call prints {"error": {...}} (the gRPC status and the
server's ErrorDetail) and exits 1; a usage or input error exits 2.

Registered as a `medsettle` subcommand through the entry point
`call = "server.call:register"`.
"""
from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, Optional

import grpc
import pyarrow.compute as pc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from engine.files import CliError, ClaimsFile, one_line
from engine.schema import AMOUNT_COLUMNS

from ._proto import settlement_pb2 as pb
from ._proto import settlement_pb2_grpc as pb_grpc
from .client import LEVEL_PB, LOCALITY_PB, VISIT_PB, claim_pb
from .errors import error_from_rpc

#: Keys of a claim row that become Claim fields.
CLAIM_KEYS = ("claim_id", "person_id", "facility_id", "settle_time", "settle_time_us", "visit_type",
              "facility_level", "locality", "referred", "disease_code", *AMOUNT_COLUMNS)
#: Keys of a claims-file row that the server takes from its registry: accepted, not sent.
REGISTRY_KEYS = ("region", "scheme", "age", "identities")
_ENUMS = {"visit_type": VISIT_PB, "facility_level": LEVEL_PB, "locality": LOCALITY_PB}
DEFAULT_TIMEOUT = 10.0


# =========================================================================== JSON <-> messages


def claim_from_json(row: dict, facility_id: Optional[str] = None) -> pb.Claim:
    """A Claim from a spec-shaped dict; a ValueError names the key at fault."""
    if not isinstance(row, dict):
        raise ValueError(f"a claim is a JSON object, not {type(row).__name__}")
    unknown = sorted(set(row) - set(CLAIM_KEYS) - set(REGISTRY_KEYS))
    if unknown:
        raise ValueError(f"claim: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(CLAIM_KEYS)}")
    row = {k: v for k, v in row.items() if k in CLAIM_KEYS}
    for key in ("claim_id", "person_id"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise ValueError(f"claim: {key} must be a non-empty string")
    if facility_id is not None:
        row["facility_id"] = facility_id
    if "settle_time_us" in row:
        if "settle_time" in row:
            raise ValueError("claim: give settle_time or settle_time_us, not both")
        us = row.pop("settle_time_us")
        if not isinstance(us, int) or isinstance(us, bool):
            raise ValueError(f"claim: settle_time_us must be an integer (µs of local wall time), not {us!r}")
        row["settle_time"] = us
    elif isinstance(row.get("settle_time"), str):
        try:
            t = dt.datetime.fromisoformat(row["settle_time"])
        except ValueError:
            raise ValueError(f"claim: settle_time {row['settle_time']!r} is not an ISO date-time "
                             f"(e.g. 2024-03-01T09:30:00, local wall time)") from None
        if t.tzinfo is not None:
            raise ValueError("claim: settle_time is a local wall time without a time zone")
        row["settle_time"] = t
    for key, table in _ENUMS.items():
        v = row.get(key)
        if v is not None and v not in table:
            raise ValueError(f"claim: {key} {v!r} is not one of {', '.join(table)}")
    for key in AMOUNT_COLUMNS:
        v = row.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            hint = " (amounts are integer fen: 1 yuan = 100 fen)" if isinstance(v, float) else ""
            raise ValueError(f"claim: {key} must be an integer number of fen, not {v!r}{hint}")
    return claim_pb(row, facility_id=row.get("facility_id") or "")


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64,
          FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64}


def _value(field: FieldDescriptor, v: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_json(v)
    if field.type == FieldDescriptor.TYPE_ENUM:
        e = field.enum_type.values_by_number.get(v)
        return e.name if e is not None else v
    if field.type in _INT64:
        return int(v)
    return v


def message_to_json(msg: Message) -> dict:
    """A message as a dict: .proto field names, every field (defaults too; an unset optional
    or message as null), enums by name, int64 as numbers (amounts and µs fit a double's 2^53)."""
    out = {}
    for field in msg.DESCRIPTOR.fields:
        v = getattr(msg, field.name)
        if field.is_repeated:
            out[field.name] = [_value(field, x) for x in v]
        elif field.has_presence and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, v)
    return out


def error_json(e: grpc.RpcError) -> dict:
    """A failed call as {"error": {...}}: the gRPC status, and the server's ErrorDetail if it sent one."""
    out = {"grpc_status": e.code().name if e.code() else None, "message": e.details()}
    detail = error_from_rpc(e)
    if detail is not None:
        d = message_to_json(detail)
        out = {"grpc_status": out["grpc_status"], "code": d["reason"], "message": d["message"],
               **{k: d[k] for k in ("claim_id", "person_id", "field")}}
    return {"error": out}


# =========================================================================== the command


def register(subparsers) -> None:
    """Adds `call` to the `medsettle` command (entry point group medsettle.commands)."""
    call = subparsers.add_parser("call", help="call the settlement server (JSON in, JSON out)",
                                 description="Call a medsettle server: one request, its answer as JSON.")
    actions = call.add_subparsers(dest="call_action", metavar="RPC")
    actions.required = True

    def action(name: str, help_: str):
        p = actions.add_parser(name, help=help_, description=help_)
        p.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                       help=f"deadline of the call in seconds (default {DEFAULT_TIMEOUT:g})")
        p.add_argument("--tls-ca", metavar="PEM", help="CA certificate(s) to verify the server by: TLS on")
        p.add_argument("--tls-cert", metavar="PEM", help="client certificate chain (mutual TLS; with --tls-key)")
        p.add_argument("--tls-key", metavar="PEM", help="client private key (with --tls-cert)")
        p.add_argument("--tls-server-name", metavar="NAME", help="the name the server's certificate is for")
        p.set_defaults(func=run)
        return p

    for name, help_ in (("settle", "Settle: settle and commit one claim"),
                        ("presettle", "PreSettle: the same calculation, committing nothing")):
        p = action(name, help_)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--claim", metavar="JSON", help="the claim as JSON, @FILE for a file, - for stdin")
        src.add_argument("--claims-file", metavar="CLAIMS", help="take the claim from this claims file "
                                                                 "(Parquet, Arrow IPC or CSV) by --claim-id")
        p.add_argument("--claim-id", metavar="ID", help="with --claims-file: the claim to send")
        p.add_argument("--facility-id", metavar="F", help="the settling facility (else the claim's facility_id)")
    p = action("reverse", "Reverse: take a settled claim off the accumulators")
    p.add_argument("--claim-id", required=True, metavar="ID")
    p.add_argument("--facility-id", required=True, metavar="F", help="the facility that settled it")
    p.add_argument("--reason", default="", metavar="TEXT")
    p = action("get", "GetSettlement: a claim's settlement record")
    p.add_argument("--claim-id", required=True, metavar="ID")
    p = action("accumulators", "GetAccumulators: a person's accumulators")
    p.add_argument("--person-id", required=True, metavar="P")
    p.add_argument("--year", type=int, default=0, metavar="Y", help="the year (default: every year)")
    p = action("person", "GetPerson: a person's registry record")
    p.add_argument("--person-id", required=True, metavar="P")


def read_claim(args) -> pb.Claim:
    """The claim of `--claim` (JSON text, @FILE or - for stdin) or of `--claims-file` by `--claim-id`."""
    if args.claims_file:
        if not args.claim_id:
            raise CliError("call: --claims-file needs --claim-id")
        claims = ClaimsFile(args.claims_file)
        table = claims.read_all()
        hit = table.filter(pc.equal(table.column("claim_id"), args.claim_id).fill_null(False))
        if hit.num_rows == 0:
            raise CliError(f"{args.claims_file}: claim_id {args.claim_id!r} not found")
        row = {k: v for k, v in hit.slice(0, 1).to_pylist()[0].items() if v is not None}
    else:
        if args.claim_id:
            raise CliError("call: --claim-id goes with --claims-file; put claim_id in the JSON of --claim")
        text = args.claim
        try:
            if text == "-":
                text = sys.stdin.read()
            elif text.startswith("@"):
                text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise CliError(f"call: --claim {args.claim}: {one_line(e)}") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise CliError(f"call: --claim is not JSON: {e}") from None
    try:
        return claim_from_json(row, args.facility_id)
    except ValueError as e:
        raise CliError(str(e)) from None


def channel(args) -> grpc.Channel:
    """An insecure channel, or TLS when a CA or client certificate is given."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("call: --tls-cert and --tls-key go together")
    if not (args.tls_ca or args.tls_cert):
        if args.tls_server_name:
            raise CliError("call: --tls-server-name needs TLS (--tls-ca)")
        return grpc.insecure_channel(args.server)
    try:
        ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
        key = Path(args.tls_key).read_bytes() if args.tls_key else None
        cert = Path(args.tls_cert).read_bytes() if args.tls_cert else None
    except OSError as e:
        raise CliError(f"call: {one_line(e)}") from None
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.server, creds, options=options)


def request(args, claim: Optional[pb.Claim], settlement: pb_grpc.SettlementStub,
            registry: pb_grpc.RegistryStub) -> Message:
    a, t = args.call_action, args.timeout
    if a in ("settle", "presettle"):
        req = pb.SettleRequest(claim=claim)
        return (settlement.Settle if a == "settle" else settlement.PreSettle)(req, timeout=t)
    if a == "reverse":
        return settlement.Reverse(pb.ReverseRequest(claim_id=args.claim_id, facility_id=args.facility_id,
                                                    reason=args.reason), timeout=t)
    if a == "get":
        return settlement.GetSettlement(pb.GetSettlementRequest(claim_id=args.claim_id), timeout=t)
    if a == "accumulators":
        return settlement.GetAccumulators(pb.GetAccumulatorsRequest(person_id=args.person_id, year=args.year),
                                          timeout=t)
    return registry.GetPerson(pb.GetPersonRequest(person_id=args.person_id), timeout=t)


def run(args) -> int:
    """0: the answer on stdout; 1: the server (or the network) answered with an error, as JSON."""
    claim = read_claim(args) if args.call_action in ("settle", "presettle") else None  # before connecting
    ch = channel(args)
    try:
        answer = request(args, claim, pb_grpc.SettlementStub(ch), pb_grpc.RegistryStub(ch))
    except grpc.RpcError as e:
        print(json.dumps(error_json(e), indent=2, ensure_ascii=False), flush=True)
        return 1
    finally:
        ch.close()
    print(json.dumps(message_to_json(answer), indent=2, ensure_ascii=False), flush=True)
    return 0

