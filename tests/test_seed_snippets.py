"""The seed's post-hoc snippets (Telemetry.md: Workflows 1-3, Scenarios 2 and 4), extracted from the
seed page and run unchanged, like notebook cells in one namespace, with the artifacts folder as the
working directory. The artifacts come from real parts: a tiny random model streamed through the
runtime engine (per-step trace -> the per-action table `traces/run_001.jsonl`) and one sweep
partition upserted into `deltas/eval_sweep.parquet`.

What the cells take from the notebook around them (they use names they never import): `pd` (Workflow
1's `import pandas as pd`), `plt`, `sns`,
and for Workflow 3 an `engine` with the seed's one-argument `step(tokens)` — the real
`MegaContextEngine`, its `step(new_tokens, horizon)` fed from one token window (first `refocus_every`
tokens new, the rest the horizon)."""

import re
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pyarrow.parquet as pq

from mcx_core import data
from mcx_core.compression.gistnet import Gister
from mcx_core.config import load_config
from mcx_core.eval import sweep
from mcx_core.focus.engine import MegaContextEngine, run_engine
from mcx_core.focus.policies import RandomPolicy
from mcx_core.model.base import load_base_model
from mcx_core.telemetry.actions import write_run_action_tables
from mcx_core.telemetry.schemas import validate_artifacts

SEED = Path("/work/shared/seed/Telemetry.md")  # the seed page, where this machine has it
TELEMETRY_MD = Path(__file__).parent / "data" / "Telemetry.md"  # its copy, committed unchanged
SNIPPETS = {  # heading in the seed page -> the first python block under it
    "workflow1": "#### 1. Residency Histogram Analysis",
    "workflow2": "#### 2. ΔNLL vs Compression Scatter",
    "workflow3": "#### 3. Latency Breakdown Profiling",
    "scenario2": "### Scenario 2: Allocator Oscillation",
    "scenario4": "### Scenario 4: Latency Spikes",
}



def snippet(name: str) -> str:
    text = TELEMETRY_MD.read_text(encoding="utf-8")
    after = text[text.index(SNIPPETS[name]) :]
    return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)


class SeedEngine:
    """The real engine behind the seed's `engine.step(tokens)`: `tokens` = R new tokens + H horizon."""

    def __init__(self, engine: MegaContextEngine, refocus_every: int):
        self.engine, self.R = engine, refocus_every

    def step(self, tokens):
        return self.engine.step(tokens[: self.R], tokens[self.R :])


@pytest.fixture(scope="module")
def project(tmp_path_factory, smoke_config):
    root = tmp_path_factory.mktemp("seed")
    cfg = load_config(smoke_config(root, artifacts=True))
    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    torch.manual_seed(0)
    gister = Gister(lm.d_model, cfg.gistnet.model).eval()
    R, H = cfg.runtime.refocus_every, cfg.dataset.horizon
    ids = torch.randint(0, 1000, (256 + R * 24 + H,))
    traces = root / "artifacts" / "traces"
    run_engine(cfg, lm, gister, RandomPolicy(0), ids, 24, None, traces / "runtime_eval" / "random_doc0.jsonl",
               prefill=256)
    tables = write_run_action_tables(traces)
    data.build_block_datasets(cfg, lm.tokenizer, progress=False)
    w = cfg.working_context.w_max
    rows = sweep.run_sweep_partition(cfg, lm, gister, w, "narrative", "ck-test", progress=False)
    sweep.write_sweep_table(rows, sweep.sweep_table_path(cfg))
    engine = SeedEngine(MegaContextEngine(cfg, lm, gister, RandomPolicy(1), None, ids[:256]), R)
    return {"root": root, "cfg": cfg, "tables": tables, "engine": engine, "tokens": ids[256 : 256 + R + H]}


@pytest.fixture
def notebook(project, monkeypatch):
    import pandas as pd
    import seaborn as sns

    monkeypatch.chdir(project["root"])
    ns = {"pd": pd, "plt": plt, "sns": sns, "engine": project["engine"], "tokens": project["tokens"]}
    yield ns
    plt.close("all")


def run(name: str, ns: dict) -> dict:
    exec(compile(snippet(name), f"Telemetry.md:{name}", "exec"), ns)  # noqa: S102  (the seed's own code, verbatim)
    return ns


def test_the_copy_is_the_seed_page_unchanged():
    if SEED.is_file():
        assert TELEMETRY_MD.read_bytes() == SEED.read_bytes()
    assert set(SNIPPETS) and all(snippet(name).strip() for name in SNIPPETS)


def test_the_action_table_is_the_seeds_run_file_and_passes_its_schema(project):
    assert [p.name for p in project["tables"]] == ["run_001.jsonl"]
    problems, counts = validate_artifacts(project["root"] / "artifacts")
    assert problems == []
    assert counts["action_tables"] == 1 and counts["traces"] == 1 and counts["sweep_tables"] == 1
    assert counts["delta_tables"] == 0  # the sweep table is its own kind, not a delta table


def test_workflow1_residency_per_block(notebook):
    ns = run("workflow1", dict(notebook))
    traces, residencies = ns["traces"], ns["residencies"]
    assert {"step", "block_id", "level", "action", "expanded", "latency_ms"} <= set(traces.columns)
    assert len(traces) > 0 and set(traces["action"]) <= {1, -1}
    assert len(residencies) > 0 and (residencies > 0).all()  # steps between two actions on one block


def test_workflow2_delta_nll_vs_compression(notebook):
    ns = run("workflow2", dict(notebook))
    df = ns["df"]
    assert (df["compression_ratio"] > 1).all()
    assert (df["delta_nll"] == df["delta_nll_gist"]).all()
    assert len(plt.gca().collections) > 0  # the scatter was drawn


def test_workflow3_profiles_one_engine_step(notebook, capsys):
    run("workflow3", dict(notebook))
    assert "Self CPU" in capsys.readouterr().out


def test_scenario2_oscillators_and_scenario4_latency(notebook, project):
    ns = run("scenario2", dict(notebook))
    traces = ns["traces"]
    # the filter keeps exactly the blocks whose action sequence flips more than once (|diff| 2 per flip)
    flips = traces.groupby("block_id")["action"].apply(lambda a: (a.diff().abs() > 0).sum())
    assert set(ns["oscillators"]["block_id"]) == set(flips[flips >= 2].index)
    ns = run("scenario4", ns)
    assert (ns["traces"]["num_candidates"] >= 1).all()  # every row is an action of its step
    assert list(ns["high_latency"][ns["cols"]].corr().columns) == ["num_candidates", "latency_ms"]


def test_sweep_table_carries_the_seeds_columns(project):
    schema = pq.read_schema(sweep.sweep_table_path(project["cfg"]))
    assert {"compression_ratio", "delta_nll", "dataset", "w_max"} <= set(schema.names)
