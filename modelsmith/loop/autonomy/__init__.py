"""Per-cluster supervisors, the loop service, the inbox watcher."""
