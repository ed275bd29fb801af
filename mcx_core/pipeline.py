"""The stage entry points: one plain function per pipeline stage that is not an evaluation (those live
in `mcx_core.eval`). Dagster assets and the CLI are thin wrappers around these, so the same stage runs
the same way from the UI, from `mcx materialize` and from a notebook. Each wires a config's data and
checkpoints to the library function that does the work."""

from __future__ import annotations

import time
from pathlib import Path

from mcx_core import checkpoints, data
from mcx_core.artifacts import ArtifactPaths, datasets_dir, load_stage, save_stage, stage_fingerprint
from mcx_core.compression.gistnet import load_gister
from mcx_core.config import MegaContextConfig
from mcx_core.focus import delta_tables, deltas
from mcx_core.model.base import BaseLM, load_base_model, load_tokenizer, tokenizer_id
from mcx_core.telemetry.sinks import NullSink, TelemetrySink
from mcx_core.telemetry.tables import log_delta_tables
from mcx_core.training import distributed

# A passage every run scores, so a base-model materialization carries one comparable number.
PROBE_PASSAGE = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die—to sleep,\n"
    "No more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\n"
    "That flesh is heir to: 'tis a consummation\n"
    "Devoutly to be wish'd."
)


def build_datasets(cfg: MegaContextConfig, progress: bool = True) -> dict:
    tok = load_tokenizer(cfg.base_model, cfg.dataset, root=cfg.root)
    return data.build_block_datasets(cfg, tok, datasets_dir(cfg), progress=progress)


def check_dataset_determinism(cfg: MegaContextConfig, n: int = 4) -> list[str]:
    """Re-tokenize the source documents of sampled rows; problems where tokens differ."""
    tok = load_tokenizer(cfg.base_model, cfg.dataset, root=cfg.root)
    return data.verify_retokenization(cfg, tok, datasets_dir(cfg), n=n)


def check_dataset_boundaries(cfg: MegaContextConfig) -> list[str]:
    return data.verify_document_boundaries(datasets_dir(cfg))


def check_dataset_split_sizes(cfg: MegaContextConfig) -> list[str]:
    sizes = data.split_summary(data.load_manifest(datasets_dir(cfg)))
    minimum = cfg.acceptance.split_min_samples
    return [
        f"{corpus}/{split}: {splits.get(split, 0)} samples < minimum {minimum}"
        for corpus, splits in sizes.items()
        for split in ("train", "val", "test")
        if splits.get(split, 0) < minimum
    ]


def prepare_base_model(cfg: MegaContextConfig) -> tuple[BaseLM, dict]:
    """Load (converting once if needed) and describe the frozen base model."""
    t0 = time.perf_counter()
    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    load_s = time.perf_counter() - t0
    ids = lm.tokenizer(PROBE_PASSAGE, return_tensors="pt", add_special_tokens=False).input_ids.to(lm.device)
    import torch

    with torch.no_grad():
        probe_nll = float(lm.model(ids, labels=ids).loss)
    frozen = all(not p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    info = {
        "model_id": lm.model_id,
        "parameters": lm.num_parameters,
        "d_model": lm.d_model,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "tokenizer": tokenizer_id(lm.tokenizer),
        "load_seconds": load_s,
        "probe_nll": probe_nll,
        "frozen": frozen,
    }
    return lm, info


def generate_deltas(cfg: MegaContextConfig, lm: BaseLM, sink: TelemetrySink | None = None, cycle: int = 0,
                    progress: bool = True, force: bool = False) -> tuple[Path, dict[str, float], Path]:
    """On-policy counterfactual labels from the newest JT1 checkpoint: (table, stats, checkpoint)."""
    ck = checkpoints.jt1_checkpoint(cfg, cycle)
    fp = stage_fingerprint(
        cfg, ["dataset", "base_model", "working_context", "deltas", "allocator", "seed"]
        + (["runtime"] if cfg.deltas.histories == "runtime" else []),
        data.load_manifest(datasets_dir(cfg))["config_hash"], lm.model_id, checkpoints.checkpoint_id(ck), cycle,
    )
    # Several processes (accelerate launch): rank 0 labels and writes the table; the others then find its stage.
    with distributed.main_process_first():
        cached = load_stage(cfg, f"deltas_cycle{cycle}", fp, force)
        if cached is not None:
            (sink or NullSink()).log_metrics(cached["stats"], step=0)
            log_delta_tables(sink or NullSink(), Path(cached["path"]))
            return Path(cached["path"]), cached["stats"], ck
        if cfg.deltas.histories == "runtime":  # windows of training documents in the runtime's setting
            from mcx_core.eval.runtime import runtime_histories

            ids, docs = runtime_histories(cfg, lm.tokenizer, cfg.deltas.samples, cfg.seed + cycle)
            w_max = cfg.runtime.w_max or cfg.working_context.w_max
            sample_ids = [f"{d}@{k}" for k, d in enumerate(docs)]
        else:
            ids, docs, w_max, sample_ids = data.train_ids(cfg), data.train_doc_ids(cfg), None, None
        path, stats = deltas.generate_delta_table(
            cfg, lm, load_gister(ck, lm), ck, ids, ArtifactPaths.from_config(cfg).deltas,
            sink or NullSink(), progress, cycle=cycle, doc_ids=docs, w_max=w_max, sample_ids=sample_ids,
        )
        save_stage(cfg, f"deltas_cycle{cycle}", fp, {"path": path, "stats": stats}, [path, delta_tables.contexts_path(path)])
        log_delta_tables(sink or NullSink(), path)
        return path, stats, ck


def cycle_delta_table(cfg: MegaContextConfig, cycle: int | None = None) -> Path:
    """The delta table labelled by the newest JT1 checkpoint of `cycle` (default: the final cycle)."""
    cycle = checkpoints.final_cycle(cfg) if cycle is None else cycle
    path = deltas.delta_table_path(ArtifactPaths.from_config(cfg).deltas, cycle, checkpoints.jt1_checkpoint(cfg, cycle))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; materialize delta_table first")
    return path
