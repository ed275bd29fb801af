"""Memory and wall time as telemetry: the process's peak RSS, GPU memory, an RSS sampler thread, and
one training phase's wall time and peak memory (the `phase/*` metrics)."""

from __future__ import annotations

import resource
import sys
import threading
import time
from typing import Self

import torch

from mcx_core.telemetry import metrics as M


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (allocated, reserved) since the run began, or the process's peak RSS."""
    if device.type == "cuda":
        return {
            M.GPU_MEMORY_ALLOCATED_GB: torch.cuda.max_memory_allocated(device) / 1e9,
            M.GPU_MEMORY_RESERVED_GB: torch.cuda.max_memory_reserved(device) / 1e9,
        }
    return {M.PEAK_RSS_MB: peak_rss_mb()}


class RssSampler:
    """Resident set size of this process every `interval_s`, in a background thread: [(ms, MB)]."""

    def __init__(self, interval_s: float = 0.001):
        import psutil

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((1000 * (time.perf_counter() - t0), self.process.memory_info().rss / 2**20))
            time.sleep(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class PhaseMemory:
    """Wall time and peak memory of one training phase: RSS sampled every `interval_s` in a thread (the
    process-lifetime `ru_maxrss` cannot tell phases apart) and, on CUDA, the peak allocated memory
    since the phase began. `metrics()` gives the `phase/*` metrics."""

    def __init__(self, device: torch.device | None = None, interval_s: float = 0.05):
        self.device = device
        self.sampler = RssSampler(interval_s)
        self.seconds = 0.0

    def __enter__(self) -> Self:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        self.sampler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.sampler.__exit__(*exc)
        self.seconds = time.perf_counter() - self._t0

    def metrics(self) -> dict[str, float]:
        rss = [mb for _, mb in self.sampler.samples] or [self.sampler.process.memory_info().rss / 2**20]
        out = {M.PHASE_SECONDS: self.seconds, M.PHASE_PEAK_RSS_MB: max(rss), M.PHASE_RSS_GROWTH_MB: max(rss) - rss[0]}
        if self.device is not None and self.device.type == "cuda":
            out[M.PHASE_GPU_PEAK_ALLOCATED_GB] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return out
