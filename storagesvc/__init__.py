"""storagesvc: volumes, snapshots and LUN exports behind the blockwire v1 StorageService."""
