"""Probe (issue 12): which *fixed* gist does the frozen model tolerate? 29 gists + sink + newest raw tokens at
W_max 128 on the validation split, against recency and sink + newest 96 raw (no gists): what the 29 displaced
raw tokens are worth. `.venv/bin/python bench/probe_fixed_gists.py [kinds...]` from the project root (needs
the block datasets: make demo). Numbers: README, "Compression: levers, ablation, recipe"."""
import sys, time, torch, numpy as np
from mcx_core.config import load_config
from mcx_core import data
from mcx_core.model.base import load_base_model
from mcx_core.eval import nll as E
from mcx_core.compression.teacher import pooling_targets

cfg = load_config("configs/default.yaml", ".", {"evaluation.split": "val"})
lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
samples = data.load_eval_samples(cfg, limit=12)
C, H, K = 1024, 64, 32
wc = cfg.working_context
dec = lm.model.get_decoder()
nl = lm.embed(torch.tensor(lm.tokenizer("\n")["input_ids"][:1]))[0]

def fn(kind):
    def g(level, x):
        x = x.float()
        if kind == "hidden_mean":
            h = dec(inputs_embeds=x, use_cache=False).last_hidden_state
            return pooling_targets(h, x)
        if kind == "zero": return torch.zeros(x.shape[0], x.shape[2])
        if kind == "newline": return nl.expand(x.shape[0], -1).clone()
        if kind == "last_token": return x[:, -1]
        if kind == "first_token": return x[:, 0]
        if kind == "meanpool": return E.MeanPoolGister()(level, x)
        if kind == "mean_unnormed": return x.mean(1)
    return g

conds = {"full": E.full_condition(lm), "recency": E.recency_condition(lm, wc.sink_tokens)}
kinds = sys.argv[1:] or ["zero", "newline", "last_token", "first_token", "mean_unnormed", "hidden_mean"]
for k in kinds:
    conds[k] = E.working_context_condition(lm, fn(k), K, wc.recent_tokens, wc.position_scheme, wc.sink_tokens)
rec99 = E.recency_condition(lm, wc.sink_tokens)
conds["sink+newest96"] = lambda h, w: rec99(h, 99)
t = time.time()
rows = E.evaluate(lm, samples, conds, [128], C, H, 4, False)
summ = E.summarize(rows, methods=[k for k in conds if k not in ("full", "recency")])
for s in summ:
    print(s["dataset"], "recency", round(s["delta_nll_recency_mean"], 3))
    for k in conds:
        if k in ("full", "recency"): continue
        print(f"  {k:<16} {s[f'delta_nll_{k}_mean']:+.3f}  minus recency {s[f'{k}_minus_recency_mean']:+.3f} [{s[f'{k}_minus_recency_ci_lo']:+.3f}, {s[f'{k}_minus_recency_ci_hi']:+.3f}]")
print("seconds", time.time() - t)
