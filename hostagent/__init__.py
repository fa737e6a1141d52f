"""hostagent: connects volumes to a compute host and hot-plugs them into libvirt domains.

Embeddable without grpc through `hostagent.api`; `hostagent.rpc` serves it as the HostAgentService.
"""
