"""Benchmarks: `python bench/run.py --config configs/default.yaml [--only NAME ...]` prints a table.

Speed and memory are measured here, never asserted as wall-clock limits in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SUITES = {
    "data": "bench_data",
    "model": "bench_model",
    "gist": "bench_gist",
    "runtime": "bench_runtime",
    "lora": "bench_lora",
    "cycle": "bench_cycle",
    "text": "bench_text",
}


# Suites that run a whole training cycle (minutes on the real model): only with `--only cycle`.
OPT_IN = {"cycle"}


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--only", nargs="*", choices=sorted(SUITES), help="run only these suites")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("MCX_HOME", os.getcwd())

    import importlib

    from rich.console import Console
    from rich.table import Table

    from mcx_core.config import load_config

    cfg = load_config(args.config)
    all_rows = []
    for name in args.only or [n for n in SUITES if n not in OPT_IN]:
        t0 = time.perf_counter()
        rows = importlib.import_module(SUITES[name]).rows(cfg)
        for r in rows:
            r["suite"] = name
        all_rows.extend(rows)
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    all_rows.append({"suite": "process", "bench": "peak RSS", "value": peak_rss_mb(), "unit": "MiB", "note": ""})

    table = Table(title=f"MegaContext benchmarks — config {cfg.name}, {os.cpu_count()} CPU cores")
    for col in ("suite", "bench", "value", "unit", "note"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for r in all_rows:
        table.add_row(r["suite"], r["bench"], f"{r['value']:,.1f}", r["unit"], str(r.get("note", "")))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=2))


if __name__ == "__main__":
    main()
