"""unimodality evaluate: inputs, alignment, baselines, the report files, the CLI and its LINCS config."""

from __future__ import annotations

import json
import sys
import types
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

import unimodality
from tests.helpers import quiet_trainer
from unimodality import registry
from unimodality.cli import main
from unimodality.errors import DataError
from unimodality.evaluation import (
    TABLE_COLUMNS,
    Alignment,
    EvaluationData,
    Evaluator,
    Result,
    Score,
    align,
    baseline_profiles,
    evaluate,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "evaluate" / "lincs.yaml"
LINCS = "lincs_cellpainting_plate/SQ00015054_normalized_feature_select.csv.gz"
EVALUATORS = {
    "KnownRelationshipRecall": "unimodality.plugins.evaluators.recall.KnownRelationshipRecall",
    "ReplicateRetrievalMAP": "unimodality.plugins.evaluators.mean_average_precision.ReplicateRetrievalMAP",
    "ConsistencyMAP": "unimodality.plugins.evaluators.mean_average_precision.ConsistencyMAP",
    "CrossModalRetrieval": "unimodality.plugins.evaluators.retrieval.CrossModalRetrieval",
    "KNNClassification": "unimodality.plugins.evaluators.probes.KNNClassification",
    "LinearProbe": "unimodality.plugins.evaluators.probes.LinearProbe",
}


def screen(n_perturbations: int = 30, replicates: int = 4, controls: int = 12, dim: int = 16, signal: float = 1.5,
           seed: int = 0) -> ad.AnnData:
    """A small screen: two plates with an offset, replicate wells, controls; obsm["X_emb"] carries the
    perturbations' signal, X only noise (so the embedding must beat its raw baseline)."""
    rng = np.random.default_rng(seed)
    moas = rng.standard_normal((5, dim)) * signal  # perturbations of one MOA lie near each other
    centres = moas[np.arange(n_perturbations) % 5] + rng.standard_normal((n_perturbations, dim))
    names = [f"P{i:03d}" for i in range(n_perturbations)]
    rows = [(p, r) for p in range(n_perturbations) for r in range(replicates)]
    emb = np.stack([centres[p] + rng.standard_normal(dim) for p, _ in rows] +
                   [rng.standard_normal(dim) for _ in range(controls)])
    obs = pd.DataFrame({
        "perturbation": [names[p] for p, _ in rows] + ["DMSO"] * controls,
        "plate": [f"plate{r % 2}" for _, r in rows] + [f"plate{i % 2}" for i in range(controls)],
        "moa": [f"moa{p % 5}" for p, _ in rows] + [None] * controls,
    })
    emb[obs["plate"] == "plate1"] += 3.0  # a plate effect that centring on controls removes
    x = rng.standard_normal((len(obs), 40)).astype(np.float32)
    adata = ad.AnnData(x, obs=obs.set_axis([f"w{i}" for i in range(len(obs))]))
    adata.obsm["X_emb"] = emb.astype(np.float32)
    return adata


@pytest.fixture(autouse=True)
def one_blas_thread():
    """These tests compute on small matrices, where multi-threaded BLAS on a shared machine spends more time
    waiting for its threads than computing (an SVD of 384 x 454 took 0.9 s instead of 0.08 s)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def fast_replicates(**kwargs):
    return {"class_path": "ReplicateRetrievalMAP", "init_args": {"null_size": 500, **kwargs}}


def test_evaluators_are_registered_entry_points(capsys):
    plugins = registry.registered("evaluators")
    assert {name: plugins[name][0].class_path for name in EVALUATORS} == EVALUATORS
    assert all(issubclass(plugins[name][0].cls, Evaluator) for name in EVALUATORS)
    main(["plugins"])
    printed = capsys.readouterr().out
    assert "unimodality.evaluators:" in printed and "ReplicateRetrievalMAP" in printed


def test_centring_and_scaling_per_batch_on_controls():
    adata = screen()
    data = EvaluationData(adata.obsm["X_emb"], adata.obs, perturbation=["perturbation"], batch="plate", control="DMSO")
    aligned = align(data, Alignment(center=True, scale=True))
    controls = data.control_mask()
    for plate in ("plate0", "plate1"):
        rows = controls & (adata.obs["plate"] == plate).to_numpy()
        np.testing.assert_allclose(aligned.x[rows].mean(axis=0), 0, atol=1e-9)
        np.testing.assert_allclose(aligned.x[rows].std(axis=0), 1, atol=1e-9)
    # without a control value, each batch is centred on all its rows
    plain = align(EvaluationData(adata.obsm["X_emb"], adata.obs, batch="plate"), Alignment())
    np.testing.assert_allclose(plain.x[(adata.obs["plate"] == "plate1").to_numpy()].mean(axis=0), 0, atol=1e-9)
    assert np.array_equal(align(data, Alignment(center=False)).x, data.x.astype(np.float64))


def efaar_alignment():
    """efaar_benchmarking.efaar's alignment functions; the module imports scvi-tools (a dependency we do not
    install: efaar-benchmarking is installed with --no-deps), which these functions never use."""
    pytest.importorskip("efaar_benchmarking")
    if "scvi" not in sys.modules:
        scvi = types.ModuleType("scvi")
        scvi.model = types.ModuleType("scvi.model")
        scvi.model.SCVI = object
        sys.modules.setdefault("scvi", scvi)
        sys.modules.setdefault("scvi.model", scvi.model)
    try:
        from efaar_benchmarking import efaar
    except ImportError as error:
        pytest.skip(f"efaar_benchmarking.efaar cannot be imported here: {error}")
    return efaar


def test_alignment_equals_efaar_centerscale_and_tvn():
    efaar = efaar_alignment()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)) * rng.uniform(0.5, 3, 12)
    obs = pd.DataFrame({"gene": rng.choice(["NTC", "A", "B", "C"], 300, p=[0.4, 0.2, 0.2, 0.2]),
                        "plate": rng.choice(["p1", "p2", "p3"], 300)})
    x[(obs.plate == "p2").to_numpy()] += 2
    data = EvaluationData(x, obs, perturbation=["gene"], batch="plate", control="NTC")
    np.testing.assert_allclose(align(data, Alignment(center=True, scale=True)).x,
                               efaar.centerscale_on_controls(x, obs, "gene", "NTC", "plate"), atol=1e-12)
    np.testing.assert_allclose(align(data, Alignment(center=False, tvn=True)).x,
                               efaar.tvn_on_controls(x, obs, "gene", "NTC", "plate"), atol=1e-9)


def test_alignment_errors_name_the_culprit():
    adata = screen()
    obs = adata.obs.copy()
    obs.loc[(obs["perturbation"] == "DMSO") & (obs["plate"] == "plate1"), "plate"] = "plate0"  # plate1: no DMSO
    data = EvaluationData(adata.obsm["X_emb"], obs, dataset="screen", perturbation=["perturbation"], batch="plate",
                          control="DMSO")
    with pytest.raises(DataError, match=r"screen: batch 'plate1' \(column 'plate'\) has no control row"):
        align(data, Alignment())
    with pytest.raises(DataError, match="alignment.tvn whitens on the control rows"):
        align(EvaluationData(adata.obsm["X_emb"], obs), Alignment(center=False, tvn=True))
    with pytest.raises(DataError, match="aggregate must be mean or median"):
        Alignment(aggregate="mode")


def test_baselines_have_the_embedding_dimension():
    raw = np.random.default_rng(0).standard_normal((50, 30))
    out = baseline_profiles(raw, 8, ["raw", "pca", "random"])
    assert out["raw"].shape == (50, 30) and out["pca"].shape == (50, 8) and out["random"].shape == (50, 8)
    from sklearn.decomposition import PCA

    np.testing.assert_allclose(np.abs(out["pca"]), np.abs(PCA(8, random_state=0).fit_transform(raw)), atol=1e-8)
    np.testing.assert_array_equal(baseline_profiles(raw, 8, ["random"], seed=1)["random"],
                                  baseline_profiles(raw, 8, ["random"], seed=1)["random"])


def test_python_api_scores_an_anndata_against_its_baselines():
    adata = screen()
    table = unimodality.evaluate(adata, embedding="X_emb", perturbation="perturbation", batch="plate",
                                 control="DMSO", labels="moa",
                                 evaluators=[fast_replicates(), "KNNClassification"])
    assert list(table.columns) == TABLE_COLUMNS
    activity = table[(table.evaluator == "replicate_retrieval_map")].set_index("metric")
    # the embedding holds the perturbations' signal, X is noise: every baseline is near chance
    assert activity.loc["fraction_retrieved", "value"] > 0.9
    assert activity.loc["fraction_retrieved", ["raw", "pca", "random"]].max() < 0.2
    assert activity.loc["mAP", "value"] > activity.loc["mAP", "chance"] + 0.5
    assert activity.loc["mAP", "n"] == 30
    knn = table[table.evaluator == "knn_classification"].set_index("metric")
    assert knn.loc["accuracy", "value"] > 0.9 and knn.loc["accuracy", "raw"] < 0.5
    details = table.attrs["details"][("replicate_retrieval_map", "data")]
    assert set(details["representation"]) == {"embedding", "raw", "pca", "random"}
    assert {"mean_average_precision", "p_value", "corrected_p_value", "n_replicates"} <= set(details.columns)


def test_default_evaluators_follow_the_columns_given():
    adata = screen(n_perturbations=10)
    table = evaluate(adata, embedding="X_emb", perturbation="perturbation", control="DMSO", baselines=[])
    assert set(table.evaluator) == {"replicate_retrieval_map"}
    with pytest.raises(DataError, match="no evaluator applies"):
        evaluate(adata, embedding="X_emb")


def test_an_evaluator_of_ones_own_needs_no_registration():
    class MeanNorm(Evaluator):
        name = "mean_norm"

        def evaluate(self, data: EvaluationData) -> Result:
            return Result([Score("norm", float(np.linalg.norm(data.x, axis=1).mean()), n=len(data))])

    table = evaluate(screen(n_perturbations=5), embedding="X_emb", evaluators=[MeanNorm()],
                     alignment=Alignment(center=False))
    row = table.iloc[0]
    assert row.evaluator == "mean_norm" and row.n == 32
    assert np.isfinite(row[["value", "raw", "pca", "random"]].astype(float)).all()


def test_bad_inputs_get_one_line_errors(tmp_path):
    adata = screen(n_perturbations=5)
    with pytest.raises(DataError, match=r"has no obsm key 'X_scvi' \(embedding\); its obsm keys: \['X_emb'\]"):
        evaluate(adata, embedding="X_scvi", perturbation="perturbation", control="DMSO")
    with pytest.raises(DataError, match=r"control value 'NTC' is found in no row of column 'perturbation'"):
        evaluate(adata, embedding="X_emb", perturbation="perturbation", control="NTC")
    with pytest.raises(DataError, match=r"no metadata column 'pertubation' \(--perturbation\). Did you mean"):
        evaluate(adata, embedding="X_emb", perturbation="pertubation", control="DMSO")
    broken = adata.copy()
    broken.obsm["X_emb"][3, 2] = np.nan
    with pytest.raises(DataError, match=r"'X_emb' has NaN or infinite values in 1 of 32 rows \(first: row 3\)"):
        evaluate(broken, embedding="X_emb", perturbation="perturbation", control="DMSO")
    with pytest.raises(DataError, match="unknown evaluator 'ReplicateRetrieval'. Did you mean 'ReplicateRetrievalMAP'"):
        evaluate(adata, embedding="X_emb", evaluators=["ReplicateRetrieval"])
    with pytest.raises(DataError, match=r"unknown baseline\(s\) \['umap'\]"):
        evaluate(adata, embedding="X_emb", baselines=["umap"])
    with pytest.raises(DataError, match="ReplicateRetrievalMAP needs control"):
        evaluate(adata, embedding="X_emb", perturbation="perturbation", evaluators=["ReplicateRetrievalMAP"])
    with pytest.raises(DataError, match="no such file"):
        evaluate(tmp_path / "missing.h5ad", evaluators=["ReplicateRetrievalMAP"])


def test_tables_with_embedding_columns_and_the_report_files(tmp_path):
    adata = screen(n_perturbations=12)
    table = pd.concat([adata.obs.reset_index(drop=True),
                       pd.DataFrame(adata.obsm["X_emb"]).add_prefix("X_unimodality_"),
                       pd.DataFrame(adata.X).add_prefix("feat_")], axis=1)
    path = tmp_path / "wells.parquet"
    table.to_parquet(path)
    out = tmp_path / "report"
    result = evaluate(str(path), embedding="X_unimodality", features="^feat_", perturbation="perturbation",
                      batch="plate", control="DMSO", labels=["moa"], evaluators=[fast_replicates()], output=out)
    expected = evaluate(adata, embedding="X_emb", perturbation="perturbation", batch="plate", control="DMSO",
                        labels=["moa"], evaluators=[fast_replicates()])
    pd.testing.assert_frame_equal(result.drop(columns="dataset"), expected.drop(columns="dataset"))
    csv = pd.read_csv(out / "evaluation.csv")
    assert list(csv.columns) == TABLE_COLUMNS and len(csv) == len(result)
    document = json.loads((out / "evaluation.json").read_text())
    assert document["table"][0]["evaluator"] == "replicate_retrieval_map"
    assert document["columns"]["control"] == "DMSO" and document["baselines"] == ["raw", "pca", "random"]
    assert document["evaluators"][0]["init_args"]["null_size"] == 500
    assert (out / "details" / "replicate_retrieval_map__wells.csv").is_file()
    assert (out / "plots" / "replicate_retrieval_map__wells.png").stat().st_size > 1000
    assert (out / "plots" / "replicate_retrieval_map__wells_distribution.png").is_file()
    assert not list(out.rglob("*unimodality-tmp*"))  # written through temporary files, renamed
    before = (out / "evaluation.csv").read_bytes()
    with pytest.raises(DataError, match="a report is there already"):
        evaluate(str(path), embedding="X_unimodality", perturbation="perturbation", control="DMSO", output=out)
    assert (out / "evaluation.csv").read_bytes() == before
    evaluate(str(path), embedding="X_unimodality", perturbation="perturbation", control="DMSO",
             evaluators=[fast_replicates()], output=out, overwrite=True, plots=False)


def test_cross_modal_datasets_from_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 8))
    for name, noise in (("tx", 0.3), ("ph", 0.3)):
        obs = pd.DataFrame({"compound": [f"c{i}" for i in range(20) for _ in range(2)]})
        emb = np.repeat(centres, 2, axis=0) + noise * rng.standard_normal((40, 8))
        adata = ad.AnnData(rng.standard_normal((40, 5)).astype(np.float32),
                           obs=obs.set_axis([f"{name}{i}" for i in range(40)]))
        adata.obsm["X_unimodality"] = emb.astype(np.float32)
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
    table = evaluate(str(tmp_path), perturbation="compound", baselines=[], alignment={"center": False})
    assert set(table.evaluator) == {"cross_modal_retrieval"}
    row = table[(table.metric == "recall@1") & (table.target == "ph->tx")].iloc[0]
    assert row.value > 0.8 and row.chance == pytest.approx(1 / 20) and row.n == 20


@pytest.fixture
def lincs(shared_data) -> Path:
    path = shared_data / LINCS
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_lincs_config_runs_unchanged_from_the_command_line(lincs, tmp_path, capsys, monkeypatch):
    """configs/evaluate/lincs.yaml as shipped (its output folder aside): replicate retrieval of the compounds'
    wells against DMSO, MOA/target consistency and MOA probes, each with raw, PCA and random baselines."""
    monkeypatch.chdir(CONFIG.parents[2])  # the config's paths are relative to the repository root
    config = yaml.safe_load(CONFIG.read_text())
    out = tmp_path / "lincs"
    main(["evaluate", "--config", str(CONFIG), "--output", str(out)])
    printed = capsys.readouterr().out
    assert "replicate_retrieval_map" in printed and f"Evaluation written to {out / 'evaluation.csv'}" in printed
    table = pd.read_csv(out / "evaluation.csv")
    rows = table.set_index(["evaluator", "metric", table["target"].fillna("")])
    activity = rows.loc[("replicate_retrieval_map", "fraction_retrieved", "")]
    assert activity["n"] == 58  # compounds with at least two wells (DMSO is the reference)
    assert activity[["value", "raw", "pca", "random"]].between(0.6, 0.95).all()
    assert activity["value"] == activity["raw"]  # the config scores the features themselves
    for label in config["labels"]:
        assert np.isfinite(rows.loc[("consistency_map", "mAP", label), ["value", "pca", "random", "chance"]]).all()
    for evaluator in ("knn_classification", "linear_probe"):
        assert rows.loc[(evaluator, "accuracy", "Metadata_moa"), "n"] > 0
    assert len(list((out / "plots").glob("*.png"))) >= 4
    assert json.loads((out / "evaluation.json").read_text())["alignment"]["aggregate"] == "median"
    with pytest.raises(SystemExit) as exit_info:  # a second run does not overwrite the report
        main(["evaluate", "--config", str(CONFIG), "--output", str(out)])
    assert exit_info.value.code == 1
    assert "pass --overwrite true" in capsys.readouterr().err


def test_the_simclr_training_config_for_lincs_parses(capsys, monkeypatch):
    monkeypatch.chdir(CONFIG.parents[2])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG.parent / "simclr_lincs.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["init_args"]["loss"]["init_args"]["use_groups"] is False  # no labels are seen


def test_evaluate_help_and_bad_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--alignment.tvn" in printed and "--evaluators" in printed and "--inputs" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--inputs", "x.h5ad", "--alignment.aggregate", "mode"])
    assert exit_info.value.code == 2


def test_checkpoint_embeds_the_file_exactly_as_predict_does(lincs, tmp_path):
    from unimodality.plugins.augmentations.vectors import GaussianNoise
    from unimodality.plugins.datamodules.single import SingleDataModule
    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.losses.ntxent import NTXentLoss
    from unimodality.plugins.setups.simclr import SimCLRSetup
    from unimodality.plugins.sources.table import TableSource

    datamodule = SingleDataModule(TableSource(str(lincs), feature_regex="^(?!Metadata_)"), modality="ph",
                                  val_fraction=0.1, test_fraction=0.0, batch_size=64)
    model = SimCLRSetup(encoder=partial(MLPEncoder, hidden_sizes=[32]), augmentations=[GaussianNoise(std=0.3)],
                        loss=NTXentLoss(temperature=0.2, use_groups=False), embed_dim=8, projection_hidden=16)
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=datamodule)
    checkpoint = tmp_path / "simclr.ckpt"
    model.trainer.save_checkpoint(checkpoint)

    predicted = tmp_path / "wells.parquet"
    main(["predict", "--ckpt_path", str(checkpoint), "--data.path", str(lincs), "--data.output", str(predicted),
          "--trainer.enable_progress_bar", "false"])
    options = dict(perturbation="Metadata_broad_sample", control="DMSO", evaluators=[fast_replicates()])
    from_checkpoint = evaluate(str(lincs), embedding=str(checkpoint), features="^(?!Metadata_)", baselines=["pca"],
                               **options)
    # predict's parquet holds the metadata and the embedding only: no raw features, no baselines
    from_predict = evaluate(str(predicted), embedding="X_unimodality", baselines=[], **options)
    assert from_checkpoint.loc[0, "n"] == 58 and from_checkpoint["pca"].notna().all()
    pd.testing.assert_series_equal(from_checkpoint["value"], from_predict["value"], atol=1e-5)
    # a source filter that leaves the controls out (as a training filter recorded in a checkpoint does)
    with pytest.raises(DataError, match=r"control value 'DMSO' is found in no row .* the checkpoint's source "
                                        r"filters left out \d+ rows: .* set source_options \{exclude: null\}"):
        evaluate(str(lincs), embedding=str(checkpoint), features="^(?!Metadata_)", baselines=[],
                 source_options={"exclude": {"Metadata_broad_sample": ["DMSO"]}}, **options)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="broken.ckpt: holds objects .* is refused .* pass --trust_checkpoint true"):
        evaluate(str(lincs), embedding=str(tmp_path / "broken.ckpt"), **options)


def test_citeseq_probes_of_the_hashtag_sample_of_origin(shared_data):
    """The CITE-seq cells carry no cell-type labels: the hashtag (sample of origin) is the label probed."""
    folder = shared_data / "citefuse_eccite_pbmc"
    if not (folder / "adt_counts.h5ad").is_file():
        pytest.skip(f"{folder} not found")
    adt, hto = ad.read_h5ad(folder / "adt_counts.h5ad"), ad.read_h5ad(folder / "hto_counts.h5ad")
    assert list(adt.obs_names) == list(hto.obs_names)
    counts = hto.X.toarray() if hasattr(hto.X, "toarray") else np.asarray(hto.X)
    adt.obs["hashtag"] = np.asarray(hto.var_names)[counts.argmax(axis=1)]
    from unimodality.sources import apply_transform

    adt.obsm["X_clr"] = np.asarray(apply_transform(adt.X.toarray() if hasattr(adt.X, "toarray") else adt.X, "clr"))
    table = evaluate(adt, embedding="X_clr", features_transform="clr", labels="hashtag",
                     evaluators=["KNNClassification", "LinearProbe"], baselines=["pca", "random"])
    rows = table.set_index(["evaluator", "metric"])
    assert (rows["n"] == 500).all() and rows.loc[("linear_probe", "balanced_accuracy"), "chance"] == 0.25
    assert rows[["value", "pca", "random"]].stack().between(0, 1).all()
    # the protein panel says a little about the sample of origin: the linear probe beats chance
    assert rows.loc[("linear_probe", "accuracy"), "value"] > rows.loc[("linear_probe", "accuracy"), "chance"] + 0.05


@pytest.mark.slow
def test_lincs_simclr_trained_here_against_its_baselines(lincs, tmp_path, monkeypatch, capsys):
    """configs/evaluate/simclr_lincs.yaml trains a self-supervised embedding of the plate; the LINCS config then
    scores its checkpoint (the numbers the docs quote)."""
    monkeypatch.chdir(CONFIG.parents[2])
    main(["fit", "--config", str(CONFIG.parent / "simclr_lincs.yaml"), "--trainer.enable_progress_bar", "false",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    checkpoint = tmp_path / "runs" / "simclr_lincs" / "version_0" / "checkpoints" / "last.ckpt"
    main(["evaluate", "--config", str(CONFIG), "--embedding", str(checkpoint), "--output", str(tmp_path / "eval")])
    print(capsys.readouterr().out)
    table = pd.read_csv(tmp_path / "eval" / "evaluation.csv")
    activity = table[(table.evaluator == "replicate_retrieval_map") & (table.metric == "fraction_retrieved")].iloc[0]
    assert 0 < activity["value"] <= 1 and activity["pca"] > 0.5


def test_numeric_columns_named_as_metadata_are_not_features():
    """A numeric dose column named as a perturbation column stays metadata (it is no raw feature)."""
    from unimodality.evaluation import load_dataset

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"compound": np.repeat(["a", "b", "c"], 4), "dose": np.tile([0.1, 1.0], 6)})
    table = pd.concat([table, pd.DataFrame(rng.standard_normal((12, 3))).add_prefix("f")], axis=1)
    assert load_dataset(table, embedding="X").feature_names == ["dose", "f0", "f1", "f2"]  # unnamed: numeric
    named = load_dataset(table, embedding="X", metadata=["compound", "dose"])
    assert named.feature_names == ["f0", "f1", "f2"] and list(named.obs.columns) == ["compound", "dose"]
    report = evaluate(table, embedding="X", perturbation=["compound", "dose"], labels="compound",
                      evaluators=["KNNClassification"], baselines=[])
    assert report.loc[0, "n"] == 12
