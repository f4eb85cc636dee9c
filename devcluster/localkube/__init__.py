"""localkube."""
