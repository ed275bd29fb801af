"""The alternating training loop on the smoke config: two full cycles, on-policy delta tables per cycle,
cycle 1 initialised from cycle 0, and a run interrupted after one cycle resumes without retraining it."""

import contextlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mcx_core import checkpoints, data, pipeline
from mcx_core.compression.gistnet import load_gister
from mcx_core.config import load_config
from mcx_core.telemetry.sinks import MemorySink, NullSink
from mcx_core.training import cycles
from mcx_core.training import gistnet as JT1

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, smoke_config):
    """A throwaway project root with the smoke config, its datasets and the tiny base model."""
    root = tmp_path_factory.mktemp("cycles")
    path = smoke_config(root, artifacts=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MCX_HOME", str(root))
        cfg = load_config(path)
        pipeline.build_datasets(cfg, progress=False)
        lm, _ = pipeline.prepare_base_model(cfg)
        yield cfg, lm, root


def recording_factory(log: list):
    @contextlib.contextmanager
    def factory(phase, cycle):
        sink = MemorySink()
        log.append((phase, cycle))
        yield sink

    return factory


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_config_section_defaults_to_one_cycle(smoke):
    cfg, _, _ = smoke
    assert cfg.training_loop.n_cycles == 1


def test_interrupted_then_two_cycles(smoke):
    cfg, lm, _ = smoke
    opened: list = []

    # "Interrupted" run: only cycle 0.
    first = cycles.run_cycles(cfg, lm, recording_factory(opened), n_cycles=1, progress=False)
    assert len(first) == 1 and not first[0]["skipped"]
    assert opened == [(p, 0) for p in cycles.PHASES]
    c0_ids = dict(first[0]["checkpoint_ids"])

    # Asked again for two cycles: cycle 0 is not retrained, cycle 1 runs.
    opened.clear()
    both = cycles.run_cycles(cfg, lm, recording_factory(opened), n_cycles=2, progress=False)
    assert [s["cycle"] for s in both] == [0, 1]
    assert both[0]["skipped"] and not both[1]["skipped"]
    assert both[0]["checkpoint_ids"] == c0_ids
    assert opened == [(p, 1) for p in cycles.PHASES]
    for phase, n in (("jt1", 1), ("jt2", 2), ("jt3", 3)):
        latest = {1: checkpoints.jt1_checkpoint, 2: checkpoints.jt2_checkpoint, 3: checkpoints.jt3_checkpoint}[n]
        ck0, ck1 = latest(cfg, 0), latest(cfg, 1)
        assert ck0.name.startswith(f"JT{n}_cycle0_") and ck1.name.startswith(f"JT{n}_cycle1_")
        assert checkpoints.checkpoint_id(ck0) == c0_ids[phase]  # untouched by the second call
        assert both[1]["init_from"][phase] == str(ck0)
        assert both[1]["checkpoints"][phase] == str(ck1)
    assert both[0]["init_from"] == {"jt1": None, "jt2": None, "jt3": None}

    # Delta tables: one per cycle, each labelled by that cycle's GistNet.
    for s in both:
        gist_ck = Path(s["checkpoints"]["jt1"])
        table = pq.read_table(s["delta_table"])
        assert table.num_rows > 0
        assert set(table.column("gistnet_checkpoint").to_pylist()) == {gist_ck.name}
        assert table.column("cycle").to_pylist() == [s["cycle"]] * table.num_rows
        assert Path(s["delta_gistnet_checkpoint"]) == gist_ck
    assert both[0]["delta_table"] != both[1]["delta_table"]

    for s in both:
        assert s["nan_free"]
        assert set(s["seconds"]) == set(cycles.PHASES) and all(v >= 0 for v in s["seconds"].values())
        assert set(s["metrics"]) == set(cycles.PHASES) and s["metrics"]["jt1"]

    # A third call does nothing.
    opened.clear()
    again = cycles.run_cycles(cfg, lm, recording_factory(opened), n_cycles=2, progress=False)
    assert opened == [] and all(s["skipped"] for s in again)


def test_cycle1_gistnet_starts_from_cycle0(smoke, tmp_path):
    """Retrain cycle 1's JT1 elsewhere from cycle 0's weights and from a fresh init: the loop's
    checkpoint matches the first (training is deterministic) and differs from the second."""
    cfg, lm, _ = smoke
    cycles.run_cycles(cfg, lm, n_cycles=2, progress=False)
    ck0, ck1 = checkpoints.jt1_checkpoint(cfg, 0), checkpoints.jt1_checkpoint(cfg, 1)
    ids = data.train_ids(cfg)
    warm = JT1.train_gistnet(cfg, lm, ids, tmp_path / "warm", NullSink(), cycle=1, resume=False, progress=False,
                         init_from=ck0)
    fresh = JT1.train_gistnet(cfg, lm, ids, tmp_path / "fresh", NullSink(), cycle=1, resume=False, progress=False)
    loop, warm_w, fresh_w = (_state(load_gister(c, lm)) for c in (ck1, warm.checkpoint, fresh.checkpoint))
    assert all(torch.allclose(loop[k], warm_w[k], atol=1e-5) for k in loop)
    assert any(not torch.allclose(loop[k], fresh_w[k], atol=1e-5) for k in loop)


def test_lost_checkpoint_reruns_its_cycle(smoke):
    """A cycle record whose checkpoint no longer matches is not trusted: that cycle runs again."""
    cfg, lm, _ = smoke
    cycles.run_cycles(cfg, lm, n_cycles=1, progress=False)
    record = cycles.cycle_record_path(cfg, 0)
    text = record.read_text()
    record.write_text(text.replace('"jt3": "JT3_cycle0_', '"jt3": "JT3_stale_'))
    assert cycles.completed_cycle(cfg, 0) is None
    out = cycles.run_cycles(cfg, lm, n_cycles=1, progress=False)
    assert not out[0]["skipped"]  # trainers resume at once from their finished checkpoints
    assert cycles.completed_cycle(cfg, 0) is not None


def test_mlflow_parent_run_with_a_child_per_phase(smoke, tmp_path):
    """`mcx train-cycles` logs under the training loop's parent run (the same one Dagster's phase
    assets find by its key): one child per phase, each with its wall time and peak memory."""
    from mlflow import MlflowClient

    cfg, lm, root = smoke
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri, "system_metrics": False})})
    factory, parent = cycles.mlflow_sinks(cfg, root)
    summary = cycles.run_cycle(cfg, lm, 0, factory, progress=False)
    parent.log_metrics(cycles.cycle_metrics(summary["memory"]), step=0)
    parent.end("FINISHED")
    _, again = cycles.mlflow_sinks(cfg, root)
    assert again.run_id == parent.run_id  # found by `mcx.training_loop`, not created twice

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(parent.run_id)
    assert run.data.tags["mcx.training_loop"] == cycles.training_loop_key(cfg)
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(f"cycle0-{p}" for p in cycles.PHASES)
    for c in children:
        assert c.data.tags["mcx.phase"] in cycles.PHASES and c.data.metrics["phase/peak_rss_mb"] > 0
    assert run.data.metrics["cycle/seconds"] == pytest.approx(sum(summary["seconds"].values()))
    assert {f"cycle/{p}/peak_rss_mb" for p in cycles.PHASES} <= set(run.data.metrics)
