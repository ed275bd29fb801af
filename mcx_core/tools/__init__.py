"""Telemetry tools a person runs: post-hoc analysis, alerts, explain, profiling, run comparison, DuckDB query."""
