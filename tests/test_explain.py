"""`mcx explain` and `mcx_core.tools.explain`: LensNet's focus over a text at one cursor, as tables, a
highlighted HTML text and a heatmap; and MLflow system metrics for a run with `system_metrics=True`."""

import html
import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import shakespeare_play

from mcx_cli.telemetry import explain
from mcx_core.compression.gistnet import Gister
from mcx_core.config import load_config
from mcx_core.focus.lensnet import LensNet
from mcx_core.model.base import load_base_model
from mcx_core.tools.explain import explain_text, render_html, render_markdown

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, smoke_config):
    root = tmp_path_factory.mktemp("mcxexplain")
    cfg_path = smoke_config(root, artifacts=True)
    cfg = load_config(cfg_path)
    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    torch.manual_seed(0)
    gister, lensnet = Gister(lm.d_model, cfg.gistnet.model), LensNet(lm.d_model, cfg.lensnet.model)
    with torch.no_grad():  # an untrained head scores ~0.01: make the scores spread so ordering is tested
        lensnet.head.weight.normal_(std=0.5)
    gister.save_pretrained(root / "ck" / "gistnet")
    lensnet.save_pretrained(root / "ck" / "lensnet")
    text = shakespeare_play(6000)
    (root / "play.txt").write_text(text, encoding="utf-8")
    ids = torch.as_tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return root, cfg_path, cfg, lm, gister.eval(), lensnet.eval(), ids


@pytest.fixture(scope="module")
def result(project):
    _, _, cfg, lm, gister, lensnet, ids = project
    return explain_text(cfg, lm, gister, lensnet, ids[:1000], w_max=96, top_k=5)


def test_entries_cover_the_history_up_to_the_cursor_contiguously(project, result):
    cfg = project[2]
    assert result["cursor"] == 1000 - cfg.dataset.horizon
    ends = [0] + [e["end"] for e in result["entries"]]
    assert [e["start"] for e in result["entries"]] == ends[:-1]  # no gap, no overlap
    assert ends[-1] == result["cursor"]  # nothing past the cursor, nothing missing before it
    assert all(e["end"] <= result["cursor"] for e in result["entries"])
    assert result["cost"] == result["sink_tokens"] + sum(e["cost"] for e in result["entries"]) <= result["w_max"] == 96
    assert result["sink_tokens"] == cfg.working_context.sink_tokens  # the attention sink is counted in the budget
    assert any(e["level"] > 0 for e in result["entries"])  # 984 tokens in 96 positions: gists exist
    assert result["causality_violations"] == 0


def test_scores_are_bounded_and_spread_and_text_matches_the_tokens(project, result):
    lm, ids = project[3], project[6]
    scores = [e["score"] for e in result["entries"]]
    assert all(-1 <= s <= 1 for s in scores)
    assert max(scores) - min(scores) > 0.05
    for e in result["entries"][:3] + result["entries"][-3:]:
        assert e["text"] == lm.tokenizer.decode(ids[e["start"] : e["end"]].tolist())
        assert e["span_id"] and e["snippet"]


def test_top_k_is_ordered_by_score_expand_gists_collapse_lowest(result):
    entries, expand, collapse = result["entries"], result["expand"], result["collapse"]
    gist_scores = sorted((e["score"] for e in entries if e["level"] > 0), reverse=True)
    assert len(expand) == min(5, len(gist_scores)) and len(collapse) == 5
    assert [e["score"] for e in expand] == gist_scores[: len(expand)]
    assert all(e["level"] > 0 for e in expand)
    assert [e["score"] for e in collapse] == sorted(e["score"] for e in entries)[:5]
    for e in expand + collapse:
        assert entries[e["i"]]["span_id"] == e["span_id"] and entries[e["i"]]["score"] == e["score"]


def test_query_at_moves_the_cursor_and_is_validated(project):
    _, _, cfg, lm, gister, lensnet, ids = project
    r = explain_text(cfg, lm, gister, lensnet, ids[:1000], w_max=96, query_at=300, top_k=3)
    assert r["cursor"] == 300 and r["entries"][-1]["end"] == 300 and len(r["collapse"]) == 3
    with pytest.raises(ValueError, match="outside"):
        explain_text(cfg, lm, gister, lensnet, ids[:100], query_at=101)


def test_html_has_every_span_with_its_score_and_markdown_marks_the_top(result):
    page = render_html(result)
    for e in result["entries"]:
        assert f'data-span="{e["span_id"]}" data-score="{e["score"]:.6f}"' in page
        assert f"score {e['score']:+.4f}" in page
        assert html.escape(e["text"]) in page
    assert page.count('<span class="e ') == len(result["entries"])
    md = render_markdown(result)
    top = result["expand"][0]
    assert top["span_id"] in md and f"⟦▲{top['score']:+.2f}" in md
    marked_low = [e for e in result["collapse"] if e["score"] < 0]
    assert md.count("⟦▼") == len(marked_low)  # only negative scores are marked for collapse
    assert md.count("⟦▲") == len([e for e in result["expand"] if e["score"] > 0]) >= 1


def _explain(project, *args, checkpoint=None):
    """`mcx explain` on the project's config, checkpoint (or `checkpoint`) and play.txt, then `args`."""
    root, cfg_path = project[0], project[1]
    checkpoint = checkpoint or root / "ck"
    paths = ["--config", str(cfg_path), "--checkpoint", str(checkpoint), "--text", str(root / "play.txt")]
    return CliRunner().invoke(explain, [*paths, *args], env={"MCX_HOME": str(root)})


def test_cli_writes_the_reports_and_prints_the_top_spans(project):
    root = project[0]
    res = _explain(project, "--w-max", "96", "--at", "640", "--top", "3")
    assert res.exit_code == 0, res.output
    out = root / "artifacts" / "reports" / "explain"
    for name in ("explain.md", "explain.html", "explain.png", "explain.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "explain.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "explain.json").read_text())
    assert saved["cursor"] == 640 and len(saved["expand"]) == 3
    assert "expand" in res.output and "collapse" in res.output
    for e in saved["expand"] + saved["collapse"]:
        assert f"{e['score']:+.3f}" in res.output and e["span_id"] in res.output


def test_cli_json_and_out(project, tmp_path):
    res = _explain(project, "--top", "2", "--out", str(tmp_path / "rep"), "--json")
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output.strip().splitlines()[-1])
    assert len(payload["collapse"]) == 2 and Path(payload["files"]["html"]).parent == tmp_path / "rep"


def test_cli_missing_checkpoint_and_bad_cursor_are_one_line_errors(project, tmp_path):
    res = _explain(project, checkpoint=tmp_path / "nope")
    assert res.exit_code == 2 and "not a JT2 checkpoint" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = _explain(project, "--at", "10000000", "--out", str(tmp_path / "rep"))
    assert res.exit_code == 2 and "outside" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()


def test_mlflow_sink_logs_system_metrics_to_its_own_store(tmp_path, monkeypatch):
    import mlflow

    from mcx_core.telemetry.mlflow_sink import MLflowSink

    monkeypatch.chdir(tmp_path)  # a monitor writing to the default store would land here, not in the run's
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    assert mlflow.system_metrics.MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() == 0.2
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    sink = MLflowSink.start(
        uri, "sysmetrics", "r", artifact_location=(tmp_path / "art").as_uri(), system_metrics=True
    )
    time.sleep(1.0)
    sink.end()
    keys = set(sink.client.get_run(sink.run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
    assert len(sink.metric_history("system/cpu_utilization_percentage")) >= 2  # sampled while running
    assert not (tmp_path / "mlflow.db").exists()
