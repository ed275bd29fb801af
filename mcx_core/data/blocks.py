"""Building block datasets: documents split by work, tokenized, cut into block-aligned samples and
written as Arrow files with the manifest last."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from mcx_core.artifacts import write_arrow, write_atomic
from mcx_core.config import MegaContextConfig
from mcx_core.data.corpora import (
    CorpusSpec,
    Document,
    DocumentStats,
    SourceFile,
    corpus_specs,
    read_documents,
    source_fingerprint,
)
from mcx_core.data.store import MANIFEST, file_sha256, load_manifest, relative_path

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 16  # documents per tokenizer call: the Rust tokenizer spreads a batch over the cores


# ---------------------------------------------------------------------------------------------- splits


def _split_counts(n_works: int, fractions: dict[str, float]) -> dict[str, int]:
    names = sorted(fractions)
    counts, cumulative, previous = {}, 0.0, 0
    for name in names:
        cumulative += fractions[name]
        end = min(n_works, round(cumulative * n_works))
        counts[name] = end - previous
        previous = end
    counts[max(names, key=lambda k: fractions[k])] += n_works - previous  # float sums may fall short of 1
    positive = [s for s in names if fractions[s] > 0]
    if n_works >= len(positive):
        for name in positive:
            if counts[name] == 0:
                donor = max(positive, key=lambda k: counts[k])
                counts[donor] -= 1
                counts[name] += 1
    return counts


def assign_splits(work_ids: Iterable[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Work -> split. Works are ordered by sha256(f"{seed}:{work}") and cut by cumulative fractions,
    splits taken in name order so the result depends only on the values (as `dataset_hash` does).
    Every split with a fraction > 0 gets at least one work when there are enough works."""
    works = sorted(set(work_ids), key=lambda w: (hashlib.sha256(f"{seed}:{w}".encode()).hexdigest(), w))
    counts = _split_counts(len(works), fractions)
    out, i = {}, 0
    for split in sorted(fractions):
        out.update({w: split for w in works[i : i + counts[split]]})
        i += counts[split]
    return out


# ---------------------------------------------------------------------------------------------- samples


def tokenize_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Whole documents -> int32 token ids each, no special tokens (a sample is plain text)."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int32) for ids in encoded]


def stride_tokens(cfg: MegaContextConfig) -> int:
    """Distance between sample starts: the config's, or one sample rounded up to whole blocks."""
    ds = cfg.dataset
    return ds.stride_tokens or -(-ds.sample_tokens // ds.block_size) * ds.block_size


@dataclass(frozen=True)
class _Tokenized:
    source: SourceFile
    doc: Document
    ids: np.ndarray  # [doc_tokens] int32


@dataclass(frozen=True)
class _Window:
    item: _Tokenized
    start: int


def _windows(items: Iterable[_Tokenized], sample_tokens: int, stride: int) -> list[_Window]:
    """Every full sample of every document, in document order; none crosses a document's end."""
    return [_Window(t, start) for t in items for start in range(0, len(t.ids) - sample_tokens + 1, stride)]


def _spread(windows: list[_Window], cap: int, salt: str) -> list[_Window]:
    """`cap` windows chosen by hash (stable, independent of library RNGs), back in document order."""

    def key(i: int) -> str:
        w = windows[i]
        return hashlib.sha256(f"{salt}:{w.item.doc.doc_id}:{w.start}".encode()).hexdigest()

    chosen = sorted(range(len(windows)), key=key)[:cap]
    return [windows[i] for i in sorted(chosen)]


def sample_schema(sample_tokens: int) -> pa.Schema:
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("corpus", pa.string()),
            ("split", pa.string()),
            ("doc_id", pa.string()),
            ("work_id", pa.string()),
            ("doc_tokens", pa.int32()),
            ("start_token", pa.int32()),
            ("input_ids", pa.list_(pa.int32(), sample_tokens)),
        ]
    )


def _samples_table(corpus: str, split: str, windows: list[_Window], sample_tokens: int) -> pa.Table:
    ids = np.zeros((len(windows), sample_tokens), dtype=np.int32)  # [n, sample_tokens]
    for i, w in enumerate(windows):
        ids[i] = w.item.ids[w.start : w.start + sample_tokens]
    columns = {
        "sample_id": [f"{corpus}/{split}/{i:06d}" for i in range(len(windows))],
        "corpus": [corpus] * len(windows),
        "split": [split] * len(windows),
        "doc_id": [w.item.doc.doc_id for w in windows],
        "work_id": [w.item.doc.work_id for w in windows],
        "doc_tokens": np.array([len(w.item.ids) for w in windows], dtype=np.int32),
        "start_token": np.array([w.start for w in windows], dtype=np.int32),
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), sample_tokens),
    }
    return pa.table(columns, schema=sample_schema(sample_tokens))


# ---------------------------------------------------------------------------------------------- build


def tokenizer_key(tokenizer) -> str:
    from mcx_core.model.base import tokenizer_id  # lazy: mcx_core.model.base imports torch

    return tokenizer_id(tokenizer)


def _identity(cfg: MegaContextConfig, tok_id: str, specs: list[CorpusSpec]) -> dict:
    """What a build's output depends on. `dataset_hash` does not cover the seed, so it is kept apart."""
    return {
        "config_hash": cfg.dataset_hash(tok_id),
        "seed": cfg.seed,
        "source_fingerprints": {spec.name: source_fingerprint(spec.files) for spec in specs},
    }


def _up_to_date(out_dir: Path, identity: dict) -> dict | None:
    """The existing manifest if it was built from the same inputs and every file is intact."""
    try:
        manifest = load_manifest(out_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    built = {
        "config_hash": manifest.get("config_hash"),
        "seed": manifest.get("seed"),
        "source_fingerprints": {
            c: e.get("source_fingerprint") for c, e in manifest.get("corpora", {}).items()
        },
    }
    if built != identity:
        return None
    for entry in manifest["corpora"].values():
        for info in entry["splits"].values():
            path = out_dir / info["path"]
            if not path.is_file() or file_sha256(path) != info["sha256"]:
                return None
    return manifest


def _tokenize_corpus(
    spec: CorpusSpec, tokenizer, min_tokens: int, stats: DocumentStats, progress: bool
) -> list[_Tokenized]:
    """Tokenize every document; keep those with at least `min_tokens` tokens."""
    kept = []
    documents = read_documents(spec.name, spec.files, spec.gutenberg, stats)
    with tqdm(total=len(spec.files), desc=f"tokenizing {spec.name}", unit="doc", disable=not progress) as bar:
        while batch := list(islice(documents, TOKENIZE_BATCH)):
            for (source, doc), ids in zip(batch, tokenize_texts(tokenizer, [d.text for _, d in batch])):
                if len(ids) < min_tokens:
                    stats.too_short += 1
                else:
                    kept.append(_Tokenized(source, doc, ids))
            bar.update(stats.read - bar.n)
    return kept


def _assign_documents(spec: CorpusSpec, kept: list[_Tokenized], cfg: MegaContextConfig) -> dict[str, str]:
    """doc_id -> split: by work (seeded), or as the config's `splits` globs say."""
    if not spec.split_by_work:
        return {t.doc.doc_id: t.source.split for t in kept}
    by_work = assign_splits((t.doc.work_id for t in kept), cfg.dataset.split_fractions, cfg.seed)
    return {t.doc.doc_id: by_work[t.doc.work_id] for t in kept}


def _split_file(spec: CorpusSpec, split: str, out_dir: Path) -> Path:
    if split in spec.output_paths:
        return Path(spec.output_paths[split])
    return out_dir / spec.name / f"{split}.arrow"


def _build_split(
    cfg: MegaContextConfig, spec: CorpusSpec, split: str, members: list[_Tokenized], out_dir: Path
) -> dict:
    """Cut, cap and write one split's samples; return its manifest entry."""
    ds = cfg.dataset
    windows = _windows(members, ds.sample_tokens, stride_tokens(cfg))
    available = len(windows)
    cap = ds.max_samples_per_split.get(split)
    if cap is not None and available > cap:
        windows = _spread(windows, cap, salt=f"{cfg.seed}:{spec.name}:{split}")
    path = _split_file(spec, split, out_dir)
    table = _samples_table(spec.name, split, windows, ds.sample_tokens)
    write_atomic(path, lambda tmp: write_arrow(table, tmp))
    return {
        "path": relative_path(path, out_dir),
        "sha256": file_sha256(path),
        "samples": len(windows),
        "available_samples": available,  # before max_samples_per_split
        "documents": len({w.item.doc.doc_id for w in windows}),
        "works": len({w.item.doc.work_id for w in windows}),
        "tokens": len(windows) * ds.sample_tokens,
        "source_tokens": int(sum(len(t.ids) for t in members)),  # every token of the split's documents
    }


def _build_corpus(
    cfg: MegaContextConfig, spec: CorpusSpec, fingerprint: str, tokenizer, out_dir: Path, progress: bool
) -> dict:
    ds = cfg.dataset
    stats = DocumentStats()
    kept = _tokenize_corpus(spec, tokenizer, ds.min_document_tokens or ds.sample_tokens, stats, progress)
    split_of = _assign_documents(spec, kept, cfg)
    splits = {
        split: _build_split(cfg, spec, split, [t for t in kept if split_of[t.doc.doc_id] == split], out_dir)
        for split in spec.splits
    }
    log.info(
        "%s: %d documents read, %d kept, samples per split %s",
        spec.name,
        stats.read,
        len(kept),
        {s: v["samples"] for s, v in splits.items()},
    )
    return {
        "kind": spec.kind,
        "source": spec.source,
        "source_fingerprint": fingerprint,
        "split_by": "work" if spec.split_by_work else "config",
        "documents_read": stats.read,
        "documents": len(kept),
        "works": len({t.doc.work_id for t in kept}),
        "skipped": {"empty": stats.empty, "too_short": stats.too_short},
        "documents_with_undecodable_bytes": stats.undecodable,
        "splits": splits,
    }


def build_block_datasets(
    cfg: MegaContextConfig, tokenizer, out_dir: Path | None = None, progress: bool = True
) -> dict:
    """Tokenize every corpus into block-aligned samples, write `<corpus>/<split>.arrow` files and then
    the manifest; return the manifest. Does nothing when an intact build of the same inputs exists."""
    out_dir = Path(out_dir) if out_dir is not None else cfg.resolve(cfg.dataset.output_dir)
    specs = corpus_specs(cfg)
    tok_id = tokenizer_key(tokenizer)
    identity = _identity(cfg, tok_id, specs)
    current = _up_to_date(out_dir, identity)
    if current is not None:
        log.info("block datasets in %s are up to date (config %s)", out_dir, identity["config_hash"])
        return current
    # From here the old files are being replaced: no manifest may vouch for them until the new one.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    ds = cfg.dataset
    manifest = {
        "dataset_name": ds.dataset_name,
        "config_hash": identity["config_hash"],
        # Changes with anything the files depend on (config, tokenizer, seed, sources): a data version.
        "data_version": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16],
        "seed": cfg.seed,
        "tokenizer": tok_id,
        "block_size": ds.block_size,
        "context_tokens": ds.context_tokens,
        "horizon": ds.horizon,
        "sample_tokens": ds.sample_tokens,
        "stride_tokens": stride_tokens(cfg),
        "min_document_tokens": ds.min_document_tokens or ds.sample_tokens,
        "corpora": {
            spec.name: _build_corpus(
                cfg, spec, identity["source_fingerprints"][spec.name], tokenizer, out_dir, progress
            )
            for spec in specs
        },
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_atomic(out_dir / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return json.loads(text)  # the same dict, key order included, that load_manifest returns
