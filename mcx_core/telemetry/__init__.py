"""Telemetry: one definition per metric (`metrics`), and sinks that record them (`sinks`)."""
