"""Index type choice, recall tuning, incremental add, filters and dedup on synthetic vectors."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from index_helpers import clustered, write_shard

from index.build import build_index, gpu_count, is_current, load_index, new_index, read_meta
from index.choose import FLAT_MAX_CELLS, choose_index, num_lists
from index.dedup import components, dedup
from index.search import Searcher
from index.tune import ExactTopK, recall_at_k
from index.update import update_index
from shardlight.core.errors import IndexStateError, InputError

DIM = 32


def _keys_and_scores(out, queries, k=10):
    s = Searcher(out)
    return [[(h.key, round(h.score, 5)) for h in s.search(vector=q, k=k)] for q in queries]


# --- choice ---------------------------------------------------------------------------------------------

def test_small_sets_get_exact_flat():
    assert choose_index(10_000, 512, 1 << 30).factory == "Flat"


def test_medium_sets_get_fast_scan_re_ranked_from_memory_mapped_float16():
    plan = choose_index(1_000_000, 512, 16 << 30)
    assert plan.factory == "IVF1024,PQ64x4fs,Refine(SQfp16)" and plan.tune == "nprobe"
    assert plan.bytes_estimate < 1_000_000 * 64  # RAM: 4-bit codes, centroids and ids, not the vectors
    assert plan.mapped_bytes == 1_000_000 * 512 * 2  # the float16 rows stay on disk


def test_dimensions_without_an_even_fast_scan_split_get_ivf_flat():
    assert choose_index(1_000_000, 500, 16 << 30).factory == "IVF4096,Flat"


def test_a_budget_far_below_the_vectors_still_gets_fast_scan_with_the_rerank_on_disk():
    plan = choose_index(5_000_000, 512, 1 << 30)  # 10 GB of float32 vectors, 1 GiB of RAM
    assert plan.factory == "IVF2048,PQ64x4fs,Refine(SQfp16)" and plan.bytes_estimate <= 1 << 30


def test_past_the_fast_scan_budget_an_index_built_in_parts_keeps_its_lists_on_disk():
    n, dim, budget = 1_000_000_000, 512, 32 << 30  # 40 GB of fast-scan codes and ids: not in 32 GiB of RAM
    plan = choose_index(n, dim, budget, on_disk=True)
    assert plan.factory == "IVF131072_HNSW32,PQ64,Refine(SQfp16)"  # 8-bit PQ, lists merged on disk
    assert plan.bytes_estimate < 1 << 30 and plan.mapped_bytes == n * dim * 2 + n * (64 + 8)
    assert choose_index(n, dim, budget).factory.startswith("OPQ")  # in RAM: the smallest codes that fit
    with pytest.raises(IndexStateError, match="cannot fit"):
        choose_index(5 * n, dim, budget)


def test_tight_budget_compresses_scalar_first_then_pq():
    n, dim = 1_000_000, 504  # no even fast-scan split (63 codes): the older ladder, now re-ranked from float16
    assert choose_index(n, dim, 1 << 30).factory == "IVF4096,SQ8,Refine(SQfp16)"  # 2 GB float32 does not fit
    pq_plan = choose_index(n, dim, 200 << 20)
    assert pq_plan.factory.startswith("OPQ") and pq_plan.factory.endswith(",Refine(SQfp16)")
    assert pq_plan.bytes_estimate <= 200 << 20 and pq_plan.mapped_bytes == n * dim * 2
    with pytest.raises(IndexStateError, match="cannot fit"):
        choose_index(n, dim, 1 << 20)


def test_very_many_lists_use_an_hnsw_quantizer():
    assert choose_index(50_000_000, 500, 1 << 40).factory.startswith("IVF32768_HNSW32,")  # IVF,Flat: 4·√n lists
    assert choose_index(500_000_000, 512, 1 << 42).factory.startswith("IVF16384_HNSW32,")  # fast scan: √n lists


def test_num_lists_is_a_power_of_two_near_4_sqrt_n_with_enough_points():
    assert num_lists(1_000_000) == 4096
    assert num_lists(1_000_000, per_root=1) == 1024
    assert num_lists(100_000) == 1024
    assert num_lists(1_000) * 39 <= 1_000
    assert FLAT_MAX_CELLS // 512 < 100_000  # 100k × 512-d is served by an approximate index


def test_pq_indexes_skip_polysemous_training_which_no_search_here_uses():
    for factory in ("IVF16,PQ8", "IVF16_HNSW32,PQ8,Refine(SQfp16)", "OPQ8,IVF16,PQ8"):
        index = new_index(32, factory)  # kept: the IVF part below points into it
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        assert ivf.do_polysemous_training is False, factory
        assert ivf.polysemous_ht == 0, factory


# --- tuning ---------------------------------------------------------------------------------------------

def test_exact_top_k_matches_brute_force_and_leaves_queries_out():
    x = clustered(2000, DIM)
    qids = np.array([3, 500, 1999])
    exact = ExactTopK(x[qids], qids, 5)
    for start in range(0, 2000, 300):
        exact.update(x[start:start + 300], start)
    sims = x[qids] @ x.T
    sims[np.arange(3), qids] = -np.inf
    truth = np.argsort(-sims, axis=1)[:, :5]
    assert recall_at_k(exact.ids, truth) == 1.0
    assert not np.isin(qids[:, None], exact.ids).any(axis=1).any()


def test_build_tunes_nprobe_to_reach_the_recall_target(tmp_path):
    parts = [clustered(2000, DIM, seed=i) for i in range(3)]
    keys = [k for i, part in enumerate(parts) for k in write_shard(tmp_path, f"{i:05d}", part)]
    meta = build_index(str(tmp_path), "IVF64,Flat", recall_target=0.95, tune_queries=200)
    tuning = meta["tuning"]  # one probe is not enough for 0.95 on this data: the tuner must find two
    assert tuning["param"] == "nprobe" and tuning["reached"]
    assert tuning["recall_at_k"] >= 0.95 and tuning["queries"] == 200
    assert tuning["value"] == min(c["value"] for c in tuning["curve"] if c["recall_at_k"] >= 0.95)
    assert tuning["qps"] > 0 and tuning["latency_ms_p50"] > 0
    index, _, _ = load_index(str(tmp_path))
    assert faiss.extract_index_ivf(index).nprobe == tuning["value"]  # applied when the index is loaded
    on_disk = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert on_disk["nprobe"] == tuning["value"] and on_disk["count"] == 6000
    recall = fresh_recall_at_10(tmp_path, np.concatenate(parts), keys, seeds=(0, 1, 2))
    assert recall >= 0.95, recall  # nprobe=1 would give 0.94 here


def fresh_recall_at_10(out, vectors: np.ndarray, keys: list[str], seeds=(0,), n: int = 300) -> float:
    """Recall@10 of the index as loaded from disk, on queries it never saw, against numpy brute force over
    the vectors the test wrote (keys, not ids, are compared: the id map is under test too)."""
    index, ids, _ = load_index(str(out))
    stored_keys = ids.column("key").to_pylist()
    queries = np.concatenate([clustered(n // len(seeds), DIM, seed=s, fresh=1) for s in seeds])  # new points
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    _, found = index.search(queries, 10)
    return float(np.mean([len({stored_keys[i] for i in f if i >= 0} & {keys[i] for i in t}) / 10
                          for f, t in zip(found, truth)]))


def test_rerank_index_tunes_search_breadth_and_rerank_depth_together(tmp_path):
    write_shard(tmp_path, "00000", clustered(6000, DIM))
    meta = build_index(str(tmp_path), "IVF32,PQ8x4fs,RFlat", recall_target=0.95, tune_queries=200)
    tuning = meta["tuning"]
    assert tuning["reached"] and tuning["recall_at_k"] >= 0.95
    assert set(tuning["params"]) == {"nprobe", "k_factor_rf"} and meta["nprobe"] == tuning["params"]["nprobe"]
    hits = [c for c in tuning["curve"] if c["recall_at_k"] >= 0.95]
    assert tuning["qps"] == max(c["qps"] for c in hits)  # the fastest setting that reaches the target
    index, _, _ = load_index(str(tmp_path))
    assert faiss.extract_index_ivf(index).nprobe == tuning["params"]["nprobe"]
    assert faiss.downcast_index(index).k_factor == tuning["params"]["k_factor_rf"]
    s = Searcher(str(tmp_path))
    assert np.allclose(s.vector_of_id(7), clustered(6000, DIM)[7])  # re-rank vectors are exact


def test_auto_with_a_tight_budget_re_ranks_from_the_float16_file_and_reaches_the_target(tmp_path):
    vectors = clustered(6000, DIM)
    keys = write_shard(tmp_path, "00000", vectors)
    meta = build_index(str(tmp_path), "auto", memory_budget=400_000, recall_target=0.95, tune_queries=200)
    assert meta["factory"].endswith(",Refine(SQfp16)") and meta["requested_factory"] == "auto"
    assert meta["tuning"]["recall_at_k"] >= 0.95 and "vectors" in meta["files"]
    recall = fresh_recall_at_10(tmp_path, vectors, keys)
    assert recall >= 0.95, recall
    assert meta["choice"]["bytes_estimate"] <= 400_000


def test_auto_sq8_with_a_tight_budget_still_reaches_the_target(tmp_path):
    dim = 36  # no even 4-bit fast-scan split: scalar quantisation, re-ranked
    vectors = clustered(6000, dim)
    write_shard(tmp_path, "00000", vectors)
    meta = build_index(str(tmp_path), "auto", memory_budget=400_000, recall_target=0.95, tune_queries=200)
    assert meta["factory"].endswith(",SQ8,Refine(SQfp16)") and meta["tuning"]["recall_at_k"] >= 0.95


def test_explicit_nprobe_is_kept_and_measured(tmp_path):
    write_shard(tmp_path, "00000", clustered(3000, DIM))
    meta = build_index(str(tmp_path), "IVF32,Flat", nprobe=32, tune_queries=100)
    assert meta["nprobe"] == 32 and meta["tuning"]["recall_at_k"] == 1.0  # every list probed: exact


def test_bad_factory_is_one_clear_error(tmp_path):
    write_shard(tmp_path, "00000", clustered(100, DIM))
    with pytest.raises(IndexStateError, match="bad FAISS factory"):
        build_index(str(tmp_path), "NoSuchIndex")


# --- incremental ----------------------------------------------------------------------------------------

def test_incremental_flat_answers_exactly_like_a_rebuild(tmp_path):
    inc, full = tmp_path / "inc", tmp_path / "full"
    parts = [clustered(500, DIM, seed=s) for s in range(3)]
    for out in (inc, full):
        write_shard(out, "00000", parts[0])
        write_shard(out, "00001", parts[1])
    build_index(str(inc), "Flat")
    for out in (inc, full):
        write_shard(out, "00002", parts[2])
    meta = update_index(str(inc))
    build_index(str(full), "Flat")
    assert meta["update"] == {"mode": "added", "added": 500, "shards": 1}
    assert meta["fingerprint"] == read_meta(str(full))["fingerprint"]
    queries = clustered(20, DIM, seed=9)
    assert _keys_and_scores(str(inc), queries) == _keys_and_scores(str(full), queries)


def test_incremental_ivf_keeps_the_trained_quantizer(tmp_path):
    write_shard(tmp_path, "00000", clustered(3000, DIM, seed=1))
    build_index(str(tmp_path), "IVF32,Flat", tune_queries=100)
    before, _, _ = load_index(str(tmp_path))
    centroids = faiss.extract_index_ivf(before).quantizer.reconstruct_n(0, 32)
    write_shard(tmp_path, "00001", clustered(1000, DIM, seed=1))  # same distribution: no drift
    meta = update_index(str(tmp_path))
    after, ids, _ = load_index(str(tmp_path))
    ivf = faiss.extract_index_ivf(after)
    assert np.array_equal(ivf.quantizer.reconstruct_n(0, 32), centroids)
    assert after.ntotal == ids.num_rows == 4000 and not meta["drift"]["drifted"]
    # probing every list, the incremental index answers exactly like an exact rebuild over the same rows
    ivf.nprobe = 32
    exact = tmp_path / "exact"
    write_shard(exact, "00000", clustered(3000, DIM, seed=1))
    write_shard(exact, "00001", clustered(1000, DIM, seed=1))
    build_index(str(exact), "Flat")
    queries = clustered(10, DIM, seed=5)
    got = after.search(queries, 10)[1]
    want = load_index(str(exact))[0].search(queries, 10)[1]
    assert np.array_equal(got, want)


def test_drifted_data_is_flagged_and_rebuilt_on_request(tmp_path):
    write_shard(tmp_path, "00000", clustered(3000, DIM, seed=1))
    build_index(str(tmp_path), "IVF32,Flat", tune_queries=100)
    write_shard(tmp_path, "00001", clustered(1000, DIM, seed=77, spread=0.05))  # new, unseen clusters
    flagged = update_index(str(tmp_path))
    assert flagged["drift"]["drifted"] and flagged["drift"]["ratio"] > 1.25
    write_shard(tmp_path, "00002", clustered(1000, DIM, seed=78, spread=0.05))
    rebuilt = update_index(str(tmp_path), rebuild_on_drift=True, tune_queries=100)
    assert rebuilt["update"]["mode"] == "rebuilt" and rebuilt["count"] == 5000


def test_a_rewritten_shard_forces_a_rebuild(tmp_path):
    write_shard(tmp_path, "00000", clustered(300, DIM, seed=1))
    build_index(str(tmp_path), "Flat")
    write_shard(tmp_path, "00000", clustered(310, DIM, seed=2))
    meta = update_index(str(tmp_path))
    assert meta["update"]["mode"] == "rebuilt" and meta["count"] == 310
    assert update_index(str(tmp_path))["update"]["mode"] == "unchanged"


def test_index_update_measures_speed_at_the_new_size_and_says_recall_is_the_builds(tmp_path, monkeypatch):
    """The artifact after an index-update shows the queries/s that update measured, never the build's figure."""
    from flows.report.summary import summary_markdown
    from index import update

    write_shard(tmp_path, "00000", clustered(300, DIM, seed=1))
    built = build_index(str(tmp_path), "Flat", tune_queries=50)
    write_shard(tmp_path, "00001", clustered(200, DIM, seed=2))
    measured = []

    def timed_search(index, queries, query_ids, k):  # the real search, with a figure no build could have
        measured.append((index.ntotal, len(queries), int(query_ids.min())))
        return None, {"qps": 4242.0, "latency_ms_p50": 0.25}

    monkeypatch.setattr(update, "timed_search", timed_search)
    meta = update_index(str(tmp_path))
    assert measured == [(500, 50, 300)]  # at the grown size, on new vectors (ids 300…), as many as the build's
    tuning = meta["tuning"]
    assert tuning["qps"] == 4242.0 and tuning["speed_count"] == meta["count"] == 500
    assert tuning["recall_count"] == 300 and tuning["recall_at_k"] == built["tuning"]["recall_at_k"]
    assert read_meta(str(tmp_path))["tuning"] == tuning
    text = summary_markdown(str(tmp_path))  # what the Prefect artifact and the report show
    assert "on 300 vectors (not re-measured after index-update)" in text
    assert "4,242 queries/s (measured after index-update)" in text and text.count("queries/s") == 1


# --- filters --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW16", "PCA16,IVF8,SQ8", "IVF8,PQ8x4fs,RFlat",
                                     "IVF8,PQ8x4fs,Refine(SQfp16)"])
def test_label_and_synthetic_filters_run_inside_the_index(tmp_path, factory):
    n = 1000
    labels = ["rare" if i % 100 == 0 else "common" for i in range(n)]
    write_shard(tmp_path, "00000", clustered(n, DIM), labels=labels, synthetic=[i % 2 == 1 for i in range(n)])
    build_index(str(tmp_path), factory, nprobe=8 if "IVF" in factory else None, tune_queries=50)
    s = Searcher(str(tmp_path))
    q = clustered(1, DIM, seed=3)[0]
    rare = s.search(vector=q, k=10, label="rare")
    assert len(rare) == 10 and {h.label for h in rare} == {"rare"}
    synthetic = s.search(vector=q, k=20, synthetic=True)
    assert len(synthetic) == 20 and all(h.synthetic for h in synthetic)
    assert all(not h.synthetic for h in s.search(vector=q, k=20, synthetic=False))
    with pytest.raises(InputError, match="closest: 'common', 'rare'"):  # a typo is an error, not "no results"
        s.search(vector=q, k=5, label="no such label")


def test_missing_synthetic_column_means_not_synthetic(tmp_path):
    write_shard(tmp_path, "00000", clustered(50, DIM))
    build_index(str(tmp_path), "Flat")
    s = Searcher(str(tmp_path))
    q = clustered(1, DIM, seed=3)[0]
    assert s.search(vector=q, k=5, synthetic=True) == []
    assert len(s.search(vector=q, k=5, synthetic=False)) == 5


# --- dedup ----------------------------------------------------------------------------------------------

def test_components_joins_chains():
    labels = components(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert labels.tolist() == [0, 0, 0, 3, 4, 4]


def test_dedup_finds_planted_duplicate_groups(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, DIM)).astype(np.float32)  # spread out: no accidental duplicates
    x[100] = x[7] + 1e-3
    x[250] = x[7] - 1e-3  # a group of three: 7, 100, 250
    x[399] = x[42] * 1.0001  # a pair: 42, 399
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_shard(tmp_path, "00000", x)
    build_index(str(tmp_path), "Flat")
    summary = dedup(str(tmp_path), threshold=0.99)
    assert summary["groups"] == 2 and summary["duplicates"] == 3
    table = pq.read_table(tmp_path / "dedup" / "duplicates.parquet").to_pylist()
    groups = {}
    for r in table:
        groups.setdefault(r["group"], []).append((r["row"], r["representative"]))
    assert groups == {7: [(7, True), (100, False), (250, False)], 42: [(42, True), (399, False)]}
    assert all(r["similarity"] >= 0.99 for r in table)
    assert not any(r["synthetic"] for r in table)


def test_dedup_says_which_members_are_generated(tmp_path):
    x = clustered(40, DIM, seed=4, spread=0.3)
    write_shard(tmp_path, "00000", x)
    write_shard(tmp_path, "00000", x[:3] * 1.0001, folder="augmented", key_prefix="gen", synthetic=[True] * 3)
    build_index(str(tmp_path), "Flat")
    summary = dedup(str(tmp_path), threshold=0.999)
    rows = pq.read_table(tmp_path / "dedup" / "duplicates.parquet").to_pylist()
    by_key = {r["key"]: r for r in rows}
    assert {k for k, r in by_key.items() if r["synthetic"]} == {f"gen_{i:06d}" for i in range(3)}
    assert all(not by_key[f"00000_{i:06d}"]["synthetic"] and by_key[f"00000_{i:06d}"]["representative"] for i in range(3))
    assert summary["synthetic_members"] == 3


def test_dedup_default_threshold_is_the_documented_one():
    import inspect

    from flows.index_cli import dedup as dedup_command
    from index import DEDUP_THRESHOLD

    assert inspect.signature(dedup).parameters["threshold"].default == DEDUP_THRESHOLD
    assert inspect.signature(dedup_command).parameters["threshold"].default.default == DEDUP_THRESHOLD
    docs = (Path(__file__).resolve().parent.parent / "docs" / "index.md").read_text()
    assert f"shardlight dedup OUT --threshold {DEDUP_THRESHOLD}" in docs


def test_dedup_refuses_a_stale_index(tmp_path):
    write_shard(tmp_path, "00000", clustered(50, DIM))
    build_index(str(tmp_path), "Flat")
    write_shard(tmp_path, "00001", clustered(50, DIM, seed=1))
    with pytest.raises(IndexStateError, match="index-update"):
        dedup(str(tmp_path), threshold=0.9)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA build of FAISS and a GPU")
def test_ivf_training_runs_on_the_gpu_and_saves_a_cpu_index(tmp_path):
    write_shard(tmp_path, "00000", clustered(5000, DIM))
    meta = build_index(str(tmp_path), "IVF32,Flat", tune_queries=100)
    index, _, _ = load_index(str(tmp_path))
    assert meta["tuning"]["reached"] and faiss.extract_index_ivf(index).clustering_index is None


# --- generated rows ----------------------------------------------------------------------------------------

def _run_with_generated_rows(out):
    real = write_shard(out, "00000", clustered(300, DIM, seed=1))
    fake = write_shard(out, "00000", clustered(40, DIM, seed=2), folder="augmented", key_prefix="gen",
                       synthetic=[True] * 40)
    return real, fake


def test_index_can_leave_generated_rows_out_and_keeps_that_choice(tmp_path):
    out = str(tmp_path)
    real, fake = _run_with_generated_rows(out)
    meta = build_index(out, "Flat", synthetic=False)
    assert meta["count"] == len(real) and meta["synthetic"] is False
    assert is_current(out) and is_current(out, synthetic=False) and not is_current(out, synthetic=True)
    keys = {h.key for q in clustered(5, DIM, seed=2) for h in Searcher(out).search(vector=q, k=20)}
    assert keys and keys <= set(real)  # the queries sit in the generated clusters, yet only input rows answer
    assert update_index(out)["update"]["mode"] == "unchanged"  # the augmented file is not "new" to this index
    assert dedup(out, threshold=0.999)["rows"] == len(real)

    meta = update_index(out, synthetic=True)
    assert meta["update"]["mode"] == "rebuilt" and "included" in meta["update"]["reason"]
    assert meta["count"] == len(real) + len(fake) and meta["synthetic"] is True
    hits = Searcher(out).search(vector=clustered(1, DIM, seed=2)[0], k=5, synthetic=True)
    assert hits and all(h.key in fake and h.synthetic for h in hits)


def test_flow_index_stage_follows_the_config_choice(tmp_path):
    from flows.pipeline import index_stage
    from shardlight.core.config import IndexSpec, RunConfig

    real, fake = _run_with_generated_rows(str(tmp_path))
    cfg = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path), index=IndexSpec(synthetic=False))
    assert index_stage.fn(cfg)["count"] == len(real)
    assert index_stage.fn(cfg)["update"]["mode"] == "unchanged"
    both = index_stage.fn(cfg.model_copy(update={"index": IndexSpec(synthetic=True)}))
    assert both["count"] == len(real) + len(fake) and both["update"]["mode"] == "rebuilt"
