"""The alternating training loop (SPEC §6): `n_cycles` × (JT1 → deltas → JT2 → JT3).

Each cycle starts from the previous cycle's checkpoints (GistNet, LensNet, LoRA adapter), and the delta
labels are regenerated after every JT1, tagged with the GistNet that produced them, so JT2 always learns
from on-policy labels. A finished cycle leaves `artifacts/cycles/cycle{c}.json`; a rerun skips those
cycles and, inside an interrupted one, each trainer resumes from its newest complete checkpoint.

    python -m mcx_core.cycles --config configs/gpu.yaml --cycles 3
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mcx_core import pipeline, reports
from mcx_core.config import MegaContextConfig
from mcx_core.model import BaseLM
from mcx_core.telemetry.sinks import NullSink, TelemetrySink

log = logging.getLogger(__name__)

PHASES = ("jt1", "deltas", "jt2", "jt3")
SinkFactory = Callable[[str, int], contextlib.AbstractContextManager[TelemetrySink]]


@contextlib.contextmanager
def null_sinks(phase: str, cycle: int) -> Iterator[TelemetrySink]:
    yield NullSink()


def cycles_dir(cfg: MegaContextConfig) -> Path:
    return pipeline.ArtifactPaths.from_config(cfg).root / "cycles"


def cycle_record_path(cfg: MegaContextConfig, cycle: int) -> Path:
    return cycles_dir(cfg) / f"cycle{cycle}.json"


def completed_cycle(cfg: MegaContextConfig, cycle: int) -> dict | None:
    """The stored summary of `cycle` when it finished and its checkpoints are still the ones it wrote
    (same names, same trainer states); None otherwise."""
    import json

    path = cycle_record_path(cfg, cycle)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    for phase, ck in record["checkpoints"].items():
        ck = Path(ck)
        if not (ck / "trainer_state.json").is_file() or pipeline.checkpoint_id(ck) != record["checkpoint_ids"][phase]:
            return None
    return record


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def run_cycle(cfg: MegaContextConfig, lm: BaseLM, cycle: int, sink_factory: SinkFactory = null_sinks,
              progress: bool = True) -> dict:
    """One JT1 → deltas → JT2 → JT3 cycle, initialised from cycle − 1's checkpoints; its summary."""
    from mcx_core.training.jt1 import load_gister
    from mcx_core.training.jt2 import load_lensnet
    from mcx_core.training.jt3 import train_jt3

    paths = pipeline.ArtifactPaths.from_config(cfg)
    init = (
        {
            "jt1": pipeline.jt1_checkpoint(cfg, cycle - 1),
            "jt2": pipeline.jt2_checkpoint(cfg, cycle - 1),
            "jt3": pipeline.jt3_checkpoint(cfg, cycle - 1),
        }
        if cycle > 0
        else {"jt1": None, "jt2": None, "jt3": None}
    )
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    with sink_factory("jt1", cycle) as sink:
        sink.set_tags({"mcx.cycle": str(cycle), "mcx.phase": "jt1"})
        jt1 = pipeline.train_gistnet(cfg, lm, sink, cycle=cycle, init_from=init["jt1"], progress=progress)
    seconds["jt1"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with sink_factory("deltas", cycle) as sink:
        sink.set_tags({"mcx.cycle": str(cycle), "mcx.phase": "deltas"})
        # Regenerated from this cycle's GistNet: the table's name and `gistnet_checkpoint` column say which.
        table, delta_stats, gist_ck = pipeline.generate_deltas(cfg, lm, sink, cycle=cycle, progress=progress)
    seconds["deltas"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with sink_factory("jt2", cycle) as sink:
        sink.set_tags({"mcx.cycle": str(cycle), "mcx.phase": "jt2"})
        jt2 = pipeline.train_lensnet(cfg, lm, sink, cycle=cycle, init_from=init["jt2"], progress=progress)
    seconds["jt2"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with sink_factory("jt3", cycle) as sink:
        sink.set_tags({"mcx.cycle": str(cycle), "mcx.phase": "jt3"})
        # pipeline.train_lora has no init_from: call the trainer directly to carry the adapter over.
        jt3 = train_jt3(
            cfg, lm, load_gister(jt1.checkpoint, lm), load_lensnet(jt2.checkpoint, lm.device),
            pipeline.train_ids(cfg), paths.checkpoints, sink, cycle=cycle, progress=progress, init_from=init["jt3"],
        )
    seconds["jt3"] = time.perf_counter() - t0

    checkpoints = {"jt1": jt1.checkpoint, "jt2": jt2.checkpoint, "jt3": jt3.checkpoint}
    summary = {
        "cycle": cycle,
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "checkpoint_ids": {k: pipeline.checkpoint_id(v) for k, v in checkpoints.items()},
        "init_from": {k: (str(v) if v is not None else None) for k, v in init.items()},
        "delta_table": str(table),
        "delta_gistnet_checkpoint": str(gist_ck),
        "metrics": {
            "jt1": _floats(jt1.metrics),
            "deltas": _floats(delta_stats),
            "jt2": _floats(jt2.metrics),
            "jt3": _floats(jt3.metrics),
        },
        "nan_free": bool(jt1.nan_free and jt2.nan_free and jt3.nan_free),
        "seconds": seconds,
        "seconds_total": sum(seconds.values()),
        "skipped": False,
    }
    reports.write_json(cycle_record_path(cfg, cycle), summary)
    return summary


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


# ---------------------------------------------------------------------------------------------- CLI


def mlflow_sinks(cfg: MegaContextConfig, root: Path, parent_name: str) -> tuple[SinkFactory, Callable[[str], None]]:
    """(factory, end): one parent MLflow run for the whole loop, one child run per (phase, cycle)."""
    from mcx_core.telemetry.mlflow_sink import (
        MLflowSink,
        default_artifact_location,
        default_tracking_uri,
        git_commit,
    )

    uri = cfg.mlflow.tracking_uri or default_tracking_uri(root)
    artifacts = cfg.mlflow.artifact_location or default_artifact_location(root)
    experiment = cfg.mlflow.experiment or cfg.name
    tags = {"mcx.config_name": cfg.name, "mcx.git_commit": git_commit(root)}
    parent = MLflowSink.start(uri, experiment, parent_name, tags=tags, artifact_location=artifacts,
                              system_metrics=cfg.mlflow.system_metrics)
    parent.log_params(cfg.flat())
    parent.log_text(cfg.to_yaml(), "config/config.yaml")

    @contextlib.contextmanager
    def factory(phase: str, cycle: int) -> Iterator[TelemetrySink]:
        child = MLflowSink.start(uri, experiment, f"cycle{cycle}-{phase}", tags=tags, artifact_location=artifacts,
                                 parent_run_id=parent.run_id)
        try:
            yield child
        except BaseException:
            child.end("FAILED")
            raise
        child.end("FINISHED")

    return factory, parent.end


def rank_config(cfg: MegaContextConfig, rank: int, world_size: int) -> MegaContextConfig:
    """Under `accelerate launch` with several processes, process `rank` trains its own seed replica
    (seed + rank) in its own artifacts and dataset directories. The trainers are single-process: this is
    seed-parallel, not data-parallel."""
    if world_size <= 1:
        return cfg
    update = {
        "seed": cfg.seed + rank,
        "artifacts_dir": str(Path(cfg.artifacts_dir) / f"rank{rank}"),
        "dataset": cfg.dataset.model_copy(update={"output_dir": str(Path(cfg.dataset.output_dir) / f"rank{rank}")}),
    }
    return cfg.model_copy(update=update)


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mcx_core.cycles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--cycles", type=int, default=None, help="default: training_loop.n_cycles")
    parser.add_argument("--no-mlflow", action="store_true", help="log nowhere (default: MLflow parent + child runs)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    import json
    import os

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from mcx_core.config import load_config, project_root

    # accelerate / torchrun set these; one process per GPU, each pinned to its own device.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
    cfg = rank_config(load_config(args.config), rank, world)
    root = project_root()
    pipeline.build_datasets(cfg, progress=not args.no_progress)
    lm, info = pipeline.prepare_base_model(cfg)
    log.info("base model %s on %s", info["model_id"], info["device"])
    factory, end = (null_sinks, None) if args.no_mlflow else mlflow_sinks(
        cfg, root, f"cycles-{cfg.name}" + (f"-rank{rank}" if world > 1 else "")
    )
    try:
        summaries = run_cycles(cfg, lm, factory, n_cycles=args.cycles, progress=not args.no_progress)
    except BaseException:
        if end is not None:
            end("FAILED")
        raise
    if end is not None:
        end("FINISHED")
    print(json.dumps([{k: s[k] for k in ("cycle", "checkpoints", "seconds", "skipped")} for s in summaries], indent=2))
    return summaries


if __name__ == "__main__":
    main()
