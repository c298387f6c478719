"""Learners score candidates for one slot. ``vw.py`` is the only module that imports VW."""
