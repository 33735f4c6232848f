"""copairs mAP (replicate retrieval, consistency) against our torchmetrics mAP, cross-modal retrieval, and the
label probes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from unimodality.errors import DataError
from unimodality.evaluation import EvaluationData
from unimodality.metrics import replicate_map
from unimodality.plugins.evaluators.mean_average_precision import ConsistencyMAP, ReplicateRetrievalMAP
from unimodality.plugins.evaluators.probes import KNNClassification, LinearProbe
from unimodality.plugins.evaluators.retrieval import CrossModalRetrieval

copairs_map = pytest.importorskip("copairs.map", reason="copairs is not installed (pip install \"unimodality[eval]\")")


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Small matrices: multi-threaded BLAS on a shared machine mostly waits for its threads."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def scores(result) -> dict[tuple[str, str], float]:
    return {(s.metric, s.target): s.value for s in result.scores}


@pytest.mark.parametrize("signal", [0.0, 0.8, 3.0])
def test_copairs_average_precision_equals_our_torchmetrics_map(signal):
    """The in-training metric (every replicate queries all other rows) and copairs, set up the same way, agree."""
    rng = np.random.default_rng(0)
    group = rng.integers(0, 40, 200)
    x = rng.standard_normal((200, 8)) + signal * rng.standard_normal((40, 8))[group]
    ap = copairs_map.average_precision(pd.DataFrame({"g": group}), x, ["g"], [], [], ["g"], progress_bar=False)
    ours = replicate_map(torch.from_numpy(x).float(), torch.from_numpy(group))
    queries = ap[ap["n_pos_pairs"] > 0]
    assert len(queries) == int(ours["queries"])
    assert queries["average_precision"].mean() == pytest.approx(float(ours["map"]), abs=1e-5)


def wells(n: int = 24, replicates: int = 3, controls: int = 16, signal: float = 3.0, active: int | None = None,
          seed: int = 0) -> EvaluationData:
    """Compounds with replicate wells: the first ``active`` (default all) have a phenotype, the rest are
    controls in disguise; ``moa`` groups compounds by 4, and compounds of one MOA share their phenotype."""
    rng = np.random.default_rng(seed)
    active = n if active is None else active
    moa_centres = rng.standard_normal((n // 4, 16)) * signal
    centres = moa_centres[np.arange(n) // 4] + 0.5 * rng.standard_normal((n, 16)) * signal
    centres[active:] = 0
    rows = [(c, r) for c in range(n) for r in range(replicates)]
    x = np.stack([centres[c] + rng.standard_normal(16) for c, _ in rows] + [rng.standard_normal(16)
                                                                             for _ in range(controls)])
    obs = pd.DataFrame({"compound": [f"c{c}" for c, _ in rows] + ["DMSO"] * controls,
                        "moa": [f"moa{c // 4}" for c, _ in rows] + [None] * controls})
    # every fourth compound also has the next MOA's target (a cell of two labels)
    second = {f"c{c}": f"|moa{c // 4 + 1}" if c % 4 == 3 and c // 4 + 1 < n // 4 else "" for c in range(n)}
    obs["target"] = [None if m is None else m + second[c] for c, m in zip(obs["compound"], obs["moa"])]
    return EvaluationData(x, obs, perturbation=["compound"], control="DMSO", labels=["moa"])


def test_replicate_retrieval_finds_active_compounds_only():
    data = wells(active=12)
    result = ReplicateRetrievalMAP(null_size=2000).evaluate(data)
    got = scores(result)
    assert got[("fraction_retrieved", "")] == pytest.approx(0.5, abs=0.1)  # the 12 active of 24
    details = result.details.set_index("perturbation")
    assert details.loc[[f"c{i}" for i in range(12)], "below_corrected_p"].all()
    assert details.loc[[f"c{i}" for i in range(12, 24)], "below_corrected_p"].mean() < 0.2
    assert (details["n_replicates"] == 3).all() and details["p_value"].min() >= 1 / 2001
    chance = next(s.chance for s in result.scores if s.metric == "mAP")
    assert 0 < chance < got[("mAP", "")]
    noise = scores(ReplicateRetrievalMAP(null_size=2000).evaluate(wells(active=0)))
    assert noise[("fraction_retrieved", "")] < 0.1


def test_consistency_of_labels_and_their_shuffle():
    data = wells()
    got = scores(ConsistencyMAP(null_size=2000).evaluate(data))
    assert got[("fraction_retrieved", "moa")] == 1.0 and got[("mAP", "moa")] > 0.8
    shuffled = data.obs.copy()
    compounds = shuffled.loc[shuffled["moa"].notna(), "compound"].unique()
    labels = dict(zip(compounds, np.random.default_rng(0).permutation([f"moa{i // 4}" for i in range(len(compounds))])))
    shuffled["moa"] = shuffled["compound"].map(labels)
    chance = scores(ConsistencyMAP(null_size=2000).evaluate(data.like(data.x, shuffled)))
    assert chance[("fraction_retrieved", "moa")] <= 1 / 6 and chance[("mAP", "moa")] < 0.5
    # a cell holding several labels: each is a label of its own
    multi = scores(ConsistencyMAP(label="target", separator="|", null_size=500).evaluate(data))
    assert multi[("mAP", "target")] > 0 and ("fraction_retrieved", "target") in multi
    with pytest.raises(DataError, match="ReplicateRetrievalMAP needs control"):
        ReplicateRetrievalMAP().evaluate(data.like(data.x, control=None))


def test_cross_modal_retrieval_against_chance():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, 8))
    obs = pd.DataFrame({"compound": [f"c{i}" for i in range(30) for _ in range(2)]})

    def modality(noise):
        return EvaluationData(np.repeat(centres, 2, axis=0) + noise * rng.standard_normal((60, 8)), obs,
                              perturbation=["compound"])

    result = CrossModalRetrieval(ks=[1, 5]).evaluate_datasets({"tx": modality(0.2), "ph": modality(0.2)})
    top1 = next(s for s in result.scores if s.metric == "recall@1" and s.target == "tx->ph")
    assert top1.value > 0.9 and top1.chance == pytest.approx(1 / 30) and top1.n == 30
    unrelated = EvaluationData(rng.standard_normal((60, 8)), obs, perturbation=["compound"])
    shuffled = CrossModalRetrieval(ks=[5]).evaluate_datasets({"tx": modality(0.2), "ph": unrelated})
    assert next(s.value for s in shuffled.scores if s.metric == "recall@5") < 0.4
    with pytest.raises(DataError, match="different dimensions"):
        CrossModalRetrieval().evaluate_datasets({"a": modality(0.1), "b": EvaluationData(np.zeros((60, 3)), obs,
                                                                                          perturbation=["compound"])})


def test_probes_read_labels_and_never_classify_a_replicate_by_its_twin():
    data = wells()
    for probe in (KNNClassification(k=3), LinearProbe()):
        got = scores(probe.evaluate(data))
        assert got[("accuracy", "moa")] > 0.9
    # replicates identical, each compound a random class: only a replicate's twin tells its class
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"compound": np.repeat([f"c{i}" for i in range(40)], 3)})
    obs["label"] = obs["compound"].map(dict(zip(obs["compound"].unique(), rng.choice(["a", "b"], 40))))
    twins = EvaluationData(np.repeat(rng.standard_normal((40, 6)), 3, axis=0), obs, perturbation=["compound"])
    grouped = scores(KNNClassification(label="label", k=1).evaluate(twins))
    leaky = scores(KNNClassification(label="label", k=1, group_by_perturbation=False).evaluate(twins))
    assert leaky[("accuracy", "label")] == 1.0 and grouped[("balanced_accuracy", "label")] < 0.75
