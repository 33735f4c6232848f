"""Dose as an input: a numeric metadata column (log-scaled) fed to a tower beside its features, recorded in the
checkpoint and read again by ``predict``, in memory and streaming."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from tests.test_bad_inputs import assert_user_error, run
from unimodality.errors import DataError
from unimodality.paths import resolve_path
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.table import TableSource

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip_embeddings_format.yaml"
TX = "example://embeddings_transcriptomics.h5ad"
DOSE = {"treatment_concentration": "log10"}


def test_the_dose_column_is_appended_scaled_after_the_features(example_data_dir):
    source = AnnDataSource(TX, obsm="scVI", transform="none", metadata_features=DOSE, exclude={"has_control": [True]})
    rows = np.flatnonzero(source.usable_rows())[:50]
    matrix = source.read_features(rows)
    obs = ad.read_h5ad(resolve_path(TX))
    np.testing.assert_array_equal(matrix[:, :-1], obs.obsm["scVI"][rows])
    np.testing.assert_allclose(matrix[:, -1], np.log10(obs.obs["treatment_concentration"].to_numpy()[rows]), rtol=1e-6)
    assert source.input_names()[-1] == "log10(treatment_concentration)" == source.describe()["features"][-1]
    assert source.feature_names() == [f"scVI_{i}" for i in range(obs.obsm["scVI"].shape[1])]
    # a model's input names align to the matrix; the dose comes from the metadata
    aligned = source.read_features(rows, align_to=source.input_names())
    np.testing.assert_array_equal(aligned, matrix)


def test_bad_dose_values_are_refused_naming_the_column_and_rows(tmp_path):
    table = pd.DataFrame({"f0": [1.0, 2.0, 3.0, 4.0], "f1": [0.5, 0.1, 0.2, 0.3],
                          "dose": ["1e-6", "abc", None, "0"]})
    table.to_parquet(tmp_path / "wells.parquet")
    source = TableSource(str(tmp_path / "wells.parquet"), feature_prefix="f", metadata_features={"dose": "log10"})
    assert source.read_features(np.array([0]))[0, -1] == pytest.approx(-6.0)  # numbers written as text count
    with pytest.raises(DataError, match=r"wells\.parquet: metadata feature column 'dose' needs positive numbers "
                                        r"\(log10 scale\); 3 rows are not \(row 1: 'abc', row 2: None, row 3: '0'\)"):
        source.read_features()
    with pytest.raises(DataError, match="needs finite numbers"):
        TableSource(str(tmp_path / "wells.parquet"), feature_prefix="f", metadata_features={"dose": "none"}
                    ).read_features(np.array([1]))
    with pytest.raises(DataError, match=r"has no column\(s\) \['dosage'\]"):
        TableSource(str(tmp_path / "wells.parquet"), feature_prefix="f", metadata_features={"dosage": "none"}
                    ).read_features()
    with pytest.raises(ValueError, match="each column's scale is none, log10 or log1p"):
        TableSource(str(tmp_path / "wells.parquet"), feature_prefix="f", metadata_features={"dose": "log2"})


def test_streaming_training_reads_the_dose_too(example_data_dir, tmp_path):
    import yaml

    from tests.test_embeddings_format import datamodule_of

    config = yaml.safe_load(CONFIG.read_text())
    config["data"]["init_args"]["modalities"]["tx"]["init_args"]["metadata_features"] = DOSE
    datamodules = {}
    for streaming in (False, True):
        config["data"]["init_args"].update(streaming=streaming, stream_modality="tx", cache_dir=str(tmp_path),
                                           replicates_per_key=1)
        datamodules[streaming] = datamodule_of(config)
        datamodules[streaming].setup("fit")
    torch.manual_seed(0)
    batch = next(iter(datamodules[True].train_dataloader()))
    obs = ad.read_h5ad(resolve_path(TX))
    width = obs.obsm["scVI"].shape[1] + 1
    assert batch["tx"].shape[1] == width == next(iter(datamodules[False].train_dataloader()))["tx"].shape[1]
    log_doses = np.log10(obs.obs["treatment_concentration"].to_numpy()[obs.obs["has_control"].to_numpy() == 0])
    assert np.isin(np.round(batch["tx"][:, -1].numpy(), 4), np.round(log_doses, 4).astype(np.float32)).all()


def test_the_checkpoint_records_the_dose_and_predict_reads_it(example_data_dir, tmp_path):
    code, printed = run(["fit", "--config", str(CONFIG), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar",
                         "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
                         "--data.modalities.tx.init_args.metadata_features", '{"treatment_concentration": "log10"}'])
    assert code == 0, printed
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    schema = state["hyper_parameters"]["schema"]["tx"]
    assert schema["features"][-1] == "log10(treatment_concentration)"
    assert schema["init_args"]["metadata_features"] == DOSE

    # the same cells at another dose embed differently: predict feeds the dose of the file it reads
    cells = ad.read_h5ad(resolve_path(TX))
    cells = cells[~cells.obs["has_control"].to_numpy()].copy()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    cells.obs["treatment_concentration"] *= 100
    cells.write_h5ad(tmp_path / "dosed.h5ad")
    outputs = {}
    for name, streaming in (("cells", "false"), ("cells", "true"), ("dosed", "false")):
        outputs[name, streaming] = tmp_path / f"{name}_{streaming}.parquet"
        code, printed = run(["predict", "--ckpt_path", str(checkpoint), "--data.path", str(tmp_path / f"{name}.h5ad"),
                             "--data.output", str(outputs[name, streaming]), "--data.streaming", streaming,
                             "--trainer.enable_progress_bar", "false"])
        assert code == 0, printed
    embedding = {key: pd.read_parquet(path).filter(like="X_unimodality_").to_numpy() for key, path in outputs.items()}
    np.testing.assert_allclose(embedding["cells", "true"], embedding["cells", "false"], atol=1e-5)
    assert np.abs(embedding["dosed", "false"] - embedding["cells", "false"]).max() > 1e-3

    del cells.obs["treatment_concentration"]
    cells.write_h5ad(tmp_path / "undosed.h5ad")
    assert_user_error(["predict", "--ckpt_path", str(checkpoint), "--data.path", str(tmp_path / "undosed.h5ad"),
                       "--data.output", str(tmp_path / "undosed.parquet")],
                      r"undosed\.h5ad: obs has no column\(s\) \['treatment_concentration'\]")
