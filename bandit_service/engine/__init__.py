"""The decision engine: plain Python, no web framework, no database."""

from bandit_service.engine.decide import DecisionEngine

__all__ = ["DecisionEngine"]
