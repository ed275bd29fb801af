"""Reading block datasets back: the manifest, a split's samples, and the stacks training and
evaluation read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyarrow import ipc

from mcx_core.config import MegaContextConfig

MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------- files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def relative_path(path: Path, out_dir: Path) -> str:
    """Manifest paths are relative to the output dir, unless `output_path` put a file elsewhere."""
    try:
        return path.relative_to(out_dir).as_posix()
    except ValueError:
        return str(path)


def load_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no block-dataset manifest at {path}: the datasets were never built there, or a build was "
            "interrupted. Build them with mcx_core.data.build_block_datasets (the block datasets asset)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _split_path(out_dir: Path, manifest: dict, corpus: str, split: str) -> Path:
    corpora = manifest["corpora"]
    if corpus not in corpora or split not in corpora[corpus]["splits"]:
        have = ", ".join(f"{c}/{s}" for c in sorted(corpora) for s in sorted(corpora[c]["splits"]))
        raise KeyError(f"no split {corpus}/{split} in {out_dir / MANIFEST} (have: {have})")
    return out_dir / corpora[corpus]["splits"][split]["path"]  # an absolute path replaces out_dir


def load_split(out_dir: Path, corpus: str, split: str) -> pa.Table:
    out_dir = Path(out_dir)
    path = _split_path(out_dir, load_manifest(out_dir), corpus, split)
    # Read into memory rather than memory-map: a map of a file someone then rewrites in place dies with
    # SIGBUS, and the files are small (train: 2000 samples x 1088 tokens = 9 MB).
    with pa.OSFile(str(path), "rb") as source:
        return ipc.open_file(source).read_all()


def load_samples(out_dir: Path, corpus: str, split: str, limit: int | None = None) -> np.ndarray:
    """Token ids of a split's samples, [n, sample_tokens] int64 (the first `limit` rows if given)."""
    table = load_split(out_dir, corpus, split)
    if limit is not None:
        table = table.slice(0, limit)
    column = table.column("input_ids")
    sample_tokens = column.type.list_size
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.int64).reshape(-1, sample_tokens)


def split_summary(manifest: dict) -> dict[str, dict[str, int]]:
    """corpus -> split -> samples."""
    return {
        corpus: {split: info["samples"] for split, info in entry["splits"].items()}
        for corpus, entry in manifest["corpora"].items()
    }


def load_eval_samples(cfg: MegaContextConfig, limit: int | None = None) -> dict[str, tuple[list[str], np.ndarray]]:
    out = cfg.resolve(cfg.dataset.output_dir)
    manifest = load_manifest(out)
    limit = limit or cfg.evaluation.samples_per_dataset
    result = {}
    for corpus in manifest["corpora"]:
        table = load_split(out, corpus, cfg.evaluation.split)
        ids = load_samples(out, corpus, cfg.evaluation.split, limit=limit)
        result[corpus] = (table.column("sample_id").to_pylist()[: len(ids)], ids)
    return result


def train_doc_ids(cfg: MegaContextConfig) -> list[str]:
    """The document of each `train_ids` row, as "corpus/doc_id" (same order): what keeps the samples of
    one document on one side of a held-out split."""
    out = cfg.resolve(cfg.dataset.output_dir)
    manifest = load_manifest(out)
    return [f"{corpus}/{d}" for corpus in sorted(manifest["corpora"])
            for d in load_split(out, corpus, "train").column("doc_id").to_pylist()]


def train_ids(cfg: MegaContextConfig) -> np.ndarray:
    """Every corpus's train split, stacked: [N, context_tokens + horizon]."""
    out = cfg.resolve(cfg.dataset.output_dir)
    manifest = load_manifest(out)
    return np.concatenate([load_samples(out, corpus, "train") for corpus in sorted(manifest["corpora"])])
