"""Integrity: one writer per artifacts root (the project lock), per-process temp names and directory swaps,
stage records that verify their files, stages that clear what they no longer write, and checkpoints that
are validated before they are loaded (one line, exit 2, through the CLI)."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from helpers import shakespeare_play, untrained_checkpoint

from mcx_core import artifacts, checkpoints, locking
from mcx_core.artifacts import load_stage, save_stage, swap_dir, sweep_temp, temp_path, write_atomic
from mcx_core.config import load_config

HOLDER = textwrap.dedent("""
    import sys, time
    from mcx_core.locking import project_lock
    with project_lock(sys.argv[1], "holder-for-test"):
        print("held", flush=True)
        time.sleep(120)
""")


def _hold(root: Path) -> subprocess.Popen:
    """A separate process holding `root`'s lock until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()


# ---------------------------------------------------------------------------------------------- the lock


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    p = _hold(tmp_path)
    try:
        with pytest.raises(locking.ProjectLocked) as err, locking.project_lock(tmp_path, "second"):
            pass
        msg = str(err.value)
        assert f"pid {p.pid}" in msg and "holder-for-test" in msg and "since" in msg and "\n" not in msg
        t0 = time.monotonic()
        with pytest.raises(locking.ProjectLocked, match="after waiting 0.6 s"), \
                locking.project_lock(tmp_path, "second", wait_s=0.6):
            pass
        assert time.monotonic() - t0 >= 0.6
    finally:
        _kill(p)  # kill -9: the holder never releases
    dropped = []
    with locking.project_lock(tmp_path, "after the crash", on_dead=dropped.extend) as me:
        assert [h.pid for h in locking.holders(tmp_path)] == [os.getpid()] and me.command == "after the crash"
    assert [h.pid for h in dropped] == [p.pid]
    assert not (tmp_path / locking.LOCK_FILE).exists()


def test_a_waiting_writer_gets_the_lock_when_the_holder_finishes(tmp_path):
    p = _hold(tmp_path)
    killer = subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -9 {p.pid}"])
    with locking.project_lock(tmp_path, "waiter", wait_s=30):
        assert [h.command for h in locking.holders(tmp_path)] == ["waiter"]
    killer.wait()
    p.wait()


def test_the_lock_is_reentrant_for_one_process_and_one_dagster_run(tmp_path):
    with locking.project_lock(tmp_path, "cli"), locking.project_lock(tmp_path, "its in-process run", run_id="r1"):
        assert len(locking.holders(tmp_path)) == 2
    assert locking.holders(tmp_path) == []
    # Another process of the same Dagster run (a multiprocess step) joins; of another run it waits.
    code = "import sys; from mcx_core.locking import project_lock\nwith project_lock(sys.argv[1], 'step', run_id=sys.argv[2]): print('ok')"
    with locking.project_lock(tmp_path, "run worker", run_id="r1"):
        same = subprocess.run([sys.executable, "-c", code, str(tmp_path), "r1"], capture_output=True, text=True, check=False)
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path), "r2"], capture_output=True, text=True, check=False)
    assert same.returncode == 0 and same.stdout.strip() == "ok"
    assert other.returncode != 0 and "ProjectLocked" in other.stderr and "Dagster run r1" in other.stderr


def test_a_torn_lock_file_holds_nothing(tmp_path):
    (tmp_path / locking.LOCK_FILE).write_text('{"holders": [{"pid"')
    with locking.project_lock(tmp_path, "x"):
        assert len(locking.holders(tmp_path)) == 1


@pytest.fixture()
def project(tmp_path, smoke_config):
    cfg_path = smoke_config(tmp_path, artifacts=True)
    return tmp_path, cfg_path


def _mcx(args, root):
    from mcx_cli.main import main

    return CliRunner().invoke(main, args, env={"MCX_HOME": str(root), "DAGSTER_HOME": str(root / "dagster_home")})


def test_materialize_and_train_cycles_refuse_while_another_process_writes(project):
    root, cfg_path = project
    p = _hold(root / "artifacts")
    try:
        for args in (["materialize", "--config", str(cfg_path)], ["train-cycles", "--config", str(cfg_path), "--no-mlflow"]):
            res = _mcx(args, root)
            assert res.exit_code == 2, res.output
            lines = [x for x in res.output.splitlines() if x.strip()]
            assert lines[-1].startswith("error: ") and f"pid {p.pid}" in lines[-1], res.output
            assert "Traceback" not in res.output
    finally:
        _kill(p)


# ---------------------------------------------------------------------------------------------- temp names, swaps, sweeping


def test_temp_names_are_unique_per_process_and_call(tmp_path):
    a, b = temp_path(tmp_path / "x.json"), temp_path(tmp_path / "x.json")
    assert a != b and f".{os.getpid()}-" in a.name and a.name.startswith(".x.json.")
    code = "import sys; from mcx_core.artifacts import temp_path; print(temp_path(sys.argv[1]).name)"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.json")], capture_output=True, text=True, check=False)
    assert f".{os.getpid()}-" not in out.stdout


def test_a_checkpoint_rewrite_swaps_directories_and_a_failed_one_keeps_the_old(tmp_path):
    final = tmp_path / "JT1_cycle0_step3"

    def write(version):
        def fill(d):
            (d / "weights").write_text(version)
            (d / checkpoints.TRAINER_STATE_FILE).write_text("{}")
        return fill

    checkpoints.write_checkpoint(final, write("old"))

    def crash(d):
        (d / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoints.write_checkpoint(final, crash)
    assert (final / "weights").read_text() == "old"
    checkpoints.write_checkpoint(final, write("new"))
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # no temp or aside directory left


def test_swap_dir_puts_the_old_directory_back_when_the_new_cannot_move_in(tmp_path):
    final = tmp_path / "d"
    final.mkdir()
    (final / "f").write_text("old")
    with pytest.raises(OSError):
        swap_dir(tmp_path / "missing", final)
    assert (final / "f").read_text() == "old"


def test_sweep_removes_temp_files_of_dead_writers_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=False)
    pid = int(dead.stdout)
    (tmp_path / "eval").mkdir()
    orphans = [
        tmp_path / "eval" / f".baseline.parquet.{pid}-0123abcd.tmp",
        tmp_path / "eval" / f".baseline.parquet.{pid}.tmp",
        tmp_path / f".JT1_cycle0_step3.tmp-{pid}",
        tmp_path / f".plot.tmp{pid}.png",
        tmp_path / ".lensnet_doc0.jsonl.tmp",
        tmp_path / f".lensnet_doc1.{pid}-89abcdef.jsonl.tmp",
    ]
    for p in orphans:
        p.mkdir() if "JT1" in p.name else p.write_text("x")
    mine = tmp_path / f".live.json.{os.getpid()}-0123abcd.tmp"
    mine.write_text("in progress")
    keep = [tmp_path / "eval" / "baseline.parquet", tmp_path / "notes.tmp.txt", mine]
    for p in keep[:2]:
        p.write_text("x")
    assert sorted(sweep_temp(tmp_path)) == sorted(orphans)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in orphans)


def test_a_swap_killed_between_its_renames_gets_the_old_directory_back(tmp_path):
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True, check=False).stdout)
    final = tmp_path / "JT1_cycle0_step3"
    aside = tmp_path / f".{final.name}.{pid}-0123abcd.tmp.old"  # renamed aside, then kill -9
    new = tmp_path / f".{final.name}.{pid}-89abcdef.tmp"
    aside.mkdir()
    (aside / "weights").write_text("old")
    new.mkdir()
    assert sweep_temp(tmp_path) == [new]
    assert (final / "weights").read_text() == "old" and sorted(tmp_path.iterdir()) == [final]


# ---------------------------------------------------------------------------------------------- the stage cache


@pytest.fixture()
def cfg(tmp_path, smoke_config):
    return load_config(smoke_config(tmp_path, artifacts=True))


def _table(path: Path, n: int) -> Path:
    return write_atomic(path, lambda tmp: pq.write_table(pa.table({"x": list(range(n))}), tmp))


def test_a_stage_whose_file_changed_or_was_truncated_is_recomputed_and_says_why(cfg, caplog):
    out = artifacts.ArtifactPaths.from_config(cfg).eval
    table = _table(out / "t.parquet", 100)
    save_stage(cfg, "s", "fp1", {"value": 1}, [table])
    assert load_stage(cfg, "s", "fp1") == {"value": 1, "cached": True}
    assert load_stage(cfg, "s", "fp2") is None  # other inputs
    table.write_bytes(table.read_bytes()[:-40])  # truncated
    with caplog.at_level(logging.WARNING):
        assert load_stage(cfg, "s", "fp1") is None
    assert "bytes, the stage wrote" in caplog.text and "recomputing" in caplog.text
    _table(table, 101)  # rewritten by hand with other content
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_stage(cfg, "s", "fp1") is None
    result = {"value": 2}
    save_stage(cfg, "s", "fp1", result, [table])
    assert result["recomputed_because"] and "t.parquet" in result["recomputed_because"][0]
    assert load_stage(cfg, "s", "fp1") == {"value": 2, "cached": True}
    # Same size, other bytes: caught by the hash.
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF
    table.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert load_stage(cfg, "s", "fp1") is None
    assert "sha256 differs" in caplog.text


def test_a_stage_record_without_digests_or_unreadable_is_not_trusted(cfg):
    table = _table(artifacts.ArtifactPaths.from_config(cfg).eval / "t.parquet", 10)
    record = artifacts.ArtifactPaths.from_config(cfg).stages / "old.json"
    artifacts.write_json(record, {"fingerprint": "fp", "files": [str(table)], "result": {"v": 1}})
    assert load_stage(cfg, "old", "fp") is None
    record.write_text("{not json")
    assert load_stage(cfg, "old", "fp") is None


def test_a_stage_clears_files_in_its_folders_that_it_no_longer_writes(cfg):
    traces = artifacts.ArtifactPaths.from_config(cfg).traces
    first = [artifacts.write_text(traces / "runtime_eval" / f"lensnet_doc{d}.jsonl", "{}\n") for d in range(4)]
    first += [artifacts.write_text(traces / "compare" / f"{p}_doc{d}.jsonl", "{}\n")
              for p in ("recency", "random", "lensnet") for d in range(4)]
    save_stage(cfg, "runtime_eval", "fp", {}, first, owns=[traces / "runtime_eval", traces / "compare"])
    other = artifacts.write_text(traces / "mine.jsonl", "{}\n")  # not in an owned folder: kept
    rerun = [traces / "runtime_eval" / "lensnet_doc0.jsonl", traces / "compare" / "recency_doc0.jsonl"]
    save_stage(cfg, "runtime_eval", "fp2", {}, rerun, owns=[traces / "runtime_eval", traces / "compare"])
    left = sorted(p.relative_to(traces).as_posix() for p in traces.rglob("*.jsonl"))
    assert left == ["compare/recency_doc0.jsonl", "mine.jsonl", "runtime_eval/lensnet_doc0.jsonl"]
    assert other.exists() and load_stage(cfg, "runtime_eval", "fp2") == {"cached": True}


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def text_project(tmp_path_factory, smoke_config):
    root = tmp_path_factory.mktemp("integrity_ck")
    cfg_path = smoke_config(root, artifacts=True)
    untrained_checkpoint(root, cfg_path, lensnet=True)
    (root / "play.txt").write_text(shakespeare_play(20000), encoding="utf-8")
    return root, cfg_path


def _edit_config(path: Path, **changes) -> None:
    c = json.loads(path.read_text())
    for k, v in changes.items():
        if k.startswith("model."):
            c["model"][k.removeprefix("model.")] = v
        else:
            c[k] = v
    path.write_text(json.dumps(c))


W = "gistnet/gistnet.safetensors"
CORRUPTIONS = {
    "truncated weights": (lambda d: (d / W).write_bytes((d / W).read_bytes()[:500]), "not a readable safetensors"),
    "weights of random bytes": (lambda d: (d / W).write_bytes(os.urandom(4096)), "not a readable safetensors"),
    "weights missing": (lambda d: (d / W).unlink(), "is missing"),
    "config.json missing": (lambda d: (d / "gistnet/config.json").unlink(), "config.json is missing"),
    "config.json malformed": (lambda d: (d / "gistnet/config.json").write_text('{"d_model": 64,'), "not valid JSON"),
    "config.json a list": (lambda d: (d / "gistnet/config.json").write_text("[1, 2]"), "expected a JSON object"),
    "huge d_model": (lambda d: _edit_config(d / "gistnet/config.json", d_model=200000), "d_model must be an integer"),
    "d_model of another model": (lambda d: _edit_config(d / "gistnet/config.json", d_model=576), "not the base model's"),
    "shapes not the config's": (lambda d: _edit_config(d / "gistnet/config.json", **{"model.hidden_size": 16}),
                                "weights do not match"),
    "absurd layer count": (lambda d: _edit_config(d / "gistnet/config.json", **{"model.num_layers": 10**6}),
                           "gistnet"),
    "trained on another base model": (
        lambda d: (d / checkpoints.TRAINER_STATE_FILE).write_text(json.dumps({"base_model": {"id": "embedded_gguf:smollm2"}})),
        "was trained on base model embedded_gguf:smollm2"),
    "trainer state malformed": (lambda d: (d / checkpoints.TRAINER_STATE_FILE).write_text("{"), "not a valid trainer state"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_one_line_and_exit_2(text_project, tmp_path, case):
    import shutil

    root, cfg_path = text_project
    ck = tmp_path / "ck"
    shutil.copytree(root / "ck", ck)
    corrupt, expected = CORRUPTIONS[case]
    corrupt(ck)
    for cmd in (["eval-text", "--samples", "1"], ["run", "--steps", "1", "--trace", str(tmp_path / "t.jsonl")]):
        res = _mcx([*cmd, "--config", str(cfg_path), "--checkpoint", str(ck), "--text", str(root / "play.txt")], root)
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert res.exit_code == 2, (case, cmd[0], res.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (case, res.output)
    assert not (tmp_path / "t.jsonl").exists()


def test_a_valid_checkpoint_loads_with_the_same_weights(text_project):
    from mcx_core.compression.gistnet import Gister, load_gister
    from mcx_core.model.base import load_base_model

    root, cfg_path = text_project
    cfg = load_config(cfg_path)
    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    a = load_gister(root / "ck", lm)
    b = Gister.from_pretrained(root / "ck" / "gistnet")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_corrupt_lora_adapter_is_one_line(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{")
    with pytest.raises(checkpoints.CheckpointError, match="not valid JSON"):
        checkpoints.check_adapter(tmp_path, "adapter_config.json")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (tmp_path / "adapter_model.safetensors").write_bytes(os.urandom(100))
    with pytest.raises(checkpoints.CheckpointError, match="not a readable safetensors"):
        checkpoints.check_adapter(tmp_path, "adapter_config.json")
