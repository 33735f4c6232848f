"""Several ``.h5ad`` files read as one source: the same rows, features and metadata as one file holding them
all, in memory and streaming, with a bounded number of files open, and files of other features refused."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tests.helpers import quiet_trainer
from unimodality.errors import DataError
from unimodality.paths import resolve_path
from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.formats import source_for
from unimodality.plugins.sources.table import TableSource


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def split_into_files(adata: ad.AnnData, folder: Path, n: int) -> list[Path]:
    """``adata``'s rows in ``n`` consecutive files (plates), named so that name order is row order."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, adata.n_obs, n + 1).astype(int)
    files = []
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        files.append(folder / f"plate_{k:02d}.h5ad")
        adata[a:b].copy().write_h5ad(files[-1])
    return files


@pytest.fixture(params=["csr", "dense"])
def plates(tmp_path, request) -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.7, size=(203, 25)).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts) if request.param == "csr" else counts,
        obs=pd.DataFrame({"plate": [f"P{i // 51}" for i in range(203)], "dose": rng.uniform(size=203)},
                         index=[f"cell{i}" for i in range(203)]),
    )
    adata.var_names = [f"g{j}" for j in range(25)]
    adata.obsm["scVI"] = rng.normal(size=(203, 6)).astype(np.float32)
    adata.write_h5ad(tmp_path / "all.h5ad")
    return tmp_path / "all.h5ad", split_into_files(adata, tmp_path / "plates", 4)


@pytest.mark.parametrize("form", ["folder", "glob", "list"])
@pytest.mark.parametrize("options", [{"transform": "log1p"}, {"obsm": "scVI"}])
def test_four_files_read_as_the_one_file_holding_them(plates, form, options):
    whole, files = plates
    path = {"folder": str(files[0].parent), "glob": str(files[0].parent / "plate_*.h5ad"),
            "list": [str(f) for f in files]}[form]
    single, sharded = AnnDataSource(str(whole), **options), AnnDataSource(path, **options)
    assert sharded.is_sharded and sharded.files == files and source_for(path) is AnnDataSource
    assert sharded.feature_names() == single.feature_names() and sharded.num_rows() == 203
    pd.testing.assert_frame_equal(sharded.read_metadata(), single.read_metadata())
    pd.testing.assert_frame_equal(sharded.read_metadata(["plate", "obs_names"]),
                                  single.read_metadata(["plate", "obs_names"]))
    rows = np.array([202, 0, 51, 50, 50, 101, 7, 160])  # unsorted, repeated, across file boundaries
    for r in (None, rows, rows[:0]):
        np.testing.assert_array_equal(dense(sharded.read_features(r)), dense(single.read_features(r)))
    store, reference = sharded.row_store(), single.row_store()
    np.testing.assert_array_equal(dense(store.read_rows(np.unique(rows))), dense(reference.read_rows(np.unique(rows))))
    runs = (np.array([0, 40, 149]), np.array([3, 120, 203]))  # runs that cross file boundaries
    np.testing.assert_array_equal(dense(store.read_runs(*runs)), dense(reference.read_runs(*runs)))


def test_files_with_other_features_are_refused_naming_both(tmp_path):
    adata = ad.AnnData(X=np.ones((4, 3), np.float32))
    adata.var_names = ["a", "b", "c"]
    adata.write_h5ad(tmp_path / "p1.h5ad")
    adata.var_names = ["a", "x", "c"]
    adata.write_h5ad(tmp_path / "p2.h5ad")
    source = AnnDataSource(str(tmp_path / "*.h5ad"))
    pattern = r"p2\.h5ad: its features differ from those of .*p1\.h5ad \(feature 1 is 'x', in p1\.h5ad 'b'\)"
    with pytest.raises(DataError, match=pattern):
        source.read_features()
    with pytest.raises(DataError, match=pattern):
        AnnDataSource(str(tmp_path / "*.h5ad")).row_store()
    adata.var_names = ["a", "b", "c"]
    adata[:, ["c", "a", "b"]].copy().write_h5ad(tmp_path / "p2.h5ad")
    with pytest.raises(DataError, match="the same features in another order"):
        AnnDataSource([str(tmp_path / "p1.h5ad"), str(tmp_path / "p2.h5ad")]).feature_names()
    with pytest.raises(FileNotFoundError, match=r"no \.h5ad file matches .*nothing_\*\.h5ad"):
        AnnDataSource(str(tmp_path / "nothing_*.h5ad")).num_rows()


def open_descriptors(folder: Path) -> int:
    """File descriptors of this process open on files in ``folder``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
        except OSError:  # the descriptor of the listing itself, closed by now
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_streaming_keeps_at_most_eight_files_open(tmp_path):
    rng = np.random.default_rng(1)
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(0.5, size=(240, 10)).astype(np.float32)))
    files = split_into_files(adata, tmp_path / "plates", 20)
    store = AnnDataSource(str(tmp_path / "plates")).row_store()
    assert open_descriptors(tmp_path) == 0  # nothing open until rows are read
    for start in range(0, 240, 12):  # each file in turn, then a read across all of them
        np.testing.assert_array_equal(dense(store.read_range(start, start + 12)), adata.X[start:start + 12].toarray())
        assert open_descriptors(tmp_path) <= 8
    np.testing.assert_array_equal(dense(store.read_rows(np.arange(0, 240, 7))), adata.X[::7].toarray())
    assert open_descriptors(tmp_path) == 8 == store.max_open
    store.close()
    assert open_descriptors(tmp_path) == 0 and len(files) == 20


def example_modalities(tx_path: str | list[str]) -> dict:
    return {"tx": AnnDataSource(tx_path, transform="normalize_log1p"),
            "ph": TableSource("example://phenomics.parquet", feature_prefix="feat_")}


@pytest.mark.parametrize("streaming", [False, True])
def test_paired_training_on_plates_pairs_and_splits_like_the_single_file(tmp_path, streaming):
    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.setups.cross_modal import CrossModalSetup

    files = split_into_files(ad.read_h5ad(resolve_path("example://transcriptomics.h5ad")), tmp_path / "plates", 4)
    datamodules = {}
    for name, path in (("single", "example://transcriptomics.h5ad"), ("plates", str(files[0].parent))):
        datamodules[name] = PairedDataModule(modalities=example_modalities(path), keys=["smiles", "concentration"],
                                             split_column="split", batch_size=32, streaming=streaming,
                                             cache_dir=str(tmp_path / "cache"))
        datamodules[name].setup("fit")
    single, plates = datamodules["single"], datamodules["plates"]
    (codes_a, shared_a, split_a, _), (codes_b, shared_b, split_b, _) = single._index(), plates._index()
    assert all(np.array_equal(codes_a[name], codes_b[name]) for name in codes_a)
    np.testing.assert_array_equal(shared_a, shared_b)
    np.testing.assert_array_equal(split_a, split_b)
    batch = next(iter(plates.val_dataloader()))
    reference = next(iter(single.val_dataloader()))
    np.testing.assert_array_equal(batch["tx"].numpy(), reference["tx"].numpy())
    setup = CrossModalSetup(encoders={"tx": partial(MLPEncoder, hidden_sizes=[32]),
                                      "ph": partial(MLPEncoder, hidden_sizes=[32])}, embed_dim=8)
    quiet_trainer(limit_train_batches=3, limit_val_batches=2).fit(setup, datamodule=plates)
