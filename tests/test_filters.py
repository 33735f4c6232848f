"""Row filters (include / exclude) on every source: applied before pairing, splitting and prediction."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tests.test_bad_inputs import assert_user_error, checkpoint, predict, run  # noqa: F401 - fixture
from unimodality.errors import DataError
from unimodality.paths import resolve_path
from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.table import TableSource


@pytest.fixture
def with_controls(tmp_path, example_data_dir):
    """The example files with control rows: one compound's rows flagged ``has_control`` in both files."""
    tx = ad.read_h5ad(resolve_path("example://transcriptomics.h5ad"))
    ph = pd.read_parquet(resolve_path("example://phenomics.parquet"))
    control = ph["smiles"].iloc[0]
    for frame in (tx.obs, ph):
        frame["has_control"] = (frame["smiles"] == control).to_numpy()
    tx.write_h5ad(tmp_path / "tx.h5ad")
    ph.to_parquet(tmp_path / "ph.parquet")
    return tmp_path, control, ph


def test_exclude_drops_the_rows_it_names_and_logs_counts(with_controls, caplog):
    folder, control, ph = with_controls
    source = TableSource(str(folder / "ph.parquet"), feature_prefix="feat_", exclude={"has_control": [True]})
    with caplog.at_level(logging.INFO, logger="unimodality"):
        kept = source.usable_rows()
    assert np.array_equal(kept, ~ph["has_control"].to_numpy())
    assert f"keep {(~ph['has_control']).sum()} of {len(ph)} rows" in caplog.text
    include = TableSource(str(folder / "ph.parquet"), feature_prefix="feat_", include={"smiles": [control]})
    assert np.array_equal(include.usable_rows(), ph["has_control"].to_numpy())
    text = TableSource(str(folder / "ph.parquet"), feature_prefix="feat_", exclude={"has_control": ["True"]})
    assert np.array_equal(text.usable_rows(), kept)  # YAML text "True" matches the boolean column too


@pytest.mark.parametrize("filters, message", [
    ({"exclude": {"is_control": [True]}}, r"row filter column\(s\) \['is_control'\] not found"),
    ({"exclude": {"smiles": ["NOT_A_SMILES"]}}, r"exclude filter smiles: \['NOT_A_SMILES'\] matches no row"),
    ({"include": {"has_control": [True]}, "exclude": {"has_control": [True]}}, r"the row filters .* leave no row"),
])
def test_bad_filters_are_named(with_controls, filters, message):
    folder, _, _ = with_controls
    with pytest.raises(DataError, match=r"ph\.parquet: " + message):
        TableSource(str(folder / "ph.parquet"), feature_prefix="feat_", **filters).usable_rows()


def test_controls_never_reach_a_batch(with_controls):
    folder, control, _ = with_controls
    dm = PairedDataModule(
        modalities={
            "tx": AnnDataSource(str(folder / "tx.h5ad"), exclude={"has_control": [True]}),
            "ph": TableSource(str(folder / "ph.parquet"), feature_prefix="feat_", exclude={"has_control": [True]}),
        },
        keys=["smiles", "concentration"], split_column="split", batch_size=16,
    )
    _, shared, _, uniques = dm._index()
    assert all(uniques[code][0] != control for code in shared)
    dm.setup("fit")
    dm.setup("test")
    for dataset in dm.datasets.values():
        assert all(uniques[code][0] != control for code in np.unique(dataset.groups))


def test_predict_applies_the_training_filter_unless_told_otherwise(tmp_path, checkpoint, example_data_dir):  # noqa: F811
    import torch

    ph = pd.read_parquet(resolve_path("example://phenomics.parquet"))
    ph["has_control"] = np.arange(len(ph)) % 5 == 0
    ph.to_parquet(tmp_path / "ph.parquet")
    content = torch.load(checkpoint, weights_only=True)  # the model as if trained with exclude: controls
    content["hyper_parameters"]["schema"]["ph"]["init_args"]["exclude"] = {"has_control": [True]}
    torch.save(content, tmp_path / "filtered.ckpt")
    code, printed = run(predict(tmp_path / "filtered.ckpt", tmp_path / "ph.parquet", "--data.output",
                                str(tmp_path / "out.parquet")))
    assert code == 0, printed
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert len(out) == (~ph["has_control"]).sum() and not out["has_control"].any()
    code, printed = run(predict(tmp_path / "filtered.ckpt", tmp_path / "ph.parquet", "--data.output",
                                str(tmp_path / "all.parquet"), "--data.source_options", '{"exclude": null}'))
    assert code == 0, printed
    assert len(pd.read_parquet(tmp_path / "all.parquet")) == len(ph)


def test_the_lincs_plate_without_its_dmso_wells(shared_data):
    path = shared_data / "lincs_cellpainting_plate" / "SQ00015054_normalized_feature_select.csv.gz"
    plate = pd.read_csv(path)
    source = TableSource(str(path), feature_regex="^(?!Metadata_)", exclude={"Metadata_broad_sample": ["DMSO"]})
    kept = source.usable_rows()
    assert kept.sum() == len(plate) - 24 and not (plate["Metadata_broad_sample"][kept] == "DMSO").any()
    features = plate[[c for c in plate.columns if not c.startswith("Metadata_")]].to_numpy(np.float32)
    np.testing.assert_array_equal(source.read_features(np.flatnonzero(kept)), features[kept])
