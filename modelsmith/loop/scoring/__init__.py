"""Scenarios, their files, criteria and rubric scoring: a leaf (imports nothing of the daemon)."""
