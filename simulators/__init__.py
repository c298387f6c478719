"""Seeded simulator scenarios, runners and sweeps behind ``bandit-service simulate``."""
