"""Data-parallel training through accelerate: the same trainer code on CPU, one GPU or several
(`accelerate launch --num_processes N -m mcx_cli train-cycles ...`).

One process-wide `accelerate.Accelerator` (`get_accelerator`, created on first use: `cpu=True` when CUDA
is absent, `mixed_precision="no"`: precision is the config's `base_model.torch_dtype`). The trainers do
not wrap their modules in DistributedDataParallel: they call module methods other than `forward`
(`Gister(level, x)`, `LensNet.raw_scores`, a peft adapter inside the frozen base model) and run the
frozen base LM around the trained module, which DDP's forward hooks do not see. Instead, with N > 1
processes, every step:

  sampling   each rank takes its own slice of the step's batch (`rank_rows`): the step generator is the
             same on every rank, rank r takes positions [r·b, (r+1)·b) of its permutation, so the ranks
             see different samples and the effective batch is b·N;
  backward   `accelerator.backward(loss)`, then `sync_gradients`: the trainable parameters' gradients are
             all-reduced (mean) in one flattened buffer, so every rank applies the identical update (a
             parameter without a gradient on some rank counts as zero there; one without a gradient on
             every rank keeps `grad = None`, as in one process);
  clipping   after the sync, on the averaged gradient (the same norm on every rank);
  NaN guard  a step is skipped on every rank when the loss is non-finite on any rank (`all_finite`);
  metrics    averaged over ranks before they are logged (`reduce_metrics`; throughput is summed);
  files      only the main process logs to the telemetry sink (`main_sink`) and writes checkpoints
             (`checkpoints.save_jt_checkpoint`), then `wait_for_everyone()`; on resume every rank reads the
             same checkpoint;
  replicas   initial weights are broadcast from rank 0 (`broadcast_parameters`); each checkpoint records
             every rank's checksum of the trained parameters (`state_fields`): equal when in sync.

With one process every helper reduces to what the trainers did before (same numbers for the same seed):
`backward` is `loss.backward()` (loss / 1), nothing is reduced, rank 0 draws `randperm(n)[:b]`.
Nothing here imports dagster.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

_ACCELERATOR = None
RANK_SEED_STRIDE = 1_000_003  # torch.manual_seed(seed + rank * stride): per-rank dropout masks


def get_accelerator():
    """The process-wide `accelerate.Accelerator` (created on first use)."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator

        _ACCELERATOR = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    return _ACCELERATOR


def world_size() -> int:
    return get_accelerator().num_processes


def process_index() -> int:
    return get_accelerator().process_index


def is_main_process() -> bool:
    return get_accelerator().is_main_process


def wait_for_everyone() -> None:
    get_accelerator().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (e.g. writes a file); the others run it after, when they
    can read what it wrote. A no-op with one process."""
    with get_accelerator().main_process_first():
        yield


def main_sink(sink):
    """`sink` on the main process, a `NullSink` elsewhere: one copy of every logged metric."""
    if is_main_process():
        return sink
    from mcx_core.telemetry.sinks import NullSink

    return NullSink()


def rank_seed(seed: int) -> int:
    """`seed` on rank 0; distinct per rank (dropout masks differ on different samples)."""
    return seed + process_index() * RANK_SEED_STRIDE


def rank_rows(perm: torch.Tensor, batch_size: int, rank: int = 0) -> torch.Tensor:
    """Rank `rank`'s rows of a step: positions [rank·b, (rank + 1)·b) of `perm` (a permutation of the
    n candidates, the same on every rank), wrapping around when b·N > n; b = min(batch_size, n).
    Rank 0 takes `perm[:b]`, what one process always took."""
    n = len(perm)
    b = min(batch_size, n)
    return perm[(torch.arange(b) + rank * b) % n]


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def _comm_device() -> torch.device:
    """Where collective buffers live: the accelerator's device (NCCL needs CUDA tensors even when the
    config keeps the trained module on the CPU; gloo takes CPU tensors)."""
    return get_accelerator().device


def all_finite(value: float) -> bool:
    """True when `value` is finite on every rank."""
    finite = math.isfinite(value)
    if world_size() == 1:
        return finite
    flag = torch.tensor([1.0 if finite else 0.0], device=_comm_device())
    return bool(get_accelerator().reduce(flag, reduction="sum").item() == world_size())


def sync_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of `params` over all ranks (a no-op with one process). One all-reduce over a
    flattened buffer holding every gradient plus a has-gradient flag per parameter."""
    if world_size() == 1:
        return
    params = trainable(params)
    if not params:
        return
    device = _comm_device()
    parts = [
        (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, torch.float32)
        for p in params
    ]
    flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=device)
    flat = get_accelerator().reduce(torch.cat(parts + [flags]), reduction="sum")
    n = world_size()
    seen = flat[-len(params):]
    offset = 0
    for p, has in zip(params, seen.tolist()):
        k = p.numel()
        if has > 0:
            grad = (flat[offset : offset + k] / n).view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
        offset += k


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
                  max_norm: float) -> float:
    """zero_grad → `accelerator.backward(loss)` → gradient sync → clip to `max_norm`; the gradient norm
    (after the sync, before clipping). NaN, and no backward, when the loss is non-finite on any rank:
    the caller then stops without `optimizer.step()`."""
    params = trainable(params)
    if not all_finite(loss.item()):
        return math.nan
    optimizer.zero_grad(set_to_none=True)
    get_accelerator().backward(loss)
    sync_gradients(params)
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def broadcast_parameters(params: Iterable[nn.Parameter]) -> None:
    """Copy rank 0's values of `params` to every rank (the starting point DDP would give); a no-op with
    one process."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    device = _comm_device()
    with torch.no_grad():
        for p in params:
            buffer = p.data.to(device).contiguous()
            dist.broadcast(buffer, src=0)
            p.data.copy_(buffer.to(p.device))


def reduce_metrics(metrics: dict, sum_keys: Iterable[str] = ()) -> dict:
    """`metrics` averaged over ranks (keys in `sum_keys` summed, e.g. throughput); a key a rank lacks
    is averaged over the ranks that have it. Unchanged with one process."""
    if world_size() == 1:
        return metrics
    from accelerate.utils import gather_object

    everyone = gather_object([metrics])
    sums = set(sum_keys)
    out = {}
    for k, v in metrics.items():
        values = [float(m[k]) for m in everyone if k in m and isinstance(m[k], int | float)]
        if not isinstance(v, int | float) or not values:
            out[k] = v
            continue
        out[k] = sum(values) if k in sums else sum(values) / len(values)
    return out


def parameters_checksum(params: Iterable[torch.Tensor]) -> str:
    """sha256 (16 hex digits) of the values of `params`, in order."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def replica_checksums(params: Iterable[torch.Tensor]) -> list[str]:
    """Every rank's `parameters_checksum(params)`, in rank order (one entry with one process)."""
    mine = parameters_checksum(params)
    if world_size() == 1:
        return [mine]
    from accelerate.utils import gather_object

    return list(gather_object([mine]))


def state_fields(batch_size: int, params: Iterable[torch.Tensor]) -> dict:
    """What a checkpoint's trainer_state.json records about the data-parallel run (collective: every
    rank must call it)."""
    n = world_size()
    checksums = replica_checksums(params)
    return {
        "world_size": n,
        "batch_size_per_process": batch_size,
        "effective_batch_size": batch_size * n,
        "replica_checksums": checksums,
        "replicas_in_sync": len(set(checksums)) == 1,
    }
