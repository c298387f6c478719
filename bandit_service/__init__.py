"""bandit-service: a self-hosted contextual-bandit decision service."""

__version__ = "0.1.0"
