"""The evaluation sweep (mcx_core.eval.sweep): the grid, per-sample rows, and the upserted Parquet table
whose partitions can be rewritten independently without losing or duplicating rows."""

import json
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mcx_core import data
from mcx_core.compression.gistnet import Gister
from mcx_core.config import BaseModelConfig, CorpusConfig, DatasetConfig, MegaContextConfig
from mcx_core.eval import sweep
from mcx_core.model.base import BaseLM, freeze, tiny_llama
from mcx_core.telemetry.sinks import MemorySink

C, H = 256, 16


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("sweep")
    cfg = MegaContextConfig(
        name="test-sweep",
        seed=7,
        artifacts_dir=str(root / "artifacts"),
        dataset=DatasetConfig(
            context_tokens=C,
            horizon=H,
            corpora={
                "narrative": CorpusConfig(source="embedded:shakespeare", max_documents=6),
                "code": CorpusConfig(source="embedded:stdlib", kind="code", max_documents=30),
            },
            split_fractions={"train": 0.6, "val": 0.2, "test": 0.2},
            max_samples_per_split={"train": 4, "val": 4, "test": 4},
            output_dir=str(root / "datasets"),
        ),
        gistnet={"model": {"num_layers": 1}},
        working_context={"w_max": 96, "eval_w_max": [64, 96], "recent_tokens": 32, "sink_tokens": 4},
        evaluation={"batch_size": 2},
        sweep={"w_max": [64, 96], "datasets": ["narrative", "code", "recall"], "samples": 2},
    )
    data.build_block_datasets(cfg, tokenizer, progress=False)
    return cfg


@pytest.fixture(scope="module")
def lm(tokenizer):
    model = freeze(tiny_llama(BaseModelConfig(source="tiny_random"), vocab_size=len(tokenizer), seed=0))
    return BaseLM(model=model, tokenizer=tokenizer, model_id="tiny-test")


@pytest.fixture(scope="module")
def gister(cfg, lm):
    return Gister(lm.d_model, cfg.gistnet.model).eval()


@pytest.fixture(scope="module")
def rows(cfg, lm, gister):
    """Scored partitions, once: (w_max, dataset) -> rows."""
    return {
        (w, ds): sweep.run_sweep_partition(cfg, lm, gister, w, ds, "ck-a", progress=False)
        for w, ds in [(64, "narrative"), (64, "recall"), (96, "recall")]
    }


def test_partition_keys_are_the_config_grid(cfg):
    keys = sweep.sweep_partitions(cfg)
    assert keys == ["w64|narrative", "w64|code", "w64|recall", "w96|narrative", "w96|code", "w96|recall"]
    assert [sweep.parse_partition(k) for k in keys] == [
        (w, ds) for w in cfg.sweep.w_max for ds in cfg.sweep.datasets
    ]
    for bad in ["64|narrative", "w64narrative", "w|code", "w64|"]:
        with pytest.raises(ValueError):
            sweep.parse_partition(bad)


def test_sweep_samples_come_from_the_held_out_split_and_the_recall_set(cfg, tokenizer):
    ids, x, metas = sweep.sweep_samples(cfg, tokenizer, "code")
    assert len(ids) == len(metas) == cfg.sweep.samples and x.shape == (cfg.sweep.samples, C + H)
    assert all(i.startswith(f"code/{cfg.evaluation.split}/") for i in ids)
    assert {m["kind"] for m in metas} == {"code"}
    ids, x, metas = sweep.sweep_samples(cfg, tokenizer, "recall")
    assert x.shape == (cfg.sweep.samples, C + H) and [m["kind"] for m in metas] == ["passkey", "kv"]
    with pytest.raises(KeyError, match="qa"):
        sweep.sweep_samples(cfg, tokenizer, "qa")


def test_partition_rows_hold_every_condition_and_consistent_deltas(cfg, rows):
    narrative, recall_rows = rows[(64, "narrative")], rows[(64, "recall")]
    assert len(narrative) == len(recall_rows) == cfg.sweep.samples
    for r in narrative + recall_rows:
        assert (r["w_max"], r["checkpoint"], r["horizon"]) == (64, "ck-a", H)
        for m in sweep.METHODS:
            assert r[f"delta_nll_{m}"] == pytest.approx(r[f"nll_{m}"] - r["nll_full"])
        for c in sweep.CONDITIONS:
            assert len(r[f"token_nll_{c}"]) == H
            assert r[f"nll_{c}"] == pytest.approx(np.mean(r[f"token_nll_{c}"]), rel=1e-5)
        assert r["context_len_recency"] == 64 and r["context_len_gist"] <= 64
    assert all(r.get("answer_tokens") is None for r in narrative)
    for r in recall_rows:
        k = r["answer_tokens"]
        assert k > 0 and r["needle_position"] >= cfg.working_context.sink_tokens
        assert r["answer_nll_full"] == pytest.approx(np.mean(r["token_nll_full"][:k]), rel=1e-5)
        assert 0.0 <= r["answer_acc_gist"] <= 1.0


def _keys(table: pa.Table) -> list[tuple]:
    cols = ["checkpoint", "w_max", "dataset", "sample_id"]
    return list(zip(*(table.column(c).to_pylist() for c in cols)))


def test_rewriting_one_partition_keeps_the_others(rows, tmp_path):
    path = tmp_path / "deltas" / sweep.SWEEP_FILE
    a, b, c = rows[(64, "narrative")], rows[(64, "recall")], rows[(96, "recall")]
    sweep.write_sweep_table(a, path)
    sweep.write_sweep_table(b, path)
    sweep.write_sweep_table(c, path)
    first = sweep.read_sweep_table(path)
    assert first.num_rows == len(a) + len(b) + len(c)
    # Rewrite one partition with new numbers: same rows count, no duplicates, only its rows changed.
    later = datetime(2030, 1, 1, tzinfo=UTC)
    b2 = [{**r, "run_ts": later, "nll_gist": r["nll_gist"] + 1.0} for r in b]
    sweep.write_sweep_table(b2, path)
    table = sweep.read_sweep_table(path)
    keys = _keys(table)
    assert len(keys) == len(set(keys)) == first.num_rows
    by = {k: r for k, r in zip(keys, table.to_pylist())}
    for r in b2:
        stored = by[("ck-a", 64, "recall", r["sample_id"])]
        assert stored["run_ts"] == later and stored["nll_gist"] == pytest.approx(r["nll_gist"])
    for r in a + c:
        stored = by[(r["checkpoint"], r["w_max"], r["dataset"], r["sample_id"])]
        assert stored["run_ts"] != later and stored["nll_gist"] == pytest.approx(r["nll_gist"])
    # Another checkpoint's rows of the same cell sit next to the first checkpoint's.
    sweep.write_sweep_table([{**r, "checkpoint": "ck-b"} for r in b], path)
    assert sweep.read_sweep_table(path).num_rows == first.num_rows + len(b)
    assert not list(tmp_path.glob("deltas/*.tmp")) and not list(tmp_path.glob("deltas/.*.tmp"))


def test_schema_is_stable_whichever_partition_writes_first(rows, tmp_path):
    path = tmp_path / sweep.SWEEP_FILE
    sweep.write_sweep_table(rows[(64, "narrative")], path)  # every recall column is null here
    assert pq.read_schema(path).equals(sweep.SWEEP_SCHEMA, check_metadata=False)
    sweep.write_sweep_table(rows[(64, "recall")], path)
    assert pq.read_schema(path).equals(sweep.SWEEP_SCHEMA, check_metadata=False)
    for name in ["run_ts", "checkpoint", "w_max", "dataset", "sample_id", "nll_full", "nll_recency",
                 "nll_meanpool", "nll_gist", "delta_nll_gist", "recovery_gist", "answer_nll_gist"]:  # fmt: skip
        assert name in sweep.SWEEP_SCHEMA.names
    with pytest.raises(ValueError, match="outside the schema"):
        sweep.write_sweep_table([{**rows[(64, "recall")][0], "typo_nll": 1.0}], path)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"w_max": [1], "dataset": ["x"]}), other)
    with pytest.raises(ValueError, match="another sweep schema"):
        sweep.write_sweep_table(rows[(64, "recall")], other)


def test_summary_means_and_p95_per_cell(rows):
    all_rows = [r for rs in rows.values() for r in rs]
    table = sweep.rows_to_sweep_table(all_rows)
    summary = sweep.summarize_sweep(table)
    assert [(s["w_max"], s["dataset"]) for s in summary] == [
        (64, "narrative"),
        (64, "recall"),
        (96, "recall"),
    ]
    for s in summary:
        cell = rows[(s["w_max"], s["dataset"])]
        gist = np.array([r["delta_nll_gist"] for r in cell])
        assert s["n_samples"] == len(cell)
        assert s["delta_nll_gist_mean"] == pytest.approx(gist.mean())
        assert s["delta_nll_gist_p95"] == pytest.approx(np.percentile(gist, 95))
        assert s["delta_nll_gist_ci_lo"] <= s["delta_nll_gist_mean"] <= s["delta_nll_gist_ci_hi"]
        assert ("answer_acc_gist" in s) == (s["dataset"] == "recall")
    assert sweep.summarize_sweep(table, checkpoint="nope") == []
    metrics = sweep.sweep_metrics(summary)
    assert metrics["sweep/recall/w96/delta_nll_gist_mean"] == summary[2]["delta_nll_gist_mean"]


def test_run_partition_reads_a_checkpoint_and_logs(cfg, lm, gister, tmp_path):
    ck = tmp_path / "JT1_cycle0_step3"
    gister.save_pretrained(ck)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 3}))
    sink = MemorySink()
    result = sweep.run_partition(cfg, lm, ck, "w96|code", sink, progress=False)
    assert result["rows"] == cfg.sweep.samples and result["checkpoint"].startswith("JT1_cycle0_step3:")
    table = sweep.read_sweep_table(sweep.sweep_table_path(cfg))
    assert set(table.column("dataset").to_pylist()) == {"code"}
    assert "sweep/code/w96/delta_nll_gist_mean" in sink.history
