"""`mcx ablate`: the ablation file is validated with clear errors, variants are compared to the first on
the same samples (paired), and the CLI exits 2 on bad input."""

import pytest
from click.testing import CliRunner

from mcx_cli.main import main
from mcx_core.config import ConfigError
from mcx_core.eval import ablation as A


def _write(tmp_path, text):
    p = tmp_path / "abl.yaml"
    p.write_text(text)
    return p


def test_spec_rejects_dataset_overrides_and_unknown_keys(tmp_path):
    bad = _write(tmp_path, "base: configs/default.yaml\nbudget_seconds: 10\nvariants:\n  a: {dataset.horizon: 8}\n")
    with pytest.raises(ConfigError) as err:
        A.load_spec(bad)
    assert "variants.a.dataset.horizon" in err.value.problems[0]
    typo = _write(tmp_path, "base: x.yaml\nbudget_second: 10\nvariants: {a: {}}\n")
    with pytest.raises(ConfigError) as err:
        A.load_spec(typo)
    assert any("budget_second" in p for p in err.value.problems)


def test_the_shipped_ablation_file_is_valid():
    spec = A.load_spec("configs/ablation.yaml")
    assert next(iter(spec.variants)) == "base" and spec.budget_seconds > 0
    for name in spec.variants:  # every variant is a valid config
        A.variant_config(spec, name, ".")


def test_variants_are_compared_with_the_first_on_the_same_samples():
    rows = [
        {"variant": "base", "dataset": "d", "gist_nll_by_sample": {"s1": 2.0, "s2": 3.0, "s3": 2.5, "s4": 2.2}},
        {"variant": "better", "dataset": "d", "gist_nll_by_sample": {"s1": 1.5, "s2": 2.4, "s3": 2.0, "s4": 1.8}},
        {"variant": "same", "dataset": "d", "gist_nll_by_sample": {"s1": 2.1, "s2": 2.9, "s3": 2.6, "s4": 2.1}},
    ]
    A.versus_first(rows, "base")
    better, same = rows[1], rows[2]
    assert better["minus_first_mean"] == pytest.approx(-0.5, abs=0.01) and better["minus_first_ci_hi"] < 0
    assert same["minus_first_ci_lo"] < 0 < same["minus_first_ci_hi"]
    assert rows[0]["minus_first_mean"] == 0.0


def test_cli_errors_exit_2_with_one_line(tmp_path):
    r = CliRunner().invoke(main, ["ablate", "--config", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "ablation file not found" in r.output
    p = _write(tmp_path, "base: configs/default.yaml\nbudget_seconds: 10\nvariants: {a: {}}\n")
    r = CliRunner().invoke(main, ["ablate", "--config", str(p), "--only", "nope"])
    assert r.exit_code == 2 and "no variant nope" in r.output
