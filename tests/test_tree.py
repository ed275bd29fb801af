"""MegaContextTree (mcx_core.model.tree): gisting rules, chunking, batching, storage round trip, rebuilds."""

import json
import os

import pytest
import torch
from helpers import D, embed, mean_gist, random_tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from mcx_core.model import tree as tree_module
from mcx_core.model.tree import MegaContextTree, Node


def make_tree(n_tokens: int = 0, gist_fn=mean_gist, **kwargs) -> MegaContextTree:
    tree = MegaContextTree(D, embed, gist_fn, **kwargs)
    tree.ingest(random_tokens(n_tokens))
    return tree


class TinyGistNet(torch.nn.Module):
    """A small trainable GistFn: per-level linear map, then mean over the K slots."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.ModuleList([torch.nn.Linear(D, D) for _ in range(4)])

    def forward(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj[level](x.float())).mean(dim=1)  # [n, K, D] (any float dtype) -> [n, D]


def test_partial_tail_stays_lod0_and_is_never_gisted():
    tree = make_tree(100)
    assert tree.cursor == 100 and tree.tokens.dtype == torch.int32
    assert tree.num_nodes(0) == 4 and tree.num_nodes(1) == 3
    assert tree.node(0, 3).start == 96 and tree.node(0, 3).end == 100
    assert torch.equal(tree.block_tokens(3), tree.tokens[96:100])
    with pytest.raises(IndexError):
        tree.gist(1, 3)
    for b in range(3):  # each complete block's gist is gist_fn over exactly its tokens
        expected = mean_gist(1, embed(tree.tokens[32 * b : 32 * (b + 1)].long())[None])[0]
        torch.testing.assert_close(tree.gist(1, b), expected)

    created = tree.ingest(random_tokens(28, seed=1))  # completes block 3
    assert [n.span_id for n in created] == ["L1:000003"]
    assert tree.num_nodes(0) == tree.num_nodes(1) == 4


@pytest.mark.parametrize("block_size,max_level", [(32, 2), (4, 3)])
def test_parent_appears_exactly_when_all_children_exist(block_size, max_level):
    K = block_size
    tree = make_tree(K**max_level - 1, block_size=K, max_level=max_level)
    for level in range(1, max_level + 1):
        assert tree.num_nodes(level) == K ** (max_level - level) - 1  # the top level: none yet

    created = tree.ingest([7])
    assert [n.level for n in created] == list(range(1, max_level + 1))  # one new node per level
    assert created[-1].span_id == f"L{max_level}:000000"
    top_inputs = tree.gists(max_level - 1, range(K))[None]  # [1, K, D]
    torch.testing.assert_close(tree.gist(max_level, 0), mean_gist(max_level, top_inputs)[0])


def test_node_metadata():
    tree = make_tree(2 * 1024 + 40)  # 65 complete blocks, a tail of 8, 2 LOD2 nodes
    assert (tree.num_nodes(0), tree.num_nodes(1), tree.num_nodes(2)) == (66, 65, 2)
    assert tree.node(1, 42) == Node(
        level=1, index=42, start=1344, end=1376, gist_version=1, parent_id="L2:000001"
    )
    assert tree.node(1, 42).span_id == "L1:000042"
    assert tree.node(2, 1) == Node(level=2, index=1, start=1024, end=2048, gist_version=1, parent_id=None)
    assert tree.node(0, 65) == Node(level=0, index=65, start=2080, end=2088, gist_version=0, parent_id="L1:000065")
    assert [n.index for n in tree.nodes(2)] == [0, 1]
    with pytest.raises(IndexError):
        tree.node(2, 2)
    with pytest.raises(ValueError):
        tree.num_nodes(3)
    with pytest.raises(ValueError):
        tree.gists(0, [0])  # LOD0 has tokens, not gists


@settings(max_examples=30, deadline=None)
@given(chunks=st.lists(st.integers(1, 300), min_size=1, max_size=16), batch=st.integers(1, 70))
def test_ingest_in_chunks_equals_one_ingest(chunks, batch):
    stream = random_tokens(sum(chunks) + 1024)  # always reach LOD2
    whole = MegaContextTree(D, embed, mean_gist, gist_batch_size=batch)
    whole.ingest(stream)
    pieces = MegaContextTree(D, embed, mean_gist)
    pos = 0
    for n in chunks + [1024]:
        pieces.ingest(stream[pos : pos + n].tolist())  # lists are accepted too
        pos += n
    assert torch.equal(pieces.tokens, whole.tokens)
    for level in (1, 2):
        assert pieces.num_nodes(level) == whole.num_nodes(level) > 0
        n = whole.num_nodes(level)
        assert torch.equal(pieces.gists(level, range(n)), whole.gists(level, range(n)))


def test_ingest_in_chunks_equals_one_ingest_with_a_learned_gistnet():
    net = TinyGistNet()
    stream = random_tokens(3000)
    whole = MegaContextTree(D, embed, net)
    whole.ingest(stream)
    pieces = MegaContextTree(D, embed, net, gist_batch_size=5)
    for a in range(0, 3000, 77):
        pieces.ingest(stream[a : a + 77])
    for level in (1, 2):
        n = whole.num_nodes(level)
        torch.testing.assert_close(pieces.gists(level, range(n)), whole.gists(level, range(n)))
    assert not whole.gist(1, 0).requires_grad  # stored detached although the net has parameters


def test_gist_fn_calls_are_batched_per_level():
    calls = []

    def counting(level, x):
        calls.append((level, len(x)))
        return mean_gist(level, x)

    tree = MegaContextTree(D, embed, counting)
    tree.ingest(random_tokens(64 * 32))
    assert calls == [(1, 64), (2, 2)]

    calls.clear()
    small = MegaContextTree(D, embed, counting, gist_batch_size=10)
    small.ingest(random_tokens(64 * 32 + 5))
    assert calls == [(1, 10)] * 6 + [(1, 4), (2, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    net, newer = TinyGistNet(seed=0), TinyGistNet(seed=1)
    tree = make_tree(2 * 1024 + 300 + 17, gist_fn=net, gist_dtype=dtype)
    tree.rebuild_gists(newer)  # so a non-default gist_version must survive
    tree.save(tmp_path / "tree")
    loaded = MegaContextTree.load(tmp_path / "tree", embed, newer)

    assert loaded.tokens.dtype == torch.int32 and torch.equal(loaded.tokens, tree.tokens)
    assert (loaded.d_model, loaded.block_size, loaded.max_level, loaded.gist_dtype) == (D, 32, 2, dtype)
    assert (loaded.cursor, loaded.gist_version) == (tree.cursor, 2)
    for level in (0, 1, 2):
        assert loaded.nodes(level) == tree.nodes(level)
    for level in (1, 2):
        n = tree.num_nodes(level)
        a, b = tree.gists(level, range(n)), loaded.gists(level, range(n))
        assert a.dtype == b.dtype == dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    more = random_tokens(1024, seed=5)  # a loaded tree keeps growing exactly like the original
    tree.ingest(more)
    loaded.ingest(more)
    assert torch.equal(loaded.gists(2, range(3)), tree.gists(2, range(3)))
    meta = json.loads((tmp_path / "tree" / "tree.json").read_text())
    assert meta["gist_dtype"] == str(dtype).removeprefix("torch.") and meta["cursor"] == 2 * 1024 + 317


def test_save_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "tree"
    first, second = make_tree(100), make_tree(300)
    first.save(path)

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tree_module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        second.save(path)
    assert MegaContextTree.load(path, embed, mean_gist).cursor == 100  # the old tree is intact
    assert os.listdir(tmp_path) == ["tree"]  # no temp directory left behind

    monkeypatch.undo()
    second.save(path)
    assert MegaContextTree.load(path, embed, mean_gist).cursor == 300
    assert os.listdir(tmp_path) == ["tree"]


def test_load_rejects_inconsistent_files(tmp_path):
    make_tree(100).save(tmp_path / "tree")
    meta_path = tmp_path / "tree" / "tree.json"
    meta = json.loads(meta_path.read_text())
    meta["cursor"] = 132
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokens"):
        MegaContextTree.load(tmp_path / "tree", embed, mean_gist)


def test_rebuild_gists_bumps_version_and_rewrites_every_level():
    def doubled(level, x):
        return 2 * mean_gist(level, x)

    stream = random_tokens(2 * 1024 + 100)
    tree = make_tree(0)
    tree.ingest(stream)
    before = {L: tree.gists(L, range(tree.num_nodes(L))) for L in (1, 2)}
    tree.rebuild_gists(doubled)

    fresh = MegaContextTree(D, embed, doubled)  # what the newer GistNet gives from scratch
    fresh.ingest(stream)
    for L in (1, 2):
        after = tree.gists(L, range(tree.num_nodes(L)))
        assert not torch.allclose(after, before[L])
        assert torch.equal(after, fresh.gists(L, range(fresh.num_nodes(L))))
        assert all(n.gist_version == 2 for n in tree.nodes(L))
    assert tree.gist_version == 2 and all(n.gist_version == 0 for n in tree.nodes(0))

    more = random_tokens(1024, seed=3)  # later ingests use the newer GistNet
    tree.ingest(more)
    fresh.ingest(more)
    assert torch.equal(tree.gists(2, range(3)), fresh.gists(2, range(3)))


def test_ingest_rejects_bad_inputs():
    tree = make_tree(0)
    with pytest.raises(ValueError, match="1-D"):
        tree.ingest(torch.zeros(2, 32, dtype=torch.long))
    bad = MegaContextTree(D, embed, lambda level, x: x[:, 0, :3])
    with pytest.raises(ValueError, match="returned"):
        bad.ingest(random_tokens(32))


def test_ingesting_a_million_tokens():
    stream = random_tokens(1_000_000)
    tree = make_tree(0)
    for a in range(0, len(stream), 10_000):
        tree.ingest(stream[a : a + 10_000])
    assert tree.cursor == 1_000_000 and torch.equal(tree.tokens, stream.int())
    assert (tree.num_nodes(0), tree.num_nodes(1), tree.num_nodes(2)) == (31_250, 31_250, 976)
    last = mean_gist(1, embed(stream[-32:])[None])[0]
    torch.testing.assert_close(tree.gist(1, 31_249), last)
    torch.testing.assert_close(tree.gist(2, 975), mean_gist(2, tree.gists(1, range(975 * 32, 976 * 32))[None])[0])
