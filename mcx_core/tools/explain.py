"""Explainability (seed Telemetry: "visualize which gists LensNet attends to"): where LensNet wants more
or less detail in a text, at one cursor.

`explain_text` streams a text into the tree and working context exactly as the runtime does (every
`runtime.refocus_every` tokens: ingest, forced collapses back under W_max, LensNet scores, allocator
actions), stops at the cursor, and scores the working context there once more. No base-model forward
runs: the focus decisions do not depend on it. The result is a plain dict (JSON-able):

    cursor, tokens, w_max, cost, steps, levels, causality_violations
    entries    one per working-context entry, oldest first: i, span_id, level, start, end, cost, score,
               can_expand, can_collapse, text (the decoded span), snippet (shortened)
    expand     the top_k gists by score, highest first (the spans LensNet would open up)
    collapse   the top_k entries by score, lowest first (the spans it would compress)

`render_markdown`, `render_html` and `write_heatmap` turn it into a report; `write_reports` writes all
three (explain.md, explain.html, explain.png) plus explain.json.
"""

from __future__ import annotations

import html
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mcx_core import artifacts, reports
from mcx_core.config import MegaContextConfig
from mcx_core.focus.engine import MegaContextEngine
from mcx_core.focus.lensnet import LensNet, LensNetPolicy
from mcx_core.model.base import BaseLM
from mcx_core.model.tree import GistFn

SNIPPET_CHARS = 60
ENTRY_KEYS = ("i", "span_id", "level", "start", "end", "cost", "score", "snippet")
EXPAND_RGB = (214, 96, 77)  # positive score: more detail wanted
COLLAPSE_RGB = (67, 147, 195)  # negative score: can be coarser


def _snippet(text: str, n: int = SNIPPET_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"


def _chunks(ids) -> Iterator[torch.Tensor]:
    if isinstance(ids, torch.Tensor | np.ndarray | list | tuple | array):
        yield torch.as_tensor(np.asarray(ids), dtype=torch.long).flatten()
        return
    for chunk in ids:
        yield torch.as_tensor(np.asarray(chunk), dtype=torch.long).flatten()


def check_budget(cfg: MegaContextConfig, w_max: int | None) -> int:
    """The working budget, or ValueError when it cannot hold the sink, the recent tokens and one gist."""
    wcc = cfg.working_context
    w = w_max or wcc.w_max
    least = wcc.sink_tokens + wcc.recent_tokens + 1
    if w < least:
        raise ValueError(
            f"W_max {w} cannot hold the {wcc.sink_tokens} sink tokens, the {wcc.recent_tokens} recent tokens "
            f"and one gist (at least {least})"
        )
    return w


@torch.no_grad()
def explain_text(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister: GistFn,
    lensnet: LensNet,
    ids: torch.Tensor | Iterable,
    w_max: int | None = None,
    query_at: int | None = None,
    top_k: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """LensNet's scores for the working context of `ids` at token `query_at` (default T - horizon: the
    last cursor the runtime would refocus at). `ids` is a 1-D tensor [T] or an iterable of token chunks
    (read lazily: tokens past `query_at` are never read, and a budget that cannot hold the text fails
    where it overflows, not after the whole text). Raises ValueError for a cursor outside [1, T] or a
    budget that cannot hold the text (BudgetError)."""
    check_budget(cfg, w_max)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if query_at is not None and query_at < 1:
        raise ValueError(f"cursor {query_at} is outside the text")
    H, R = cfg.dataset.horizon, cfg.runtime.refocus_every
    if isinstance(ids, torch.Tensor | np.ndarray | list | tuple | array):  # a known length: check it first
        n = len(torch.as_tensor(np.asarray(ids)).flatten())
        cursor = n - H if query_at is None else query_at
        if not 1 <= cursor <= n:
            raise ValueError(
                f"cursor {cursor} is outside the text's {n} tokens"
                + (f" (default: tokens - horizon {H})" if query_at is None else "")
            )
    policy = LensNetPolicy(lensnet, lm.embed)
    engine = MegaContextEngine(cfg, lm, gister, policy, w_max)
    tree, wc, allocator = engine.tree, engine.wc, engine.allocator
    # Tokens read but not ingested; a step ingests R of them once it knows they lie before the cursor
    # (with the default cursor: once H more tokens follow them). The allocator acts on a step's scores
    # at the start of the next step, so the last scores (the explanation) are never acted on.
    buf = torch.empty(0, dtype=torch.long)
    read, ingested, step = 0, 0, 0
    scores = None
    source = _chunks(ids)
    bar = None  # made at the first step: an error before it prints no progress bar

    def run_step(chunk: torch.Tensor) -> None:
        nonlocal scores, step, ingested, bar
        if bar is None:
            bar = tqdm(desc="explain", unit="tok", disable=not progress)
        if scores is not None:
            allocator.step(wc, scores)
            wc.check_invariants()
        tree.ingest(chunk)
        ingested += len(chunk)
        wc.sync()
        allocator.fit(wc)
        scores = policy.scores(wc, tree, step)  # [N]
        wc.check_invariants()
        step += 1
        bar.update(len(chunk))

    ended = False
    lookahead, limit = (0, query_at) if query_at is not None else (H, None)
    while True:
        # Full steps that are certainly before the cursor.
        # With --at, every token up to the cursor is read first (the tree holds them all anyway), so a
        # cursor past the end fails before any step; with the default cursor, steps run as text arrives.
        while len(buf) >= R + lookahead and (limit is None or (read >= limit and ingested + R <= limit)):
            chunk, buf = buf[:R], buf[R:]
            run_step(chunk)
        if ended or (limit is not None and read >= limit and ingested + R > limit):
            break
        try:
            nxt = next(source)
            buf = torch.cat([buf, nxt])
            read += len(nxt)
        except StopIteration:
            ended = True
    total = read if ended else None
    cursor = (read - H) if query_at is None else query_at
    if total is not None and not 1 <= cursor <= total:
        if bar is not None:
            bar.close()
        raise ValueError(
            f"cursor {cursor} is outside the text's {total} tokens"
            + (f" (default: tokens - horizon {H})" if query_at is None else "")
        )
    # The rest up to the cursor: one last (possibly short) step, or several.
    while ingested < cursor:
        n = min(R, cursor - ingested)
        chunk, buf = buf[:n], buf[n:]
        run_step(chunk)
    if bar is not None:
        bar.close()
    starts = list(range(0, cursor, R))
    tokens = tree.tokens.long().tolist()
    entries = []
    for i, (e, s) in enumerate(zip(wc.entries, scores.tolist(), strict=True)):
        text = lm.tokenizer.decode(tokens[e.start : e.end])
        entries.append({
            "i": i, "span_id": e.span_id, "level": e.level, "start": e.start, "end": e.end, "cost": e.cost,
            "score": float(s), "can_expand": wc.can_expand(i), "can_collapse": wc.can_collapse(i),
            "text": text, "snippet": _snippet(text),
        })  # fmt: skip
    brief = lambda e: {k: e[k] for k in ENTRY_KEYS}
    gists = [e for e in entries if e["level"] > 0]
    return {
        "cursor": cursor,
        "tokens": read,
        "w_max": wc.w_max,
        "cost": wc.cost,
        "sink_tokens": wc.sink_cost,
        "steps": len(starts),
        "levels": wc.level_counts(),
        "causality_violations": policy.causality_violations,
        "top_k": top_k,
        "entries": entries,
        "expand": [brief(e) for e in sorted(gists, key=lambda e: -e["score"])[:top_k]],
        "collapse": [brief(e) for e in sorted(entries, key=lambda e: e["score"])[:top_k]],
    }


# ---------------------------------------------------------------------------------------------- reports


def _scale(result: dict[str, Any]) -> float:
    """Colour saturation is relative to the largest |score|: an untrained LensNet's scores are small."""
    return max([abs(e["score"]) for e in result["entries"]] + [1e-6])


def summary_line(result: dict[str, Any]) -> str:
    levels = ", ".join(f"{k} {v}" for k, v in result["levels"].items())
    return (
        f"cursor {result['cursor']} of {result['tokens']} tokens, {len(result['entries'])} entries, "
        f"cost {result['cost']} / W_max {result['w_max']} ({levels}), {result['steps']} refocus steps, "
        f"{result['causality_violations']} causality violations"
    )


def render_markdown(result: dict[str, Any]) -> str:
    """The top expand/collapse tables, every entry's score, and the text with the top spans marked
    ⟦▲+0.42 …⟧ (expand) and ⟦▼-0.31 …⟧ (collapse)."""
    cols, heads = (
        ["span_id", "level", "start", "end", "score", "snippet"],
        ["span", "level", "start", "end", "score", "text"],
    )
    esc = lambda rows: [r | {"snippet": r["snippet"].replace("|", "\\|")} for r in rows]
    expand_ids = {e["i"] for e in result["expand"] if e["score"] > 0}
    collapse_ids = {e["i"] for e in result["collapse"] if e["score"] < 0}
    marked = []
    for e in result["entries"]:
        if e["i"] in expand_ids:
            marked.append(f"⟦▲{e['score']:+.2f} {e['text']}⟧")
        elif e["i"] in collapse_ids:
            marked.append(f"⟦▼{e['score']:+.2f} {e['text']}⟧")
        else:
            marked.append(e["text"])
    text = "".join(marked).replace("```", "ʼʼʼ")
    return "\n\n".join([
        "# LensNet focus explanation",
        summary_line(result),
        "![focus heatmap](explain.png)",
        f"## Expand candidates (top {result['top_k']} gists by score)",
        reports.markdown_table(esc(result["expand"]), cols, heads) if result["expand"] else "_no gists yet_",
        f"## Collapse candidates (lowest {result['top_k']} scores)",
        reports.markdown_table(esc(result["collapse"]), cols, heads),
        "## All entries",
        reports.markdown_table(esc(result["entries"]), cols, heads),
        "## Text (▲ expand / ▼ collapse candidates)",
        f"```text\n{text}\n```",
    ]) + "\n"  # fmt: skip


def _background(score: float, scale: float) -> str:
    r, g, b = EXPAND_RGB if score >= 0 else COLLAPSE_RGB
    return f"rgba({r},{g},{b},{min(1.0, abs(score) / scale) * 0.85:.3f})"


def render_html(result: dict[str, Any]) -> str:
    """The text, one <span> per entry with its background coloured by score (red: expand, blue: collapse,
    saturation relative to the largest |score|) and its span, level and score in the title."""
    scale = _scale(result)
    spans = []
    for e in result["entries"]:
        title = f"{e['span_id']} LOD{e['level']} tokens [{e['start']}, {e['end']}) score {e['score']:+.4f}"
        spans.append(
            f'<span class="e L{e["level"]}" data-span="{e["span_id"]}" data-score="{e["score"]:.6f}" '
            f'title="{html.escape(title)}" style="background:{_background(e["score"], scale)}">'
            f"{html.escape(e['text'])}</span>"
        )

    def rows(items):
        return "".join(
            f"<tr><td>{e['span_id']}</td><td>{e['level']}</td><td>{e['start']}–{e['end']}</td>"
            f"<td>{e['score']:+.3f}</td><td>{html.escape(e['snippet'])}</td></tr>"
            for e in items
        )

    head = "<tr><th>span</th><th>level</th><th>tokens</th><th>score</th><th>text</th></tr>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LensNet focus explanation</title>
<style>
body {{ font-family: sans-serif; max-width: 70em; margin: 2em auto; }}
.text {{ white-space: pre-wrap; font-family: monospace; line-height: 1.6; border: 1px solid #ccc; padding: 1em; }}
.e {{ border-radius: 3px; }} .e.L1, .e.L2, .e.L3 {{ outline: 1px dashed #888; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }} td, th {{ border: 1px solid #ddd; padding: 2px 6px; }}
</style></head><body>
<h1>LensNet focus explanation</h1>
<p>{html.escape(summary_line(result))}. Red: LensNet wants more detail (expand), blue: the span can be
coarser (collapse); saturation relative to max |score| = {scale:.3f}. Dashed outline: a gist. Hover for scores.</p>
<img src="explain.png" alt="focus heatmap" style="max-width:100%">
<h2>Expand candidates</h2><table>{head}{rows(result["expand"])}</table>
<h2>Collapse candidates</h2><table>{head}{rows(result["collapse"])}</table>
<h2>Text up to the cursor</h2>
<div class="text">{"".join(spans)}</div>
</body></html>
"""


def write_heatmap(result: dict[str, Any], path: Path) -> Path:
    """Top: score over the token axis (one bar per entry, as wide as its span). Bottom: a levels × entries
    heatmap of the scores (blank where an entry is at another level)."""
    plt = reports._plt()
    entries = result["entries"]
    scale = _scale(result)
    levels = max([e["level"] for e in entries] + [len(result["levels"]) - 1])
    grid = np.full((levels + 1, len(entries)), np.nan)
    for e in entries:
        grid[e["level"], e["i"]] = e["score"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5.5), gridspec_kw={"height_ratios": [3, 2]})
    cmap = plt.get_cmap("RdBu_r")
    top.bar([e["start"] for e in entries], [e["score"] for e in entries],
            width=[e["end"] - e["start"] for e in entries], align="edge",
            color=[cmap(0.5 + 0.5 * e["score"] / scale) for e in entries], edgecolor="black", linewidth=0.3)  # fmt: skip
    top.axhline(0, color="black", linewidth=0.6)
    top.set_xlim(0, result["cursor"])
    top.set_xlabel("token position")
    top.set_ylabel("LensNet score")
    top.set_title(f"LensNet focus at cursor {result['cursor']} (+ expand, − collapse)")
    im = bottom.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
    bottom.set_yticks(range(levels + 1), [f"LOD{L}" for L in range(levels + 1)])
    bottom.set_xlabel("working-context entry (oldest → newest)")
    fig.colorbar(im, ax=bottom, label="score")
    return reports._save(fig, plt, path)


def write_reports(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """explain.md, explain.html, explain.png and explain.json under `out_dir`."""
    out = Path(out_dir)
    return {
        "markdown": artifacts.write_text(out / "explain.md", render_markdown(result)),
        "html": artifacts.write_text(out / "explain.html", render_html(result)),
        "png": write_heatmap(result, out / "explain.png"),
        "json": artifacts.write_json(out / "explain.json", result),
    }
