"""Operability: graceful shutdown, metrics, structured logs and request ids (issue 11)."""
