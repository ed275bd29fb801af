"""MegaContext tree: the whole history at several levels of detail (SPEC §2).

    LOD0  raw tokens, grouped into blocks of `block_size` (K = 32) tokens
    LOD1  one gist per complete LOD0 block                 (K tokens    -> 1 vector)
    LOD2  one gist per K consecutive LOD1 gists            (K**2 tokens -> 1 vector)
    ...   up to `max_level`

Node indexing: a level-L node (L >= 1) with index i covers tokens [i * K**L, (i + 1) * K**L). A level-0
node is an LOD0 *block*: index b covers [b * K, min((b + 1) * K, cursor)), so the last one may be a
partial tail. The tail is never gisted; a level-(L+1) node exists only once all K of its children do.

LOD1 inputs are the blocks' token embeddings, or with an `input_fn` (a contextual GistNet,
`compression.gistnet.encoder_inputs_fn`) whatever it returns per block, e.g. embeddings ‖ the base model's
first-k-layer states of the block run alone: computed once per block at ingest and kept in the tree
(float16, `block_inputs`), so `rebuild_gists` reuses them; `last_ingest_seconds` splits an ingest's time
into `encode` (input_fn) and `gist` (gist_fn) for the runtime's per-stage latency.

The tree is append-only. Gists come from `gist_fn` (a GistNet, or any callable in tests), are stored
detached on the CPU in `gist_dtype`, and all carry the tree's `gist_version` (one GistNet wrote every
gist; `rebuild_gists` rewrites them all with a newer one and bumps the version).

On disk (`save`/`load`), a directory holding:

    tree.json          metadata: format, d_model, block_size, max_level, cursor, gist_version, gist_dtype
    tree.safetensors   `tokens` int32 [cursor], `gists.L1` [n1, d], `gists.L2` [n2, d], ...,
                       `inputs.L1` float16 [n1, K, d_in] when the tree has an input_fn
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# (level L >= 1, inputs [n, K, d]) -> gists [n, d]. Inputs: embed_fn's token embeddings for L = 1, the
# stored level-(L-1) gists (CPU, gist_dtype) for L >= 2; the callable moves/casts them as it needs.
GistFn = Callable[[int, torch.Tensor], torch.Tensor]
EmbedFn = Callable[[torch.Tensor], torch.Tensor]  # token ids [n] (long, CPU) -> embeddings [n, d]
InputFn = Callable[[torch.Tensor], torch.Tensor]  # token ids [n * K] (long, CPU) -> LOD1 inputs [n, K, d_in]
INPUT_DTYPE = torch.float16

FORMAT = "megacontext-tree"
FORMAT_VERSION = 1
METADATA_FILE = "tree.json"
TENSORS_FILE = "tree.safetensors"


def span_id(level: int, index: int) -> str:
    """Stable name of a node, e.g. 'L1:000042' (the same node always gets the same id)."""
    return f"L{level}:{index:06d}"


@dataclass(frozen=True)
class Node:
    level: int
    index: int
    start: int  # first token covered
    end: int  # exclusive; end - start == K**level for gists, K for LOD0 blocks (less for the tail)
    gist_version: int  # version of the GistNet that wrote this gist; 0 for LOD0 blocks (no gist)
    parent_id: str | None  # None at the top level; the parent of a tail block does not exist yet

    @property
    def span_id(self) -> str:
        return span_id(self.level, self.index)


def _append(buf: torch.Tensor, used: int, new: torch.Tensor) -> torch.Tensor:
    """Write `new` after the first `used` rows of `buf`, doubling the capacity when it runs out, so a long
    stream of small appends costs amortised O(1) per row instead of a full copy each time."""
    if used + len(new) > len(buf):
        grown = buf.new_empty((max(2 * len(buf), used + len(new), 1024), *buf.shape[1:]))
        grown[:used] = buf[:used]
        buf = grown
    buf[used : used + len(new)] = new
    return buf


class MegaContextTree:
    def __init__(
        self,
        d_model: int,
        embed_fn: EmbedFn,
        gist_fn: GistFn,
        block_size: int = 32,
        max_level: int = 2,
        gist_dtype: torch.dtype = torch.float32,
        gist_batch_size: int = 256,
        input_fn: InputFn | None = None,
    ):
        if block_size < 2 or max_level < 1:
            raise ValueError(f"need block_size >= 2 and max_level >= 1 (got {block_size}, {max_level})")
        self.d_model = d_model
        self.embed_fn = embed_fn
        self.gist_fn = gist_fn
        self.input_fn = input_fn
        self.block_size = block_size
        self.max_level = max_level
        self.gist_dtype = gist_dtype
        self.gist_batch_size = gist_batch_size  # blocks per gist_fn call: bounds memory on long ingests
        self.gist_version = 1
        self.cursor = 0
        self._tokens = torch.empty(0, dtype=torch.int32)
        # _gists[L][:_count[L]] holds the level-L gists; rows beyond are spare capacity. Index 0 unused.
        self._gists = [torch.empty(0, d_model, dtype=gist_dtype) for _ in range(max_level + 1)]
        self._count = [0] * (max_level + 1)
        self._inputs: torch.Tensor | None = None  # [n1 + spare, K, d_in] float16, with an input_fn
        self.last_ingest_seconds = {"encode": 0.0, "gist": 0.0}

    # ------------------------------------------------------------------------------------------ reading

    @property
    def tokens(self) -> torch.Tensor:
        """Every token ingested so far, int32 [cursor] (a view: do not write to it)."""
        return self._tokens[: self.cursor]

    def span_tokens(self, level: int) -> int:
        """Tokens covered by one node of `level`: K**level for gists, one block (K) at LOD0."""
        return self.block_size ** max(level, 1)

    def num_nodes(self, level: int) -> int:
        """Level 0: LOD0 blocks, the partial tail included (ceil(cursor / K)). Level L >= 1: gists."""
        self._check_level(level, allow_lod0=True)
        if level == 0:
            return -(-self.cursor // self.block_size)
        return self._count[level]

    def node(self, level: int, index: int) -> Node:
        if not 0 <= index < self.num_nodes(level):
            raise IndexError(f"no node {span_id(level, index)}: level {level} has {self.num_nodes(level)}")
        span = self.span_tokens(level)
        start = index * span
        parent_index = index if level == 0 else index // self.block_size  # a block's gist is its parent
        return Node(
            level=level,
            index=index,
            start=start,
            end=min(start + span, self.cursor),
            gist_version=self.gist_version if level > 0 else 0,
            parent_id=span_id(level + 1, parent_index) if level < self.max_level else None,
        )

    def nodes(self, level: int) -> list[Node]:
        return [self.node(level, i) for i in range(self.num_nodes(level))]

    def gist(self, level: int, index: int) -> torch.Tensor:
        """[d_model]"""
        return self.gists(level, [index])[0]

    def gists(self, level: int, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """[n] indices -> [n, d_model] gists (a copy, in `gist_dtype`, on the CPU)."""
        self._check_level(level, allow_lod0=False)
        idx = torch.as_tensor(indices, dtype=torch.long).cpu()
        if len(idx) and (idx.min() < 0 or idx.max() >= self._count[level]):
            raise IndexError(f"gist index out of range: level {level} has {self._count[level]} gists")
        return self._gists[level][idx]

    def block_tokens(self, index: int) -> torch.Tensor:
        """int32 [<= K]: the tokens of LOD0 block `index` (fewer than K for the partial tail)."""
        node = self.node(0, index)
        return self.tokens[node.start : node.end]

    # ------------------------------------------------------------------------------------------ writing

    def ingest(self, tokens: Sequence[int] | torch.Tensor) -> list[Node]:
        """Append tokens; return the gist nodes this created, level by level (LOD1 first)."""
        new = torch.as_tensor(tokens, dtype=torch.int32).cpu()
        if new.dim() != 1:
            raise ValueError(f"ingest takes a 1-D sequence of token ids, got shape {tuple(new.shape)}")
        self._tokens = _append(self._tokens, self.cursor, new)
        self.cursor += len(new)
        created = []
        self.last_ingest_seconds = {"encode": 0.0, "gist": 0.0}
        for level in range(1, self.max_level + 1):
            have, ready = self._count[level], self._children_ready(level)
            if ready > have:
                gists = self._compute_gists(self.gist_fn, level, have, ready)
                self._gists[level] = _append(self._gists[level], have, gists)
                self._count[level] = ready
                created += [self.node(level, i) for i in range(have, ready)]
        return created

    def rebuild_gists(self, gist_fn: GistFn) -> None:
        """Recompute every gist with a newer GistNet (bottom-up: LOD2 reads the new LOD1), use it for
        future ingests too, and bump `gist_version`."""
        for level in range(1, self.max_level + 1):
            n = self._count[level]
            self._gists[level][:n] = self._compute_gists(gist_fn, level, 0, n, reuse_inputs=True)
        self.gist_fn = gist_fn
        self.gist_version += 1

    def _children_ready(self, level: int) -> int:
        """How many level-`level` nodes have all their children: complete blocks for LOD1."""
        if level == 1:
            return self.cursor // self.block_size
        return self._count[level - 1] // self.block_size

    def block_inputs(self, lo: int, hi: int) -> torch.Tensor:
        """LOD1 inputs of complete blocks [lo, hi): [hi - lo, K, d_in] — the kept input_fn output
        (float16), else the token embeddings."""
        K = self.block_size
        if self.input_fn is None:
            return self.embed_fn(self._tokens[lo * K : hi * K].long()).reshape(hi - lo, K, self.d_model)
        if self._inputs is None or hi > self._count[1]:
            raise IndexError(f"no kept inputs for blocks [{lo}, {hi}): {self._count[1]} are kept")
        return self._inputs[lo:hi]

    def _encode(self, lo: int, hi: int) -> torch.Tensor:
        """input_fn over complete blocks [lo, hi), kept in `_inputs`; -> [hi - lo, K, d_in]."""
        K = self.block_size
        t0 = time.perf_counter()
        new = self.input_fn(self._tokens[lo * K : hi * K].long()).detach().to("cpu", INPUT_DTYPE)
        if self._inputs is None:
            self._inputs = new.new_empty((0, *new.shape[1:]))
        self._inputs = _append(self._inputs, lo, new)
        self.last_ingest_seconds["encode"] += time.perf_counter() - t0
        return new

    @torch.no_grad()
    def _compute_gists(self, gist_fn: GistFn, level: int, lo: int, hi: int, reuse_inputs: bool = False) -> torch.Tensor:
        """Gists of level-`level` nodes [lo, hi) -> [hi - lo, d_model], batched `gist_batch_size` at a time.
        Inputs are the blocks' LOD1 inputs (token embeddings, or the input_fn's, computed here once per
        block unless `reuse_inputs`) or the stored level-(L-1) gists (LOD2+), [n, K, d_in]."""
        K, d = self.block_size, self.d_model
        out = torch.empty(hi - lo, d, dtype=self.gist_dtype)
        for a in range(lo, hi, self.gist_batch_size):
            b = min(a + self.gist_batch_size, hi)
            if level == 1 and self.input_fn is not None:
                inputs = self.block_inputs(a, b) if reuse_inputs else self._encode(a, b)
            elif level == 1:
                inputs = self.block_inputs(a, b)
            else:
                inputs = self._gists[level - 1][a * K : b * K].reshape(b - a, K, d)
            t0 = time.perf_counter()
            gists = gist_fn(level, inputs)
            self.last_ingest_seconds["gist"] += time.perf_counter() - t0
            if tuple(gists.shape) != (b - a, d):
                raise ValueError(f"gist_fn({level}, [{b - a}, {K}, {d}]) returned {tuple(gists.shape)}")
            out[a - lo : b - lo] = gists.detach().to("cpu", self.gist_dtype)
        return out

    def _check_level(self, level: int, allow_lod0: bool) -> None:
        if not (0 if allow_lod0 else 1) <= level <= self.max_level:
            raise ValueError(f"level {level} out of range (max_level {self.max_level})")

    # ------------------------------------------------------------------------------------------ storage

    def save(self, path: str | os.PathLike) -> None:
        """Write the tree to directory `path` atomically: a reader sees the old tree or the new one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            tensors = {"tokens": self.tokens.contiguous()}
            for level in range(1, self.max_level + 1):
                tensors[f"gists.L{level}"] = self._gists[level][: self._count[level]].contiguous()
            if self._inputs is not None:
                tensors["inputs.L1"] = self._inputs[: self._count[1]].contiguous()
            save_file(tensors, tmp / TENSORS_FILE)
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "d_model": self.d_model,
                "block_size": self.block_size,
                "max_level": self.max_level,
                "cursor": self.cursor,
                "gist_version": self.gist_version,
                "gist_dtype": str(self.gist_dtype).removeprefix("torch."),
                "num_gists": {str(L): self._count[L] for L in range(1, self.max_level + 1)},
            }
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            if path.exists():
                path.rename(old)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike, embed_fn: EmbedFn, gist_fn: GistFn,
             input_fn: InputFn | None = None) -> MegaContextTree:
        path = Path(path)
        meta = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} directory")
        tree = cls(
            d_model=meta["d_model"],
            embed_fn=embed_fn,
            gist_fn=gist_fn,
            block_size=meta["block_size"],
            max_level=meta["max_level"],
            gist_dtype=getattr(torch, meta["gist_dtype"]),
            input_fn=input_fn,
        )
        tensors = load_file(path / TENSORS_FILE)
        tree._tokens, tree.cursor = tensors["tokens"], meta["cursor"]
        if tree._tokens.dtype != torch.int32 or len(tree._tokens) != tree.cursor:
            raise ValueError(
                f"{path}: tokens are {tree._tokens.dtype} [{len(tree._tokens)}], expected int32 [{tree.cursor}]"
            )
        tree.gist_version = meta["gist_version"]
        for level in range(1, tree.max_level + 1):
            gists = tensors[f"gists.L{level}"]
            expected = (tree._children_ready(level), tree.d_model)
            if tuple(gists.shape) != expected or gists.dtype != tree.gist_dtype:
                raise ValueError(
                    f"{path}: gists.L{level} is {tuple(gists.shape)} {gists.dtype}, "
                    f"expected {expected} {tree.gist_dtype} for {tree.cursor} tokens"
                )
            tree._gists[level], tree._count[level] = gists, len(gists)
        if input_fn is not None:
            if "inputs.L1" not in tensors:
                raise ValueError(f"{path}: no inputs.L1 (saved without an input_fn) but one was given")
            tree._inputs = tensors["inputs.L1"]
        return tree
