"""`python -m mcx_core.tools.readme`: README blocks regenerated from the report JSONs."""

import json

from mcx_core.tools import readme

REPORT = {"summary": [
    {"dataset": "narrative", "w_max": 128, "n_samples": 12, "delta_nll_recency_mean": 0.272,
     "delta_nll_recency_ci_lo": 0.198, "delta_nll_recency_ci_hi": 0.338, "delta_nll_gist_mean": 0.297,
     "delta_nll_gist_ci_lo": 0.238, "delta_nll_gist_ci_hi": 0.352, "gist_minus_recency_mean": 0.025,
     "gist_minus_recency_ci_lo": -0.001, "gist_minus_recency_ci_hi": 0.051, "recovery_gist": -0.091,
     "recovery_gist_ci_lo": -0.234, "recovery_gist_ci_hi": 0.003},
]}


def _project(tmp_path, body="| old | numbers |\n"):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "gist_eval.json").write_text(json.dumps(REPORT))
    md = tmp_path / "README.md"
    md.write_text(f"# Title\n\nbefore\n<!-- numbers:begin gist_eval -->\n{body}<!-- numbers:end -->\nafter\n")
    return md


def test_write_rewrites_the_block_from_the_report_and_nothing_else(tmp_path, capsys):
    md = _project(tmp_path)
    args = ["--readme", str(md), "--reports", str(tmp_path / "reports")]
    assert readme.main(args) == 3  # check only: stale
    assert "old | numbers" in md.read_text()
    assert readme.main([*args, "--write"]) == 0
    text = md.read_text()
    assert "old | numbers" not in text
    assert "| **learned gists** | 0.297 [0.238, 0.352] |" in text
    assert "| learned − recency (paired) | +0.025 [-0.001, +0.051] |" in text
    assert text.startswith("# Title\n\nbefore\n<!-- numbers:begin gist_eval -->\n") and text.endswith("<!-- numbers:end -->\nafter\n")
    assert readme.main(args) == 0  # now in sync
    assert "match" in capsys.readouterr().out


def test_missing_report_or_unknown_block_is_one_line_exit_2(tmp_path, capsys):
    md = _project(tmp_path)
    (tmp_path / "reports" / "gist_eval.json").unlink()
    assert readme.main(["--readme", str(md), "--reports", str(tmp_path / "reports"), "--write"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gist_eval.json: missing" in err
    md.write_text("<!-- numbers:begin nope -->\nx\n<!-- numbers:end -->\n")
    assert readme.main(["--readme", str(md), "--reports", str(tmp_path / "reports")]) == 2
    assert "unknown" in capsys.readouterr().err


def test_policy_block_lists_each_policy_and_the_paired_lensnet_rows():
    report = {
        "comparison": [
            {"policy": "recency", "loss_at_h": 3.344, "swap_rate": 0.0085, "expands": 0, "swaps": 0,
             "mean_residency": None, "residency_samples": 0, "age_out_collapses": 36, "utilization": 0.908,
             "latency_p50_ms": 700.0},
            {"policy": "lensnet", "loss_at_h": 3.3136, "swap_rate": 0.0141, "expands": 12, "swaps": 12,
             "mean_residency": 3.1429, "residency_samples": 7, "age_out_collapses": 36, "utilization": 0.908,
             "latency_p50_ms": 710.0},
        ],
        "paired": [{"policy": "lensnet", "versus": "recency", "difference": -0.0308, "ci_low": -0.0531,
                    "ci_high": -0.0109, "beats": True, "samples": 32}],
    }
    text = readme.policy_table(report)
    assert "| recency | 3.344 | 0.009 | 0 | 0 | — | 0 | 36 | 0.908 | 700.000 |" in text
    assert "| lensnet | 3.314 | 0.014 | 12 | 12 | 3.143 | 7 | 36 |" in text
    assert "| recency | -0.031 [-0.053, -0.011] | yes |" in text
