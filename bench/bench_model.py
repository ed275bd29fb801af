"""Base-model forward throughput at the working-context sizes the system uses."""

from __future__ import annotations

import time

import torch


def rows(cfg, positions=(128, 256, 1024), repeats: int = 3) -> list[dict]:
    from mcx_core.model.base import load_base_model

    t0 = time.perf_counter()
    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    out = [{"bench": "base model load", "value": time.perf_counter() - t0, "unit": "s", "note": lm.model_id}]
    gen = torch.Generator().manual_seed(0)
    for n in positions:
        ids = torch.randint(0, len(lm.tokenizer), (1, n), generator=gen).to(lm.device)
        with torch.no_grad():
            lm.model(ids, use_cache=False)  # warm-up
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                lm.model(ids, use_cache=False)
                times.append(time.perf_counter() - t)
        best = min(times)
        out.append(
            {"bench": f"forward {n} positions", "value": n / best, "unit": "tokens/s",
             "note": f"best of {repeats}: {best * 1000:.0f} ms"}
        )
    return out
