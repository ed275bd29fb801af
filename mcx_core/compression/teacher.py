"""The JT1 teacher pass as a cached, resumable artifact: what the frozen base model says about each
training sample, computed once per dataset version and streamed from disk during training.

Per sample (history = the first C tokens, horizon = the next H):
  ids            int32 [C + H]
  teacher_nll    f32 [H]      per-token NLL of the horizon given the full history (ΔNLL's reference)
  recency_nll    f32 [H]      the same under the recency baseline at `working_context.w_max` (sink +
                              newest tokens): how much the full history helps each token (weighting)
  topk_logprobs  f16 [H, k]   the teacher's top-k horizon log-probs and their token ids (KL targets:
  topk_ids       i32 [H, k]   k = `gistnet.training.teacher_top_k`; the full [H, V] would be 6 MiB a sample)
  lod1_targets   f32 [nb, d]  pooling_mse targets (`pooling_targets`), LOD1 and LOD2
  lod2_targets   f32 [n2, d]
and, per `input_layers` k > 0 (a separate directory, so the k of an ablation share one teacher pass):
  states         f16 [nb, K, d]  the residual stream after the base model's first k layers over each
                                 block run alone — a contextual GistNet's inputs (`BaseLM.block_states`)

Layout: `artifacts/teacher/<fingerprint>-s<shard_size>/` with `teacher.json` (what the fingerprint covers) and shards
`shard-00000.safetensors` of `shard_size` samples each, in *pool order*: a seeded permutation of the
train split (`pool_positions`), so a pool of 96 samples reuses the shards of a pool of 24, and cycle c
reads the next `sample_pool` positions. A shard is written atomically (temporary name, then rename),
so an interrupted pass resumes at the first missing shard and never leaves a half shard that looks
complete. Training reads single rows through `safe_open` slices: memory stays at the batch, not the pool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mcx_core import artifacts, data
from mcx_core.config import MegaContextConfig
from mcx_core.model.base import BaseLM
from mcx_core.model.scoring import ConditionInput, horizon_nll

TEACHER_FIELDS = ("ids", "teacher_nll", "recency_nll", "topk_logprobs", "topk_ids", "lod1_targets", "lod2_targets")
STATES_FIELD = "states"
META_FILE = "teacher.json"


def pool_order(n_available: int, seed: int) -> np.ndarray:
    """The seeded permutation of the train split that pools are read from."""
    return np.random.default_rng(seed * 7919).permutation(n_available)


def pool_positions(n_available: int, pool_size: int, cycle: int) -> np.ndarray:
    """Positions in `pool_order` of cycle `cycle`'s pool: the next `pool_size` after the previous
    cycles' (wrapping around when the split runs out)."""
    size = min(pool_size, n_available)
    return (cycle * size + np.arange(size)) % n_available


def pooling_targets(hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
    """Mean hidden state per span, rescaled to the span's mean token-embedding norm.
    hidden [n, S, d], token_embeds [n, S', d] -> [n, d]."""
    mean_h = hidden.mean(dim=1)
    norm = token_embeds.norm(dim=-1).mean(dim=1, keepdim=True)
    return mean_h * norm / mean_h.norm(dim=-1, keepdim=True).clamp_min(1e-6)


@dataclass(frozen=True)
class TeacherSpec:
    """What one teacher pass depends on."""

    context_tokens: int
    horizon: int
    block_size: int
    top_k: int
    sink_tokens: int
    w_max: int
    position_scheme: str
    seed: int
    data_hash: str  # of the train split's token ids themselves
    model_id: str

    @classmethod
    def from_config(cls, cfg: MegaContextConfig, lm: BaseLM, train_ids: np.ndarray) -> TeacherSpec:
        import hashlib

        wc = cfg.working_context
        data_hash = hashlib.sha256(np.ascontiguousarray(train_ids, dtype=np.int64).tobytes()).hexdigest()[:16]
        return cls(
            cfg.dataset.context_tokens, cfg.dataset.horizon, cfg.dataset.block_size,
            cfg.gistnet.training.teacher_top_k, wc.sink_tokens, wc.w_max, wc.position_scheme, cfg.seed,
            data_hash, lm.model_id,
        )

    @property
    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]


class TeacherCache:
    """The teacher pass of one `TeacherSpec` on disk; `ensure` computes missing shards, `rows` reads."""

    def __init__(self, root: Path, spec: TeacherSpec, shard_size: int):
        self.spec, self.shard_size = spec, shard_size
        self.dir = Path(root) / f"{spec.fingerprint}-s{shard_size}"  # the shard size is part of the layout
        self._handles: dict[Path, object] = {}

    @classmethod
    def for_config(cls, cfg: MegaContextConfig, lm: BaseLM, train_ids: np.ndarray, root: Path | None = None
                   ) -> TeacherCache:
        """The cache of `train_ids` under `root` (default `<artifacts>/teacher`)."""
        root = root or artifacts.ArtifactPaths.from_config(cfg).root / "teacher"
        return cls(root, TeacherSpec.from_config(cfg, lm, train_ids), cfg.gistnet.training.teacher_shard_size)

    def _states_dir(self, layers: int) -> Path:
        return self.dir / f"states-k{layers}"

    def shard_path(self, j: int, layers: int = 0) -> Path:
        return (self._states_dir(layers) if layers else self.dir) / f"shard-{j:05d}.safetensors"

    def _shards(self, positions: np.ndarray) -> list[int]:
        return sorted({int(p) // self.shard_size for p in positions})

    def missing(self, positions: np.ndarray, layers: int = 0) -> list[int]:
        need = [j for j in self._shards(positions) if not self.shard_path(j).is_file()]
        if layers:
            need += [j for j in self._shards(positions) if not self.shard_path(j, layers).is_file()]
        return sorted(set(need))

    @torch.no_grad()
    def ensure(self, lm: BaseLM, train_ids: np.ndarray, positions: np.ndarray, layers: int = 0,
               batch_size: int = 2, progress: bool = True) -> list[int]:
        """Compute every shard holding `positions` (and their `layers`-deep states) that is not on disk
        yet; returns the shards computed. A shard covers whole pool positions [j·S, (j+1)·S)."""
        order = pool_order(len(train_ids), self.spec.seed)
        todo = self.missing(positions, layers)
        if not todo:
            return []
        self.dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(self.dir / META_FILE, {"spec": self.spec.__dict__, "shard_size": self.shard_size,
                                                    "fields": list(TEACHER_FIELDS)})
        n = len(train_ids)
        bar = tqdm(total=len(todo) * self.shard_size, desc="JT1 teacher pass", unit="sample", disable=not progress)
        for j in todo:
            rows = order[np.arange(j * self.shard_size, (j + 1) * self.shard_size) % n]
            ids = torch.as_tensor(np.asarray(train_ids)[rows], dtype=torch.long)
            ids = ids[:, : self.spec.context_tokens + self.spec.horizon]
            if not self.shard_path(j).is_file():
                self._write(self.shard_path(j), teacher_fields(lm, ids, self.spec, batch_size), rows)
            if layers and not self.shard_path(j, layers).is_file():
                self._write(self.shard_path(j, layers), {STATES_FIELD: encoder_states(lm, ids, self.spec, layers, batch_size)}, rows)
            bar.update(self.shard_size)
        bar.close()
        return todo

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], rows: np.ndarray) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        meta = {"train_rows": json.dumps([int(r) for r in rows]), "fingerprint": self.spec.fingerprint}
        artifacts.write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def rows(self, positions, fields: tuple[str, ...] = TEACHER_FIELDS, layers: int = 0) -> dict[str, torch.Tensor]:
        """Stacked fields of pool `positions` [B], read row by row from the shards (plus `states` when
        `layers` > 0)."""
        out: dict[str, list[torch.Tensor]] = {f: [] for f in fields}
        if layers:
            out[STATES_FIELD] = []
        for p in (int(x) for x in positions):
            j, i = divmod(p, self.shard_size)
            for f in fields:
                out[f].append(self._handle(self.shard_path(j)).get_slice(f)[i])
            if layers:
                out[STATES_FIELD].append(self._handle(self.shard_path(j, layers)).get_slice(STATES_FIELD)[i])
        return {f: torch.stack(v) for f, v in out.items()}

    def _handle(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise FileNotFoundError(f"teacher shard {path} is missing: run the teacher pass (`ensure`) first")
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def nbytes(self, positions, layers: int = 0) -> int:
        """Bytes on disk of the shards holding `positions`."""
        files = [self.shard_path(j) for j in self._shards(positions)]
        files += [self.shard_path(j, layers) for j in self._shards(positions)] if layers else []
        return sum(f.stat().st_size for f in files if f.is_file())


@torch.no_grad()
def teacher_fields(lm: BaseLM, ids: torch.Tensor, spec: TeacherSpec, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Every teacher field (module docstring) of samples `ids` [n, >= C + H], in memory."""
    from mcx_core.eval.nll import recency_condition

    s = spec
    ids = torch.as_tensor(ids, dtype=torch.long)[:, : s.context_tokens + s.horizon]
    C, K, k = s.context_tokens, s.block_size, s.top_k
    decoder = lm.model.get_decoder()
    recency = recency_condition(lm, s.sink_tokens, s.position_scheme)
    out: dict[str, list[torch.Tensor]] = {f: [] for f in TEACHER_FIELDS}
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        b = len(chunk)
        embeds = lm.embed(chunk[:, :C])  # [b, C, d]
        conditions = [ConditionInput(e, torch.arange(C), C) for e in embeds]
        with capture_logits(lm) as logits:
            out["teacher_nll"].append(horizon_nll(lm, conditions, chunk[:, C:]).float().cpu())
        top = logits["logits"][:, :-1].float().log_softmax(-1).topk(k, dim=-1)  # [b, H, k]
        out["topk_logprobs"].append(top.values.half().cpu())
        out["topk_ids"].append(top.indices.int().cpu())
        rec = [recency(h, s.w_max) for h in chunk[:, :C]]
        out["recency_nll"].append(horizon_nll(lm, rec, chunk[:, C:]).float().cpu())
        # Every block run alone: [b * nb, K] tokens -> [b * nb, K, d] final hidden states.
        hidden = decoder(input_ids=chunk[:, :C].reshape(-1, K).to(lm.device), use_cache=False).last_hidden_state
        t1 = pooling_targets(hidden.float(), embeds.float().reshape(-1, K, lm.d_model)).view(b, C // K, -1)
        out["lod1_targets"].append(t1.cpu())
        n2 = C // (K * K)  # LOD2: the mean of its 32 blocks' targets, rescaled the same way
        if n2:
            children = t1[:, : n2 * K].reshape(b * n2, K, -1)
            child_embeds = embeds[:, : n2 * K * K].float().reshape(b * n2, K * K, -1)
            out["lod2_targets"].append(pooling_targets(children, child_embeds).view(b, n2, -1).cpu())
        else:
            out["lod2_targets"].append(torch.zeros(b, 0, lm.d_model))
        out["ids"].append(chunk.int())
    return {f: torch.cat(v) for f, v in out.items()}


@torch.no_grad()
def encoder_states(lm: BaseLM, ids: torch.Tensor, spec: TeacherSpec, layers: int, batch_size: int = 2) -> torch.Tensor:
    """`BaseLM.block_states` of every history block of `ids`: [n, C // K, K, d] float16."""
    C, K = spec.context_tokens, spec.block_size
    ids = torch.as_tensor(ids, dtype=torch.long)
    chunks = [lm.block_states(ids[i : i + batch_size, :C].reshape(-1, K), layers).half().cpu()
              for i in range(0, len(ids), batch_size)]
    return torch.cat(chunks).view(len(ids), C // K, K, -1)


class capture_logits:  # noqa: N801 (a context manager used like a function)
    """`with capture_logits(lm) as out:` — `out["logits"]` is the logits of the last base-model forward
    inside the block (horizon_nll keeps only the last H + 1 positions), for KL targets and terms."""

    def __init__(self, lm: BaseLM):
        self.lm, self.out = lm, {}

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.hook = self.lm.model.register_forward_hook(lambda m, a, o: self.out.__setitem__("logits", o.logits))
        return self.out

    def __exit__(self, *exc) -> None:
        self.hook.remove()


def run_teacher_pass(cfg: MegaContextConfig, lm: BaseLM, cycle: int = 0, progress: bool = True) -> dict:
    """The teacher shards of `cycle`'s JT1 pool (and its encoder states when GistNet reads base-model
    layers): computed when missing, else reused. Returns where they are and what they hold."""
    import time

    train = data.train_ids(cfg)
    cache = TeacherCache.for_config(cfg, lm, train)
    positions = pool_positions(len(train), cfg.gistnet.training.sample_pool, cycle)
    layers = cfg.gistnet.model.input_layers
    t0 = time.perf_counter()
    computed = cache.ensure(lm, train, positions, layers, progress=progress)
    return {
        "directory": cache.dir, "fingerprint": cache.spec.fingerprint, "samples": len(positions),
        "shards_computed": len(computed), "shards": len(cache._shards(positions)), "input_layers": layers,
        "bytes": cache.nbytes(positions, layers), "seconds": time.perf_counter() - t0,
    }
