"""Retrieval metrics: perturbation level, replicate mAP, chance levels, deduplication, and under DDP.

Heavy imports (sklearn, Lightning) are made inside the tests that need them: the DDP test's worker
processes import this module, and should start fast.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unimodality.metrics import (
    EmbeddingCollector,
    chance_levels,
    cross_recall,
    perturbation_retrieval,
    random_average_precision,
    replicate_map,
    retrieval_scores,
    row_recall,
    unique_rows,
)


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_perturbation_retrieval_by_hand():
    # modality A: perturbation 0 has two replicates whose mean points along x; 1 along y; 2 along z.
    a = unit([1, 0.2, 0], [1, -0.2, 0], [0, 1, 0], [0, 0, 1])
    group_a = torch.tensor([0, 0, 1, 2])
    # modality B: 0 is near A's 0, but 1 and 2 are swapped
    b = unit([1, 0, 0], [0, 0.1, 1], [0, 1, 0.1])
    group_b = torch.tensor([0, 1, 2])
    result = perturbation_retrieval(a, group_a, b, group_b, ks=(1, 2))
    # A->B: 0 finds itself first; 1 and 2 find each other's partner first, their own second
    assert result["recall@1/forward"] == pytest.approx(1 / 3)
    assert result["recall@2/forward"] == pytest.approx(1.0)
    assert result["mrr/forward"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert result["recall@1/backward"] == pytest.approx(1 / 3)
    assert result["chance@1"] == pytest.approx(1 / 3) and result["chance@2"] == pytest.approx(2 / 3)
    assert result["chance_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert int(result["count"]) == 3


def test_perturbation_retrieval_uses_only_shared_perturbations():
    a, b = unit([1, 0], [0, 1], [1, 1]), unit([1, 0], [0, 1])
    result = perturbation_retrieval(a, torch.tensor([0, 1, 7]), b, torch.tensor([0, 1]), ks=(1,))
    assert int(result["count"]) == 2 and result["recall@1/forward"] == 1 and result["chance@1"] == 0.5
    assert perturbation_retrieval(a, torch.tensor([0, 1, 2]), b, torch.tensor([5, 6]), ks=(1,)) == {}


def test_averaging_replicates_beats_single_noisy_rows():
    """The point of the perturbation level: replicate noise averages out, so it retrieves better than rows."""
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(40, 16), dim=1)
    group = torch.arange(40).repeat_interleave(6)
    a = F.normalize(centres[group] + 0.35 * torch.randn(240, 16), dim=1)
    b = F.normalize(centres[group] + 0.35 * torch.randn(240, 16), dim=1)
    rows = row_recall(a, b, group, group, (1,))[0]
    pert = perturbation_retrieval(a, group, b, group, ks=(1,))["recall@1/forward"]
    assert pert > rows + 0.2, (float(pert), float(rows))


def test_random_embeddings_sit_at_chance():
    torch.manual_seed(1)
    group = torch.arange(200)
    values = [perturbation_retrieval(F.normalize(torch.randn(200, 8), dim=1), group,
                                     F.normalize(torch.randn(200, 8), dim=1), group, ks=(10,))
              for _ in range(5)]
    recall = np.mean([float(v["recall@10/forward"]) for v in values])
    mrr = np.mean([float(v["mrr/forward"]) for v in values])
    assert recall == pytest.approx(0.05, abs=0.02) and mrr == pytest.approx(float(values[0]["chance_mrr"]), abs=0.01)


def test_chance_levels():
    expected = {"recall@1": 0.25, "recall@10": 1.0, "mrr": (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4}
    assert chance_levels(4, (1, 10)) == pytest.approx(expected)


def test_random_average_precision_matches_simulation():
    rng = np.random.default_rng(0)
    for m, r in ((10, 1), (20, 3), (50, 10)):
        # AP of random rankings: positions (1-based) of the r right answers in a random order
        positions = np.sort(np.argsort(rng.random((20000, m)), axis=1)[:, :r], axis=1) + 1
        simulated = np.mean(np.arange(1, r + 1) / positions)
        expected = float(random_average_precision(torch.tensor([m]), torch.tensor([r]))[0])
        assert expected == pytest.approx(simulated, abs=0.01), (m, r)
    assert float(random_average_precision(torch.tensor([1]), torch.tensor([1]))[0]) == 1.0


def test_replicate_map_matches_sklearn_and_skips_singletons():
    from sklearn.metrics import average_precision_score

    torch.manual_seed(2)
    x = F.normalize(torch.randn(9, 4), dim=1)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # group 3: a singleton, a candidate but no query
    expected = []
    for i in range(8):
        others = [j for j in range(9) if j != i]
        expected.append(average_precision_score((group[others] == group[i]).numpy(), (x[others] @ x[i]).numpy()))
    result = replicate_map(x, group, chunk_size=3)  # blocks must not change the mean
    assert float(result["map"]) == pytest.approx(np.mean(expected), abs=1e-6)
    assert int(result["queries"]) == 8
    assert replicate_map(x[:3], torch.tensor([0, 1, 2])) == {}


def test_retrieval_scores_excludes_entries_and_skips_unanswerable_queries():
    # negative similarities on purpose: torchmetrics counts a right answer scored <= 0 as missed
    sim = torch.tensor([[0.9, -0.8, -0.9], [0.5, 0.4, 0.3], [-0.1, -0.2, 0.3]])
    target = torch.tensor([[-1, 1, 0], [0, 0, 0], [0, 1, -1]])
    scores = retrieval_scores(sim, target, ks=(1,), mrr=True, average_precision=True)
    # query 0: its own entry dropped, the right answer ranks first; query 1 has none; query 2: second
    assert int(scores["queries"]) == 2
    assert float(scores["recall@1"]) == pytest.approx(0.5) and float(scores["mrr"]) == pytest.approx(0.75)


def test_duplicated_replicates_do_not_inflate_map():
    torch.manual_seed(3)
    x = F.normalize(torch.randn(30, 8), dim=1)
    group = torch.arange(15).repeat_interleave(2)
    clean = replicate_map(x, group)["map"]
    repeated, repeated_group = torch.cat([x, x[:10]]), torch.cat([group, group[:10]])
    assert replicate_map(repeated, repeated_group)["map"] > clean + 0.1  # counted twice, a row finds itself
    deduped = replicate_map(*unique_rows(repeated, repeated_group))["map"]
    assert float(deduped) == pytest.approx(float(clean))


def test_collector_drops_repeated_indices():
    collector = EmbeddingCollector()
    x = torch.randn(6, 3)
    collector.update(x[:4], torch.arange(4), torch.arange(4))
    collector.update(torch.cat([x[4:], x[:1]]), torch.tensor([4, 5, 0]), torch.tensor([4, 5, 0]))
    embedding, group = collector.compute()
    torch.testing.assert_close(embedding, x)
    assert group.tolist() == [0, 1, 2, 3, 4, 5]


# -- the vectorised ranking metrics against the per-query implementation they replaced, and under ties ------
def per_query_scores(sim, target, ks=(), mrr=False, average_precision=False):
    """The former implementation: torchmetrics' functional retrieval metrics, one query at a time."""
    from torchmetrics.functional.retrieval import (
        retrieval_average_precision,
        retrieval_hit_rate,
        retrieval_reciprocal_rank,
    )

    functions = {f"recall@{k}": partial(retrieval_hit_rate, top_k=k) for k in ks}
    if mrr:
        functions["mrr"] = retrieval_reciprocal_rank
    if average_precision:
        functions["map"] = retrieval_average_precision
    scores = sim.float() - sim.float().amin(dim=1, keepdim=True) + 1.0
    totals, answerable = dict.fromkeys(functions, 0.0), 0
    for row, row_target in zip(scores, target):
        keep = row_target != -1
        row, row_target = row[keep], row_target[keep].bool()
        if not row_target.any():
            continue
        answerable += 1
        for name, function in functions.items():
            totals[name] += float(function(row, row_target))
    return {name: total / answerable for name, total in totals.items()}, answerable


def random_targets(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, m, generator=g) < 0.15).long()
    target[torch.rand(n, m, generator=g) < 0.1] = -1  # excluded entries
    target[:3] = 0  # queries with nothing to find
    return target, g


@pytest.mark.parametrize("block_elements", [2**22, 37])  # one block, and blocks of a row or two
@pytest.mark.parametrize("compare_max", [32, 0])
def test_retrieval_scores_equal_the_per_query_torchmetrics_values(block_elements, compare_max, monkeypatch):
    import unimodality.metrics

    monkeypatch.setattr(unimodality.metrics, "BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(unimodality.metrics, "COMPARE_MAX_POSITIVES", compare_max)
    target, g = random_targets(40, 30, seed=0)
    sim = torch.randn(40, 30, generator=g)  # untied
    got = retrieval_scores(sim, target, ks=(1, 3, 10), mrr=True, average_precision=True)
    expected, answerable = per_query_scores(sim, target, ks=(1, 3, 10), mrr=True, average_precision=True)
    assert int(got["queries"]) == answerable
    for name, value in expected.items():
        assert float(got[name]) == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("compare_max", [32, 0])  # AP by comparing with each right answer, and by sorting
def test_retrieval_scores_resolve_ties_like_the_brute_force_reference(compare_max, monkeypatch):
    from sklearn.metrics import average_precision_score

    import unimodality.metrics

    monkeypatch.setattr(unimodality.metrics, "COMPARE_MAX_POSITIVES", compare_max)

    target, g = random_targets(50, 25, seed=1)
    sim = torch.randint(0, 4, (50, 25), generator=g).float() / 4  # many ties, within and across classes
    got = retrieval_scores(sim, target, ks=(1, 2, 5), mrr=True, average_precision=True)
    recall, reciprocal, ap = {k: [] for k in (1, 2, 5)}, [], []
    for row, row_target in zip(sim.tolist(), target.tolist()):
        pairs = [(s, t) for s, t in zip(row, row_target) if t != -1]
        if not any(t == 1 for _, t in pairs):
            continue
        best = max(s for s, t in pairs if t == 1)
        rank = sum(1 for s, _ in pairs if s > best)  # ties in favour of the right answer
        for k in recall:
            recall[k].append(rank < k)
        reciprocal.append(1 / (rank + 1))
        ap.append(average_precision_score([t for _, t in pairs], [s for s, _ in pairs]))
    assert int(got["queries"]) == len(reciprocal)
    for k, hits in recall.items():
        assert float(got[f"recall@{k}"]) == pytest.approx(np.mean(hits), abs=1e-6)
    assert float(got["mrr"]) == pytest.approx(np.mean(reciprocal), abs=1e-6)
    assert float(got["map"]) == pytest.approx(np.mean(ap), abs=1e-6)


def test_replicate_map_with_ties_matches_sklearn():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randint(-1, 2, (30, 3), generator=g).float() + 1e-3 * (torch.arange(3) == 0), dim=1)
    group = torch.randint(0, 8, (30,), generator=g)
    expected = []
    for i in range(30):
        others = [j for j in range(30) if j != i]
        labels = (group[others] == group[i]).numpy()
        if labels.any():
            expected.append(average_precision_score(labels, (x[others] @ x[i]).numpy()))
    for chunk in (None, 7):
        assert float(replicate_map(x, group, chunk_size=chunk)["map"]) == pytest.approx(np.mean(expected), abs=1e-6)


@pytest.mark.parametrize("block_elements", [2**22, 10])  # one shared matrix, and each direction in blocks
def test_cross_recall_equals_both_directions_of_row_recall(block_elements, monkeypatch):
    import unimodality.metrics

    monkeypatch.setattr(unimodality.metrics, "BLOCK_ELEMENTS", block_elements)
    g = torch.Generator().manual_seed(5)
    a, b = F.normalize(torch.randn(23, 4, generator=g), dim=1), F.normalize(torch.randn(19, 4, generator=g), dim=1)
    group_a, group_b = torch.randint(0, 9, (23,), generator=g), torch.randint(0, 9, (19,), generator=g)
    forward, backward = cross_recall(a, b, group_a, group_b, (1, 3))
    torch.testing.assert_close(forward, row_recall(a, b, group_a, group_b, (1, 3), chunk_size=5))
    torch.testing.assert_close(backward, row_recall(b, a, group_b, group_a, (1, 3), chunk_size=5))


# -- under DDP: the gathered metric equals the single-process one, padding repeats dropped ----------------
def _collector_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x, group = torch.randn(11, 4), torch.arange(11) // 3
    # what a DistributedSampler without shuffling gives 2 ranks of 11 rows: rank r gets r, r+2, ...;
    # rank 1 is padded with row 0 to equal length
    index = torch.tensor(list(range(rank, 11, 2)) + ([0] if rank == 1 else []))
    collector = EmbeddingCollector()
    collector.update(x[index[:3]], group[index[:3]], index[:3])
    collector.update(x[index[3:]], group[index[3:]], index[3:])  # batches of unequal size
    embedding, gathered_group = collector.compute()
    order = torch.argsort(gathered_group * 100 + torch.cdist(embedding, x).argmin(dim=1))
    torch.save({"embedding": embedding[order], "group": gathered_group[order],
                "map": replicate_map(embedding, gathered_group)["map"]}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: 10-20 s on 2 shared cores
def test_collector_under_ddp_matches_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # spawn, not fork: a forked child of a process whose OpenMP pool has run hangs in its first torch op
    mp.spawn(_collector_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    x, group = torch.randn(11, 4), torch.arange(11) // 3
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["embedding"], x)  # all 11 rows once: the padding repeat dropped
        assert result["group"].tolist() == group.tolist()
        torch.testing.assert_close(result["map"], replicate_map(x, group)["map"])


# -- in the setup: what validation logs ---------------------------------------------------------------------
def test_setup_logs_perturbation_metrics_with_chance(example_data_dir):
    import pandas as pd

    from tests.helpers import example_datamodule, quiet_trainer
    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.setups.cross_modal import CrossModalSetup

    datamodule = example_datamodule()
    torch.manual_seed(0)
    model = CrossModalSetup(encoders={"tx": partial(MLPEncoder, hidden_sizes=[64]),
                                      "ph": partial(MLPEncoder, hidden_sizes=[64])}, embed_dim=32,
                            optimizer=partial(torch.optim.AdamW, lr=3e-3))
    trainer = quiet_trainer(max_epochs=5, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    table = pd.read_parquet(example_data_dir / "phenomics.parquet")
    count = int(metrics["val/pert/count"])
    assert count == len(table[table["split"] == "val"].drop_duplicates(["smiles", "concentration"]))
    assert metrics["val/pert/chance@1"] == pytest.approx(1 / count)
    assert metrics["val/pert/chance@10"] == pytest.approx(10 / count)
    for direction in ("tx->ph", "ph->tx"):
        for name in ("recall@1", "recall@5", "recall@10", "mrr"):
            assert 0 <= metrics[f"val/pert/{name}/{direction}"] <= 1
        assert metrics[f"val/recall@1/{direction}"] >= 0  # the row-level metrics are still there
    # trained for a few epochs on data with a shared structure: well above chance
    # (seen: recall@1 0.11 vs chance 0.025, recall@10 0.55 vs 0.25, mrr 0.23 vs 0.11, map/tx 0.23 vs 0.05)
    assert metrics["val/pert/recall@1"] > 2.5 * metrics["val/pert/chance@1"]
    assert metrics["val/pert/recall@10"] > 1.5 * metrics["val/pert/chance@10"]
    assert metrics["val/pert/mrr"] > 1.5 * metrics["val/pert/chance_mrr"]
    for modality in ("tx", "ph"):
        assert metrics[f"val/map/chance/{modality}"] < metrics[f"val/map/{modality}"] <= 1
    # the logged values are the ones an independent computation from the collected rows gives
    (tx, tx_group), (ph, ph_group) = (model.last_evaluation["embeddings"][m] for m in ("tx", "ph"))
    again = perturbation_retrieval(tx, tx_group, ph, ph_group, ks=(1,))
    assert metrics["val/pert/recall@1/tx->ph"] == pytest.approx(float(again["recall@1/forward"]))


def test_metrics_benchmark_former_and_vectorised_agree():
    """benchmarks/metrics.py's baseline (the former per-query code) gives the values the vectorised code does."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "metrics.py"
    spec = importlib.util.spec_from_file_location("benchmark_metrics", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a, b, group = bench.synthetic(120, 8)
    new = bench.synthetic_metrics(a, b, group)
    with bench.former_implementation():
        old = bench.synthetic_metrics(a, b, group)
    assert set(new) == set(old)
    for key in old:
        assert float(new[key]) == pytest.approx(float(old[key]), abs=1e-6), key
