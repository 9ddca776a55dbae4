"""A cluster's config, its state reduced from the ledger, the fleet, crash recovery."""
