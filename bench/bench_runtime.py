"""Runtime costs: the allocator alone as the working context grows, LensNet per refocus, the whole
step against the frozen base model (overhead), and one step over a 10k- vs a 1M-token history.

`python bench/bench_runtime.py [config.yaml]` prints a table; `bench/run.py` calls `rows(cfg)`.
GistNet and LensNet are untrained here: their cost does not depend on their weights.
"""

from __future__ import annotations

import sys
import time

import torch

ENTRY_COUNTS = (256, 1024, 4096, 8192)
LONG_HISTORIES = (10_000, 1_000_000)
SYNTHETIC_D = 8  # d_model of the allocator's synthetic trees: the allocator never reads vectors


def _synthetic_tree(n_tokens: int):
    from mcx_core.model.tree import MegaContextTree

    table = torch.randn(1000, SYNTHETIC_D, generator=torch.Generator().manual_seed(0))
    tree = MegaContextTree(SYNTHETIC_D, lambda ids: table[ids], lambda level, x: x.mean(dim=1))
    tree.ingest(torch.randint(0, 1000, (n_tokens,), generator=torch.Generator().manual_seed(1)))
    return tree, table


def allocator_rows(cfg, steps: int = 16) -> list[dict]:
    """fit + step per refocus, random scores in [-1, 1], on contexts of N entries (N - 2 LOD1 gists and
    the two newest blocks raw, full to the budget)."""
    from mcx_core.focus.allocator import FocusAllocator
    from mcx_core.model.working_context import WorkingContext
    from mcx_core.telemetry import metrics as M

    K, out = 32, []
    for n in ENTRY_COUNTS:
        tree, _ = _synthetic_tree(K * n)
        w_max = n - 2 + 64
        wc = WorkingContext.initial(tree, w_max, recent_tokens=64)
        alloc = FocusAllocator(
            cfg.allocator.model_copy(update={"min_residency": 0, "cooldown_steps": 0}), w_max
        )
        gen = torch.Generator().manual_seed(2)
        times, actions = [], 0
        for s in range(steps):
            tree.ingest(torch.randint(0, 1000, (K,), generator=gen))
            wc.sync()
            t = time.perf_counter()
            alloc.fit(wc)
            stats = alloc.step(wc, torch.rand(len(wc.entries), generator=gen) * 2 - 1)
            times.append(1000 * (time.perf_counter() - t))
            actions += len(stats.actions)
            wc.check_invariants()
        out.append(
            {
                "bench": f"allocator step, {len(wc.entries)} entries",
                "value": M.p50(times),
                "unit": "ms",
                "note": f"p50 of {steps} (p95 {M.p95(times):.1f} ms), {actions / steps:.1f} actions/step",
            }
        )
    return out


def _random_ids(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def runtime_rows(cfg, steps: int = 24, long_steps: int = 12) -> list[dict]:
    from mcx_core.compression.gistnet import Gister
    from mcx_core.eval.nll import MeanPoolGister
    from mcx_core.focus.engine import run_engine
    from mcx_core.focus.lensnet import LensNet, LensNetPolicy
    from mcx_core.focus.policies import RecencyPolicy
    from mcx_core.model.base import load_base_model
    from mcx_core.telemetry import metrics as M

    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    vocab = lm.model.config.vocab_size
    gister = Gister(lm.d_model, cfg.gistnet.model).to(lm.device).eval()
    lensnet = LensNet(lm.d_model, cfg.lensnet.model).to(lm.device).eval()
    w, R, H = cfg.working_context.w_max, cfg.runtime.refocus_every, cfg.dataset.horizon
    ids = _random_ids(vocab, cfg.dataset.context_tokens + steps * R + H)
    note = f"{lm.model_id}, W_max {w}, refocus every {R}, H {H}, {lm.device}"
    out = []
    for policy in (RecencyPolicy(), LensNetPolicy(lensnet, lm.embed)):
        res = run_engine(cfg, lm, gister, policy, ids, steps, w, prefill=cfg.dataset.context_tokens)
        s = res.summary
        out.append(
            {
                "bench": f"step overhead [{policy.name}]",
                "value": 100 * s[M.LATENCY_OVERHEAD],
                "unit": "%",
                "note": f"step p50 {s[M.LATENCY_P50]:.1f} ms vs base p50 {s[M.BASELINE_LATENCY_P50]:.1f} ms; {note}",
            }
        )
        if policy.name == "lensnet":
            lens = [r[M.LATENCY_STAGE_PREFIX + "lensnet"] for r in res.records]
            entries = sum(r["entries"] for r in res.records) / len(res.records)
            out.append(
                {
                    "bench": "LensNet per refocus",
                    "value": M.p50(lens),
                    "unit": "ms",
                    "note": f"p50, {entries:.0f} entries on average, hidden {cfg.lensnet.model.hidden_size}",
                }
            )
            stages = {
                stage: M.p50([r[M.LATENCY_STAGE_PREFIX + stage] for r in res.records])
                for stage in ("ingest", "fit", "allocator", "checks", "assemble", "forward")
            }
            out.append(
                {
                    "bench": "step stages [lensnet], p50",
                    "value": sum(stages.values()) + M.p50(lens),
                    "unit": "ms",
                    "note": ", ".join(f"{k} {v:.2f}" for k, v in stages.items()),
                }
            )

    # One step over a long history: a cheap gister makes a 1M-token prefill affordable; max_level 3
    # lets 1M tokens fit W_max (976 LOD2 gists would not).
    # A coarsest legal context keeps up to K - 1 unparented gists per level + the recent tokens: at
    # max_level 3 about 3 * 31 + recent + K positions, so small budgets cannot stream a 1M history.
    w_long = max(256, *cfg.working_context.eval_w_max)
    lensnet3 = LensNet(lm.d_model, cfg.lensnet.model, max_level=3).to(lm.device).eval()
    p50s = {}
    for n in LONG_HISTORIES:
        ids = _random_ids(vocab, n + long_steps * R + H, seed=n)
        t = time.perf_counter()
        res = run_engine(
            cfg, lm, MeanPoolGister(), LensNetPolicy(lensnet3, lm.embed), ids, long_steps, w_long,
            prefill=n, max_level=3,
        )  # fmt: skip
        total = time.perf_counter() - t
        p50s[n] = res.summary[M.LATENCY_P50]
        out.append(
            {
                "bench": f"step latency, {n:,}-token history",
                "value": p50s[n],
                "unit": "ms",
                "note": (
                    f"p50 of {long_steps}, W_max {w_long}, {res.records[-1]['entries']} entries, overhead "
                    f"{100 * res.summary[M.LATENCY_OVERHEAD]:.0f}%; prefill+run {total:.1f} s"
                ),
            }
        )
    # The demo's focus setting (issue 13): step cost against W_max and history length, the learned gister.
    for w_b, n in ((128, 4096), (256, 4096), (256, 16384)):
        ids = _random_ids(vocab, n + long_steps * R + H, seed=w_b + n)
        res = run_engine(cfg, lm, gister, RecencyPolicy(), ids, long_steps, w_b, prefill=n)
        out.append(
            {
                "bench": f"step latency, W_max {w_b}, {n:,}-token history",
                "value": res.summary[M.LATENCY_P50],
                "unit": "ms",
                "note": f"p50 of {long_steps}; frozen base on the same positions {res.summary[M.BASELINE_LATENCY_P50]:.1f} ms",
            }
        )
    lo, hi = LONG_HISTORIES
    out.append(
        {
            "bench": f"step latency ratio {hi:,} / {lo:,}",
            "value": p50s[hi] / p50s[lo],
            "unit": "x",
            "note": "1.0 = step cost independent of history length (depends on W_max only)",
        }
    )
    return out


def rows(cfg) -> list[dict]:
    return allocator_rows(cfg) + runtime_rows(cfg)


if __name__ == "__main__":
    import os

    os.environ.setdefault("MCX_HOME", os.getcwd())
    from mcx_core.config import load_config

    config = load_config(sys.argv[1] if len(sys.argv) > 1 else "configs/smoke.yaml")
    print(f"{'bench':<44} {'value':>10} {'unit':<5} note")
    for r in rows(config):
        print(f"{r['bench']:<44} {r['value']:>10.2f} {r['unit']:<5} {r['note']}")
