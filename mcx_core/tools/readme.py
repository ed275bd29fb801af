"""README numbers from the demo's own report files, never typed by hand.

A README block

    <!-- numbers:begin gist_eval -->
    (anything: replaced)
    <!-- numbers:end -->

is regenerated from `reports/<name>.json` by `BLOCKS[name]`. Usage:

    python -m mcx_core.tools.readme [--readme README.md] [--reports artifacts/reports] [--write]

Without `--write` it only checks: exit 3 and the stale block names when the README differs from the
reports, 0 when it matches. Exit 2 (one line) for an unknown block name or a missing/unreadable report.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

BLOCK = re.compile(r"(<!-- numbers:begin (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- numbers:end -->)", re.DOTALL)
METHOD_NAMES = {"recency": "recency (sink + newest)", "meanpool": "mean-pool gists (untrained)",
                "gist": "**learned gists**"}


class ReadmeError(ValueError):
    """A block the tool cannot fill: its one-line reason."""


def _num(v, signed: bool = False) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        return "—"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _with_ci(row: dict, key: str, signed: bool = False) -> str:
    stem = key.removesuffix("_mean")  # intervals are stored as <stem>_ci_lo / <stem>_ci_hi
    if f"{stem}_ci_lo" not in row and f"{key}_ci_lo" in row:
        stem = key
    lo, hi = row.get(f"{stem}_ci_lo"), row.get(f"{stem}_ci_hi")
    base = _num(row.get(key), signed)
    if lo is None or hi is None:
        return base
    return f"{base} [{_num(lo, signed)}, {_num(hi, signed)}]"


def gist_table(report: dict) -> str:
    """ΔNLL vs full history per method (rows) and dataset × W_max (columns), paired 95 % intervals; the
    learned − recency difference and the recovery of learned gists."""
    summary = sorted(report["summary"], key=lambda r: (r["w_max"], r["dataset"]))
    methods = []
    for r in summary:
        for k in r:
            m = re.fullmatch(r"delta_nll_(\w+)_mean", k)
            if m and m.group(1) not in methods:
                methods.append(m.group(1))
    methods.sort(key=lambda m: (m == "gist", m != "recency", m))
    head = ["ΔNLL vs full history (nats/token) [paired 95 % CI]"] + [f"{r['dataset']} W={r['w_max']}" for r in summary]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [_with_ci(r, f"delta_nll_{m}_mean") if f"delta_nll_{m}_mean" in r else "" for r in summary]
        lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    others = []  # learned − X (paired), recency first, for every X the report compares with
    for r in summary:
        for k in r:
            m = re.fullmatch(r"gist_minus_(\w+)_mean", k)
            if m and m.group(1) not in others:
                others.append(m.group(1))
    others.sort(key=lambda x: (x != "recency", x))
    for x in others:
        cells = [_with_ci(r, f"gist_minus_{x}_mean", signed=True) if f"gist_minus_{x}_mean" in r else "" for r in summary]
        lines.append(f"| learned − {x} (paired) | " + " | ".join(cells) + " |")
    lines.append("| recovery of learned gists | " + " | ".join(
        _with_ci(r, "recovery_gist", signed=True) for r in summary) + " |")
    stress = {s["dataset"]: s for s in report.get("stress") or [] if s.get("condition") == "stress1024"}
    if stress:  # one LOD2 gist per 1024 tokens; shown in each dataset's first column
        first = {}
        for i, r in enumerate(summary):
            first.setdefault(r["dataset"], i)
        cells = [""] * len(summary)
        for ds, i in first.items():
            if ds in stress:
                cells[i] = _with_ci(stress[ds], "delta_nll_mean")
        lines.append("| 1024× stress (one LOD2 gist per 1024 tokens) | " + " | ".join(cells) + " |")
    lines.append("| samples | " + " | ".join(str(r.get("n_samples", "")) for r in summary) + " |")
    return "\n".join(lines) + "\n"


def runtime_table(report: dict) -> str:
    """The runtime evaluation's summary: one row of the SPEC §8 focus numbers."""
    s = report["summary"]
    keys = [("swap rate", "swap_rate"), ("mean residency", "mean_residency"), ("utilization", "utilization"),
            ("latency overhead", "overhead"), ("Loss@H", "loss_at_h"), ("steps", "steps")]
    lines = ["| " + " | ".join(k for k, _ in keys) + " |", "|" + "---|" * len(keys)]
    lines.append("| " + " | ".join(str(s[v]) if isinstance(s.get(v), int) else _num(s.get(v)) for _, v in keys) + " |")
    return "\n".join(lines) + "\n"


def policy_table(report: dict) -> str:
    """The runtime evaluation's policy comparison (same documents, same W_max), then LensNet minus each
    policy, paired over the same (document, step) samples, with its 95 % interval."""
    keys = [("policy", "policy"), ("Loss@H", "loss_at_h"), ("swap rate", "swap_rate"), ("expands", "expands"),
            ("swaps", "swaps"), ("mean residency", "mean_residency"), ("residency samples", "residency_samples"),
            ("age-out collapses", "age_out_collapses"), ("utilization", "utilization"), ("p50 ms/step", "latency_p50_ms")]
    lines = ["| " + " | ".join(k for k, _ in keys) + " |", "|" + "---|" * len(keys)]
    for r in report.get("comparison") or []:
        lines.append("| " + " | ".join(str(r.get(v)) if isinstance(r.get(v), int | str) else _num(r.get(v))
                                       for _, v in keys) + " |")
    paired = report.get("paired") or []
    if paired:
        lines += ["", "| LensNet − policy, Loss@H (paired) | difference [95 % CI] | beats |", "|---|---|---|"]
        for p in paired:
            lines.append(f"| {p['versus']} | {_num(p['difference'])} [{_num(p['ci_low'])}, {_num(p['ci_high'])}] "
                         f"| {'yes' if p['beats'] else 'no'} |")
    return "\n".join(lines) + "\n"


BLOCKS: dict[str, Callable[[dict], str]] = {"gist_eval": gist_table, "runtime_eval": runtime_table,
                                            "runtime_policies": policy_table}
REPORT_OF = {"runtime_policies": "runtime_eval"}  # blocks that read another block's report


def render(name: str, reports_dir: Path) -> str:
    if name not in BLOCKS:
        raise ReadmeError(f"README block {name!r}: unknown (known: {', '.join(sorted(BLOCKS))})")
    path = Path(reports_dir) / f"{REPORT_OF.get(name, name)}.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        return BLOCKS[name](report)
    except FileNotFoundError:
        raise ReadmeError(f"{path}: missing (run the demo first)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ReadmeError(f"{path}: not a {name} report ({type(err).__name__}: {err})") from None


def rewrite(text: str, reports_dir: Path) -> tuple[str, list[str]]:
    """`text` with every numbers block regenerated; the names of the blocks that changed."""
    changed = []

    def fill(m: re.Match) -> str:
        body = render(m.group("name"), reports_dir)
        if body != m.group("body"):
            changed.append(m.group("name"))
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(fill, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mcx_core.tools.readme", description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--reports", default="artifacts/reports")
    ap.add_argument("--write", action="store_true", help="rewrite the README (default: check only)")
    args = ap.parse_args(argv)
    readme = Path(args.readme)
    try:
        text = readme.read_text(encoding="utf-8")
        new, changed = rewrite(text, Path(args.reports))
    except (ReadmeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not BLOCK.search(text):
        print(f"{readme}: no <!-- numbers:begin NAME --> block")
        return 0
    if args.write and changed:
        tmp = readme.with_name(f".{readme.name}.tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(readme)
        print(f"{readme}: rewrote {', '.join(changed)}")
        return 0
    if changed:
        print(f"{readme}: stale block(s) {', '.join(changed)} (rerun with --write)")
        return 3
    print(f"{readme}: numbers match {args.reports}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
