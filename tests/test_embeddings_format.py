"""Files as a drug-discovery team has them (obsm embeddings, a list column of image-model embeddings, keys
named differently in each file, control wells, experiment ids), trained by YAML alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tests.test_bad_inputs import run
from unimodality.example_data import CONTROL_SMILES
from unimodality.paths import resolve_path
from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.table import TableSource

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip_embeddings_format.yaml"


def test_the_example_files_have_the_teams_shape(example_data_dir):
    import anndata as ad

    tx = ad.read_h5ad(resolve_path("example://embeddings_transcriptomics.h5ad"))
    ph = pd.read_parquet(resolve_path("example://embeddings_phenomics.parquet"))
    assert {"scVI", "scVICenterScale"} <= set(tx.obsm)
    assert {"canonical_smiles", "treatment_concentration", "has_control", "experiment_id"} <= set(tx.obs)
    assert {"smiles", "original_concentration", "has_control", "experiment_id", "pheno_embedding"} <= set(ph)
    assert ph["original_concentration"].dtype == np.float32 and tx.obs["treatment_concentration"].dtype == np.float64
    assert ph.groupby(["smiles", "original_concentration"]).size().min() >= 3  # replicate wells
    assert tx.obs["has_control"].sum() > 0 and ph["has_control"].sum() > 0


def datamodule_of(config: dict) -> PairedDataModule:
    data = config["data"]["init_args"]
    classes = {"AnnDataSource": AnnDataSource, "TableSource": TableSource}
    sources = {name: classes[spec["class_path"]](**spec["init_args"]) for name, spec in data["modalities"].items()}
    return PairedDataModule(sources, **{k: v for k, v in data.items() if k != "modalities"})


def test_controls_never_reach_a_batch_and_named_experiments_are_held_out(example_data_dir):
    dm = datamodule_of(yaml.safe_load(CONFIG.read_text()))
    _, shared, split, uniques = dm._index()
    assert all(uniques[code][0] != CONTROL_SMILES for code in shared)
    dm.setup("fit")
    dm.setup("test")
    experiment = pd.read_parquet(resolve_path("example://embeddings_phenomics.parquet"))
    experiment_of = experiment.drop_duplicates("smiles").set_index("smiles")["experiment_id"]
    for name, expected in (("val", {"EXP7"}), ("test", {"EXP8"})):
        compounds = {uniques[code][0] for code in np.unique(dm.datasets[name].groups)}
        assert {experiment_of[c] for c in compounds} == expected
    loader = dm.train_dataloader()
    for batch in loader:
        assert not any(uniques[g][0] == CONTROL_SMILES for g in batch["group"].tolist())
        counts = np.unique(batch["group"].numpy(), return_counts=True)[1]
        assert (counts == 2).all()  # replicates_per_key: 2


def test_the_config_trains_and_predict_applies_its_filter(example_data_dir, tmp_path):
    code, printed = run(["fit", "--config", str(CONFIG), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar",
                         "false", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert code == 0, printed
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    metrics = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    assert metrics["val/pert/mrr"].dropna().iloc[-1] > metrics["val/pert/chance_mrr"].dropna().iloc[-1]
    table = resolve_path("example://embeddings_phenomics.parquet")
    code, printed = run(["predict", "--ckpt_path", str(checkpoint), "--data.path", str(table), "--data.output",
                         str(tmp_path / "wells.parquet"), "--trainer.enable_progress_bar", "false"])
    assert code == 0, printed
    out, wells = pd.read_parquet(tmp_path / "wells.parquet"), pd.read_parquet(table)
    assert len(out) == (~wells["has_control"]).sum() and not out["has_control"].any()
    h5ad = resolve_path("example://embeddings_transcriptomics.h5ad")
    code, printed = run(["predict", "--ckpt_path", str(checkpoint), "--data.path", str(h5ad), "--data.output",
                         str(tmp_path / "cells.h5ad"), "--trainer.enable_progress_bar", "false"])
    assert code == 0, printed


def test_training_draws_among_alternative_representations_and_evaluation_uses_the_first(example_data_dir):
    import anndata as ad
    import torch

    config = yaml.safe_load(CONFIG.read_text())
    tx = config["data"]["init_args"]["modalities"]["tx"]["init_args"]
    tx.update(obsm_alternatives=["scVICenterScale"], alternative_weights=[0.25, 0.75])
    dm = datamodule_of(config)
    dm.setup("fit")
    adata = ad.read_h5ad(resolve_path("example://embeddings_transcriptomics.h5ad"))
    raw, corrected = adata.obsm["scVI"], adata.obsm["scVICenterScale"]
    torch.manual_seed(0)
    train = dm.datasets["train"]
    batch = train.__getitems__(list(range(len(train))) * 4)["tx"].numpy()
    from_raw = np.isin(batch.view([("", batch.dtype)] * batch.shape[1]), raw.view([("", raw.dtype)] * raw.shape[1]))
    from_corrected = np.isin(batch.view([("", batch.dtype)] * batch.shape[1]),
                             corrected.view([("", corrected.dtype)] * corrected.shape[1]))
    assert (from_raw | from_corrected).all()
    assert 0.65 < from_corrected.mean() < 0.85  # drawn with weight 0.75
    val = dm.datasets["val"].__getitems__(list(range(len(dm.datasets["val"]))))["tx"].numpy()
    assert np.isin(val.view([("", val.dtype)] * val.shape[1]), raw.view([("", raw.dtype)] * raw.shape[1])).all()


def test_alternative_representations_settings_are_checked(example_data_dir):
    import pytest

    path = "example://embeddings_transcriptomics.h5ad"
    with pytest.raises(ValueError, match="set obsm too"):
        AnnDataSource(path, obsm_alternatives=["scVICenterScale"])
    with pytest.raises(ValueError, match="one non-negative weight"):
        AnnDataSource(path, obsm="scVI", obsm_alternatives=["scVICenterScale"], alternative_weights=[1.0])
