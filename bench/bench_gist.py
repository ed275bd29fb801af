"""GistNet and JT1: gisting throughput, training step time per objective, evaluation time per sample."""

from __future__ import annotations

import time

import numpy as np
import torch


def rows(cfg, pool_size: int = 2, steps: int = 3) -> list[dict]:
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
    t0 = time.perf_counter()
    pool = jt1.build_pool(lm, ids, C, H, K, progress=False)
    out.append({"bench": "JT1 teacher + targets", "value": (time.perf_counter() - t0) / pool_size, "unit": "s/sample",
                "note": f"{C + H} tokens, cached once per training sample"})
    rows_ = torch.arange(min(cfg.gistnet.training.batch_size, pool_size))
    opt = torch.optim.AdamW(gister.parameters(), lr=1e-4)
    gister.train()
    for phase in cfg.gistnet.training.phases:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            if phase.objective == "pooling_mse":
                loss, _ = jt1.pooling_mse_loss(gister, lm, pool, rows_, C, K)
            else:
                w = [cfg.working_context.w_max] * len(rows_)
                loss, _ = jt1.delta_nll_loss(gister, lm, pool, rows_, w, cfg, phase)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        out.append({"bench": f"JT1 step ({phase.objective})", "value": float(np.median(times)), "unit": "s/step",
                    "note": f"batch {len(rows_)}, median of {steps}"})

    gister.eval()
    samples = {"bench": ([f"s{i}" for i in range(pool_size)], ids.numpy())}
    conds = gist_eval.conditions(cfg, lm, gister)
    t = time.perf_counter()
    E.evaluate(lm, samples, conds, [cfg.working_context.w_max], C, H, cfg.evaluation.batch_size, False)
    out.append({"bench": f"evaluation ({len(conds)} conditions)", "value": (time.perf_counter() - t) / pool_size,
                "unit": "s/sample", "note": f"{', '.join(conds)} at W_max={cfg.working_context.w_max}"})
    return out
