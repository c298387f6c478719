"""Off-policy evaluation: estimate, from logged data alone, how another policy would do.

This first part holds the estimators (``estimators.py``) and the Open Bandit Dataset
reader (``obd.py``); loading from the store, other log formats, target policies and the
command line build on them (issue 6).
"""
