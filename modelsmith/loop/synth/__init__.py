"""Synthetic scenarios from failure patterns: generation, verification, governance."""
