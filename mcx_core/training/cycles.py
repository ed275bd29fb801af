"""The alternating training loop (SPEC §6): `n_cycles` × (JT1 → deltas → JT2 → JT3).

Each cycle starts from the previous cycle's checkpoints (GistNet, LensNet, LoRA adapter), and the delta
labels are regenerated after every JT1, tagged with the GistNet that produced them, so JT2 always learns
from on-policy labels. A finished cycle leaves `artifacts/cycles/cycle{c}.json`; a rerun skips those
cycles and, inside an interrupted one, each trainer resumes from its newest complete checkpoint.

    mcx train-cycles --config configs/gpu.yaml --cycles 3
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from mcx_core import artifacts, checkpoints, data, pipeline
from mcx_core.compression.gistnet import load_gister
from mcx_core.config import MegaContextConfig
from mcx_core.focus.lensnet import load_lensnet
from mcx_core.model.base import BaseLM
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.memory import PhaseMemory
from mcx_core.telemetry.mlflow_sink import MLflowSink, git_commit, store
from mcx_core.telemetry.sinks import NullSink, TelemetrySink
from mcx_core.training import distributed
from mcx_core.training.gistnet import train_gistnet, validation_ids
from mcx_core.training.lensnet import train_lensnet
from mcx_core.training.lora import train_lora

log = logging.getLogger(__name__)

PHASES = ("jt1", "deltas", "jt2", "jt3")
SinkFactory = Callable[[str, int], contextlib.AbstractContextManager[TelemetrySink]]


@contextlib.contextmanager
def null_sinks(phase: str, cycle: int) -> Iterator[TelemetrySink]:
    yield NullSink()


TRAINING_SECTIONS = ["seed", "dataset", "base_model", "gistnet", "lensnet", "lora", "deltas", "working_context",
                     "allocator", "training_loop"]


def training_loop_key(cfg: MegaContextConfig) -> str:
    """Identity of one alternating training loop (its MLflow parent run): the config name plus the
    fingerprint of every section the four phases read."""
    return f"{cfg.name}-{artifacts.stage_fingerprint(cfg, TRAINING_SECTIONS)}"


def cycles_dir(cfg: MegaContextConfig) -> Path:
    return artifacts.ArtifactPaths.from_config(cfg).root / "cycles"


def cycle_record_path(cfg: MegaContextConfig, cycle: int) -> Path:
    return cycles_dir(cfg) / f"cycle{cycle}.json"


def completed_cycle(cfg: MegaContextConfig, cycle: int) -> dict | None:
    """The stored summary of `cycle` when it finished and its checkpoints are still the ones it wrote
    (same names, same trainer states); None otherwise."""
    path = cycle_record_path(cfg, cycle)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    for phase, ck in record["checkpoints"].items():
        ck = Path(ck)
        if not checkpoints.is_complete(ck) or checkpoints.checkpoint_id(ck) != record["checkpoint_ids"][phase]:
            return None
    return record


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


PHASE_NUMBER = {"jt1": 1, "jt2": 2, "jt3": 3}


def init_checkpoint(cfg: MegaContextConfig, phase: str, cycle: int) -> Path | None:
    """Where `phase` of `cycle` starts from: cycle − 1's checkpoint of the same phase (None in cycle 0).
    A missing one is an error that says which cycle to run first."""
    if cycle == 0:
        return None
    try:
        return checkpoints.jt_checkpoint(cfg, PHASE_NUMBER[phase], cycle - 1)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"cycle {cycle} starts from cycle {cycle - 1}'s checkpoints, which are not there "
                                f"({err}): run cycle {cycle - 1} first") from None


def _measured(sink: TelemetrySink, lm: BaseLM, fn: Callable[[], object]):
    """Run one phase; log its wall time and peak memory (`phase/*`) to its sink. (result, metrics)."""
    with PhaseMemory(lm.device) as mem:
        result = fn()
    metrics = mem.metrics()
    sink.log_metrics(metrics)
    return result, metrics


def phase_jt1(cfg: MegaContextConfig, lm: BaseLM, cycle: int, sink: TelemetrySink, progress: bool = True):
    """JT1 of `cycle`: GistNet on every corpus's train split, initialised from cycle − 1's GistNet;
    (TrainResult, phase metrics)."""
    init = init_checkpoint(cfg, "jt1", cycle)
    return _measured(sink, lm, lambda: train_gistnet(
        cfg, lm, data.train_ids(cfg), _checkpoints_dir(cfg), sink, cycle=cycle, init_from=init, progress=progress,
        val_ids=validation_ids(cfg, cfg.gistnet.training.val_samples) if cfg.gistnet.training.val_every else None,
    ))


def phase_deltas(cfg: MegaContextConfig, lm: BaseLM, cycle: int, sink: TelemetrySink, progress: bool = True,
                 force: bool = False):
    """Delta labels regenerated from this cycle's GistNet (the table's name and its `gistnet_checkpoint`
    column say which); ((table, stats, gistnet checkpoint), phase metrics)."""
    return _measured(sink, lm, lambda: pipeline.generate_deltas(cfg, lm, sink, cycle=cycle, progress=progress, force=force))


def phase_jt2(cfg: MegaContextConfig, lm: BaseLM, cycle: int, sink: TelemetrySink, progress: bool = True):
    """JT2 of `cycle`: LensNet on this cycle's delta table (labelled by this cycle's GistNet), initialised
    from cycle − 1's LensNet; (TrainResult, phase metrics)."""
    init, gist_ck = init_checkpoint(cfg, "jt2", cycle), checkpoints.jt1_checkpoint(cfg, cycle)
    return _measured(sink, lm, lambda: train_lensnet(
        cfg, lm, load_gister(gist_ck, lm), [pipeline.cycle_delta_table(cfg, cycle)], _checkpoints_dir(cfg), sink,
        cycle=cycle, progress=progress, init_from=init, gistnet_checkpoint=gist_ck,
    ))


def phase_jt3(cfg: MegaContextConfig, lm: BaseLM, cycle: int, sink: TelemetrySink, progress: bool = True):
    """JT3 of `cycle`: a LoRA adapter trained on Loss@H with working contexts chosen by this cycle's
    (frozen) GistNet + LensNet and the allocator, carrying cycle − 1's adapter over; (TrainResult, phase metrics)."""
    init = init_checkpoint(cfg, "jt3", cycle)
    gister = load_gister(checkpoints.jt1_checkpoint(cfg, cycle), lm)
    lensnet = load_lensnet(checkpoints.jt2_checkpoint(cfg, cycle), lm.device)
    return _measured(sink, lm, lambda: train_lora(
        cfg, lm, gister, lensnet, data.train_ids(cfg), _checkpoints_dir(cfg), sink, cycle=cycle, progress=progress,
        init_from=init,
    ))


def _checkpoints_dir(cfg: MegaContextConfig) -> Path:
    return artifacts.ArtifactPaths.from_config(cfg).checkpoints


def write_cycle_record(cfg: MegaContextConfig, cycle: int, memory: dict[str, dict],
                       metrics: dict[str, dict] | None = None) -> dict:
    """`cycles/cycle{c}.json`: the cycle's checkpoints (with ids, so a later change is noticed), the delta
    table, where each phase started from, and each phase's `phase/*` wall time and peak memory; written
    when its last phase (JT3) has finished."""

    found = {p: checkpoints.jt_checkpoint(cfg, n, cycle) for p, n in PHASE_NUMBER.items()}
    init = {p: init_checkpoint(cfg, p, cycle) for p in PHASE_NUMBER}
    states = {p: checkpoints.read_state(ck) for p, ck in found.items()}
    seconds = {phase: float(m[M.PHASE_SECONDS]) for phase, m in memory.items()}
    summary = {
        "cycle": cycle,
        "checkpoints": {k: str(v) for k, v in found.items()},
        "checkpoint_ids": {k: checkpoints.checkpoint_id(v) for k, v in found.items()},
        "init_from": {k: (str(v) if v is not None else None) for k, v in init.items()},
        "delta_table": str(pipeline.cycle_delta_table(cfg, cycle)),
        "delta_gistnet_checkpoint": str(found["jt1"]),
        # default: each trainer's last logged step, from its checkpoint
        "metrics": metrics if metrics is not None else {p: _floats(st.get("metrics", {})) for p, st in states.items()},
        "memory": memory,
        "nan_free": all(bool(st.get("nan_free", True)) for st in states.values()),
        "seconds": seconds,
        "seconds_total": sum(seconds.values()),
        "skipped": False,
    }
    artifacts.write_json(cycle_record_path(cfg, cycle), summary)
    return summary


def cycle_metrics(memory: dict[str, dict]) -> dict[str, float]:
    """A cycle's `cycle/*` metrics (wall time, peak memory; total and per phase) from its phases' `phase/*`."""
    out: dict[str, float] = {}
    for phase, m in memory.items():
        out[f"cycle/{phase}/seconds"] = float(m[M.PHASE_SECONDS])
        out[f"cycle/{phase}/peak_rss_mb"] = float(m[M.PHASE_PEAK_RSS_MB])
        if M.PHASE_GPU_PEAK_ALLOCATED_GB in m:
            out[f"cycle/{phase}/gpu_peak_allocated_gb"] = float(m[M.PHASE_GPU_PEAK_ALLOCATED_GB])
    if memory:
        out[M.CYCLE_SECONDS] = sum(float(m[M.PHASE_SECONDS]) for m in memory.values())
        out[M.CYCLE_PEAK_RSS_MB] = max(float(m[M.PHASE_PEAK_RSS_MB]) for m in memory.values())
    return out


def run_cycle(cfg: MegaContextConfig, lm: BaseLM, cycle: int, sink_factory: SinkFactory = null_sinks,
              progress: bool = True) -> dict:
    """One JT1 → deltas → JT2 → JT3 cycle, initialised from cycle − 1's checkpoints; its summary."""
    runners = {"jt1": phase_jt1, "deltas": phase_deltas, "jt2": phase_jt2, "jt3": phase_jt3}
    results, memory = {}, {}
    for phase in PHASES:
        with sink_factory(phase, cycle) as sink:
            sink.set_tags({"mcx.cycle": str(cycle), "mcx.phase": phase})
            results[phase], memory[phase] = runners[phase](cfg, lm, cycle, sink, progress)
    _, delta_stats, _ = results["deltas"]
    metrics = {
        "jt1": _floats(results["jt1"].metrics),
        "deltas": _floats(delta_stats),
        "jt2": _floats(results["jt2"].metrics),
        "jt3": _floats(results["jt3"].metrics),
    }

    summary = write_cycle_record(cfg, cycle, memory, metrics) if distributed.is_main_process() else None
    distributed.wait_for_everyone()  # data-parallel: every rank sees the record rank 0 wrote
    return summary or completed_cycle(cfg, cycle) or {}


def run_cycles(cfg: MegaContextConfig, lm: BaseLM, sink_factory: SinkFactory | None = None,
               n_cycles: int | None = None, progress: bool = True) -> list[dict]:
    """Cycles 0 … n_cycles − 1 (default `training_loop.n_cycles`); one summary dict per cycle.

    `sink_factory(phase, cycle)` returns a context manager yielding the TelemetrySink of that phase
    (phase ∈ PHASES), e.g. an MLflow child run under one parent. Finished cycles are skipped (their
    stored summary comes back with `skipped: True`); an interrupted cycle resumes inside each trainer.
    """
    sink_factory = sink_factory or null_sinks
    n = n_cycles if n_cycles is not None else cfg.training_loop.n_cycles
    if n <= 0:
        raise ValueError(f"n_cycles must be > 0 (got {n})")
    summaries = []
    for cycle in range(n):
        done = completed_cycle(cfg, cycle)
        if done is not None:
            log.info("cycle %d: complete (%s), skipped", cycle, done["checkpoints"]["jt3"])
            summaries.append({**done, "skipped": True})
            continue
        log.info("cycle %d/%d: JT1 → deltas → JT2 → JT3", cycle + 1, n)
        summaries.append(run_cycle(cfg, lm, cycle, sink_factory, progress))
    return summaries


# ---------------------------------------------------------------------------------------------- MLflow


def training_loop_parent(cfg: MegaContextConfig, root: Path, tracking_uri: str | None = None,
                         artifact_location: str | None = None):
    """(parent, created): the MLflow parent run of this config's training loop, found by its
    `mcx.training_loop` key (`cycles.training_loop_key`), else created with the config as params. The
    Dagster phase assets and `mcx train-cycles` attach their phase runs to the same one."""
    uri, artifacts = store(cfg, root, tracking_uri, artifact_location)
    parent, created = MLflowSink.parent(
        uri, cfg.mlflow.experiment or cfg.name, training_loop_key(cfg), f"training-loop-{cfg.name}",
        tags={"mcx.config_name": cfg.name, "mcx.git_commit": git_commit(root),
              "mcx.n_cycles": str(cfg.training_loop.n_cycles)},
        artifact_location=artifacts,
    )
    if created:
        parent.log_params(cfg.flat())
        parent.log_text(cfg.to_yaml(), "config/config.yaml")
    return parent, created


def mlflow_sinks(cfg: MegaContextConfig, root: Path) -> tuple[SinkFactory, TelemetrySink]:
    """(factory, parent): the training loop's parent run (`training_loop_parent`) and one child run per
    (phase, cycle)."""
    uri, artifacts = store(cfg, root)
    parent, _ = training_loop_parent(cfg, root)
    tags = {"mcx.config_name": cfg.name, "mcx.git_commit": git_commit(root)}

    def factory(phase: str, cycle: int) -> contextlib.AbstractContextManager[TelemetrySink]:
        return MLflowSink.start(uri, cfg.mlflow.experiment or cfg.name, f"cycle{cycle}-{phase}", tags=tags,
                                artifact_location=artifacts, parent_run_id=parent.run_id,
                                system_metrics=cfg.mlflow.system_metrics)

    return factory, parent

