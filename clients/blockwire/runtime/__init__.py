"""The grpc-free runtime both daemons stand on: executor (argv, exit codes, redaction), clock,
periodic work, keyed locks, failpoints."""
