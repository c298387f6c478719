"""Off-policy evaluation: estimate, from logged data alone, how another policy would do.

``estimators`` (IPS, SNIPS, DM, DR, Switch-DR with intervals), ``evaluate`` (slot rows from
the store and targets, in memory), ``stream`` (the same evaluation over chunks of columns,
bounded memory), ``table`` (the project's log schema as CSV/Parquet), ``files`` (JSON lines
and DSJSON, including multi-slot CCB), ``obd`` (Open Bandit Dataset CSVs), ``vwfile`` (VW
configurations evaluated progressively by VW's own driver), ``sweep`` (configuration grid,
recommendation, feature importance, chart). Formats and assumptions: docs/ope.md.
"""
