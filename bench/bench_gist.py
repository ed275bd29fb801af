"""GistNet and JT1: gisting throughput, training step time per objective, evaluation time per sample."""

from __future__ import annotations

import time

import numpy as np
import torch


def rows(cfg, pool_size: int = 2, steps: int = 3) -> list[dict]:
    from mcx_core.compression import teacher as T
    from mcx_core.compression.gistnet import Gister, profile_gister
    from mcx_core.eval import gists as gist_eval
    from mcx_core.eval import nll as E
    from mcx_core.model.base import load_base_model
    from mcx_core.telemetry import metrics as M
    from mcx_core.training import gistnet as jt1

    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    C, H, K = cfg.dataset.context_tokens, cfg.dataset.horizon, cfg.dataset.block_size
    torch.manual_seed(cfg.seed)
    gister = Gister(lm.d_model, cfg.gistnet.model).to(lm.device)
    prof = profile_gister(gister, n_blocks=64, repeats=5)
    out = [
        {"bench": "GistNet parameters", "value": prof[M.GISTNET_PARAMETERS] / 1e6, "unit": "M",
         "note": f"hidden {cfg.gistnet.model.hidden_size}, {cfg.gistnet.model.num_layers} layers"},
        {"bench": "GistNet LOD1 (batched 64)", "value": 1000 / prof[M.GISTNET_LATENCY_MS], "unit": "blocks/s",
         "note": f"{prof[M.GISTNET_LATENCY_MS]:.2f} ms/block"},
        {"bench": "GistNet LOD1 (single block)", "value": 1000 / prof[M.GISTNET_LATENCY_SINGLE_MS], "unit": "blocks/s",
         "note": f"{prof[M.GISTNET_LATENCY_SINGLE_MS]:.2f} ms/block"},
    ]

    ids = torch.randint(0, len(lm.tokenizer), (pool_size, C + H), generator=torch.Generator().manual_seed(0))
    spec = T.TeacherSpec.from_config(cfg, lm, ids.numpy())
    t0 = time.perf_counter()
    pool = T.teacher_fields(lm, ids, spec)
    out.append({"bench": "JT1 teacher pass", "value": (time.perf_counter() - t0) / pool_size, "unit": "s/sample",
                "note": f"{C + H} tokens: teacher + recency NLL, top-{spec.top_k}, pooling targets; once per sample"})
    layers = cfg.gistnet.model.input_layers
    if layers:
        t0 = time.perf_counter()
        pool["states"] = T.encoder_states(lm, ids, spec, layers)
        out.append({"bench": f"JT1 encoder states (k={layers})", "value": (time.perf_counter() - t0) / pool_size,
                    "unit": "s/sample", "note": f"{C // K} blocks run alone through {layers} layers"})
    n = min(cfg.gistnet.training.batch_size, pool_size)
    batch = {k: v[:n] for k, v in pool.items()}
    opt = torch.optim.AdamW(gister.parameters(), lr=1e-4)
    gister.train()
    for phase in cfg.gistnet.training.phases:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            if phase.objective == "pooling_mse":
                loss, _ = jt1.pooling_mse_loss(gister, lm, batch, C, K)
            elif phase.objective == "reconstruction":
                loss, _ = jt1.reconstruction_loss(gister, lm, batch, cfg, phase, step_seed=0)
            else:
                loss, _ = jt1.delta_nll_loss(gister, lm, batch, [cfg.working_context.w_max] * n, cfg, phase)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        out.append({"bench": f"JT1 step ({phase.objective})", "value": float(np.median(times)), "unit": "s/step",
                    "note": f"batch {n}, median of {steps}"})

    gister.eval()
    samples = {"bench": ([f"s{i}" for i in range(pool_size)], ids.numpy())}
    conds = gist_eval.conditions(cfg, lm, gister)
    t = time.perf_counter()
    E.evaluate(lm, samples, conds, [cfg.working_context.w_max], C, H, cfg.evaluation.batch_size, False)
    out.append({"bench": f"evaluation ({len(conds)} conditions)", "value": (time.perf_counter() - t) / pool_size,
                "unit": "s/sample", "note": f"{', '.join(conds)} at W_max={cfg.working_context.w_max}"})
    return out
