"""``TableSource(features="numeric")``: every numeric column that is not metadata, e.g. CITE-seq proteins."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from jsonargparse import ArgumentParser

from unimodality.errors import DataError
from unimodality.plugins.sources.table import TableSource


def test_numeric_features_of_the_citeseq_table(shared_data):
    path = shared_data / "citefuse_eccite_pbmc" / "adt_counts.parquet"
    table = pd.read_parquet(path)
    source = TableSource(str(path), features="numeric", key_columns=["barcode"], transform="clr")
    proteins = [c for c in table.columns if c != "barcode"]
    assert len(proteins) == 49 and source.feature_names() == proteins  # no shared prefix, none missed
    assert source.read_features().shape == (500, 49)
    assert list(source.read_metadata().columns) == ["barcode"]
    # a checkpoint records the columns themselves: a new file is read by those names
    assert source.describe()["init_args"]["features"] == proteins


def test_numeric_features_leave_out_keys_filters_and_listed_metadata(tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"compound": ["a", "b", "c", "d"], "dose": [1.0, 2.0, 1.0, 2.0], "plate": [1, 1, 2, 2],
                          "control": [True, False, False, False], "well": ["A1", "A2", "A3", "A4"],
                          "p1": rng.random(4), "CD3": rng.random(4), "x y": rng.integers(0, 9, 4)})
    table.to_parquet(tmp_path / "t.parquet")
    source = TableSource(str(tmp_path / "t.parquet"), features="numeric", key_columns=["compound", "dose"],
                         exclude={"control": [True]}, metadata_columns=["plate"])
    assert source.feature_names() == ["p1", "CD3", "x y"]
    np.testing.assert_allclose(source.read_features(), table[["p1", "CD3", "x y"]].to_numpy(), rtol=1e-6)
    with pytest.raises(DataError, match=r"t\.parquet: has no column\(s\) \['plates'\]"):
        TableSource(str(tmp_path / "t.parquet"), features="numeric", key_columns=["compound"],
                    metadata_columns=["plates"]).feature_names()


def test_numeric_features_refuse_unsafe_or_misspelt_settings():
    with pytest.raises(ValueError, match="features: numeric needs key_columns"):
        TableSource("t.parquet", features="numeric")
    with pytest.raises(ValueError, match="features is a list of column names or 'numeric', got 'numerics'"):
        TableSource("t.parquet", features="numerics", key_columns=["k"])
    with pytest.raises(ValueError, match="metadata_columns goes with features: numeric"):
        TableSource("t.parquet", feature_prefix="feat_", metadata_columns=["plate"])


def test_numeric_is_a_config_value():
    parser = ArgumentParser()
    parser.add_class_arguments(TableSource, "source")
    config = parser.parse_args(["--source.path", "t.parquet", "--source.features", "numeric",
                                "--source.key_columns", "[barcode]"])
    assert parser.instantiate_classes(config).source.features == "numeric"
