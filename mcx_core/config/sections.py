"""The config's sections: pydantic models that mirror the YAML files in `configs/` one to one, and
the project root their relative paths resolve against."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

EMBEDDED_SOURCES = ("embedded:shakespeare", "embedded:stdlib")


def project_root(root: str | os.PathLike | None = None) -> Path:
    """The one resolver of the project root: `root` when given, else the working directory. Entry
    points (the `mcx` CLI, the Dagster code location) decide it and pass it to `load_config`."""
    return Path(root if root else os.getcwd()).resolve()


def resolve_path(p: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    """`p` itself when absolute, else `p` under the project root `root`."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else project_root(root) / path


# Any integer in a config is at most this (a size of 2**70 fails here, not minutes into a run).
INT_MAX = 2**31 - 1


class Section(BaseModel):
    """Every config section: unknown keys refused, ints and bools strict (`horizon: true` and `steps: 2.5`
    are errors, not 1 and 2), NaN/inf refused in every float, every int at most `INT_MAX`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_ints(cls, v: Any) -> Any:
        values = v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else [v]
        for x in values:
            if isinstance(x, int) and not isinstance(x, bool) and abs(x) > INT_MAX:
                raise ValueError(f"{x} is out of range (at most {INT_MAX})")
        return v


def _divides(section: str, hidden: int, heads: int) -> None:
    if hidden % heads:
        raise ValueError(f"{section}.hidden_size ({hidden}) must be divisible by {section}.num_heads ({heads})")


# ---------------------------------------------------------------------------------------------- dataset


class CorpusConfig(Section):
    """One corpus: an embedded one (`embedded:shakespeare`, `embedded:stdlib`) or a file glob."""

    source: str
    kind: Literal["narrative", "code", "recall"] = "narrative"
    max_documents: int | None = Field(default=None, gt=0)
    strip_gutenberg: bool = True


class SplitSource(Section):
    """The seed document's explicit split form: one file glob per split."""

    source: str
    output_path: str | None = None


class DatasetConfig(Section):
    dataset_name: str = "megacontext"
    tokenizer: str = Field(default="auto", description="'auto' = the base model's tokenizer, or a local dir")
    block_size: int = Field(default=32, gt=0, le=4096)
    context_tokens: int = Field(default=1024, gt=0, le=2**24)
    horizon: int = Field(default=64, gt=0, le=2**20)
    stride_tokens: int | None = Field(default=None, gt=0, description="default: one whole sample")
    min_document_tokens: int | None = Field(default=None, gt=0, description="default: one sample")
    corpora: dict[str, CorpusConfig] = Field(default_factory=dict)
    splits: dict[str, SplitSource] = Field(default_factory=dict)
    split_fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    max_samples_per_split: dict[str, int] = Field(default_factory=dict)
    output_dir: str = "artifacts/datasets"

    @property
    def sample_tokens(self) -> int:
        return self.context_tokens + self.horizon

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        if self.context_tokens % self.block_size:
            raise ValueError(
                f"context_tokens ({self.context_tokens}) must be a multiple of block_size ({self.block_size})"
            )
        if self.stride_tokens is not None and self.stride_tokens % self.block_size:
            raise ValueError(f"stride_tokens must be a multiple of block_size ({self.block_size})")
        if not self.corpora and not self.splits:
            raise ValueError("give at least one corpus under `corpora` or explicit `splits`")
        if self.corpora:
            total = sum(self.split_fractions.values())
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"split_fractions must sum to 1 (got {total:g})")
            if any(v < 0 for v in self.split_fractions.values()):
                raise ValueError("split_fractions must be >= 0")
        if any(v <= 0 for v in self.max_samples_per_split.values()):
            raise ValueError("max_samples_per_split values must be > 0")
        return self


# ---------------------------------------------------------------------------------------------- models


class TinyModelConfig(Section):
    """A randomly initialised Llama for tests: seconds, not minutes."""

    hidden_size: int = Field(default=64, gt=0, le=16384)
    num_layers: int = Field(default=2, gt=0, le=256)
    num_heads: int = Field(default=4, gt=0, le=1024)
    intermediate_size: int = Field(default=128, gt=0, le=65536)
    max_position_embeddings: int = Field(default=4096, gt=0, le=2**24)

    @model_validator(mode="after")
    def _heads(self):
        _divides("base_model.tiny", self.hidden_size, self.num_heads)
        return self


class BaseModelConfig(Section):
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    source: Literal["embedded_gguf", "local", "tiny_random"] = "embedded_gguf"
    path: str | None = Field(default=None, description="local Hugging Face model directory (source=local)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(default="float32", alias="torch_dtype")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_name: str | None = None
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    cache_dir: str = ".cache/models"

    @model_validator(mode="after")
    def _check(self) -> BaseModelConfig:
        if self.source == "local" and not self.path:
            raise ValueError("source 'local' needs `path` (a local Hugging Face model directory)")
        return self


class PhaseConfig(Section):
    name: str
    objective: Literal["pooling_mse", "reconstruction", "delta_nll"]
    max_steps: int = Field(gt=0)
    max_seconds: float | None = Field(
        default=None, gt=0, description="also end the phase after this many seconds of training (ablations)"
    )
    lr: float | None = Field(default=None, gt=0)
    kl_weight: float = Field(default=0.0, ge=0, description="delta_nll: weight of KL(teacher || student) on the horizon")
    lod2_weight: float = Field(default=0.5, ge=0, description="delta_nll: weight of the 1024x LOD2 stress context")
    horizon_weighting: float = Field(
        default=0.0, ge=0,
        description="delta_nll: weight horizon tokens by 1 + this * (recency NLL - teacher NLL)+ / its mean "
        "(0 = uniform): tokens the full history helps count more",
    )
    blocks_per_step: int = Field(default=16, gt=0, description="reconstruction: blocks per step")


class GistNetModelConfig(Section):
    hidden_size: int | Literal["auto"] = Field(default="auto", description="'auto' = the base model's hidden size")
    block_size: int = Field(default=32, gt=0, le=4096)
    num_heads: int = Field(default=4, gt=0, le=1024)
    num_layers: int = Field(default=2, gt=0, le=256)
    ffn_mult: int = Field(default=4, gt=0, le=64)
    pooling: Literal["query", "cls", "mean"] = "query"
    dropout: float = Field(default=0.0, ge=0, lt=1)
    share_levels: bool = Field(default=False, description="one module for LOD1 and LOD2")
    input_layers: int = Field(
        default=0, ge=0,
        description="LOD1 GistNet reads the base model's residual stream after this many layers, each block "
        "run alone, beside the token embeddings (0 = token embeddings only)",
    )

    @model_validator(mode="after")
    def _levels(self):
        if self.hidden_size != "auto":
            if not 0 < self.hidden_size <= 16384:
                raise ValueError(f"hidden_size must be 'auto' or in 1..16384 (got {self.hidden_size})")
            _divides("gistnet.model", self.hidden_size, self.num_heads)
        if self.share_levels and self.input_layers:
            raise ValueError("share_levels needs input_layers 0: LOD1 reads base-model states, LOD2 reads gists")
        return self


class TrainingConfig(Section):
    batch_size: int = Field(default=4, gt=0)
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    log_every: int = Field(default=1, gt=0)
    checkpoint_every: int = Field(default=0, ge=0, description="0 = only at the end of a phase")


class GistNetTrainingConfig(TrainingConfig):
    phases: list[PhaseConfig] = Field(
        default_factory=lambda: [
            PhaseConfig(name="pooling-pretrain", objective="pooling_mse", max_steps=50),
            PhaseConfig(name="substitution", objective="delta_nll", max_steps=100),
        ]
    )
    gists_per_sample: int | Literal["all"] = "all"
    sample_pool: int = Field(default=64, gt=0, description="JT1 trains on this many samples (teacher NLL cached)")
    teacher_top_k: int = Field(
        default=32, gt=0, description="KL targets: the teacher's top-k horizon log-probs kept per token"
    )
    teacher_shard_size: int = Field(default=8, gt=0, description="samples per teacher-cache shard")
    val_every: int = Field(
        default=20, ge=0, description="JT1's validation curve: held-out ΔNLL on the val split every this many steps "
        "(also at the start and at each phase's end); 0 = none",
    )
    val_samples: int = Field(default=2, gt=0, description="val-split samples the validation curve scores (split "
                             "evenly over the corpora)")
    max_seconds: float | None = Field(
        default=None, gt=0, description="end JT1 after this many seconds of training steps, all phases together "
        "(the teacher pass not counted): equal wall-clock budgets for ablations",
    )


class GistNetConfig(Section):
    model: GistNetModelConfig = Field(default_factory=GistNetModelConfig)
    training: GistNetTrainingConfig = Field(default_factory=GistNetTrainingConfig)


class LensNetModelConfig(Section):
    hidden_size: int = Field(default=128, gt=0, le=16384)
    num_layers: int = Field(default=2, gt=0, le=256)
    num_heads: int = Field(default=4, gt=0, le=1024)
    tail_gists: int = Field(default=4, ge=0)

    @model_validator(mode="after")
    def _heads(self):
        _divides("lensnet.model", self.hidden_size, self.num_heads)
        return self


class LensNetTrainingConfig(TrainingConfig):
    max_steps: int = Field(default=200, gt=0)
    ranking_weight: float = Field(default=0.5, ge=0)
    budget_weight: float = Field(default=0.1, ge=0)
    legality_weight: float = Field(default=1.0, ge=0)
    holdout_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="JT2: share of delta-table sample_ids held out for evaluation"
    )
    utility_floor: float = Field(
        default=0.01, gt=0, description="JT2: utilities are divided by max(max |utility| of the context, this)"
    )


class LensNetConfig(Section):
    model: LensNetModelConfig = Field(default_factory=LensNetModelConfig)
    training: LensNetTrainingConfig = Field(default_factory=LensNetTrainingConfig)


class LoRATrainingConfig(TrainingConfig):
    """JT3: the adapter trained on Loss@H over LensNet + allocator-chosen working contexts."""

    max_steps: int = Field(default=50, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    warmup_steps: int = Field(default=2, ge=0)


class LoRAConfig(Section):
    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    training: LoRATrainingConfig = Field(default_factory=LoRATrainingConfig)
    refocus_steps: int = Field(
        default=4,
        gt=0,
        description="JT3: LensNet + allocator steps (runtime.refocus_every tokens each) that end at a sample's "
        "cursor and choose its working context; voluntary actions need min_residency + 1 steps",
    )
    without_adapter_every: int = Field(
        default=10,
        ge=0,
        description="JT3: also log the batch's Loss@H with the adapter disabled every N steps (0: never)",
    )


class WorkingContextConfig(Section):
    w_max: int = Field(default=128, gt=0, le=2**24, description="the budget the runtime and acceptance gate use")
    eval_w_max: list[int] = Field(default_factory=lambda: [128, 256])
    recent_tokens: int = Field(default=64, ge=0)
    position_scheme: Literal["center", "compact"] = "center"
    sink_tokens: int = Field(
        default=4, ge=0,
        description="the history's first tokens that lead every working context and the recency baseline (attention sink)",
    )

    @field_validator("eval_w_max")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(w <= 0 or w > 2**24 for w in v):
            raise ValueError(f"must be a non-empty list of integers in 1..{2**24}")
        return v


class AllocatorConfig(Section):
    tau_expand: float = Field(default=0.2, ge=0, le=1)
    tau_collapse: float = Field(default=0.2, ge=0, le=1)
    n_diff: int = Field(default=4, gt=0)
    cooldown_steps: int = Field(default=2, ge=0)
    min_residency: int = Field(default=3, ge=0)
    swap_margin: float = Field(
        default=0.2, ge=0, le=2,
        description="hysteresis of a swap: an expand may collapse spans scoring more than this below it (SPEC §5.3)",
    )


class DeltasConfig(Section):
    samples: int = Field(default=16, gt=0)
    contexts_per_sample: int = Field(default=2, gt=0)
    max_candidates: int = Field(default=16, gt=0)
    batch_size: int = Field(default=8, gt=0)
    perturb_moves: int = Field(
        default=4, gt=0, description="a perturbed context is 1..perturb_moves random legal moves from the recency one"
    )
    on_policy_contexts: int = Field(
        default=0, ge=0, le=64,
        description="contexts per sample taken along the allocator's own trajectory (a seeded random policy "
        "streamed over the history's last trajectory_steps refocus steps, true ages); counted in contexts_per_sample",
    )
    trajectory_steps: int = Field(default=8, gt=0, le=1024, description="refocus steps of an on-policy trajectory")
    histories: Literal["samples", "runtime"] = Field(
        default="samples",
        description="what is labelled: the block dataset's training samples (dataset.context_tokens at "
        "working_context.w_max), or training-document windows in the runtime evaluation's setting "
        "(runtime.prefill_tokens at runtime.w_max: LOD2 collapses exist, as in the runtime)",
    )


class RuntimeConfig(Section):
    steps: int = Field(default=100, gt=0, description="acceptance needs 1000")
    refocus_every: int = Field(default=32, gt=0)
    documents: int = Field(default=2, gt=0, description="held-out documents streamed (split evenly across corpora)")
    prefill_tokens: int = Field(
        default=1024, ge=0, description="history ingested before the first measured step (so the budget is full)"
    )
    compare_policies: list[Literal["recency", "random", "expand_nearest", "attention", "oracle", "lensnet"]] = Field(
        default_factory=lambda: ["recency", "random", "expand_nearest", "attention", "oracle", "lensnet"],
        description="policies compared at the same W_max on the same documents",
    )
    compare_steps: int = Field(default=24, ge=0, description="steps per document for the comparison (0: skip)")
    w_max: int | None = Field(
        default=None, gt=0, le=1 << 20,
        description="the runtime evaluation's budget (None: working_context.w_max); focus has choices when "
        "the history is many times this (SPEC §5: swaps under a full budget)",
    )
    compare_baseline_latency: bool = Field(
        default=False,
        description="also time the frozen model in the comparison's runs (the evaluation's own run always does)",
    )


PeerName = Literal["newest", "streaming_llm", "tova", "h2o", "block_select"]
PEER_NAMES: tuple[str, ...] = get_args(PeerName)


class EvaluationConfig(Section):
    samples_per_dataset: int = Field(default=16, gt=0)
    batch_size: int = Field(default=4, gt=0)
    split: Literal["train", "val", "test"] = "test"
    distance_blocks: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 30],
        description="gist one block this many blocks before the cursor (boundary/distance probe)",
    )
    distance_probe_samples: int = Field(default=4, ge=0)
    peers: list[PeerName] = Field(
        default_factory=lambda: list(PEER_NAMES),
        description="fixed-budget peers scored beside the baselines (mcx_core.eval.peers), at peer_w_max",
    )
    peer_w_max: list[int] | None = Field(
        default=None, min_length=1,
        description="the W_max values the baseline and gist evaluations score the peers at (each one of "
        "working_context.eval_w_max, working_context.w_max among them); None = every eval_w_max",
    )
    h2o_recent_share: float = Field(
        default=0.5, ge=0, le=1,
        description="H2O: share of the budget left after the sink that goes to the newest tokens; the rest to heavy hitters",
    )

    @field_validator("peers")
    @classmethod
    def _distinct_peers(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"names a peer twice: {v}")
        return v

    @field_validator("peer_w_max")
    @classmethod
    def _distinct_peer_w_max(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"names a W_max twice: {v}")
        return v

    def peer_w_values(self, eval_w_max: list[int]) -> list[int]:
        """The W_max values the peers are scored at: `peer_w_max` (None: all of `eval_w_max`), in the order of
        `eval_w_max`."""
        return [w for w in eval_w_max if self.peer_w_max is None or w in self.peer_w_max]


class SweepConfig(Section):
    w_max: list[int] = Field(default_factory=lambda: [128, 256])
    datasets: list[str] = Field(default_factory=lambda: ["narrative", "code", "recall"])
    samples: int = Field(default=8, gt=0)
    cron: str = "0 2 * * *"
    recall_kinds: list[Literal["passkey", "kv"]] = Field(
        default_factory=lambda: ["passkey", "kv"],
        description="synthetic recall tasks, used in turn: passkey retrieval, key-value lookup",
    )
    recall_digits: int = Field(default=5, ge=1, le=12, description="digits of a pass key")
    recall_pairs: int = Field(default=4, ge=1, le=24, description="key: value pairs planted per kv sample")
    recall_needle_region: list[float] = Field(
        default_factory=lambda: [0.1, 0.5],
        description="needles are planted inside this [start, end) share of the history (after the sink tokens)",
    )
    recall_seed: int | None = Field(default=None, description="recall samples' seed (default: the config's seed)")

    @field_validator("recall_needle_region")
    @classmethod
    def _region(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not 0 <= v[0] < v[1] <= 1:
            raise ValueError("must be [start, end] with 0 <= start < end <= 1")
        return v

    @field_validator("recall_kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one recall task")
        return v


class AcceptanceConfig(Section):
    """SPEC §8: the POC gate. Values here, never as literals in code."""

    delta_nll_max: float = 0.1
    delta_nll_1024x_max: float = 0.2
    swap_rate_max: float = 0.25
    swap_rate_critical: float = 0.5
    mean_residency_min: float = 3.0
    utilization_min: float = 0.8
    utilization_max: float = 1.0
    latency_overhead_max: float = 0.10
    causality_violations_max: int = 0
    nan_free_steps: int = 100
    split_min_samples: int = Field(default=1, ge=0, description="each split must hold at least this many")
    policy_minus_baseline_max: float = Field(
        default=0.0,
        description="LensNet beats a focus policy when the upper end of the paired 95 % interval of its Loss@H minus "
        "the policy's lies below this (nats/token); a non-blocking check (runtime_lensnet_beats_policies)",
    )
    oracle_gap_closed_min: float = Field(
        default=0.5, description="share of the recency → oracle Loss@H gap LensNet must close (when the oracle is compared)"
    )
    gist_minus_peer_max: float = Field(
        default=0.0,
        description="learned gists beat a peer when the upper end of the paired 95 % interval of NLL_gist − NLL_peer "
        "at working_context.w_max lies below this (nats/token); a non-blocking check, not part of the SPEC §8 gate",
    )


class AlertsConfig(Section):
    swap_rate_critical: float = 0.5
    latency_ratio_max: float = 1.5
    delta_nll_divergence: float = 0.05
    command: list[str] | str | None = Field(
        default=None,
        description="hook run with the alerts' JSON on stdin: an argv list (run without a shell; preferred), "
        "or a string, which is run by the shell (`sh -c`) — a config with a command is executable",
    )
    webhook_url: str | None = None
    window_steps: int = Field(
        default=10, gt=0, description="swap rate: alert on the mean over this many consecutive steps"
    )
    oscillation_window: int = Field(
        default=5, gt=1, description="a ping-pong is expand → collapse → expand of one span within this many steps"
    )
    latency_spike_ratio: float = Field(
        default=2.0, gt=1, description="a latency spike is a step slower than this × its trace's median step"
    )
    hook_timeout_s: float = Field(default=10.0, gt=0, description="alerts.command / webhook_url time limit")

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, list) and (not v or not v[0].strip()):
            raise ValueError("an argv list needs the program as its first item")
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty (leave it out for no hook)")
        return v


class MLflowConfig(Section):
    tracking_uri: str | None = Field(default=None, description="default: sqlite:///<root>/mlruns/mlflow.db")
    experiment: str | None = Field(default=None, description="default: the config's name")
    artifact_location: str | None = Field(default=None, description="default: <root>/mlruns/artifacts")
    system_metrics: bool = False
    ui_url: str = Field(default="http://127.0.0.1:5000", description="the MLflow UI: Dagster metadata links runs there")
    dagster_ui_url: str = Field(default="http://127.0.0.1:3000",
                                description="the Dagster UI: MLflow runs carry `<this>/runs/<run id>` as a tag")
    tensorboard: bool = Field(default=False, description="also write TensorBoard event files (<artifacts>/tensorboard)")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = v.split(":", 1)[0].lower() if ":" in v else ""
        known = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
        if scheme.split("+")[0] not in known:
            raise ValueError(f"{v!r} is not a tracking URI (scheme one of {', '.join(known)}: sqlite:////abs/path.db, ...)")
        if scheme == "sqlite" and not v.startswith("sqlite:///"):
            raise ValueError(f"{v!r}: a sqlite URI is sqlite:///relative.db or sqlite:////absolute/path.db")
        return v


class TrainingLoopConfig(Section):
    """The alternating schedule (SPEC §6): `n_cycles` × (JT1 → deltas → JT2 → JT3), each cycle starting
    from the previous cycle's checkpoints."""

    n_cycles: int = Field(default=1, gt=0, description="JT1→JT2→JT3 cycles `mcx_core.training.cycles.run_cycles` runs")


class MegaContextConfig(Section):
    name: str
    description: str = ""
    seed: int = 1234
    artifacts_dir: str = "artifacts"
    dataset: DatasetConfig
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    gistnet: GistNetConfig = Field(default_factory=GistNetConfig)
    lensnet: LensNetConfig = Field(default_factory=LensNetConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    working_context: WorkingContextConfig = Field(default_factory=WorkingContextConfig)
    allocator: AllocatorConfig = Field(default_factory=AllocatorConfig)
    deltas: DeltasConfig = Field(default_factory=DeltasConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    acceptance: AcceptanceConfig = Field(default_factory=AcceptanceConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    training_loop: TrainingLoopConfig = Field(
        default_factory=TrainingLoopConfig, description="cycles of the alternating JT1/JT2/JT3 schedule"
    )
    _root: Path | None = PrivateAttr(default=None)

    @property
    def root(self) -> Path:
        """The project root this config's relative paths resolve against (`load_config(path, root)`)."""
        return self._root if self._root is not None else project_root()

    def with_root(self, root: str | os.PathLike | None) -> MegaContextConfig:
        """This config, its relative paths resolving against `root` (None: the working directory)."""
        self._root = project_root(root)
        return self

    def resolve(self, path: str | os.PathLike) -> Path:
        """A path the config names (`artifacts_dir`, `dataset.output_dir`, ...), made absolute."""
        return resolve_path(path, self.root)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _check(self) -> MegaContextConfig:
        block = self.dataset.block_size
        gm = self.gistnet.model
        tiny = self.base_model.tiny
        if gm.hidden_size == "auto" and self.base_model.source == "tiny_random" and tiny.hidden_size % gm.num_heads:
            raise ValueError(
                f"gistnet.model.num_heads ({gm.num_heads}) must divide the base model's hidden size "
                f"(base_model.tiny.hidden_size {tiny.hidden_size}; gistnet.model.hidden_size is 'auto')"
            )
        capped = [c.max_documents for c in self.dataset.corpora.values()]
        if capped and all(n is not None for n in capped) and self.runtime.documents > sum(capped):
            raise ValueError(
                f"runtime.documents ({self.runtime.documents}) is more than the corpora hold "
                f"(max_documents add up to {sum(capped)})"
            )
        if self.gistnet.model.block_size != block:
            raise ValueError(
                f"gistnet.model.block_size ({self.gistnet.model.block_size}) must equal "
                f"dataset.block_size ({block})"
            )
        wc = self.working_context
        if wc.w_max not in wc.eval_w_max:
            raise ValueError(f"working_context.w_max ({wc.w_max}) must be one of eval_w_max {wc.eval_w_max}")
        if wc.recent_tokens % block:
            raise ValueError(f"working_context.recent_tokens must be a multiple of block_size ({block})")
        for w in wc.eval_w_max:
            if w < wc.recent_tokens + block:
                raise ValueError(
                    f"working_context.eval_w_max value {w} leaves no room beyond recent_tokens "
                    f"({wc.recent_tokens}) + one block"
                )
        ev = self.evaluation
        if ev.peer_w_max is not None:
            stray = [w for w in ev.peer_w_max if w not in wc.eval_w_max]
            if stray:
                raise ValueError(
                    f"evaluation.peer_w_max values {stray} are not in working_context.eval_w_max {wc.eval_w_max}"
                )
            if ev.peers and wc.w_max not in ev.peer_w_max:
                raise ValueError(
                    f"evaluation.peer_w_max {ev.peer_w_max} must hold working_context.w_max ({wc.w_max}): "
                    "the peer gates compare the learned gists with the peers there"
                )
        return self

    # Convenience views ------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=False), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """`section.sub.key -> value` for MLflow params (lists joined by commas)."""
        return flatten(self.model_dump(mode="json"))

    def dataset_hash(self, tokenizer_id: str) -> str:
        """Identity of the block datasets: same dataset section + tokenizer → same files."""
        payload = {"dataset": self.dataset.model_dump(mode="json"), "tokenizer": tokenizer_id}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = ",".join(map(str, tree)) if isinstance(tree, list) else tree
    return out
