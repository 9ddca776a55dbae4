"""Modelsmith: eval, diagnose, post-train and promote open-weight specialists."""

__version__ = "0.1.0"
