"""`mcx eval-text`: the gist evaluation on any text file, as one JSON object; bad files get one clear
line and a non-zero exit."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import shakespeare_play, untrained_checkpoint

from mcx_cli.main import main
from mcx_core.config.sections import PEER_NAMES

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "nll_full", "nll_recency", "nll_meanpool", "nll_gist", "delta_nll", "delta_nll_p95", "recovery",
    "n_samples", "w_max", "horizon", "history_tokens", "delta_nll_ci", "recovery_ci", "beats_recency", "peers",
    "beats_peers",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, smoke_config):
    """The smoke config (tiny random Llama, 256-token histories) and an untrained GistNet checkpoint."""
    root = tmp_path_factory.mktemp("evaltext")
    cfg_path = smoke_config(root)
    untrained_checkpoint(root, cfg_path)
    return root, cfg_path


def _run(args, root):
    return CliRunner().invoke(main, args, env={"MCX_HOME": str(root)})


def test_eval_text_prints_one_json_object(project):
    root, cfg = project
    text = root / "hamlet.txt"
    text.write_text(shakespeare_play(), encoding="utf-8")  # the embedded corpus: plenty for 272-token samples
    res = _run(
        ["eval-text", "--config", str(cfg), "--checkpoint", str(root / "ck"), "--text", str(text),
         "--samples", "2", "--w-max", "96", "--horizon", "8", "--json"],
        root,
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert set(out) == KEYS
    assert out["n_samples"] == 2 and out["w_max"] == 96 and out["horizon"] == 8 and out["history_tokens"] == 256
    assert out["delta_nll"] == pytest.approx(out["nll_gist"] - out["nll_full"], abs=1e-5)
    lo, hi = out["delta_nll_ci"]
    assert lo <= out["delta_nll"] + 1e-6 and out["delta_nll"] <= hi + 1e-6  # the paired interval holds the mean
    assert isinstance(out["beats_recency"], bool)
    assert out["recovery"] == pytest.approx(
        (out["nll_recency"] - out["nll_gist"]) / (out["nll_recency"] - out["nll_full"]), rel=1e-4
    )
    lo, hi = out["recovery_ci"]
    assert lo <= out["recovery"] + 1e-6 and out["recovery"] <= hi + 1e-6
    # Every peer by name, scored like the rest; StreamingLLM is the recency selection, so the same NLL.
    assert set(out["peers"]) == set(out["beats_peers"]) == set(PEER_NAMES)
    assert all(isinstance(v, float) for v in out["peers"].values())
    assert all(isinstance(v, bool) for v in out["beats_peers"].values())
    assert out["peers"]["streaming_llm"] == pytest.approx(out["nll_recency"], abs=1e-6)
    assert out["peers"]["newest"] != pytest.approx(out["nll_recency"], abs=1e-6)  # no sink: another context


def test_eval_text_table_lists_each_peer(project):
    root, cfg = project
    text = root / "hamlet.txt"
    text.write_text(shakespeare_play(), encoding="utf-8")
    res = _run(
        ["eval-text", "--config", str(cfg), "--checkpoint", str(root / "ck"), "--text", str(text),
         "--samples", "1", "--w-max", "96", "--horizon", "8"],
        root,
    )
    assert res.exit_code == 0, res.output
    for name in PEER_NAMES:
        assert f"peers.{name}" in res.output and f"beats_peers.{name}" in res.output


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        (b"", "is empty"),
        (b"\x00\x01\x02binary\x00" * 40, "binary"),
        (b"\xff\xfe\xfa not utf-8 \xc3\x28", "not UTF-8"),
        (b"Too short for a 272-token sample.", "one sample needs 272"),
    ],
)
def test_eval_text_bad_files_get_one_line_and_exit_2(project, content, expected):
    root, cfg = project
    text = root / f"bad_{abs(hash(content))}.txt"
    if content is not None:
        text.write_bytes(content)
    res = _run(["eval-text", "--config", str(cfg), "--checkpoint", str(root / "ck"), "--text", str(text), "--json"], root)
    assert res.exit_code == 2
    assert expected in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_eval_text_missing_checkpoint_names_the_path(project, tmp_path):
    root, cfg = project
    text = tmp_path / "t.txt"
    text.write_text("word " * 2000)
    res = _run(["eval-text", "--config", str(cfg), "--checkpoint", str(tmp_path / "nope"), "--text", str(text)], root)
    assert res.exit_code == 2 and str(tmp_path / "nope") in res.output
