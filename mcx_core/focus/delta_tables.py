"""The delta table's files (SPEC §6): the Parquet table of labelled actions (`DELTA_SCHEMA`) and its
companion contexts file (`CONTEXT_SCHEMA`), their paths, reading a labelled context back exactly,
and validation. `mcx_core.focus.deltas` computes the labels; this module is what a reader needs."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pyarrow import ipc

from mcx_core.model.tree import EmbedFn, GistFn, MegaContextTree
from mcx_core.model.working_context import Entry, WorkingContext

ACTIONS = ("expand", "collapse")


DELTA_SCHEMA = pa.schema(
    [
        # SPEC §6
        ("run_id", pa.string()),
        ("cycle", pa.int32()),
        ("sample_id", pa.string()),
        ("block_id", pa.string()),  # span id of the entry acted on, e.g. "L1:000012"
        ("level", pa.int32()),  # its level before the action
        ("action", pa.string()),  # "expand" | "collapse"
        ("delta_nll", pa.float64()),  # nll_after - nll_before, nats per horizon token
        ("token_cost", pa.int32()),  # change of the context's cost (0 for an expand paired with a collapse)
        ("distance_to_cursor", pa.int32()),  # cursor - span_end, tokens
        ("horizon", pa.int32()),  # H
        ("timestamp", pa.timestamp("us", tz="UTC")),
        # what the labels were computed with, and where the row sits
        ("gistnet_checkpoint", pa.string()),  # the GistNet the tree's gists came from (on-policy labels)
        ("context_id", pa.string()),  # key into the contexts file
        ("entry_index", pa.int32()),  # index of the entry in its context (LensNet's score index)
        ("w_max", pa.int32()),
        ("span_start", pa.int32()),  # the entry's span
        ("span_end", pa.int32()),
        ("nll_before", pa.float64()),
        ("nll_after", pa.float64()),
        ("paired_block_id", pa.string()),  # null, or the entry collapsed to make room for an expand
    ]
)


NULLABLE = {"paired_block_id"}


CONTEXT_SCHEMA = pa.schema(
    [
        ("context_id", pa.string()),
        ("run_id", pa.string()),
        ("cycle", pa.int32()),
        ("sample_id", pa.string()),
        ("kind", pa.string()),  # "recency" (WorkingContext.initial) | "perturbed" | "on_policy"
        ("w_max", pa.int32()),
        ("recent_tokens", pa.int32()),
        ("sink_tokens", pa.int32()),
        ("position_scheme", pa.string()),
        ("block_size", pa.int32()),
        ("max_level", pa.int32()),
        ("cursor", pa.int32()),
        ("entries", pa.string()),  # JSON list of Entry fields
        ("ages", pa.list_(pa.int32())),
        ("history_ids", pa.list_(pa.int32())),  # [cursor]
        ("horizon_ids", pa.list_(pa.int32())),  # [H]
        ("nll_before", pa.float64()),
        ("gistnet_checkpoint", pa.string()),
        ("doc_id", pa.string()),  # the sample's document ("corpus/doc"): JT2 holds out whole documents
    ]
)


def contexts_path(delta_path: str | os.PathLike) -> Path:
    """The companion contexts file of a delta table: `x.parquet` -> `x.contexts.arrow`."""
    p = Path(delta_path)
    return p.with_name(p.name.removesuffix(".parquet") + ".contexts.arrow")


def gistnet_label(gistnet_checkpoint: str | os.PathLike) -> str:
    """What a table records as its GistNet: a checkpoint directory's name (`JT1_cycle0_step175`), or the
    given id as is (`meanpool`)."""
    return Path(str(gistnet_checkpoint)).name


def delta_table_path(out_dir: str | os.PathLike, cycle: int, gistnet_checkpoint: str | os.PathLike) -> Path:
    """`{out_dir}/deltas_cycle{cycle}_{checkpoint id}.parquet`: one table per cycle and GistNet."""
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", gistnet_label(gistnet_checkpoint)).strip("-.") or "gistnet"
    return Path(out_dir) / f"deltas_cycle{cycle}_{tag}.parquet"


def now() -> datetime:
    return datetime.now(UTC)


def read_contexts(delta_path: str | os.PathLike) -> pa.Table:
    with pa.OSFile(str(contexts_path(delta_path)), "rb") as source:
        return ipc.open_file(source).read_all()


def rebuild_tree(row: dict, embed_fn: EmbedFn, gist_fn: GistFn, d_model: int, input_fn=None) -> MegaContextTree:
    """The history of a contexts-file row, re-ingested with `gist_fn` (the labels are only valid for the
    GistNet named in `gistnet_checkpoint`)."""
    tree = MegaContextTree(
        d_model, embed_fn, gist_fn, block_size=row["block_size"], max_level=row["max_level"], input_fn=input_fn
    )
    tree.ingest(torch.tensor(row["history_ids"], dtype=torch.long))
    return tree


def rebuild_context(
    row: dict, embed_fn: EmbedFn, gist_fn: GistFn, d_model: int, tree: MegaContextTree | None = None
) -> tuple[WorkingContext, list[int]]:
    """A labelled context from its contexts-file row: its tree (`rebuild_tree`, or `tree` when the caller
    already rebuilt this history, e.g. for another context of the same sample), the entries, the ages."""
    if tree is None:
        tree = rebuild_tree(row, embed_fn, gist_fn, d_model)
    elif tree.cursor != row["cursor"] or not torch.equal(
        tree.tokens, torch.tensor(row["history_ids"], dtype=torch.int32)
    ):
        raise ValueError(f"context {row['context_id']}: the given tree holds another history")
    entries = [Entry(**e) for e in json.loads(row["entries"])]
    wc = WorkingContext(tree, row["w_max"], row["recent_tokens"], row["position_scheme"], entries,
                        row.get("sink_tokens") or 0)
    wc.check_invariants()
    return wc, list(row["ages"])


def validate_delta_table(path: str | os.PathLike) -> list[str]:
    """Problems with a delta table and its contexts file; empty when both are usable."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:  # unreadable or not Parquet: report it, do not raise
        return [f"{path}: not a readable Parquet file ({err})"]
    problems = []
    for field in DELTA_SCHEMA:
        if field.name not in table.column_names:
            problems.append(f"column {field.name}: missing")
        elif table.schema.field(field.name).type != field.type:
            problems.append(
                f"column {field.name}: type {table.schema.field(field.name).type}, expected {field.type}"
            )
        elif field.name not in NULLABLE and table.column(field.name).null_count:
            problems.append(f"column {field.name}: {table.column(field.name).null_count} nulls")
    if problems:
        return problems
    if table.num_rows == 0:
        return [f"{path}: no rows"]
    d = table.to_pydict()
    bad_action = sorted(set(d["action"]) - set(ACTIONS))
    if bad_action:
        problems.append(f"column action: values {bad_action} (allowed: {list(ACTIONS)})")
    for name in ("delta_nll", "nll_before", "nll_after"):
        n_bad = int((~np.isfinite(np.asarray(d[name], dtype=np.float64))).sum())
        if n_bad:
            problems.append(f"column {name}: {n_bad} non-finite values")
    mismatch = (
        np.abs(np.asarray(d["nll_after"]) - np.asarray(d["nll_before"]) - np.asarray(d["delta_nll"])) > 1e-6
    )
    if mismatch.any():
        problems.append(f"column delta_nll: {int(mismatch.sum())} rows differ from nll_after - nll_before")
    for i in range(table.num_rows):
        where = f"row {i} ({d['context_id'][i]}, {d['action'][i]} {d['block_id'][i]})"
        if d["action"][i] == "expand" and (d["level"][i] < 1 or d["token_cost"][i] < 0):
            problems.append(f"{where}: an expand needs level >= 1 and token_cost >= 0")
        if d["action"][i] == "collapse" and d["token_cost"][i] >= 0:
            problems.append(f"{where}: a collapse must lower the cost")
        if d["distance_to_cursor"][i] < 0 or d["span_start"][i] >= d["span_end"][i] or d["horizon"][i] <= 0:
            problems.append(f"{where}: bad span/distance/horizon")
        if len(problems) > 20:
            break
    cpath = contexts_path(path)
    if not cpath.is_file():
        return problems + [f"{cpath}: contexts file missing"]
    try:
        contexts = read_contexts(path)
    except (pa.ArrowException, OSError) as err:
        return problems + [f"{cpath}: not a readable Arrow file ({err})"]
    if not contexts.schema.equals(CONTEXT_SCHEMA):
        return problems + [f"{cpath}: schema differs from CONTEXT_SCHEMA"]
    missing = set(d["context_id"]) - set(contexts.column("context_id").to_pylist())
    if missing:
        problems.append(
            f"{cpath}: {len(missing)} context ids of the delta table are missing, e.g. {min(missing)}"
        )
    # On-policy: one GistNet computed every label of a table.
    ckpts = set(d["gistnet_checkpoint"]) | set(contexts.column("gistnet_checkpoint").to_pylist())
    if len(ckpts) != 1:
        problems.append(
            f"column gistnet_checkpoint: {len(ckpts)} GistNets {sorted(ckpts)} (one table, one GistNet)"
        )
    labelled = set(d["context_id"])
    recency = {
        c["sample_id"]
        for c in contexts.select(["sample_id", "kind", "context_id"]).to_pylist()
        if c["kind"] == "recency" and c["context_id"] in labelled
    }
    no_recency = sorted(set(d["sample_id"]) - recency)
    if no_recency:
        problems.append(f"{len(no_recency)} samples without a labelled recency context, e.g. {no_recency[0]}")
    return problems
