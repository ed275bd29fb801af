"""JT3 (LoRA): adapter size, working-context construction (ingest + LensNet refocus), training step time
and throughput on the config's base model, attach/detach cost, peak RSS after."""

from __future__ import annotations

import time

import numpy as np
import torch


def rows(cfg, n_samples: int = 2, steps: int = 3) -> list[dict]:
    from mcx_core.compression.gistnet import Gister
    from mcx_core.focus.lensnet import LensNet
    from mcx_core.model.base import load_base_model
    from mcx_core.telemetry.memory import peak_rss_mb
    from mcx_core.training import common
    from mcx_core.training import lora as jt3

    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    C, H, W = cfg.dataset.context_tokens, cfg.dataset.horizon, cfg.working_context.w_max
    torch.manual_seed(cfg.seed)
    gister = Gister(lm.d_model, cfg.gistnet.model).to(lm.device).eval()
    lensnet = LensNet(lm.d_model, cfg.lensnet.model, max_level=2).to(lm.device).eval()
    ids = torch.randint(0, len(lm.tokenizer), (n_samples, C + H), generator=torch.Generator().manual_seed(0))

    t = time.perf_counter()
    samples = jt3.build_samples(cfg, lm, gister, lensnet, ids, [W] * n_samples)
    context_s = (time.perf_counter() - t) / n_samples
    tokens = sum(s.cost + H for s in samples)

    t = time.perf_counter()
    with jt3.lora_adapter(lm, cfg.lora, cfg.seed) as adapter:
        attach_s = time.perf_counter() - t
        n_params = sum(p.numel() for _, p in jt3.lora_parameters(adapter))
        opt = common.make_optimizer(adapter, cfg.lora.training.lr, cfg.lora.training.weight_decay)
        times = []
        for i in range(steps + 1):  # the first step is a warm-up
            t = time.perf_counter()
            loss, _ = jt3.jt3_loss(lm, samples)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if lm.device.type == "cuda":
                torch.cuda.synchronize(lm.device)
            if i:
                times.append(time.perf_counter() - t)
        t = time.perf_counter()
    detach_s = time.perf_counter() - t
    step_s = float(np.median(times))
    lora = cfg.lora
    return [
        {"bench": "LoRA parameters", "value": n_params / 1e3, "unit": "k",
         "note": f"rank {lora.rank}, {'+'.join(lora.target_modules)}; base {lm.num_parameters / 1e6:.1f} M"},
        {"bench": "JT3 working context", "value": context_s, "unit": "s/sample",
         "note": f"ingest {C} tokens + {lora.refocus_steps} LensNet/allocator refocus steps, W_max={W}"},
        {"bench": f"JT3 step ({n_samples} samples)", "value": step_s, "unit": "s/step",
         "note": f"forward + backward + AdamW, adapter only; median of {steps}"},
        {"bench": "JT3 throughput", "value": tokens / step_s, "unit": "tokens/s",
         "note": "working-context + horizon positions per second of training step"},
        {"bench": "LoRA attach + detach", "value": attach_s + detach_s, "unit": "s",
         "note": "get_peft_model + unload, with the base-weight checksums before and after"},
        {"bench": "peak RSS after JT3", "value": peak_rss_mb(), "unit": "MiB", "note": f"device {lm.device.type}"},
    ]  # fmt: skip
