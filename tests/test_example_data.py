"""The bundled example data: deterministic, the documented shape, and paired by perturbation."""

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from unimodality.cli import main
from unimodality.example_data import FILES, make_example_data, resolve_path


def test_generation_is_deterministic(tmp_path):
    first = make_example_data(tmp_path / "a", seed=3)
    second = make_example_data(tmp_path / "b", seed=3)
    other = make_example_data(tmp_path / "c", seed=4)
    a, b, c = (ad.read_h5ad(p["transcriptomics.h5ad"]) for p in (first, second, other))
    assert (a.X != b.X).nnz == 0
    assert a.shape != c.shape or (a.X != c.X).nnz > 0
    pd.testing.assert_frame_equal(pd.read_parquet(first["phenomics.parquet"]),
                                  pd.read_parquet(second["phenomics.parquet"]))


def test_shape_and_pairing(example_data_dir):
    tx = ad.read_h5ad(resolve_path("example://transcriptomics.h5ad"))
    ph = pd.read_parquet(resolve_path("example://phenomics.parquet"))
    assert sp.issparse(tx.X) and tx.shape[1] == 500 and 1500 <= tx.n_obs <= 2500
    assert 1500 <= len(ph) <= 2500 and len([c for c in ph.columns if c.startswith("feat_")]) == 128
    assert np.all(tx.X.data == np.round(tx.X.data))  # counts
    keys = ["smiles", "concentration"]
    tx_keys = set(map(tuple, tx.obs[keys].astype(str).to_numpy()))
    ph_keys = set(map(tuple, ph[keys].astype(str).to_numpy()))
    assert tx_keys == ph_keys and len(tx_keys) == 400
    assert tx.obs.groupby(keys, observed=True).size().min() >= 3
    # a perturbation lives in one split, the same in both files
    splits = pd.concat([tx.obs[[*keys, "split"]], ph[[*keys, "split"]]]).astype(str).drop_duplicates()
    assert not splits.duplicated(keys).any()
    assert set(splits["split"]) == {"train", "val", "test"}
    # ... and so does a compound at every concentration: held-out perturbations are unseen molecules
    assert not splits[["smiles", "split"]].drop_duplicates().duplicated("smiles").any()


def test_example_data_command_writes_files(tmp_path, capsys):
    main(["example-data", "--out", str(tmp_path)])
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / n) for n in FILES)
    assert all((tmp_path / n).is_file() for n in FILES)
