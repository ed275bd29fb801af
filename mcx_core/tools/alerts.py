"""The seed's critical alerts (Real-Time Monitoring), evaluated over a run's telemetry:

    swap_rate             the mean swap rate over `alerts.window_steps` consecutive steps > `alerts.swap_rate_critical`
                          (ping-pong behaviour: pause and review allocator thresholds)
    delta_nll_divergence  ΔNLL rose by more than `alerts.delta_nll_divergence` above its best earlier value
                          (per JT1 cycle, or smoothed over `window_steps` logged steps): GistNet drift
    latency               median step latency > `alerts.latency_ratio_max` × the median frozen-baseline step
                          (profile the runtime)

Inputs are trace records (one dict per runtime step, as `focus.engine.run_engine` writes them, including
the hidden `.tmp` trace of a run still in progress) or metric histories (`{name: [(step, value)]}`,
as MLflow and `MemorySink` keep them). `dispatch` hands fired alerts to `alerts.command` (an argv list
run without a shell, or a shell command line; the JSON on stdin) and/or POSTs them to
`alerts.webhook_url`; a failing hook is logged, never raised. `new_alerts` watches the artifacts (and MLflow) between scans and reports each alert once, for a sensor.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcx_core import checkpoints
from mcx_core.config import AlertsConfig
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.mlflow_sink import mlflow_client

log = logging.getLogger(__name__)

SWAP_RATE, DELTA_NLL_DIVERGENCE, LATENCY = "swap_rate", "delta_nll_divergence", "latency"


@dataclass(frozen=True)
class Alert:
    name: str  # SWAP_RATE | DELTA_NLL_DIVERGENCE | LATENCY
    message: str  # one line a person reads: what, how much, against which threshold
    value: float
    threshold: float
    source: str  # the trace file, MLflow run or checkpoint folder it came from
    step: int | None = None  # where it fired (end of the worst window, last cycle), when known

    @property
    def tag(self) -> str:
        """The MLflow tag this alert sets on its run."""
        return f"alert.{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- rules


def rolling_means(values: Sequence[float], window: int) -> np.ndarray:
    """Means of every `window` consecutive values (the whole series when it is shorter)."""
    a = np.asarray(values, dtype=np.float64)
    w = min(window, len(a))
    if w == 0:
        return a
    return np.convolve(a, np.ones(w), "valid") / w  # each window summed on its own: equal windows, equal means


def swap_rate_alert(swap_rates: Sequence[float], cfg: AlertsConfig, source: str,
                    steps: Sequence[int] | None = None) -> Alert | None:
    """Fires when the worst `window_steps`-step mean swap rate exceeds `swap_rate_critical`: one busy step
    is allowed, sustained thrashing is not."""
    if not len(swap_rates):
        return None
    means = rolling_means(swap_rates, cfg.window_steps)
    worst = int(np.argmax(means))
    value = float(means[worst])
    if value <= cfg.swap_rate_critical:
        return None
    w = min(cfg.window_steps, len(swap_rates))
    end = worst + w - 1
    step = int(steps[end]) if steps is not None else end
    return Alert(
        SWAP_RATE,
        f"swap rate {value:.3f} (mean of {w} steps ending at step {step}) > critical "
        f"{cfg.swap_rate_critical:g}: the allocator is thrashing; review tau_expand/tau_collapse, cooldown, "
        "min_residency",
        value, cfg.swap_rate_critical, source, step,
    )


def latency_alert(latency_ms: Sequence[float], baseline_ms: Sequence[float], cfg: AlertsConfig,
                  source: str) -> Alert | None:
    """Fires when median(step latency) / median(frozen-baseline latency) > `latency_ratio_max`. Medians,
    so the first step's one-time costs do not decide it."""
    lat = [v for v in latency_ms if v is not None and math.isfinite(v)]
    base = [v for v in baseline_ms if v is not None and math.isfinite(v) and v > 0]
    if not lat or not base:
        return None
    ratio = M.p50(lat) / M.p50(base)
    if ratio <= cfg.latency_ratio_max:
        return None
    return Alert(
        LATENCY,
        f"median step latency {M.p50(lat):.1f} ms is {ratio:.2f}× the frozen baseline's {M.p50(base):.1f} ms "
        f"(max {cfg.latency_ratio_max:g}×): profile the step (`mcx profile`)",
        ratio, cfg.latency_ratio_max, source,
    )


def delta_nll_alert(values: Sequence[float], cfg: AlertsConfig, source: str,
                    labels: Sequence[Any] | None = None, window: int = 1) -> Alert | None:
    """Fires when the latest ΔNLL (a `window`-point mean) is more than `delta_nll_divergence` above the
    best earlier one. `values` in time order: one per JT1 cycle (window 1) or per logged step."""
    labels = list(labels) if labels is not None else [f"point {i}" for i in range(len(values))]
    kept = [(lab, v) for lab, v in zip(labels, values) if v is not None and math.isfinite(v)]
    means = rolling_means([v for _, v in kept], window)
    if len(means) < 2:
        return None
    best = int(np.argmin(means[:-1]))
    rise = float(means[-1] - means[best])
    if rise <= cfg.delta_nll_divergence:
        return None
    w = min(window, len(kept))

    def name(i: int) -> str:  # the label of the last point of window i
        return str(kept[i + w - 1][0])

    return Alert(
        DELTA_NLL_DIVERGENCE,
        f"ΔNLL rose by {rise:.3f} (from {means[best]:.3f} at {name(best)} to {means[-1]:.3f} at "
        f"{name(len(means) - 1)}) > {cfg.delta_nll_divergence:g}: GistNet drift; refresh the delta labels",
        rise, cfg.delta_nll_divergence, source,
    )


# ---------------------------------------------------------------------------------------------- inputs


def evaluate_records(records: Sequence[dict], cfg: AlertsConfig, source: str) -> list[Alert]:
    """Alerts of one run's trace records (swap rate, latency)."""
    if not records:
        return []
    out = []
    rated = [(r.get("step", i), r[M.SWAP_RATE]) for i, r in enumerate(records) if r.get(M.SWAP_RATE) is not None]
    out.append(swap_rate_alert([v for _, v in rated], cfg, source, [s for s, _ in rated]))
    if all(M.BASELINE_LATENCY_MS in r for r in records):
        out.append(latency_alert([r["latency_ms"] for r in records], [r[M.BASELINE_LATENCY_MS] for r in records],
                                 cfg, source))
    return [a for a in out if a is not None]


def evaluate_metric_history(history: dict[str, list[tuple[int | None, float]]], cfg: AlertsConfig,
                            source: str) -> list[Alert]:
    """Alerts of one run's logged metric histories: swap rate and latency per runtime step, ΔNLL per
    training step (smoothed over `window_steps`)."""

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = sorted(((s or 0), v) for s, v in history.get(key, []))
        return [s for s, _ in pts], [v for _, v in pts]

    out = []
    steps, rates = series(M.SWAP_RATE)
    out.append(swap_rate_alert(rates, cfg, source, steps))
    out.append(latency_alert(series(M.LATENCY_MS)[1], series(M.BASELINE_LATENCY_MS)[1], cfg, source))
    steps, dnll = series(M.TRAIN_DELTA_NLL_MEAN)
    out.append(delta_nll_alert(dnll, cfg, source, [f"step {s}" for s in steps], window=cfg.window_steps))
    return [a for a in out if a is not None]


def read_trace(path: str | Path, partial: bool = False) -> list[dict]:
    """A trace's step records. `partial`: the file may still be written, so an unfinished last line is
    dropped instead of raising."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if partial and i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return out


def trace_files(traces_dir: Path, in_progress: bool = True) -> list[Path]:
    """Finished traces (`**/*.jsonl`) and, with `in_progress`, the hidden `.NAME.jsonl.tmp` of running ones."""
    files = sorted(Path(traces_dir).glob("**/*.jsonl"))
    if in_progress:
        files += sorted(Path(traces_dir).glob("**/.*.jsonl.tmp"))
    # The oracle policy scores every candidate with the base model by design (a reference, never a
    # deployable policy): its traces would always trip the latency alert. Only traces that represent a
    # run: not the policy comparison's few-step traces (traces/compare/), not the per-action tables.
    from mcx_core.telemetry.schemas import trace_kind

    return [f for f in files if not f.name.lstrip(".").startswith("oracle_") and f.parent.name != COMPARE_DIR
            and trace_kind(f) == "steps"]


COMPARE_DIR = "compare"  # runtime_eval's policy comparison (mcx_core.eval.runtime)


def cycle_delta_nll(checkpoints_dir: Path) -> list[tuple[int, float]]:
    """(cycle, final `train/delta_nll_mean`) of the newest complete JT1 checkpoint of every cycle that
    logged one (pooling-only checkpoints have none)."""
    newest = checkpoints.newest_per_cycle(checkpoints_dir, 1)
    out = []
    for c in sorted(newest):
        v = (checkpoints.read_state(newest[c]).get("metrics") or {}).get(M.TRAIN_DELTA_NLL_MEAN)
        if isinstance(v, int | float) and math.isfinite(v):
            out.append((c, float(v)))
    return out


def evaluate_artifacts(cfg: AlertsConfig, traces_dir: Path, checkpoints_dir: Path,
                       files: Iterable[Path] | None = None) -> list[Alert]:
    """Alerts of every trace (or just `files`), plus ΔNLL divergence across JT1 cycles."""
    out: list[Alert] = []
    for f in (trace_files(traces_dir) if files is None else files):
        records = read_trace(f, partial=f.name.endswith(".tmp"))
        out += evaluate_records(records, cfg, str(f))
    cycles = cycle_delta_nll(checkpoints_dir)
    a = delta_nll_alert([v for _, v in cycles], cfg, str(checkpoints_dir), [f"cycle {c}" for c, _ in cycles])
    return out + ([a] if a else [])


# ---------------------------------------------------------------------------------------------- outputs


def tags(alerts: Sequence[Alert]) -> dict[str, str]:
    """`alert.<name>` → messages (several sources of one alert joined), for `sink.set_tags`."""
    out: dict[str, list[str]] = {}
    for a in alerts:
        out.setdefault(a.tag, []).append(f"{Path(a.source).name}: {a.message}")
    return {k: " | ".join(v)[:4900] for k, v in out.items()}


def tag_run(sink, alerts: Sequence[Alert]) -> None:
    """Set `alert.<name>` on the sink's run (MLflow) for every alert, and log how many fired."""
    if alerts:
        sink.set_tags(tags(alerts))
    sink.log_metrics({M.ALERTS_FIRED: float(len(alerts))})


def payload(alerts: Sequence[Alert], context: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**(context or {}), "alerts": [a.to_dict() for a in alerts]}


def dispatch(alerts: Sequence[Alert], cfg: AlertsConfig, context: dict[str, Any] | None = None) -> list[str]:
    """Run `cfg.command` with the alerts' JSON on stdin and POST it to `cfg.webhook_url`. Returns the
    problems (also logged); never raises. Nothing happens without alerts."""
    if not alerts or not (cfg.command or cfg.webhook_url):
        return []
    from mcx_core.jsonutil import dumps_strict

    body = dumps_strict(payload(alerts, context), default=str)
    problems = []
    if cfg.command:
        # An argv list runs without a shell (preferred); a string is a shell command line (`sh -c`): a
        # config with `alerts.command` is executable, every sensor tick that fires an alert.
        try:
            done = subprocess.run(cfg.command, shell=isinstance(cfg.command, str), input=body, text=True,
                                  capture_output=True, timeout=cfg.hook_timeout_s, check=False)
            if done.returncode:
                problems.append(f"alerts.command exited {done.returncode}: {done.stderr.strip()[:300]}")
        except (OSError, subprocess.SubprocessError) as err:
            problems.append(f"alerts.command failed: {err}")
    if cfg.webhook_url:
        req = urllib.request.Request(cfg.webhook_url, data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=cfg.hook_timeout_s) as resp:
                resp.read()
        except (urllib.error.URLError, OSError, ValueError) as err:
            problems.append(f"alerts.webhook_url {cfg.webhook_url}: {err}")
    for p in problems:
        log.warning("alert hook: %s", p)
    return problems


def markdown(alerts: Sequence[Alert]) -> str:
    if not alerts:
        return "No alert fired."
    return "\n".join(f"- **{a.name}** ({a.source}): {a.message}" for a in alerts)


def mlflow_alerts(tracking_uri: str, experiment: str, cfg: AlertsConfig, since_ms: int = 0,
                  max_runs: int = 10) -> tuple[list[tuple[str, list[Alert]]], int]:
    """Alerts of the experiment's newest runs that are still running or ended after `since_ms`, from
    their logged metric histories: ([(run_id, alerts)], the newest end time seen, ms)."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [], since_ms
    keys = (M.SWAP_RATE, M.LATENCY_MS, M.BASELINE_LATENCY_MS, M.TRAIN_DELTA_NLL_MEAN)
    out, newest = [], since_ms
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs):
        ended = run.info.end_time or 0
        if run.info.status != "RUNNING" and ended <= since_ms:
            continue
        newest = max(newest, ended)
        history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
                   for k in keys if k in run.data.metrics}
        found = evaluate_metric_history(history, cfg, f"mlflow run {run.info.run_name} ({run.info.run_id})")
        if found:
            out.append((run.info.run_id, found))
    return out, newest


# ---------------------------------------------------------------------------------------------- watching

TMP_TRACE = re.compile(r"/[.]([^/]+?)(?:[.]\d+-[0-9a-f]{8})?[.]jsonl[.]tmp$")


def alert_key(a: Alert) -> str:
    """One alert per source and name: a finished trace is the same source as its in-progress `.tmp`."""
    return TMP_TRACE.sub(lambda m: "/" + m.group(1) + ".jsonl", a.source) + "|" + a.name


def telemetry_files(traces_dir: Path, checkpoints_dir: Path) -> dict[str, int]:
    """Every trace (in-progress ones included) and JT1 trainer state → its modification time (ns)."""
    files = trace_files(traces_dir) + [ck / checkpoints.TRAINER_STATE_FILE for ck in checkpoints.list_checkpoints(checkpoints_dir, 1)]
    out = {}
    for f in files:
        try:
            out[str(f)] = f.stat().st_mtime_ns
        except FileNotFoundError:  # a .tmp trace renamed since the glob
            continue
    return out


@dataclass(frozen=True)
class AlertScan:
    """What `new_alerts` found since the last scan."""

    alerts: list[tuple[str | None, Alert]]  # (the MLflow run it came from, or None for an artifact file; alert)
    cursor: dict[str, Any]  # JSON: give it to the next scan
    changed_files: int  # telemetry files written since the last scan


def new_alerts(cfg: AlertsConfig, traces_dir: Path, checkpoints_dir: Path, cursor: dict[str, Any] | None = None,
               mlflow: tuple[str, str] | None = None) -> AlertScan:
    """The alerts not raised before `cursor` (a previous scan's; None on the first): of the traces and JT1
    checkpoints written since, and with `mlflow` = (tracking URI, experiment) of the experiment's runs still
    running or ended since. An alert already raised (same source and name, `alert_key`) is not raised again."""
    cursor = cursor or {}
    seen, raised = cursor.get("files", {}), set(cursor.get("raised", []))
    state = telemetry_files(traces_dir, checkpoints_dir)
    changed = [Path(f) for f, t in state.items() if seen.get(f) != t]
    traces = [f for f in changed if f.name != checkpoints.TRAINER_STATE_FILE]
    found = [(None, a) for f in traces
             for a in evaluate_records(read_trace(f, partial=f.name.endswith(".tmp")), cfg, str(f))]
    if len(traces) < len(changed):  # a JT1 checkpoint changed: ΔNLL across cycles
        cycles = cycle_delta_nll(checkpoints_dir)
        a = delta_nll_alert([v for _, v in cycles], cfg, str(checkpoints_dir), [f"cycle {c}" for c, _ in cycles])
        found += [(None, a)] if a else []
    mlflow_ms = cursor.get("mlflow_ms", 0)
    if mlflow is not None:
        uri, experiment = mlflow
        if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file():  # a store to read
            by_run, mlflow_ms = mlflow_alerts(uri, experiment, cfg, mlflow_ms)
            found += [(run_id, a) for run_id, run_alerts in by_run for a in run_alerts]
    new = [(run_id, a) for run_id, a in found if alert_key(a) not in raised]
    raised |= {alert_key(a) for _, a in new}
    return AlertScan(new, {"files": state, "mlflow_ms": mlflow_ms, "raised": sorted(raised)[-500:]}, len(changed))
