"""The evaluation sweep (Telemetry.md, Example 3): ΔNLL@H of one GistNet checkpoint over the grid
`sweep.w_max` × `sweep.datasets` (narrative, code, recall).

Each grid cell is a partition (`w128|narrative`) that runs on its own: its rows replace that cell's rows
for the same checkpoint in `artifacts/deltas/eval_sweep.parquet` and leave every other row alone, so
partitions can run in any order, in parallel, or again. One row per (checkpoint, W_max, dataset,
sample): the horizon NLL of every condition (full history, recency, mean-pool gists, learned gists),
ΔNLL and recovery, and for recall samples the NLL and accuracy of the answer tokens alone.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mcx_core import data
from mcx_core.checkpoints import checkpoint_id
from mcx_core.compression.gistnet import load_gister
from mcx_core.config import MegaContextConfig
from mcx_core.data import recall
from mcx_core.eval import nll as E
from mcx_core.eval.gists import conditions
from mcx_core.model.base import BaseLM
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.schemas import SWEEP_FILE, TABLE_KIND_KEY
from mcx_core.telemetry.sinks import NullSink, TelemetrySink

RECALL = "recall"
CONDITIONS = ("full", "recency", "meanpool", "gist")
METHODS = ("recency", "meanpool", "gist")  # conditions compared with the full history
RECOVERED = ("meanpool", "gist")  # methods whose recovery of the recency gap is reported

SWEEP_SCHEMA = pa.schema(
    [
        ("run_ts", pa.timestamp("us", tz="UTC")),
        ("config", pa.string()),
        ("checkpoint", pa.string()),
        ("w_max", pa.int32()),
        ("dataset", pa.string()),
        ("sample_id", pa.string()),
        ("kind", pa.string()),  # narrative / code (the corpus kind) or passkey / kv
        ("context_tokens", pa.int32()),
        ("horizon", pa.int32()),
        *[(f"nll_{c}", pa.float64()) for c in CONDITIONS],
        *[(f"delta_nll_{m}", pa.float64()) for m in METHODS],
        *[(f"recovery_{m}", pa.float64()) for m in RECOVERED],  # per sample; NaN when recency loses nothing
        ("context_len_recency", pa.int32()),  # positions the base model read
        ("context_len_gist", pa.int32()),
        # The seed's Workflow 2 columns: history tokens per position the base model read with learned
        # gists (full-history positions / context_len_gist, as `nll.summarize` computes ratios), and the learned gists' ΔNLL (= delta_nll_gist).
        ("compression_ratio", pa.float64()),
        ("delta_nll", pa.float64()),
        *[(f"token_nll_{c}", pa.list_(pa.float32())) for c in CONDITIONS],  # [H] per horizon position
        ("needle_position", pa.int32()),  # recall only (null otherwise), as are the answer columns
        ("answer_tokens", pa.int32()),
        *[(f"answer_nll_{c}", pa.float64()) for c in CONDITIONS],
        *[(f"answer_acc_{c}", pa.float64()) for c in CONDITIONS],
    ],
    metadata={TABLE_KIND_KEY: b"eval_sweep"},  # telemetry.schemas tells the table kinds apart by it
)
PARTITION_COLUMNS = ("w_max", "dataset", "checkpoint")  # a partition's rows, replaced as a whole

# ---------------------------------------------------------------------------------------------- grid


def partition_key(w_max: int, dataset: str) -> str:
    return f"w{w_max}|{dataset}"


def parse_partition(key: str) -> tuple[int, str]:
    """`w128|narrative` -> (128, "narrative")."""
    w, sep, dataset = key.partition("|")
    if not sep or not w.startswith("w") or not w[1:].isdigit() or not dataset:
        raise ValueError(f"not a sweep partition key (like 'w128|narrative'): {key!r}")
    return int(w[1:]), dataset


def sweep_partitions(cfg: MegaContextConfig) -> list[str]:
    """Every cell of the grid, W_max-major: `w128|narrative`, `w128|code`, ..."""
    return [partition_key(w, ds) for w in cfg.sweep.w_max for ds in cfg.sweep.datasets]


def sweep_table_path(cfg: MegaContextConfig) -> Path:
    return cfg.resolve(cfg.artifacts_dir) / "deltas" / SWEEP_FILE


# ---------------------------------------------------------------------------------------------- samples


def sweep_samples(
    cfg: MegaContextConfig, tokenizer, dataset: str
) -> tuple[list[str], np.ndarray, list[dict]]:
    """`cfg.sweep.samples` held-out samples of one sweep dataset: (sample ids, ids [n, C+H], metas).

    `recall` is the synthetic recall set; any other name is a block-dataset corpus, by name or by kind,
    read from the evaluation split."""
    n = cfg.sweep.samples
    if dataset == RECALL:
        seed = cfg.sweep.recall_seed if cfg.sweep.recall_seed is not None else cfg.seed
        return recall.build_recall_samples(cfg, tokenizer, n, seed)
    out = cfg.resolve(cfg.dataset.output_dir)
    corpora = data.load_manifest(out)["corpora"]
    by_kind = [c for c, entry in sorted(corpora.items()) if entry["kind"] == dataset]
    name = dataset if dataset in corpora else (by_kind[0] if by_kind else None)
    if name is None:
        raise KeyError(
            f"sweep.datasets: {dataset!r} is neither {RECALL!r} nor a corpus name or kind of the block "
            f"datasets in {out} (have: {', '.join(sorted(corpora))})"
        )
    split = cfg.evaluation.split
    ids = data.load_samples(out, name, split, limit=n)
    sample_ids = data.load_split(out, name, split).column("sample_id").to_pylist()[: len(ids)]
    return sample_ids, ids, [{"kind": corpora[name]["kind"]} for _ in sample_ids]


# ---------------------------------------------------------------------------------------------- scoring


def run_sweep_partition(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister,
    w_max: int,
    dataset: str,
    checkpoint_id: str,
    progress: bool = True,
    samples: tuple[list[str], np.ndarray, list[dict]] | None = None,
    run_ts: datetime | None = None,
) -> list[dict]:
    """One sweep row per sample of `dataset` at `w_max` (columns: `SWEEP_SCHEMA`). `samples` overrides
    `sweep_samples` (same triple). The full-history NLL is scored in every partition, so each partition
    stands alone."""
    C, H = cfg.dataset.context_tokens, cfg.dataset.horizon
    sample_ids, ids, metas = samples if samples is not None else sweep_samples(cfg, lm.tokenizer, dataset)
    conds = {k: v for k, v in conditions(cfg, lm, gister).items() if k in CONDITIONS}  # the sweep has no peer columns
    scored = E.evaluate(
        lm, {dataset: (list(sample_ids), ids)}, conds, [w_max], C, H, cfg.evaluation.batch_size, progress,
    )  # fmt: skip
    by = {(r.condition, r.sample_id): r for r in scored}
    run_ts = run_ts or datetime.now(UTC)
    rows = []
    for sid, meta in zip(sample_ids, metas):
        r = {c: by[(c, sid)] for c in CONDITIONS}
        row = {
            "run_ts": run_ts,
            "config": cfg.name,
            "checkpoint": checkpoint_id,
            "w_max": w_max,
            "dataset": dataset,
            "sample_id": sid,
            "kind": meta.get("kind", dataset),
            "context_tokens": C,
            "horizon": H,
            "context_len_recency": r["recency"].context_len,
            "context_len_gist": r["gist"].context_len,
            "needle_position": meta.get("needle_position"),
            "answer_tokens": meta.get("answer_tokens"),
        }
        for c in CONDITIONS:
            row[f"nll_{c}"] = r[c].nll
            row[f"token_nll_{c}"] = r[c].token_nll
        for m in METHODS:
            row[f"delta_nll_{m}"] = float(M.delta_nll([r[m].nll], [r["full"].nll])[0])
        row["delta_nll"] = row["delta_nll_gist"]
        row["compression_ratio"] = r["full"].context_len / r["gist"].context_len if r["gist"].context_len else float("nan")
        for m in RECOVERED:
            row[f"recovery_{m}"] = M.recovery(r["recency"].nll, r[m].nll, r["full"].nll)
        if "answer_span" in meta:
            span = recall.horizon_answer_span(meta, C)
            for c in CONDITIONS:
                row[f"answer_nll_{c}"] = recall.answer_nll(r[c].token_nll, span)
                row[f"answer_acc_{c}"] = recall.answer_accuracy(r[c].token_nll, span)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- table


def rows_to_sweep_table(rows: list[dict]) -> pa.Table:
    """Sweep rows as a table with exactly `SWEEP_SCHEMA` (a missing optional column is null)."""
    unknown = set().union(*rows) - set(SWEEP_SCHEMA.names) if rows else set()
    if unknown:
        raise ValueError(f"sweep rows carry columns outside the schema: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=SWEEP_SCHEMA)


def read_sweep_table(path: str | os.PathLike) -> pa.Table:
    table = pq.read_table(path)
    if table.schema.equals(SWEEP_SCHEMA, check_metadata=False):
        return table
    missing = set(SWEEP_SCHEMA.names) - set(table.schema.names)
    if missing:
        raise ValueError(
            f"{path} was written with another sweep schema (missing {sorted(missing)}); move it aside and "
            "rerun the sweep"
        )
    return table.select(SWEEP_SCHEMA.names).cast(SWEEP_SCHEMA)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of the table between processes (partitions may run in parallel)."""
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_sweep_table(rows: list[dict] | pa.Table, path: str | os.PathLike) -> pa.Table:
    """Upsert: drop the stored rows of every (w_max, dataset, checkpoint) present in `rows`, append
    `rows`, write to a temporary file and rename it over `path`. Returns the whole new table."""
    new = rows if isinstance(rows, pa.Table) else rows_to_sweep_table(rows)
    if not new.schema.equals(SWEEP_SCHEMA, check_metadata=False):
        raise ValueError(f"not a sweep table: {new.schema}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replaced = set(zip(*(new.column(c).to_pylist() for c in PARTITION_COLUMNS)))
    with _locked(path):
        table = new
        if path.exists():
            old = read_sweep_table(path)
            keep = [k not in replaced for k in zip(*(old.column(c).to_pylist() for c in PARTITION_COLUMNS))]
            table = pa.concat_tables([old.filter(pa.array(keep, pa.bool_())), new])
        table = table.sort_by([("checkpoint", "ascending"), ("w_max", "ascending"), ("dataset", "ascending"),
                               ("sample_id", "ascending")])  # fmt: skip
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return table


# ---------------------------------------------------------------------------------------------- summary


def summarize_sweep(table: pa.Table | list[dict], checkpoint: str | None = None) -> list[dict]:
    """Per (checkpoint, W_max, dataset): mean NLL of each condition, ΔNLL (mean, p95) of each method,
    recovery (of the means), each with its paired bootstrap 95 % interval (`_ci_lo/_ci_hi`), and, for
    recall, mean answer NLL and accuracy per condition."""
    rows = table.to_pylist() if isinstance(table, pa.Table) else list(table)
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for r in rows:
        if checkpoint is None or r["checkpoint"] == checkpoint:
            groups.setdefault((r["checkpoint"], r["w_max"], r["dataset"]), []).append(r)
    out = []
    for (ck, w, ds), rs in sorted(groups.items()):
        s = {
            "checkpoint": ck,
            "w_max": w,
            "dataset": ds,
            "n_samples": len(rs),
            "run_ts": max(r["run_ts"] for r in rs).isoformat(),
        }
        for c in CONDITIONS:
            s[f"nll_{c}"] = M.mean(_column(rs, f"nll_{c}"))
        for m in METHODS:
            s.update(M.mean_and_p95(_column(rs, f"delta_nll_{m}"), f"delta_nll_{m}"))
            s.update(M.with_ci(f"delta_nll_{m}", M.mean_ci(_column(rs, f"delta_nll_{m}"))))
        for m in RECOVERED:
            s[f"recovery_{m}"] = M.recovery(s["nll_recency"], s[f"nll_{m}"], s["nll_full"])
            s.update(M.with_ci(f"recovery_{m}", M.recovery_ci(
                _column(rs, "nll_recency"), _column(rs, f"nll_{m}"), _column(rs, "nll_full"))))
        if all(r["answer_tokens"] is not None for r in rs):
            for c in CONDITIONS:
                s[f"answer_nll_{c}"] = M.mean(_column(rs, f"answer_nll_{c}"))
                s[f"answer_acc_{c}"] = M.mean(_column(rs, f"answer_acc_{c}"))
        out.append(s)
    return out


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=np.float64)


def sweep_metrics(summary: list[dict]) -> dict[str, float]:
    """The summary under stable metric names: `sweep/<dataset>/w<W_max>/<name>`."""
    return {
        f"sweep/{s['dataset']}/w{s['w_max']}/{k}": float(v)
        for s in summary
        for k, v in s.items()
        if isinstance(v, float | int) and k != "w_max"
    }


def run_partition(
    cfg: MegaContextConfig,
    lm: BaseLM,
    checkpoint: Path,
    key: str,
    sink: TelemetrySink | None = None,
    progress: bool = True,
) -> dict:
    """Score one partition with a JT checkpoint's GistNet, upsert its rows, log its summary."""
    sink = sink or NullSink()
    w_max, dataset = parse_partition(key)
    ck = checkpoint_id(checkpoint)
    t0 = time.perf_counter()
    rows = run_sweep_partition(cfg, lm, load_gister(checkpoint, lm), w_max, dataset, ck, progress)
    seconds = time.perf_counter() - t0
    path = sweep_table_path(cfg)
    write_sweep_table(rows, path)
    summary = summarize_sweep(rows)
    metrics = sweep_metrics(summary)
    sink.log_metrics({**metrics, f"sweep/{dataset}/w{w_max}/seconds": seconds}, step=0)
    sink.log_artifact(path, "deltas")
    return {"partition": key, "checkpoint": ck, "rows": len(rows), "summary": summary, "metrics": metrics,
            "table": path, "seconds": seconds}  # fmt: skip
