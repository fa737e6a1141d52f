"""The server part of the foundation (grpc): listeners, TLS, auth identities, call limits, signals."""
