"""Checks of a built block dataset: document boundaries, split isolation, re-tokenization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from mcx_core.config import MegaContextConfig
from mcx_core.data.blocks import tokenize_texts, tokenizer_key
from mcx_core.data.corpora import DocumentStats, corpus_specs, read_documents
from mcx_core.data.store import load_manifest, load_split

# ---------------------------------------------------------------------------------------------- checks


def verify_document_boundaries(out_dir: Path) -> list[str]:
    """Every row is one document's block-aligned window that ends inside the document. [] = all good."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    block, sample_tokens = manifest["block_size"], manifest["sample_tokens"]
    problems = []
    for corpus, entry in sorted(manifest["corpora"].items()):
        for split, info in sorted(entry["splits"].items()):
            table = load_split(out_dir, corpus, split)
            where = f"{corpus}/{split}"
            if table.num_rows != info["samples"]:
                problems.append(f"{where}: {table.num_rows} rows, the manifest says {info['samples']}")
            problems += _boundary_problems(table, corpus, split, block, sample_tokens)
    return problems


def _boundary_problems(table: pa.Table, corpus: str, split: str, block: int, sample_tokens: int) -> list[str]:
    where = f"{corpus}/{split}"
    if table.schema.field("input_ids").type != pa.list_(pa.int32(), sample_tokens):
        return [
            f"{where}: input_ids is {table.schema.field('input_ids').type}, not {sample_tokens} int32 tokens"
        ]
    rows = table.select(["sample_id", "corpus", "split", "doc_id", "doc_tokens", "start_token"]).to_pylist()
    problems, doc_tokens = [], {}
    for r in rows:
        at = f"{where} {r['sample_id']}"
        start, n = r["start_token"], r["doc_tokens"]
        if not r["doc_id"]:
            problems.append(f"{at}: no doc_id")
        if (r["corpus"], r["split"]) != (corpus, split):
            problems.append(f"{at}: row says {r['corpus']}/{r['split']}")
        if start is None or n is None or start < 0 or start % block:
            problems.append(f"{at}: start_token {start} is not a non-negative multiple of block_size {block}")
        elif start + sample_tokens > n:
            problems.append(
                f"{at}: tokens {start}..{start + sample_tokens} run past the document's end ({n})"
            )
        if doc_tokens.setdefault(r["doc_id"], n) != n:
            problems.append(f"{at}: doc_tokens {n} differs from {doc_tokens[r['doc_id']]} in another row")
    return problems


def verify_split_isolation(out_dir: Path) -> list[str]:
    """No document (and, where splits are by work, no work) appears in two splits. [] = all good."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    problems = []
    for corpus, entry in sorted(manifest["corpora"].items()):
        keys = ["doc_id", "work_id"] if entry["split_by"] == "work" else ["doc_id"]
        for key in keys:
            home: dict[str, str] = {}
            for split in sorted(entry["splits"]):
                for value in set(load_split(out_dir, corpus, split).column(key).to_pylist()):
                    if home.setdefault(value, split) != split:
                        problems.append(f"{corpus}: {key} {value!r} is in both {home[value]} and {split}")
    return problems


def _pick_rows(out_dir: Path, entry: dict, corpus: str, n: int) -> list[dict]:
    """`n` rows spread evenly over all of a corpus's splits."""
    tables = [load_split(out_dir, corpus, split) for split in sorted(entry["splits"])]
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        return []
    picks = np.unique(np.linspace(0, table.num_rows - 1, min(n, table.num_rows)).round().astype(int))
    return table.take(picks).to_pylist()


def verify_retokenization(cfg: MegaContextConfig, tokenizer, out_dir: Path, n: int = 4) -> list[str]:
    """Re-read the source documents of `n` rows per corpus, tokenize them again and compare with the
    stored tokens. [] = the files are what this config and tokenizer produce."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    problems = []
    config_hash = cfg.dataset_hash(tokenizer_key(tokenizer))
    if manifest["config_hash"] != config_hash:
        problems.append(
            f"manifest config_hash {manifest['config_hash']} != this config and tokenizer's {config_hash}"
        )
    specs = {spec.name: spec for spec in corpus_specs(cfg)}
    sample_tokens = manifest["sample_tokens"]
    for corpus, entry in sorted(manifest["corpora"].items()):
        if corpus not in specs:
            problems.append(f"{corpus}: not a corpus of this config")
            continue
        rows = _pick_rows(out_dir, entry, corpus, n)
        spec = specs[corpus]
        wanted = [f for f in spec.files if f.doc_id in {r["doc_id"] for r in rows}]
        docs = {d.doc_id: d for _, d in read_documents(corpus, wanted, spec.gutenberg, DocumentStats())}
        token_ids = dict(zip(docs, tokenize_texts(tokenizer, [d.text for d in docs.values()])))
        for r in rows:
            problems += _retokenization_problems(r, token_ids.get(r["doc_id"]), sample_tokens)
    return problems


def _retokenization_problems(row: dict, ids: np.ndarray | None, sample_tokens: int) -> list[str]:
    at = row["sample_id"]
    if ids is None:
        return [f"{at}: source document {row['doc_id']!r} is gone or empty"]
    problems = []
    if len(ids) != row["doc_tokens"]:
        problems.append(
            f"{at}: {row['doc_id']} now tokenizes to {len(ids)} tokens, stored {row['doc_tokens']}"
        )
    start = row["start_token"]
    expected = ids[start : start + sample_tokens]
    stored = np.asarray(row["input_ids"], dtype=np.int32)
    if len(expected) != sample_tokens or not np.array_equal(expected, stored):
        diff = np.flatnonzero(expected != stored[: len(expected)]) if len(expected) else np.array([0])
        first = int(diff[0]) if len(diff) else len(expected)
        problems.append(
            f"{at}: input_ids differ from a fresh tokenization of {row['doc_id']} at position {first}"
        )
    return problems
