"""Profiling one runtime step (the seed's Performance Profiling and Memory Profiling).

`profile_runtime_step` builds a `focus.engine.MegaContextEngine` with a prefilled history, runs untimed
warm-up steps, then
1. one step under `torch.profiler` (CPU, and CUDA on a GPU), each engine stage wrapped in a
   `record_function("mcx/<stage>")` range, exported as a Chrome trace (`chrome://tracing`, Perfetto);
2. one more step with memory tracking: on CUDA the allocator's history, dumped with
   `torch.cuda.memory._dump_snapshot` (open it with `python -m torch.cuda._memory_viz trace_plot`), and
   the peak allocated/reserved memory; on CPU a resident-set-size timeline sampled every millisecond
   plus tracemalloc's peak and top Python allocation sites;
and writes a small markdown report with the top operators and the memory numbers.
"""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mcx_core import artifacts, reports
from mcx_core.config import MegaContextConfig
from mcx_core.focus.engine import MegaContextEngine
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.memory import RssSampler
from mcx_core.telemetry.sinks import NullSink, TelemetrySink

STAGES = ("ingest", "fit", "lensnet", "allocator", "checks", "assemble", "forward")


@dataclass
class ProfileResult:
    chrome_trace: Path
    memory: Path  # CUDA snapshot (.pickle) or CPU RSS timeline (.json)
    report: Path
    files: dict[str, Path]
    metrics: dict[str, float]
    laps: dict[str, float]  # ms per stage of the profiled step
    top_ops: list[dict[str, Any]]


def _wrap(fn, label: str):
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def stage_ranges(engine) -> Iterator[None]:
    """Label each engine stage in the profile: instance attributes shadow the bound methods, and are
    removed again afterwards."""
    targets = [
        (engine.tree, "ingest", "mcx/ingest"),
        (engine.allocator, "fit", "mcx/fit"),
        (engine.policy, "scores", "mcx/lensnet"),
        (engine.allocator, "step", "mcx/allocator"),
        (engine.wc, "check_invariants", "mcx/checks"),
        (engine.wc, "assemble", "mcx/assemble"),
        (engine.lm.model, "forward", "mcx/forward"),
    ]
    patched = []
    try:
        for obj, name, label in targets:
            setattr(obj, name, _wrap(getattr(obj, name), label))
            patched.append((obj, name))
        yield
    finally:
        for obj, name in patched:
            delattr(obj, name)


def _top_ops(prof, cuda: bool, n: int = 15) -> list[dict[str, Any]]:
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0))[:n]:
        row = {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
               "cpu_total_ms": e.cpu_time_total / 1000, "self_cpu_mem_mb": e.self_cpu_memory_usage / 2**20}
        if cuda:
            row["self_cuda_ms"] = getattr(e, "self_device_time_total", 0) / 1000
        rows.append(row)
    return rows


def _stage_ranges(prof) -> list[dict[str, Any]]:
    return [{"range": e.key, "calls": e.count, "cpu_total_ms": e.cpu_time_total / 1000}
            for e in prof.key_averages() if e.key.startswith("mcx/")]


def profile_runtime_step(
    cfg: MegaContextConfig,
    lm,
    gister,
    policy,
    token_ids,
    out_dir: Path,
    report_dir: Path,
    *,
    prefill: int | None = None,
    warmup_steps: int = 1,
    sink: TelemetrySink | None = None,
) -> ProfileResult:
    """Profile `MegaContextEngine.step` on `token_ids` after `prefill` tokens (default
    `runtime.prefill_tokens`, fewer when the text is short). Traces go to `out_dir`, the report (and the
    CPU memory plot) to `report_dir`."""
    R, H = cfg.runtime.refocus_every, cfg.dataset.horizon
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    need = (warmup_steps + 2) * R + H  # warm-up, profiled and memory steps
    if len(ids) < need:
        raise ValueError(f"{len(ids)} tokens; profiling needs {need} (warm-up + 2 steps of {R}, horizon {H})")
    prefill = min(cfg.runtime.prefill_tokens if prefill is None else prefill, len(ids) - need)
    prefill -= prefill % cfg.dataset.block_size
    out_dir, report_dir = Path(out_dir), Path(report_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = MegaContextEngine(cfg, lm, gister, policy, None, ids[:prefill])
    cursor = prefill

    def step():
        nonlocal cursor
        out = engine.step(ids[cursor : cursor + R], ids[cursor + R : cursor + R + H])
        cursor += R
        return out

    for _ in range(warmup_steps):
        step()
    cuda = lm.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with (torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as prof,
          stage_ranges(engine)):
        profiled = step()
    chrome = out_dir / "runtime_profile.json"
    prof.export_chrome_trace(str(chrome))
    top, ranges = _top_ops(prof, cuda), _stage_ranges(prof)

    metrics = {M.PROFILE_STEP_MS: profiled.latency_ms}
    if cuda:
        torch.cuda.reset_peak_memory_stats(lm.device)
        torch.cuda.memory._record_memory_history(max_entries=100_000)
        mem_step = step()
        memory = out_dir / "memory_snapshot.pickle"
        torch.cuda.memory._dump_snapshot(str(memory))
        torch.cuda.memory._record_memory_history(enabled=None)
        metrics[M.PROFILE_GPU_PEAK_ALLOCATED_GB] = torch.cuda.max_memory_allocated(lm.device) / 1e9
        metrics[M.PROFILE_GPU_PEAK_RESERVED_GB] = torch.cuda.max_memory_reserved(lm.device) / 1e9
        memory_section = [
            (f"CUDA allocator history of one step: `{memory}` — view it with "
            f"`python -m torch.cuda._memory_viz trace_plot {memory} -o memory.html` (or pytorch.org/memory_viz)."),
            reports.markdown_table([{"peak_allocated_gb": metrics[M.PROFILE_GPU_PEAK_ALLOCATED_GB],
                                     "peak_reserved_gb": metrics[M.PROFILE_GPU_PEAK_RESERVED_GB]}],
                                   ["peak_allocated_gb", "peak_reserved_gb"]),
        ]
        plots: dict[str, Path] = {}
    else:
        tracemalloc.start()
        with RssSampler() as rss:
            mem_step = step()
        _, traced_peak = tracemalloc.get_traced_memory()
        sites = tracemalloc.take_snapshot().statistics("lineno")[:10]
        tracemalloc.stop()
        samples = rss.samples or [(0.0, 0.0)]
        rss_mb = [mb for _, mb in samples]
        metrics[M.PROFILE_PEAK_RSS_MB] = max(rss_mb)
        metrics[M.PROFILE_RSS_GROWTH_MB] = max(rss_mb) - rss_mb[0]
        metrics[M.PROFILE_TRACED_PEAK_MB] = traced_peak / 2**20
        memory = artifacts.write_json(out_dir / "memory_timeline.json", {
            "unit": {"t": "ms since the step began", "rss": "MB"},
            "samples": [{"t": t, "rss": mb} for t, mb in samples],
            "stage_ends_ms": _cumulative(mem_step.laps),
        })
        plots = {"memory_plot": reports.line_plot(
            report_dir / "profile_memory.png", [t for t, _ in samples], {"RSS": rss_mb},
            xlabel="ms since the step began", ylabel="resident set size (MB)",
            title="Process memory during one runtime step (CPU)",
        )}
        memory_section = [
            ("Resident set size sampled every millisecond during one more step (tensors included), and "
            "tracemalloc's view of Python-level allocations."),
            reports.markdown_table([{"peak_rss_mb": metrics[M.PROFILE_PEAK_RSS_MB],
                                     "rss_growth_mb": metrics[M.PROFILE_RSS_GROWTH_MB],
                                     "python_traced_peak_mb": metrics[M.PROFILE_TRACED_PEAK_MB]}],
                                   ["peak_rss_mb", "rss_growth_mb", "python_traced_peak_mb"]),
            f"![memory]({plots['memory_plot'].name})",
            reports.markdown_table([{"site": str(s.traceback[0]), "mb": s.size / 2**20, "blocks": s.count} for s in sites],
                                   ["site", "mb", "blocks"]) if sites else "No Python allocation outlived the step.",
            f"Timeline: `{memory}`.",
        ]
    metrics[M.PROFILE_MEMORY_STEP_MS] = mem_step.latency_ms

    lap_rows = [{"stage": k, "ms": v, "share": v / profiled.latency_ms if profiled.latency_ms else 0.0}
                for k, v in profiled.laps.items()]
    sections = [
        f"# Runtime step profile — config `{cfg.name}`",
        (f"One `MegaContextEngine.step` ({R} new tokens, horizon {H}, W_max {engine.w_max}) after {prefill} "
        f"prefilled tokens and {warmup_steps} warm-up step(s), policy `{getattr(policy, 'name', type(policy).__name__)}`, "
        f"device `{lm.device}`. Step under the profiler: {profiled.latency_ms:.1f} ms."),
        (f"Chrome trace: `{chrome}` (open in chrome://tracing or ui.perfetto.dev; engine stages are the "
        "`mcx/*` ranges)."),
        "## Stages (stopwatch laps of the profiled step)",
        reports.markdown_table(lap_rows, ["stage", "ms", "share"]),
        reports.markdown_table(ranges, ["range", "calls", "cpu_total_ms"]) if ranges else "",
        "## Top operators",
        reports.markdown_table(top, list(top[0]) if top else ["op"]),
        "## Memory",
        *memory_section,
    ]
    report_dir.mkdir(parents=True, exist_ok=True)
    report = artifacts.write_text(report_dir / "profile.md", "\n\n".join(s for s in sections if s) + "\n")
    summary = artifacts.write_json(report_dir / "profile.json", {
        "metrics": metrics, "laps": profiled.laps, "top_ops": top, "stage_ranges": ranges,
        "chrome_trace": str(chrome), "memory": str(memory), "device": str(lm.device),
    })
    files = {"chrome_trace": chrome, "memory": memory, "markdown": report, "json": summary, **plots}
    sink = sink or NullSink()
    sink.log_metrics(metrics)
    for p in files.values():
        sink.log_artifact(p, "profile")
    return ProfileResult(chrome, memory, report, files, metrics, dict(profiled.laps), top)


def _cumulative(laps: dict[str, float]) -> dict[str, float]:
    total, out = 0.0, {}
    for k, v in laps.items():
        total += v
        out[k] = total
    return out
