"""Training sets (leakage proof) and the training service."""
