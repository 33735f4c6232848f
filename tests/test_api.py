"""The Python API: ``unimodality.load(ckpt).embed(data)`` gives what ``unimodality predict`` writes, and
``unimodality.fit`` trains as ``unimodality fit`` does."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import unimodality
from tests.helpers import copy_of_clip_run
from unimodality.cli import main
from unimodality.errors import CheckpointError, DataError
from unimodality.outputs import OBSM_KEY
from unimodality.trust import UntrustedClassError

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def ckpt(clip_run_dir, tmp_path_factory) -> Path:
    return copy_of_clip_run(clip_run_dir, tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def model(ckpt):
    return unimodality.load(ckpt)


def predicted(ckpt: Path, path: Path | str, output: Path, *args: str) -> np.ndarray:
    """What ``unimodality predict`` writes for ``path``: the embedding matrix of its output."""
    main(["predict", "--ckpt_path", str(ckpt), "--data.path", str(path), "--data.output", str(output), *QUIET, *args])
    if output.suffix == ".h5ad":
        return ad.read_h5ad(output).obsm[OBSM_KEY]
    return pd.read_parquet(output).filter(like=f"{OBSM_KEY}_").to_numpy()


def test_load_describes_the_model(model, ckpt):
    assert model.modalities == ["tx", "ph"]
    assert model.schema["tx"]["class_path"].endswith("AnnDataSource") and len(model.schema["tx"]["features"]) == 500
    text = repr(model)
    assert "CrossModalSetup" in text and str(ckpt) in text and "tx: AnnDataSource -> 500 features" in text
    assert not model.module.training
    # a run directory works too (its checkpoints/best.ckpt)
    assert unimodality.load(ckpt.parent.parent).checkpoint.name == "best.ckpt"


def test_embed_anndata_equals_predict(model, ckpt, example_data_dir, tmp_path):
    adata = ad.read_h5ad(example_data_dir / "transcriptomics.h5ad")
    expected = predicted(ckpt, example_data_dir / "transcriptomics.h5ad", tmp_path / "tx.h5ad")
    embedding = model.embed(adata, modality="tx")
    assert embedding.dtype == np.float32 and embedding.shape == (adata.n_obs, 128)
    np.testing.assert_array_equal(embedding, expected)
    np.testing.assert_array_equal(model.embed(adata), expected)  # the one AnnData tower, found by itself
    np.testing.assert_array_equal(model.embed(example_data_dir / "transcriptomics.h5ad"), expected)  # a path
    adata.obsm["X_unimodality"] = model.embed(adata, modality="tx")  # the two lines of the docs


def test_embed_dataframe_equals_predict(model, ckpt, example_data_dir, tmp_path):
    frame = pd.read_parquet(example_data_dir / "phenomics.parquet")
    expected = predicted(ckpt, example_data_dir / "phenomics.parquet", tmp_path / "ph.parquet")
    np.testing.assert_array_equal(model.embed(frame, modality="ph"), expected)
    # columns in another order, metadata dropped: aligned by name
    shuffled = frame.filter(like="feat_").sample(frac=1.0, axis=1, random_state=0)
    np.testing.assert_array_equal(model.embed(shuffled), expected)


def test_reordered_and_missing_genes_align_with_predicts_warning(model, ckpt, example_data_dir, tmp_path):
    adata = ad.read_h5ad(example_data_dir / "transcriptomics.h5ad")[:80].copy()
    original = model.embed(adata)
    shuffled = adata[:, np.random.default_rng(0).permutation(adata.n_vars)].copy()
    np.testing.assert_allclose(model.embed(shuffled), original, atol=1e-6)

    subset = adata[:, 25:].copy()
    subset.write_h5ad(tmp_path / "subset.h5ad")
    with pytest.warns(UserWarning) as from_predict:
        expected = predicted(ckpt, tmp_path / "subset.h5ad", tmp_path / "subset_e.h5ad")
    with pytest.warns(UserWarning) as from_embed:
        embedding = model.embed(subset)
    np.testing.assert_array_equal(embedding, expected)
    assert not np.allclose(embedding, original, atol=1e-3)
    said = [str(w.message) for w in from_predict if "features are missing" in str(w.message)]
    assert len(said) == 1 and "25 of the model's 500 features are missing" in said[0]
    # the same sentence, naming the AnnData instead of a file (never the temporary file)
    shown = [str(w.message) for w in from_embed if "features are missing" in str(w.message)]
    assert shown == [said[0].replace(str(tmp_path / "subset.h5ad"), "the AnnData given to embed")]


def test_embed_refuses_unusable_data_in_one_line(model):
    genes = ad.AnnData(X=np.ones((4, 3), dtype=np.float32))
    genes.var_names = ["A", "B", "C"]
    with pytest.raises(DataError, match=r"^the AnnData given to embed: none of its 3 feature names match"):
        model.embed(genes, modality="tx")
    with pytest.raises(DataError, match="the DataFrame given to embed: none of its 2 columns is a feature"):
        model.embed(pd.DataFrame({"a": [1.0], "b": [2.0]}), modality="ph")
    with pytest.raises(TypeError, match="AnnData, a pandas DataFrame or a path, not a ndarray"):
        model.embed(np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"data.modality='rna': the model has towers \['ph', 'tx'\]"):
        model.embed(genes, modality="rna")


def test_a_table_tower_reads_an_h5ad_and_an_anndata_tower_a_dataframe(model, ckpt, example_data_dir, tmp_path):
    frame = pd.read_parquet(example_data_dir / "phenomics.parquet")
    features = frame.filter(like="feat_")
    as_anndata = ad.AnnData(X=features.to_numpy(np.float32), obs=frame.drop(columns=features.columns))
    as_anndata.var_names = list(features.columns)
    as_anndata.obs_names = [f"w{i}" for i in range(len(frame))]
    as_anndata.write_h5ad(tmp_path / "ph.h5ad")
    expected = predicted(ckpt, example_data_dir / "phenomics.parquet", tmp_path / "ph.parquet")
    # predict --data.path ph.h5ad for the tower trained on a parquet table (it read the HDF5 file as CSV)
    from_h5ad = predicted(ckpt, tmp_path / "ph.h5ad", tmp_path / "ph_e.parquet", "--data.modality", "ph")
    np.testing.assert_array_equal(from_h5ad, expected)
    np.testing.assert_array_equal(model.embed(as_anndata, modality="ph"), expected)

    genes = ad.read_h5ad(example_data_dir / "transcriptomics.h5ad")
    table = pd.DataFrame(genes.X.toarray() if hasattr(genes.X, "toarray") else genes.X, columns=genes.var_names)
    np.testing.assert_allclose(model.embed(table, modality="tx"), model.embed(genes), atol=1e-6)


def test_load_refuses_hostile_checkpoints(ckpt, tmp_path):
    content = torch.load(ckpt, weights_only=True)
    content["hyper_parameters"]["encoders"]["tx"]["class_path"] = "os.system"
    torch.save(content, tmp_path / "hostile.ckpt")
    with pytest.raises(UntrustedClassError, match=r"hostile\.ckpt.*encoders.tx.*'os.system'"):
        unimodality.load(tmp_path / "hostile.ckpt")

    pickled = torch.load(ckpt, weights_only=True)
    pickled["extra"] = Path("an object")  # not a tensor nor a plain container: needs unpickling
    torch.save(pickled, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match=r"pickled\.ckpt: holds objects other than tensors"):
        unimodality.load(tmp_path / "pickled.ckpt")
    with pytest.warns(UserWarning, match="weights_only=False"):
        trusted = unimodality.load(tmp_path / "pickled.ckpt", trust_checkpoint=True)
    assert trusted.modalities == ["tx", "ph"]
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        unimodality.load(tmp_path / "absent.ckpt")


def test_fit_from_python_writes_the_clis_config(tmp_path, monkeypatch):
    options = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 1,
               "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}
    (tmp_path / "cli").mkdir()
    (tmp_path / "py").mkdir()
    monkeypatch.chdir(tmp_path / "cli")
    main(["fit", "--config", str(ROOT / "configs" / "clip.yaml"),
          *[f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]])
    monkeypatch.chdir(tmp_path / "py")
    run = unimodality.fit(ROOT / "configs" / "clip.yaml", **options)
    assert run == Path("runs/clip/version_0") and (run / "checkpoints" / "last.ckpt").is_file()
    from_cli = (tmp_path / "cli" / "runs" / "clip" / "version_0" / "config.yaml").read_text()
    assert (run / "config.yaml").read_text() == from_cli
    assert unimodality.load(run / "checkpoints" / "last.ckpt").modalities == ["tx", "ph"]


@pytest.mark.slow  # docs/tutorial.ipynb (tests/test_tutorial.py) trains from a dict config in the default suite
def test_fit_from_a_dict_config_writes_the_same_config(tmp_path, monkeypatch):
    options = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 1,
               "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}
    monkeypatch.chdir(tmp_path)
    from_file = unimodality.fit(ROOT / "configs" / "clip.yaml", **options)
    config = yaml.safe_load((ROOT / "configs" / "clip.yaml").read_text())
    again = unimodality.fit(config, overrides=options)  # overrides as a mapping
    assert again == Path("runs/clip/version_1")
    assert (again / "config.yaml").read_text() == (from_file / "config.yaml").read_text()


def test_fit_reports_a_bad_option_as_an_exception(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="the config or an option was refused"):
        unimodality.fit(ROOT / "configs" / "clip.yaml", **{"trainer.max_epochz": 1})
    assert "max_epochz" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def embeddings_run(tmp_path_factory, example_data_dir) -> Path:
    """A 1-epoch run of configs/clip_embeddings_format.yaml: an obsm tower, a list-column tower, filters."""
    root = tmp_path_factory.mktemp("embeddings-run")
    main(["fit", "--config", str(ROOT / "configs" / "clip_embeddings_format.yaml"), "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", *QUIET,
          "--trainer.logger.init_args.save_dir", str(root / "runs")])
    return root / "runs" / "clip_embeddings_format" / "version_0" / "checkpoints" / "last.ckpt"


def test_embed_obsm_and_list_column_towers_equal_predict(embeddings_run, example_data_dir, tmp_path):
    model = unimodality.load(embeddings_run)
    assert "tx: AnnDataSource [obsm scVI]" in repr(model)
    h5ad = example_data_dir / "embeddings_transcriptomics.h5ad"
    adata = ad.read_h5ad(h5ad)
    expected = predicted(embeddings_run, h5ad, tmp_path / "tx.h5ad")
    rows, embedding = model.embed(adata, modality="tx", return_rows=True)
    np.testing.assert_array_equal(embedding, expected)
    controls = adata.obs["has_control"].to_numpy(dtype=bool)
    assert controls.any() and np.array_equal(rows, np.flatnonzero(~controls))  # the recorded filter
    assert len(model.embed(adata, modality="tx", source_options={"exclude": None})) == adata.n_obs
    with pytest.raises(DataError, match=r"the AnnData given to embed: has no obsm\['scVI'\]"):
        model.embed(ad.AnnData(X=np.ones((3, 2), np.float32)), modality="tx")

    parquet = example_data_dir / "embeddings_phenomics.parquet"
    expected = predicted(embeddings_run, parquet, tmp_path / "ph.parquet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(model.embed(pd.read_parquet(parquet), modality="ph"), expected)
    assert not [w for w in caught if "missing" in str(w.message)]  # every element of the list column found
    assert re.search(r"ph: TableSource -> \d+ features", repr(model))
