"""blockwire: block storage for virtual machines.

This package holds the SDK and CLI (`blockwire.client`, `blockwire.cli`), the generated v1 API
(`blockwire.v1`), and the small core that the services share and that works without grpc:
`blockwire.errors` (the one exception tree) and `blockwire.secret` (a value that never prints).
"""

__version__ = "0.1.0"
