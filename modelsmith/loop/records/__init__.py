"""The ledger and its typed events, the daemon's signing key, SSH signatures."""
