"""The acceptance gate over the stored evaluations (SPEC §8) and the champion it promotes."""

from __future__ import annotations

import datetime
from pathlib import Path

from mcx_core import artifacts, checkpoints
from mcx_core.artifacts import ArtifactPaths
from mcx_core.config import MegaContextConfig
from mcx_core.eval import acceptance
from mcx_core.eval.gists import read_gist_eval
from mcx_core.eval.runtime import read_runtime_eval


def acceptance_evidence(cfg: MegaContextConfig) -> dict:
    """Every SPEC §8 criterion as a gate, from the stored evaluations and training states."""

    gist = read_gist_eval(cfg)
    gates = acceptance.gist_delta_nll_gates(cfg, gist["summary"]) + acceptance.stress_gates(cfg, gist["stress"])
    for group in acceptance.runtime_gates(cfg, read_runtime_eval(cfg)["summary"]).values():
        gates += group
    jt1 = checkpoints.jt1_checkpoint(cfg)
    state = checkpoints.read_state(jt1)
    problems, _ = checkpoints.check_training_finite(jt1)
    finite_steps = float(state["global_step"]) if not problems else 0.0
    gates.append(acceptance.at_least("nan_free_steps", "JT1 steps without NaN/inf", finite_steps, cfg.acceptance.nan_free_steps))
    return {
        "gates": [g.to_dict() for g in gates],
        "passed": all(g.passed for g in gates),
        "cycle": checkpoints.final_cycle(cfg),
        "checkpoints": {"gistnet": str(jt1), "lensnet": str(checkpoints.jt2_checkpoint(cfg)), "lora": str(checkpoints.jt3_checkpoint(cfg))},
        "summary": acceptance.verdict(gates),
    }

def promote_champion(cfg: MegaContextConfig, evidence: dict) -> Path:
    """Mark the checkpoint set that passed the gate: `artifacts/champion.json` (atomic)."""

    path = ArtifactPaths.from_config(cfg).root / "champion.json"
    artifacts.write_json(path, {"promoted_at": datetime.datetime.now(datetime.UTC).isoformat(), **evidence})
    return path
