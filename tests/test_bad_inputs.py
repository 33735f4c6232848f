"""A catalogue of bad inputs: each gets one short message naming the culprit, and no user file changes.

Every case runs the command line in-process, as a user would type it, and checks that it exits with an
error (not a traceback from inside a library), that the message names the file, column, key or option at
fault, and that the files the user had are byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml

from unimodality.cli import main
from unimodality.example_data import resolve_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK = ["--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"]


def run(args: list[str]) -> tuple[int, str]:
    """Run ``unimodality`` in-process; the exit code and everything printed (stderr first)."""
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            main(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, err.getvalue() + out.getvalue()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_user_error(args: list[str], *patterns: str, folder: Path | None = None) -> str:
    before = snapshot(folder) if folder is not None else None
    code, printed = run(args)
    assert code != 0, printed
    assert "Traceback" not in printed, printed
    for pattern in patterns:
        assert re.search(pattern, printed), f"{pattern!r} not in:\n{printed}"
    if folder is not None:
        after = {k: v for k, v in snapshot(folder).items() if k in before}
        assert after == before, "a user file was modified"
    return printed


@pytest.fixture
def data(tmp_path, example_data_dir) -> dict[str, Path]:
    """Small copies of the example files the cases below break in one way each."""
    folder = tmp_path / "data"
    folder.mkdir()
    tx = ad.read_h5ad(resolve_path("example://transcriptomics.h5ad"))
    ph = pd.read_parquet(resolve_path("example://phenomics.parquet"))
    tx.write_h5ad(folder / "tx.h5ad")
    ph.to_parquet(folder / "ph.parquet")
    return {"dir": folder, "tx": folder / "tx.h5ad", "ph": folder / "ph.parquet", "tx_adata": tx, "ph_table": ph}


def fit(data: dict, *extra: str, tx: Path | None = None, ph: Path | None = None) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "clip.yaml"),
            "--data.modalities.tx.init_args.path", str(tx or data["tx"]),
            "--data.modalities.ph.init_args.path", str(ph or data["ph"]), *QUICK, *extra]


# -- configuration ---------------------------------------------------------------------------------------

def test_malformed_yaml(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  class_path: CrossModalSetup\n   init_args: [\n")
    assert_user_error(["fit", "--config", str(config)], r"broken\.yaml", folder=tmp_path)


def test_unknown_option(data):
    assert_user_error(fit(data, "--trainer.max_epochz", "3"), r"max_epochz", folder=data["dir"])


def test_unknown_plugin_name(data):
    assert_user_error(fit(data, "--model.loss", "ClipLos"), r"Did you mean 'ClipLoss'\?")


def test_wrong_value_type(data):
    assert_user_error(fit(data, "--data.batch_size", "many"), r"batch_size", r"many")


@pytest.mark.parametrize("option, value, culprit", [
    ("--data.batch_size", "0", "batch_size"),
    ("--data.batch_size", "-4", "batch_size"),
    ("--model.embed_dim", "0", "embed_dim"),
    ("--model.encoders.tx.init_args.hidden_sizes", "[0]", "hidden_sizes"),
])
def test_negative_or_zero_sizes(data, option, value, culprit):
    assert_user_error(fit(data, option, value), culprit, folder=data["dir"])


# -- data files -------------------------------------------------------------------------------------------

def test_missing_data_file(data):
    assert_user_error(fit(data, tx=data["dir"] / "absent.h5ad"), r"absent\.h5ad", r"not found")


def test_truncated_h5ad(data):
    broken = data["dir"] / "truncated.h5ad"
    broken.write_bytes(data["tx"].read_bytes()[:5000])
    assert_user_error(fit(data, tx=broken), r"truncated\.h5ad", r"(corrupt|truncated|not a readable)",
                      folder=data["dir"])


def test_truncated_parquet(data):
    broken = data["dir"] / "truncated.parquet"
    broken.write_bytes(data["ph"].read_bytes()[:3000])
    assert_user_error(fit(data, ph=broken), r"truncated\.parquet", r"(corrupt|truncated|not a readable)",
                      folder=data["dir"])


def test_missing_key_column(data):
    table = data["ph_table"].drop(columns=["concentration"])
    table.to_parquet(data["dir"] / "nokey.parquet")
    assert_user_error(fit(data, ph=data["dir"] / "nokey.parquet"), r"nokey\.parquet", r"concentration",
                      folder=data["dir"])


def test_missing_feature_columns(data):
    # a config of its own (an override would merge with clip.yaml's feature_prefix)
    config = yaml.safe_load((CONFIGS / "clip.yaml").read_text())
    config["data"]["init_args"]["modalities"]["ph"]["init_args"] = {
        "path": str(data["ph"]), "features": ["feat_000", "feat_999"]}
    config["data"]["init_args"]["modalities"]["tx"]["init_args"]["path"] = str(data["tx"])
    (data["dir"].parent / "features.yaml").write_text(yaml.safe_dump(config))
    assert_user_error(["fit", "--config", str(data["dir"].parent / "features.yaml"), *QUICK], r"ph\.parquet",
                      r"feat_999", folder=data["dir"])


def test_non_numeric_features(data):
    table = data["ph_table"].copy()
    table["feat_005"] = table["feat_005"].astype(str)
    table.to_parquet(data["dir"] / "text.parquet")
    assert_user_error(fit(data, ph=data["dir"] / "text.parquet"), r"text\.parquet", r"feat_005", r"numeric")


def test_duplicate_var_names(data):
    tx = data["tx_adata"].copy()
    names = list(tx.var_names)
    names[3] = names[2]
    tx.var_names = names
    tx.write_h5ad(data["dir"] / "dup.h5ad")
    assert_user_error(fit(data, tx=data["dir"] / "dup.h5ad"), r"dup\.h5ad", r"more than once", names[2])


def test_no_key_overlap(data):
    table = data["ph_table"].copy()
    table["smiles"] = "X_" + table["smiles"].astype(str)
    table.to_parquet(data["dir"] / "other.parquet")
    assert_user_error(fit(data, ph=data["dir"] / "other.parquet"), r"no key \['smiles', 'concentration'\]")


def test_empty_training_split(data):
    table = data["ph_table"].copy()
    table["split"] = "test"
    table.to_parquet(data["dir"] / "alltest.parquet")
    tx = data["tx_adata"].copy()
    tx.obs["split"] = "test"
    tx.write_h5ad(data["dir"] / "alltest.h5ad")
    assert_user_error(fit(data, tx=data["dir"] / "alltest.h5ad", ph=data["dir"] / "alltest.parquet"),
                      r"training split holds no perturbation")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_and_inf_features(data, value):
    table = data["ph_table"].copy()
    table.loc[7, "feat_010"] = value
    table.to_parquet(data["dir"] / "bad.parquet")
    assert_user_error(fit(data, ph=data["dir"] / "bad.parquet"), r"bad\.parquet", r"NaN or infinite",
                      r"row 7 / feat_010")


def test_all_zero_rows(data):
    tx = data["tx_adata"].copy()
    X = tx.X.toarray()
    X[[4, 9]] = 0
    tx.X = sp.csr_matrix(X)
    tx.write_h5ad(data["dir"] / "zeros.h5ad")
    assert_user_error(fit(data, tx=data["dir"] / "zeros.h5ad"), r"zeros\.h5ad", r"2 rows", r"all zero",
                      r"normalize_log1p")


def test_batch_larger_than_the_dataset(data):
    assert_user_error(fit(data, "--data.batch_size", "100000"), r"fewer than batch_size=100000")


# -- checkpoints and prediction ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs-run")
    code, printed = run(["fit", "--config", str(CONFIGS / "clip.yaml"), "--trainer.max_epochs", "1",
                         "--trainer.enable_progress_bar", "false",
                         "--trainer.logger.init_args.save_dir", str(root / "runs")])
    assert code == 0, printed
    return next((root / "runs").rglob("last.ckpt"))


def predict(checkpoint: Path, path: Path, *extra: str) -> list[str]:
    return ["predict", "--ckpt_path", str(checkpoint), "--data.path", str(path),
            "--trainer.enable_progress_bar", "false", *extra]


def test_missing_checkpoint(tmp_path):
    assert_user_error(["predict", "--ckpt_path", str(tmp_path / "none.ckpt"), "--data.path", "x.h5ad"],
                      r"none\.ckpt", r"not found")


def test_corrupt_checkpoint(tmp_path, data, checkpoint):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(checkpoint.read_bytes()[:2000])
    assert_user_error(predict(broken, data["tx"]), r"broken\.ckpt", r"(corrupt|truncated|not a readable)",
                      folder=data["dir"])


def test_checkpoint_of_a_newer_format(tmp_path, data, checkpoint):
    content = torch.load(checkpoint, weights_only=True)
    content["unimodality"]["format"] = 99
    torch.save(content, tmp_path / "future.ckpt")
    assert_user_error(predict(tmp_path / "future.ckpt", data["tx"]), r"future\.ckpt", r"format 99",
                      r"upgrade unimodality")


def test_checkpoint_of_another_setup_class(data, checkpoint):
    from unimodality.plugins.setups.simclr import SimCLRSetup

    with pytest.raises(TypeError, match=r"last\.ckpt.*CrossModalSetup.*not a SimCLRSetup"):
        SimCLRSetup.load_from_checkpoint(checkpoint)
    assert_user_error(predict(checkpoint, data["tx"], "--model", "SimCLRSetup"), r"last\.ckpt", r"CrossModalSetup",
                      r"not a SimCLRSetup")


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path, data, checkpoint):
    content = torch.load(checkpoint, weights_only=True)
    content["payload"] = Path("/etc/passwd")  # any object that is not tensors and containers
    torch.save(content, tmp_path / "pickled.ckpt")
    assert_user_error(predict(tmp_path / "pickled.ckpt", data["tx"]), r"pickled\.ckpt", r"weights_only",
                      folder=data["dir"])


def test_predict_without_shared_genes(data, checkpoint):
    tx = data["tx_adata"].copy()
    tx.var_names = [f"OTHER{i}" for i in range(tx.n_vars)]
    tx.write_h5ad(data["dir"] / "other_genes.h5ad")
    assert_user_error(predict(checkpoint, data["dir"] / "other_genes.h5ad",
                              "--data.output", str(data["dir"] / "out.h5ad")),
                      r"other_genes\.h5ad", r"none of its 500 feature names match", folder=data["dir"])
    assert not (data["dir"] / "out.h5ad").exists()


def test_predict_with_a_modality_the_model_lacks(data, checkpoint):
    assert_user_error(predict(checkpoint, data["tx"], "--data.modality", "mol"), r"data\.modality='mol'",
                      r"\['ph', 'tx'\]")


def test_predict_into_a_missing_or_read_only_directory(data, checkpoint, tmp_path):
    assert_user_error(predict(checkpoint, data["tx"], "--data.output", str(tmp_path / "nowhere" / "out.h5ad")),
                      r"nowhere", r"does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        assert_user_error(predict(checkpoint, data["tx"], "--data.output", str(locked / "out.h5ad")),
                          r"locked", r"not writable")
    finally:
        locked.chmod(0o700)


def test_predict_refuses_to_overwrite_without_overwrite(data, checkpoint):
    output = data["dir"] / "embedded.parquet"
    output.write_bytes(b"precious")
    assert_user_error(predict(checkpoint, data["ph"], "--data.output", str(output)), r"embedded\.parquet",
                      r"already exists", r"--data\.overwrite")
    assert output.read_bytes() == b"precious"
    code, printed = run(predict(checkpoint, data["ph"], "--data.output", str(output), "--data.overwrite", "true"))
    assert code == 0, printed
    assert len(pd.read_parquet(output)) == len(data["ph_table"])

