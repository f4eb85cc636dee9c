"""The lease broker and model gateway: per-request leases of shared model endpoints, its leader and TLS."""
