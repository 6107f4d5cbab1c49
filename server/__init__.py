"""medsettle real-time settlement server (gRPC): see docs/SERVER.md.

Modules: `store` (the store interface and its backends: SQLite file,
PostgreSQL; versioned migrations), `registry` (persons and what they mean at a
settle time), `core` (engine calls), `batcher` (the group writer: settle,
reverse, commit a group), `writer` (the paced group loop and the in-process
transport), `writer_proc` (the writer as a process of its own), `service`
(servicers), `app` (`medsettle serve`), `commands` (the subcommands registered
with `medsettle`), `runtime` (GC tuning, profiling), `client` (a small client
helper), `protogen` (regenerates `_proto`).
"""
