"""Data-parallel training through accelerate (mcx_core.training.distributed).

One process: every helper is what the trainers did before (same gradients, same rows, nothing reduced),
and checkpoints record world_size 1. Two CPU processes (`accelerate launch --multi_gpu --num_processes 2`
with no GPU visible: torchrun + gloo): one smoke cycle writes one set of JT1/JT2/JT3 checkpoints that
record world_size 2, every rank ends with the same trained parameters (per-rank checksums in each
trainer_state.json: they differ when gradients are not averaged), and the trained weights differ from a
one-process run (the ranks trained on different samples).
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mcx_core import checkpoints
from mcx_core.training import common, distributed

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"


# ---------------------------------------------------------------------------------------------- one process


def test_one_process_is_the_plain_single_process_loop():
    assert distributed.world_size() == 1 and distributed.process_index() == 0 and distributed.is_main_process()
    with distributed.main_process_first():
        distributed.wait_for_everyone()
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    opt_a, opt_b = torch.optim.AdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    # plain: zero_grad, backward, clip
    opt_a.zero_grad(set_to_none=True)
    a(x).pow(2).mean().backward()
    plain_norm = float(torch.nn.utils.clip_grad_norm_(a.parameters(), 0.1))
    norm = distributed.backward_step(b(x).pow(2).mean(), opt_b, b.parameters(), 0.1)
    assert norm == plain_norm
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)
    # a non-finite loss: no backward, NaN norm, gradients untouched
    assert math.isnan(distributed.backward_step(b(x).sum() * math.nan, opt_b, b.parameters(), 0.1))
    assert torch.equal(next(a.parameters()).grad, next(b.parameters()).grad)
    metrics = {"train/loss": 1.5, "note": "x"}
    assert distributed.reduce_metrics(metrics, sum_keys=["train/loss"]) == metrics
    fields = distributed.state_fields(4, b.parameters())
    assert fields["world_size"] == 1 and fields["effective_batch_size"] == 4
    assert fields["replica_checksums"] == [distributed.parameters_checksum(b.parameters())]
    assert fields["replicas_in_sync"]


def test_rank_rows_slice_one_permutation():
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(10, generator=g)
    assert torch.equal(distributed.rank_rows(perm, 4, 0), perm[:4])  # rank 0 = what one process took
    r0, r1 = distributed.rank_rows(perm, 4, 0), distributed.rank_rows(perm, 4, 1)
    assert not set(r0.tolist()) & set(r1.tolist())  # disjoint while the candidates last
    assert len(distributed.rank_rows(perm, 4, 2)) == 4  # then it wraps around
    assert torch.equal(distributed.rank_rows(perm[:3], 8, 1), perm[:3])  # b = min(batch, n)


@pytest.mark.parametrize("sample_step", [common.sample_step])
def test_rank_zero_draws_the_single_process_batch(sample_step):
    one = sample_step(7, 5, 20, 3, [64, 96, 128])
    r0 = sample_step(7, 5, 20, 3, [64, 96, 128], rank=0, world=2)
    r1 = sample_step(7, 5, 20, 3, [64, 96, 128], rank=1, world=2)
    assert torch.equal(one[0], r0[0]) and one[1] == r0[1]
    assert not set(r0[0].tolist()) & set(r1[0].tolist())


def test_checkpoint_records_world_size_one(tmp_path):
    module = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(module.parameters())
    sched = common.make_scheduler(opt, 1, 3)

    class Cfg:
        def to_yaml(self):
            return "name: t\n"

    state = {"step": 1, **distributed.state_fields(2, module.parameters())}
    ck = checkpoints.save_jt_checkpoint(tmp_path, 2, 0, 1, {}, opt, sched, Cfg(), state)
    saved = checkpoints.read_state(ck)
    assert saved["world_size"] == 1 and saved["effective_batch_size"] == 2 and saved["replicas_in_sync"]


# ---------------------------------------------------------------------------------------------- two processes


def _cycle(cfg: Path, processes: int) -> tuple[subprocess.CompletedProcess, float]:
    """One smoke cycle through the CLI; with processes > 1 under `accelerate launch` on CPU processes.
    (`accelerate launch --cpu` starts one process unless mpirun is set up; `--multi_gpu` with no GPU
    visible runs torchrun with gloo, i.e. MULTI_CPU.)"""
    root = cfg.parent
    cli = ["-m", "mcx_cli", "train-cycles", "--config", str(cfg), "--cycles", "1", "--no-mlflow", "--no-progress"]
    if processes > 1:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *cli]
    else:
        cmd = [sys.executable, *cli]
    env = {**os.environ, "MCX_HOME": str(root), "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    return done, time.perf_counter() - t0


def _states(root: Path) -> dict[str, dict]:
    """The final checkpoint of each trainer: name prefix -> trainer_state.json."""
    where = root / "artifacts" / "checkpoints"
    out = {}
    for phase in (1, 2, 3):
        ck = checkpoints.latest_checkpoint(where, phase, 0)
        assert ck is not None, f"no JT{phase} checkpoint in {where}"
        out[f"JT{phase}"] = {"name": ck.name, **checkpoints.read_state(ck)}
    return out


def test_two_cpu_processes_train_one_model_data_parallel(tmp_path, smoke_config):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    done, seconds = _cycle(smoke_config(two, artifacts=True), 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    print(f"2-process smoke cycle: {seconds:.1f} s")

    where = two / "artifacts" / "checkpoints"
    assert not list(where.glob(".*tmp*")), "a checkpoint write was left half done"
    assert not (two / "artifacts" / "rank1").exists()  # one shared artifacts directory, no seed replicas
    states = _states(two)
    smoke = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    batch = {"JT1": smoke["gistnet"]["training"]["batch_size"], "JT2": smoke["lensnet"]["training"]["batch_size"],
             "JT3": smoke["lora"]["training"]["batch_size"]}
    for name, state in states.items():
        assert state["world_size"] == 2, name
        assert state["effective_batch_size"] == 2 * batch[name], name
        # every rank ended with the same trained parameters: gradients were averaged over ranks
        assert len(state["replica_checksums"]) == 2 and state["replicas_in_sync"], (name, state["replica_checksums"])
    record = json.loads((two / "artifacts" / "cycles" / "cycle0.json").read_text())
    assert {k: Path(v).name for k, v in record["checkpoints"].items()} == {
        "jt1": states["JT1"]["name"], "jt2": states["JT2"]["name"], "jt3": states["JT3"]["name"]
    }

    # One process on the same config: world_size 1, and other weights (the two ranks saw other samples).
    done, _ = _cycle(smoke_config(one, artifacts=True), 1)
    assert done.returncode == 0, done.stderr[-6000:]
    single = _states(one)
    for name, state in single.items():
        assert state["world_size"] == 1 and state["effective_batch_size"] == batch[name]
        assert state["name"] == states[name]["name"]  # the same steps
    assert single["JT1"]["replica_checksums"][0] != states["JT1"]["replica_checksums"][0]
