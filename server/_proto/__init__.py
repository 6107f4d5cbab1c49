"""Generated gRPC modules of proto/medsettle/v1 (python -m server.protogen)."""
