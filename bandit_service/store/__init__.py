"""Persistence: SQLAlchemy models, repository functions, the group-commit writer.

Repository functions never commit; the caller owns the unit of work.
"""
