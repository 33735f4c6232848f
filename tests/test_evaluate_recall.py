"""Known-relationship recall (EFAAR): planted structure is recalled, shuffled genes give chance, the numbers
equal efaar-benchmarking's own, and the pairwise similarities are never held whole."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from unimodality.errors import DataError
from unimodality.evaluation import EvaluationData, evaluate
from unimodality.plugins.evaluators.recall import (
    KnownRelationshipRecall,
    annotation_folder,
    pair_similarity_order_statistics,
    read_pairs,
)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Small matrices: multi-threaded BLAS on a shared machine mostly waits for its threads."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def efaar_folder():
    pytest.importorskip("efaar_benchmarking", reason="efaar-benchmarking is not installed (pip install "
                        "\"unimodality[eval]\", or pip install --no-deps efaar-benchmarking)")
    return annotation_folder()


def test_order_statistics_of_all_pairs_are_exact_in_small_blocks():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6))
    x[60:70] = x[50]  # identical rows: many tied similarities
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = np.sort((x @ x.T)[np.triu_indices(len(x), k=1)])
    ranks = [0, 1, 357, len(full) // 2, len(full) - 2, len(full) - 1]
    found = pair_similarity_order_statistics(x, ranks, block_elements=500, bins=64)
    np.testing.assert_array_equal(found, full[ranks])


def planted(genes: list[str], complexes: dict[str, list[str]], replicates: int = 2, dim: int = 32, noise: float = 0.7,
            seed: int = 0) -> pd.DataFrame:
    """Replicate rows of genes drawn near their complex's centre, and non-targeting controls."""
    rng = np.random.default_rng(seed)
    centre_of = {}
    for members in complexes.values():
        centre = rng.standard_normal(dim)
        for gene in members:
            centre_of.setdefault(gene, centre)
    rows = [g for g in genes for _ in range(replicates)]
    x = np.stack([centre_of[g] + noise * rng.standard_normal(dim) for g in rows] +
                 [noise * rng.standard_normal(dim) for _ in range(20)])
    obs = pd.DataFrame({"gene": rows + ["non-targeting"] * 20})
    obs["plate"] = [f"p{i % 2}" for i in range(len(obs))]
    return pd.concat([obs, pd.DataFrame(x).add_prefix("emb_")], axis=1)


def corum_complexes(n_genes: int = 500, seed: int = 0) -> tuple[list[str], dict[str, list[str]]]:
    """Disjoint CORUM complexes (from efaar-benchmarking's CORUM_clusters.tsv) up to ``n_genes`` genes."""
    rng = np.random.default_rng(seed)
    complexes = {}
    for line in open(efaar_folder() / "CORUM_clusters.tsv"):
        name, members = line.rstrip("\n").split("\t")
        complexes[name] = members.split()
    chosen, genes = {}, []
    for name in rng.permutation(sorted(complexes)):
        members = [g for g in complexes[name] if g not in set(genes)]
        if len(members) >= 3:
            chosen[name] = members
            genes += members
        if len(genes) >= n_genes:
            break
    return genes, chosen


def test_planted_corum_complexes_are_recalled_and_shuffled_genes_give_chance():
    genes, complexes = corum_complexes()
    table = planted(genes, complexes)
    options = dict(embedding="emb", perturbation="gene", batch="plate", control="non-targeting", baselines=[],
                   evaluators=[{"class_path": "KnownRelationshipRecall", "init_args": {"sources": ["CORUM"]}}])
    report = evaluate(table, **options)
    corum = report[report.target == "CORUM"].iloc[0]
    assert corum.metric == "recall_0.05_0.95" and corum.chance == pytest.approx(0.1) and corum.n > 1000
    assert corum.value > 0.5  # pairs within the planted complexes sit in the top 5 % (others across complexes)
    rng = np.random.default_rng(1)
    shuffled = table.copy()
    targeting = shuffled["gene"] != "non-targeting"
    mapping = dict(zip(genes, rng.permutation(genes)))
    shuffled.loc[targeting, "gene"] = shuffled.loc[targeting, "gene"].map(mapping)
    chance = evaluate(shuffled, **options)
    assert 0.06 < chance[chance.target == "CORUM"].iloc[0].value < 0.14
    notes = " ".join(report.attrs["notes"])
    assert "CORUM are licensed CC BY-NC 4.0: non-commercial use only" in notes


def test_own_pair_files_need_no_efaar(tmp_path):
    complexes = {f"c{i}": [f"G{i}_{j}" for j in range(4)] for i in range(40)}
    genes = [g for members in complexes.values() for g in members]
    pairs = [(a, b) for m in complexes.values() for i, a in enumerate(m) for b in m[i + 1:]]
    path = tmp_path / "complexes.tsv"
    pd.DataFrame(pairs, columns=["gene_a", "gene_b"]).to_csv(path, sep="\t", index=False)
    table = planted(genes, complexes, seed=2)
    evaluator = {"class_path": "KnownRelationshipRecall",
                 "init_args": {"sources": [], "pair_files": {"mine": str(path)},
                               "thresholds": [[0.05, 0.95], [0.1, 0.9]]}}
    # the embedding columns as the features themselves (X), with a random projection of them as the baseline
    report = evaluate(table, embedding="X", features="^emb_", perturbation="gene", control="non-targeting",
                      evaluators=[evaluator], baselines=["random"], seed=0)
    mine = report[report.target == "mine"].set_index("metric")
    assert mine.loc["recall_0.05_0.95", "value"] > 0.9 and mine.loc["recall_0.1_0.9", "chance"] == pytest.approx(0.2)
    assert mine.loc["recall_0.05_0.95", "n"] == len(pairs) and mine.loc["recall_0.05_0.95", "random"] > 0.5
    assert len(read_pairs(str(path))) == len(pairs)
    with pytest.raises(DataError, match="pair file .* not found"):
        KnownRelationshipRecall(sources=[], pair_files={"x": str(tmp_path / "missing.csv")})
    with pytest.raises(DataError, match="needs perturbation"):
        KnownRelationshipRecall(sources=[], pair_files={"mine": str(path)}).evaluate(
            EvaluationData(np.zeros((3, 2)), pd.DataFrame(index=range(3))))


def efaar_benchmark():
    """efaar-benchmarking's ``known_relationship_benchmark``. Its module imports geomloss for another metric
    (a distribution distance this one never calls); efaar-benchmarking installed with --no-deps lacks it, so
    a stand-in whose use would fail loudly is put in its place."""
    import importlib.util
    import sys
    import types

    stand_in = importlib.util.find_spec("geomloss") is None and "geomloss" not in sys.modules
    if stand_in:
        geomloss = types.ModuleType("geomloss")

        def samples_loss(*args, **kwargs):
            raise RuntimeError("geomloss is not installed (a stand-in for the recall test)")

        geomloss.SamplesLoss = samples_loss
        sys.modules["geomloss"] = geomloss
    try:
        from efaar_benchmarking.benchmarking import known_relationship_benchmark
    except ImportError as error:
        pytest.skip(f"efaar_benchmarking.benchmarking cannot be imported: {error}")
    finally:
        if stand_in:  # efaar's module keeps its reference; nothing else (POT checks geomloss) may see it
            del sys.modules["geomloss"]
    return known_relationship_benchmark


def test_recall_equals_efaar_benchmarkings_own_implementation():
    folder = efaar_folder()
    from sklearn.utils import Bunch

    known_relationship_benchmark = efaar_benchmark()
    rng = np.random.default_rng(3)
    reactome = read_pairs(str(folder / "Reactome.txt"))
    genes = sorted(set(reactome.entity1[:1500]) | set(reactome.entity2[:1500]))[:400]
    x = rng.standard_normal((len(genes), 12))
    x[: len(genes) // 3] += rng.standard_normal(12)  # some structure, so recall is not only chance
    x[10] = x[11]  # and ties
    obs = pd.DataFrame({"gene": genes})
    sources, thresholds = ["Reactome", "SIGNOR"], [(0.05, 0.95), (0.1, 0.9)]
    ours = KnownRelationshipRecall(sources=sources, thresholds=thresholds, block_elements=5000).evaluate(
        EvaluationData(x, obs, perturbation=["gene"]))
    theirs = known_relationship_benchmark(Bunch(features=pd.DataFrame(x), metadata=obs), "gene",
                                          benchmark_sources=sources, recall_thr_pairs=thresholds)
    scores = {(s.target, s.metric): s for s in ours.scores}
    assert sorted(theirs["source"]) == sources
    for _, row in theirs.iterrows():
        for low, high in thresholds:
            score = scores[(row["source"], f"recall_{low:g}_{high:g}")]
            assert score.value == pytest.approx(row[f"recall_{low}_{high}"], abs=1e-12)
            assert score.n == row["query_distribution_size"]
