"""Markdown reports with their plots next to the numbers. Files are written atomically."""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:+.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def with_intervals(rows: Sequence[dict], prefixes: Sequence[str]) -> list[dict]:
    """Rows for a table whose cells read `value [lo, hi]`: for each prefix, the column `{prefix}` shows the
    row's `{prefix}_mean` (else `{prefix}`) with its interval `{prefix}_ci_lo/hi`."""
    out = []
    for r in rows:
        cells = dict(r)
        for p in prefixes:
            key = f"{p}_mean" if f"{p}_mean" in r else p
            lo, hi = r.get(f"{p}_ci_lo"), r.get(f"{p}_ci_hi")
            cells[p] = fmt(r[key]) + (f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else "")
        out.append(cells)
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bar_plot(
    path: Path,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    title: str,
    hline: float | None = None,
    hline_label: str | None = None,
) -> Path:
    """One group of bars per `groups` entry, one bar per series; optional threshold line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [g + k * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=15)
    if hline is not None:
        ax.axhline(hline, color="red", linestyle="--", label=hline_label)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def scatter_plot(
    path: Path,
    points: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    hline: float | None = None,
    hline_label: str | None = None,
    logx: bool = False,
) -> Path:
    """One colour per series of (x, y) points; optional threshold line (e.g. the acceptance ΔNLL)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in points.items():
        ax.scatter(xs, ys, s=14, alpha=0.7, label=name)
    if hline is not None:
        ax.axhline(hline, color="red", linestyle="--", label=hline_label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, plt, path)


def line_plot(
    path: Path, x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, ys in series.items():
        ax.plot(x, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def histogram_plot(path: Path, bins: Sequence[int], stacks: dict[str, Sequence[int]], xlabel: str, title: str,
                   vline: float | None = None, vline_label: str | None = None) -> Path:
    """Stacked bars of counts per integer bin; optional vertical threshold line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(bins))
    for name, counts in stacks.items():
        ax.bar(bins, counts, bottom=bottom, width=0.85, label=name)
        bottom += np.asarray(counts, dtype=np.float64)
    if vline is not None:
        ax.axvline(vline - 0.5, color="red", linestyle="--", label=vline_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def heatmap_plot(path: Path, matrix: np.ndarray, row_labels: Sequence[str], xlabel: str, title: str,
                 colorbar: str) -> Path:
    """One row per label, one column per position; a diverging scale centred on 0."""
    plt = _plt()
    m = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(7, 0.28 * m.shape[1] + 3), max(2.5, 0.45 * m.shape[0] + 1.5)))
    lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    im = ax.imshow(m, aspect="auto", cmap="coolwarm", vmin=-lim or -1, vmax=lim or 1, interpolation="nearest")
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    step = max(1, m.shape[1] // 16)
    ax.set_xticks(range(0, m.shape[1], step))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=colorbar)
    return _save(fig, plt, path)


def timeline_plot(path: Path, rows: Sequence[dict], labels: Sequence[str], title: str) -> Path:
    """Actions over steps, one row per (trace, span): ▲ expand, ▼ collapse (hollow: forced)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(labels) + 1.5)))
    y_of = {lab: i for i, lab in enumerate(labels)}
    for kind, marker, color in (("expand", "^", "tab:green"), ("collapse", "v", "tab:red")):
        for forced in (False, True):
            pts = [(r["step"], y_of[r["label"]]) for r in rows if r["kind"] == kind and bool(r["forced"]) == forced]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, marker=marker, s=40, label=f"{kind}{' (forced)' if forced else ''}",
                           facecolors="none" if forced else color, edgecolors=color)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("allocator step")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, plt, path)


# ---------------------------------------------------------------------------------------------- images in UIs

# `![alt](target)` or `![alt](target "title")`; the UIs (Dagster metadata, MLflow's artifact preview) do not
# resolve a relative target against the report's folder, so they show the alt text instead of the plot.
_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}


def _local_image(target: str, base_dir: Path) -> Path | None:
    """The file a relative image link names under `base_dir`, else None (URLs, data URIs, absolute
    paths, links leaving `base_dir`, missing files, unknown types)."""
    if ":" in target or target.startswith(("/", "#")):
        return None
    base = Path(base_dir).resolve()
    path = (base / target).resolve()
    if not path.is_relative_to(base) or not path.is_file() or path.suffix.lower() not in _MIME:
        return None
    return path


def linked_images(markdown: str, base_dir: Path) -> list[Path]:
    """The local image files a markdown text links relatively (each once, in order)."""
    out: list[Path] = []
    for m in _IMAGE.finditer(markdown):
        path = _local_image(m["target"], base_dir)
        if path is not None and path not in out:
            out.append(path)
    return out


def embed_images(markdown: str, base_dir: Path) -> str:
    """`markdown` with every relative image link to a file under `base_dir` replaced by a `data:` URI of
    the file, so the report renders with its plots where relative links do not resolve (Dagster's
    markdown metadata, MLflow's artifact preview). Other links are left as written."""

    def embed(m: re.Match) -> str:
        path = _local_image(m["target"], base_dir)
        if path is None:
            return m[0]
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{m['alt']}](data:{_MIME[path.suffix.lower()]};base64,{data}{m['title'] or ''})"

    return _IMAGE.sub(embed, markdown)


def markdown_to_html(markdown: str, base_dir: Path, title: str = "report") -> str:
    """A standalone HTML page of a markdown report (CommonMark + tables), its images embedded."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(embed_images(markdown, base_dir))
    style = ("body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")
