"""Counterfactual delta tables on a tiny random Llama: the SPEC §6 schema plus the GistNet checkpoint,
written atomically under the given directory with stats logged, a validator that catches corruption, the
recency context always labelled, legal in-budget candidates, batching that does not change the numbers,
labels reproducible from the contexts file, and the oracle's scores."""

import shutil

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import random_ids, tiny_config

from mcx_core.eval.nll import ConditionInput, MeanPoolGister, horizon_nll
from mcx_core.focus import delta_tables as T
from mcx_core.focus import deltas as D
from mcx_core.focus import policies
from mcx_core.focus.policies import OraclePolicy
from mcx_core.model.tree import MegaContextTree
from mcx_core.model.working_context import WorkingContext
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import MemorySink

C, H, W = 256, 8, 96
SPEC_COLUMNS = {
    "run_id": pa.string(),
    "cycle": pa.int32(),
    "sample_id": pa.string(),
    "block_id": pa.string(),
    "level": pa.int32(),
    "action": pa.string(),
    "delta_nll": pa.float64(),
    "token_cost": pa.int32(),
    "distance_to_cursor": pa.int32(),
    "horizon": pa.int32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**deltas):
    return tiny_config(
        "deltas-test",
        C,
        H,
        seed=5,
        working_context={"w_max": W, "eval_w_max": [W], "recent_tokens": 32},
        deltas={"samples": 3, "contexts_per_sample": 3, "max_candidates": 6, "batch_size": 4, **deltas},
    )


def _ids(n=5, seed=0) -> np.ndarray:
    return random_ids((n, C + H), seed).numpy()


@pytest.fixture(scope="module")
def generated(lm, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("artifacts") / "deltas"
    ids = _ids()
    sink = MemorySink()
    path, stats = D.generate_delta_table(
        _cfg(),
        lm,
        MeanPoolGister(),
        out_dir.parent / "checkpoints" / "JT1_cycle0_step7",
        ids,
        out_dir,
        sink,
        progress=False,
        cycle=0,
        run_id="run-a",
        sample_ids=[f"s{i}" for i in range(len(ids))],
    )
    return path, stats, sink, out_dir


@pytest.fixture(scope="module")
def table(generated):
    return generated[0]


def test_written_atomically_under_the_directory_with_stats(generated):
    path, stats, sink, out_dir = generated
    assert path == out_dir / "deltas_cycle0_JT1_cycle0_step7.parquet"
    assert path == D.delta_table_path(out_dir, 0, "JT1_cycle0_step7")
    # the table and its contexts, no temporary files left behind
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([path.name, D.contexts_path(path).name])
    n_rows = pq.read_table(path).num_rows
    assert stats[M.DELTAS_SAMPLES] == 3 and stats[M.DELTAS_CONTEXTS] == 9 and stats[M.DELTAS_ROWS] == n_rows
    assert stats[M.DELTAS_ROWS_PER_CONTEXT] == pytest.approx(n_rows / 9)
    assert stats[M.DELTAS_SEQUENCES] == n_rows + 9
    assert stats[M.DELTAS_SECONDS_PER_CONTEXT] == pytest.approx(stats[M.DELTAS_SECONDS] / 9)
    assert 0 <= stats[M.DELTAS_HELPFUL_FRACTION] <= 1
    d = pq.read_table(path).to_pydict()
    expand = [x for x, a in zip(d["delta_nll"], d["action"]) if a == "expand"]
    assert stats[M.DELTAS_EXPAND_DELTA_NLL_MEAN] == pytest.approx(np.mean(expand))
    assert {k: v[-1] for k, v in sink.history.items()} == {k: (0, v) for k, v in stats.items()}


def _tree(lm, ids) -> MegaContextTree:
    tree = MegaContextTree(lm.d_model, lm.embed, MeanPoolGister(), block_size=32)
    tree.ingest(torch.as_tensor(ids[:C]))
    return tree


def test_schema_has_every_spec_column_and_duckdb_reads_it(table):
    schema = pq.read_schema(table)
    for name, dtype in SPEC_COLUMNS.items():
        assert schema.field(name).type == dtype, name
    assert T.validate_delta_table(table) == []
    con = duckdb.connect()
    counts = dict(con.execute(f"SELECT action, count(*) FROM read_parquet('{table}') GROUP BY 1").fetchall())
    assert set(counts) == {"expand", "collapse"}
    n = pq.read_table(table).num_rows
    assert n == sum(counts.values()) and n > 0
    d = pq.read_table(table).to_pydict()
    assert set(d["horizon"]) == {H} and set(d["w_max"]) == {W}
    assert np.allclose(np.array(d["nll_after"]) - np.array(d["nll_before"]), d["delta_nll"])


def test_labels_carry_the_gistnet_checkpoint(table):
    assert set(pq.read_table(table).column("gistnet_checkpoint").to_pylist()) == {"JT1_cycle0_step7"}
    assert set(T.read_contexts(table).column("gistnet_checkpoint").to_pylist()) == {"JT1_cycle0_step7"}
    assert set(pq.read_table(table).column("run_id").to_pylist()) == {"run-a"}


def test_recency_context_is_always_labelled(lm, table):
    contexts = T.read_contexts(table).to_pylist()
    labelled = set(pq.read_table(table).column("context_id").to_pylist())
    samples = {c["sample_id"] for c in contexts}
    assert len(samples) == 3 and len(contexts) == 9
    for s in samples:
        recency = [c for c in contexts if c["sample_id"] == s and c["kind"] == "recency"]
        assert len(recency) == 1 and recency[0]["context_id"] in labelled
        wc, _ = T.rebuild_context(recency[0], lm.embed, MeanPoolGister(), lm.d_model)
        assert wc.entries == WorkingContext.initial(wc.tree, W, recent_tokens=32).entries


def test_labels_are_reproducible_from_the_contexts_file(lm, table):
    """What JT2 rebuilds is what was labelled: the context's NLL recomputed from the stored history,
    entries and horizon equals the stored nll_before."""
    for row in T.read_contexts(table).to_pylist()[:4]:
        wc, ages = T.rebuild_context(row, lm.embed, MeanPoolGister(), lm.d_model)
        assert len(ages) == len(wc.entries) and min(ages) >= 0
        nll = horizon_nll(lm, [D.context_input(wc, lm.embed)], torch.tensor([row["horizon_ids"]]))
        assert nll.mean().item() == pytest.approx(row["nll_before"], abs=1e-5)


def test_candidates_are_legal_and_within_budget(lm):
    ids = _ids(1, seed=3)[0]
    recency = WorkingContext.initial(_tree(lm, ids), W, recent_tokens=32)
    rng = np.random.default_rng(0)
    contexts = [recency] + [D.perturbed_context(recency, rng, 4)[0] for _ in range(6)]
    assert any(wc.entries != recency.entries for wc in contexts)
    saw_paired = saw_plain = False
    for wc in contexts:
        wc.check_invariants()
        cands = D.candidate_actions(wc)
        collapses = {c.index for c in cands if c.action == "collapse"}
        assert collapses == {i for i in range(len(wc.entries)) if wc.can_collapse(i)}
        for cand in cands:
            after = D.apply_candidate(wc, cand)
            after.check_invariants()  # budget, coverage, alignment, legality
            if cand.action == "expand":
                fits = wc.cost + wc.expand_cost(cand.index) <= W
                assert (cand.paired_collapse is None) == fits
                saw_paired |= not fits
                saw_plain |= fits
    assert saw_paired and saw_plain


def test_a_delta_computed_in_a_batch_equals_the_delta_computed_alone(lm):
    ids = _ids(2, seed=4)
    contexts = [WorkingContext.initial(_tree(lm, row), W, recent_tokens=32) for row in ids]
    horizons = [torch.as_tensor(row[C:]) for row in ids]
    cands = [D.candidate_actions(wc) for wc in contexts]
    batched = D.evaluate_candidates(lm, contexts, horizons, cands, batch_size=8)
    alone = D.evaluate_candidates(lm, contexts, horizons, cands, batch_size=1)
    for (b0, b), (a0, a) in zip(batched, alone):
        assert b0 == pytest.approx(a0, abs=1e-5)
        np.testing.assert_allclose(b, a, atol=1e-5)
    # ...and equals a forward of the context built by hand with the WorkingContext methods.
    wc, cand = contexts[0], next(c for c in cands[0] if c.paired_collapse is not None)
    manual = WorkingContext(wc.tree, W, 32, entries=wc.entries)
    target = manual.entries[cand.index]
    manual.collapse(cand.paired_collapse)
    manual.expand(manual.entries.index(target))
    embeds, positions, _ = manual.assemble(lm.embed)
    nll = horizon_nll(lm, [ConditionInput(embeds, positions, C)], horizons[0][None]).mean().item()
    assert nll == pytest.approx(batched[0][1][cands[0].index(cand)], abs=1e-5)


def test_validator_rejects_corrupted_tables(table, tmp_path):
    def copy(name):
        dst = tmp_path / f"{name}.parquet"
        shutil.copy(table, dst)
        shutil.copy(D.contexts_path(table), D.contexts_path(dst))
        return dst

    garbage = copy("garbage")
    garbage.write_bytes(b"not a parquet file")
    assert T.validate_delta_table(garbage)

    t = pq.read_table(table)
    broken = {
        "dropped": t.drop_columns(["delta_nll"]),
        "retyped": t.set_column(
            t.schema.get_field_index("level"), "level", t.column("level").cast(pa.string())
        ),
        "bad_action": t.set_column(
            t.schema.get_field_index("action"), "action", pa.array(["explode"] * t.num_rows)
        ),
        "non_finite": t.set_column(
            t.schema.get_field_index("delta_nll"), "delta_nll", pa.array([float("nan")] * t.num_rows)
        ),
    }
    for name, bad in broken.items():
        path = copy(name)
        pq.write_table(bad, path)
        assert T.validate_delta_table(path), name

    orphan = copy("orphan")
    D.contexts_path(orphan).unlink()
    assert any("contexts file missing" in p for p in T.validate_delta_table(orphan))
    garbled = copy("garbled")
    D.contexts_path(garbled).write_bytes(b"not an arrow file")
    assert any("not a readable Arrow file" in p for p in T.validate_delta_table(garbled))

    # on-policy: one GistNet per table
    mixed = copy("mixed")
    ckpt = t.column("gistnet_checkpoint").to_pylist()
    ckpt[0] = "JT1_cycle1_step9"
    pq.write_table(
        t.set_column(t.schema.get_field_index("gistnet_checkpoint"), "gistnet_checkpoint", pa.array(ckpt)),
        mixed,
    )
    assert any("gistnet_checkpoint" in p for p in T.validate_delta_table(mixed))

    # every sample keeps its labelled recency context
    no_recency = copy("no_recency")
    recency_ids = {c["context_id"] for c in T.read_contexts(table).to_pylist() if c["kind"] == "recency"}
    keep = pa.array([cid not in recency_ids for cid in t.column("context_id").to_pylist()])
    pq.write_table(t.filter(keep), no_recency)
    assert any("recency" in p for p in T.validate_delta_table(no_recency))

    assert T.validate_delta_table(copy("intact")) == []


def test_oracle_scores_follow_true_counterfactuals(lm, monkeypatch):
    """Planted counterfactual NLLs: the oracle reads the horizon after the cursor and turns utilities into
    the scores JT2 trains towards (helpful expands positive, helpful collapses negative, harm -> 0)."""
    ids = _ids(1, seed=6)[0]
    tree = _tree(lm, ids)
    wc = WorkingContext.initial(tree, W, recent_tokens=32)
    # 6 LOD1 gists (expand only, each paired with collapsing block 6), block 6 (collapse only), block 7 (newest)
    assert [e.level for e in wc.entries] == [1] * 6 + [0, 0]
    planted = {("expand", 2): 4.8, ("expand", 4): 4.9, ("collapse", 6): 4.95}
    seen = {}

    def fake_evaluate(lm_, contexts, horizons, candidates, batch_size):
        seen["horizon"] = horizons[0]
        return [(5.0, [planted.get((c.action, c.index), 5.3) for c in candidates[0]])]

    monkeypatch.setattr(policies, "evaluate_candidates", fake_evaluate)
    horizon = torch.as_tensor(ids[C:])
    oracle = OraclePolicy(lm, horizon_ids_fn=lambda cursor: horizon if cursor == C else None)
    assert oracle.name == "oracle"
    scores = oracle.scores(wc, tree, step=0)
    assert torch.equal(seen["horizon"], horizon)  # the future, by design
    expected = torch.tensor([0.0, 0.0, 0.2 / 0.3, 0.0, 0.1 / 0.3, 0.0, -0.05 / 0.3, 0.0])
    torch.testing.assert_close(scores, expected)


def test_oracle_on_the_real_counterfactuals(lm):
    ids = _ids(1, seed=7)[0]
    tree = _tree(lm, ids)
    wc = WorkingContext.initial(tree, W, recent_tokens=32)
    horizon = torch.as_tensor(ids[C:])
    scores = OraclePolicy(lm, horizon_ids_fn=lambda cursor: horizon, utility_floor=1e-9).scores(wc, tree, 0)
    cands = D.candidate_actions(wc)
    [(before, after)] = D.evaluate_candidates(lm, [wc], [horizon], [cands], batch_size=8)
    assert scores.abs().max() <= 1 and scores[-1] == 0  # the newest block has no legal action
    for cand, nll in zip(cands, after):
        helps = nll < before
        s = scores[cand.index].item()
        if cand.action == "expand":  # these gists cannot collapse: the expand alone sets the score
            assert (s > 0) if helps else (s == 0)
        else:  # LOD0 block: the collapse alone sets the score
            assert (s < 0) if helps else (s == 0)


def test_on_policy_contexts_follow_the_allocator_and_carry_documents(lm, tmp_path):
    """`deltas.on_policy_contexts`: contexts the allocator's own trajectory reaches (its true ages, every
    invariant), labelled like the others; each context names its sample's document."""
    cfg = _cfg(samples=2, contexts_per_sample=3, on_policy_contexts=1, trajectory_steps=3)
    ids = _ids(3, seed=4)
    path, _ = D.generate_delta_table(cfg, lm, MeanPoolGister(), "JT1_cycle0_step1", ids, tmp_path, progress=False,
                                     sample_ids=["a", "b", "c"], doc_ids=["d1", "d1", "d2"])
    contexts = T.read_contexts(path).to_pylist()
    assert sorted(c["kind"] for c in contexts) == ["on_policy", "on_policy", "perturbed", "perturbed", "recency", "recency"]
    assert {c["sample_id"]: c["doc_id"] for c in contexts}.items() <= {"a": "d1", "b": "d1", "c": "d2"}.items()
    for c in contexts:
        if c["kind"] == "on_policy":  # rebuilt exactly, within budget, ages from the allocator (small)
            wc, ages = T.rebuild_context(c, lm.embed, MeanPoolGister(), lm.d_model)
            wc.check_invariants()
            assert wc.cost <= wc.w_max and len(ages) == len(wc.entries)
            assert max(ages) <= cfg.allocator.min_residency + 3  # settled prefill + 3 trajectory steps
    rows = pq.read_table(path).to_pylist()
    assert {r["context_id"] for r in rows} <= {c["context_id"] for c in contexts}


def test_longer_histories_at_another_budget_are_labelled_in_that_setting(lm, tmp_path):
    """`w_max` (deltas.histories: runtime): histories are the rows but the horizon, contexts have that
    budget, and LOD2 collapses appear among the candidates once the history holds 32 gists."""
    cfg = _cfg(samples=2, contexts_per_sample=1, max_candidates=64)
    long_c = 40 * 32
    ids = random_ids((2, long_c + H), 9).numpy()
    path, _ = D.generate_delta_table(cfg, lm, MeanPoolGister(), "JT1_cycle0_step1", ids, tmp_path, progress=False,
                                     w_max=W + 64, doc_ids=["x", "y"])
    contexts = T.read_contexts(path).to_pylist()
    assert {c["w_max"] for c in contexts} == {W + 64} and {c["cursor"] for c in contexts} == {long_c}
    rows = pq.read_table(path).to_pylist()
    assert any(r["action"] == "collapse" and r["level"] == 1 for r in rows)  # 32 gists -> one LOD2
