"""Configs: the shipped ones validate, the seed's example is a valid shape, and every error names the
YAML path of the field it is about."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mcx_core.config import ConfigError, check_files, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default", "smoke", "gpu"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert check_files(cfg, ROOT) == []
    # Acceptance thresholds come from config (SPEC §8), never from code.
    assert cfg.acceptance.delta_nll_max == pytest.approx(0.1)
    assert cfg.acceptance.swap_rate_max == pytest.approx(0.25)


def test_seed_example_is_a_valid_shape():
    cfg = load_config(ROOT / "tests" / "data" / "seed_example.yaml")
    assert cfg.dataset.splits["train"].output_path.endswith("train.arrow")
    assert cfg.base_model.dtype == "bfloat16"  # `torch_dtype` is accepted as the seed spells it
    assert cfg.gistnet.training.phases[0].objective == "pooling_mse"
    # Its files do not exist here; the file check says which field points nowhere.
    problems = check_files(cfg, ROOT)
    assert any(p.startswith("dataset.splits.train.source:") for p in problems)


def _bad(tmp_path, data) -> ConfigError:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    return err.value


def _base():
    return yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())


def test_unknown_key_names_its_path(tmp_path):
    data = _base()
    data["gistnet"]["model"]["colour"] = "red"
    err = _bad(tmp_path, data)
    assert err.problems == ["gistnet.model.colour: unknown key"]


def test_wrong_type_names_list_index(tmp_path):
    data = _base()
    data["gistnet"]["training"]["phases"][1]["max_steps"] = "many"
    err = _bad(tmp_path, data)
    assert err.problems[0].startswith("gistnet.training.phases[1].max_steps:")


def test_out_of_range_value(tmp_path):
    data = _base()
    data["gistnet"]["training"]["phases"][1]["max_steps"] = 0
    err = _bad(tmp_path, data)
    assert err.problems == ["gistnet.training.phases[1].max_steps: Input should be greater than 0"]


def test_missing_required_field(tmp_path):
    data = _base()
    del data["name"]
    assert _bad(tmp_path, data).problems == ["name: missing required field"]


def test_cross_field_rule_names_the_section(tmp_path):
    data = _base()
    data["dataset"]["context_tokens"] = 250
    err = _bad(tmp_path, data)
    assert err.problems[0].startswith("dataset:") and "multiple of block_size" in err.problems[0]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("name: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="YAML mapping"):
        parse_config(["a"])


def test_missing_model_directory_is_named(tmp_path):
    data = _base()
    data["base_model"] = {"source": "local", "path": str(tmp_path / "no_model")}
    cfg = parse_config(data)
    problems = check_files(cfg, ROOT)
    assert problems == [
        f"base_model.path: no Hugging Face model directory at {tmp_path / 'no_model'} (config.json missing)"
    ]


def test_overrides_and_flat_params():
    cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides={"runtime.steps": 11})
    assert cfg.runtime.steps == 11
    flat = cfg.flat()
    assert flat["runtime.steps"] == 11
    assert flat["working_context.eval_w_max"] == "64,96"
    assert flat["gistnet.training.phases.1.objective"] == "delta_nll"


def test_cli_validate_config_one_line_per_problem(tmp_path):
    data = _base()
    data["allocator"] = {"n_diff": -1}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    out = subprocess.run(
        [sys.executable, "-m", "mcx_cli", "validate-config", str(p)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {p}: allocator.n_diff: Input should be greater than 0"
    good = subprocess.run(
        [sys.executable, "-m", "mcx_cli", "validate-config", str(ROOT / "configs" / "smoke.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert good.returncode == 0, good.stderr
    assert "name: smoke" in good.stdout


def test_lora_training_is_its_own_section(tmp_path):
    """JT3 has its own training section: LensNet's loss weights are not accepted there."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    assert type(cfg.lora.training).__name__ == "LoRATrainingConfig"
    assert not hasattr(cfg.lora.training, "ranking_weight")
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["lora"]["training"]["ranking_weight"] = 0.5
    err = _bad(tmp_path, data)
    assert any(p.startswith("lora.training.ranking_weight") for p in err.problems), err.problems


def test_peer_w_max_defaults_to_every_eval_w_max_and_must_lie_within_it(tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    assert cfg.evaluation.peer_w_max is None
    assert cfg.evaluation.peer_w_values(cfg.working_context.eval_w_max) == [64, 96]
    data = _base()
    data["evaluation"]["peer_w_max"] = [96]
    assert parse_config(data).evaluation.peer_w_values([64, 96]) == [96]
    data["evaluation"]["peer_w_max"] = [96, 80]
    (problem,) = _bad(tmp_path, data).problems
    assert "evaluation.peer_w_max values [80] are not in working_context.eval_w_max [64, 96]" in problem
    data["evaluation"]["peer_w_max"] = [64]  # the peer gates compare at working_context.w_max (96)
    (problem,) = _bad(tmp_path, data).problems
    assert "evaluation.peer_w_max [64] must hold working_context.w_max (96)" in problem
    data["evaluation"]["peers"] = []  # no peers, no gates: any eval_w_max subset will do
    assert parse_config(data).evaluation.peer_w_max == [64]
    data["evaluation"]["peer_w_max"] = [96, 96]
    assert _bad(tmp_path, data).problems == ["evaluation.peer_w_max: names a W_max twice: [96, 96]"]
    data["evaluation"]["peer_w_max"] = []
    assert _bad(tmp_path, data).problems[0].startswith("evaluation.peer_w_max:")
