"""Evaluation: ΔNLL@H against the full history and fixed-budget peers, gists, runtime, sweep, acceptance gates, champion."""
