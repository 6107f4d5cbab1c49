"""medsettle real-time settlement server (gRPC): see docs/SERVER.md.

Modules: `store` (SQLite ledger, accumulators, registry), `registry` (persons
and what they mean at a settle time), `core` (engine calls), `batcher` (the
group-committing writer), `service` (servicers), `app` (`medsettle serve`),
`client` (a small client helper), `protogen` (regenerates `_proto`).
"""
