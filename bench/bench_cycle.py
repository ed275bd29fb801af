"""The alternating training loop: seconds and peak memory for one JT1 → deltas → JT2 → JT3 cycle, per phase
and in total.

Runs `mcx_core.training.cycles.run_cycles(n_cycles=1)` on the config as given (the smoke config stays smoke-sized)
with its artifacts and datasets in a temporary directory, so the project's artifacts are never touched.
On the real model this trains for real and takes as long as the config's step counts say.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def rows(cfg) -> list[dict]:
    from mcx_core import pipeline
    from mcx_core.training import cycles

    with tempfile.TemporaryDirectory(prefix="mcx-bench-cycle-") as tmp:
        tmp = Path(tmp)
        cfg = cfg.model_copy(
            update={
                "artifacts_dir": str(tmp / "artifacts"),
                "dataset": cfg.dataset.model_copy(update={"output_dir": str(tmp / "datasets")}),
            }
        )
        t0 = time.perf_counter()
        pipeline.build_datasets(cfg, progress=False)
        lm, _ = pipeline.prepare_base_model(cfg)
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        (summary,) = cycles.run_cycles(cfg, lm, n_cycles=1, progress=False)
        cycle_s = time.perf_counter() - t0

    g, lens, r = cfg.gistnet.training, cfg.lensnet.training, cfg.lora.training
    steps = {
        "jt1": f"{sum(p.max_steps for p in g.phases)} steps × batch {g.batch_size}",
        "deltas": f"{cfg.deltas.samples} samples × {cfg.deltas.contexts_per_sample} contexts, "
                  f"≤{cfg.deltas.max_candidates} candidates",
        "jt2": f"{lens.max_steps} steps × batch {lens.batch_size}",
        "jt3": f"{r.max_steps} steps × batch {r.batch_size}",
    }
    out = [{"bench": "cycle setup (datasets + base model)", "value": setup_s, "unit": "s", "note": "not part of a cycle"}]
    out += [
        {"bench": f"cycle phase {phase}", "value": summary["seconds"][phase], "unit": "s", "note": steps[phase]}
        for phase in cycles.PHASES
    ]
    # Peak RSS sampled while each phase ran (the process's own, base model included); GPU peak on CUDA.
    for phase in cycles.PHASES:
        mem = summary["memory"][phase]
        out.append({"bench": f"peak memory {phase}", "value": mem["phase/peak_rss_mb"], "unit": "MiB",
                    "note": f"+{mem['phase/rss_growth_mb']:.0f} MiB during the phase"})
        if "phase/gpu_peak_allocated_gb" in mem:
            out.append({"bench": f"peak GPU memory {phase}", "value": mem["phase/gpu_peak_allocated_gb"],
                        "unit": "GB", "note": "torch.cuda.max_memory_allocated"})
    out.append({"bench": "seconds per cycle", "value": cycle_s, "unit": "s/cycle",
                "note": f"JT1→deltas→JT2→JT3, config {cfg.name}, device {lm.device}"})
    return out


if __name__ == "__main__":
    import argparse
    import os

    from mcx_core.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smoke.yaml")
    args = parser.parse_args()
    os.environ.setdefault("MCX_HOME", os.getcwd())
    for row in rows(load_config(args.config)):
        print(f"{row['bench']:<40} {row['value']:>10.2f} {row['unit']:<8} {row['note']}")
