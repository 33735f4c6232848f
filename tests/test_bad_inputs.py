"""A catalogue of bad inputs: each gets one short message naming the culprit, and no user file changes.

Every case runs the command line in-process, as a user would type it, and checks that it exits with an
error (not a traceback from inside a library), that the message names the file, column, key or option at
fault, and that the files the user had are byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml

from tests.helpers import copy_of_clip_run, fork
from unimodality.cli import main
from unimodality.errors import DataError
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
def data(tmp_path, example_tables) -> dict[str, Path]:
    """Small copies of the example files the cases below break in one way each (the files copied, their
    contents copies of the session's ``example_tables``)."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copyfile(resolve_path("example://transcriptomics.h5ad"), folder / "tx.h5ad")
    shutil.copyfile(resolve_path("example://phenomics.parquet"), folder / "ph.parquet")
    tx, ph = example_tables[0].copy(), example_tables[1].copy()
    return {"dir": folder, "tx": folder / "tx.h5ad", "ph": folder / "ph.parquet", "tx_adata": tx, "ph_table": ph}


def trained(args: list[str]) -> list[str]:
    """``args`` without ``fast_dev_run``: a real (short) run, with checkpoints and a run directory."""
    i = args.index("--trainer.fast_dev_run")
    return args[:i] + args[i + 2:]


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
def checkpoint(clip_run_dir, tmp_path_factory) -> Path:
    """last.ckpt of a 1-epoch CLI fit of configs/clip.yaml (the session's, copied for this module)."""
    return copy_of_clip_run(clip_run_dir, tmp_path_factory.mktemp("bad-inputs-run"))


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



# -- trust: what a checkpoint or a config may make unimodality build ------------------------------------------

HOSTILE = ["os.system", "subprocess.Popen", "builtins.eval", "os.remove"]


def tampered(checkpoint: Path, folder: Path, change) -> Path:
    """A copy of ``checkpoint`` with ``change(content)`` applied: still tensors and plain data (weights_only)."""
    content = torch.load(checkpoint, weights_only=True)
    change(content)
    path = folder / "tampered.ckpt"
    torch.save(content, path)
    torch.load(path, weights_only=True)  # passes the pickle check: only the class check can refuse it
    return path


def _set(path: str, name: str):
    """A change setting the ``class_path`` at ``path`` (keys joined by dots) of a checkpoint to ``name``."""
    def change(content):
        node = content
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = name if keys[-1] in ("class_path", "_class_path", "_instantiator") else {"class_path": name}
    return change


CHECKPOINT_SLOTS = [
    "hyper_parameters.schema.tx.class_path",       # predict would import it and call it with the input path
    "hyper_parameters._class_path",
    "hyper_parameters._instantiator",              # Lightning's load_from_checkpoint imports and calls it
    "hyper_parameters.encoders.tx.class_path",
    "hyper_parameters.loss.class_path",
    "hyper_parameters.optimizer.class_path",
    "hyper_parameters.lr_scheduler",
    "datamodule_hyper_parameters._class_path",
    "datamodule_hyper_parameters.modalities.tx.class_path",
]


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("slot", CHECKPOINT_SLOTS)
def test_a_checkpoint_naming_a_function_or_foreign_class_is_refused(data, checkpoint, tmp_path, slot, name):
    from unimodality.plugins.setups.cross_modal import CrossModalSetup

    hostile = tampered(checkpoint, tmp_path, _set(slot, name))
    culprit = re.escape(slot.rsplit(".class_path", 1)[0].split(".", 1)[1])
    command = "validate" if slot.startswith("datamodule") else "predict"
    args = predict(hostile, data["tx"], "--data.output", str(data["dir"] / "out.h5ad"))
    if command == "validate":
        args = ["validate", "--ckpt_path", str(hostile), "--trainer.enable_progress_bar", "false"]
    assert_user_error(args, r"tampered\.ckpt", culprit, re.escape(name), folder=data["dir"])
    assert data["tx"].exists() and not (data["dir"] / "out.h5ad").exists()
    with pytest.raises(Exception, match=r"tampered\.ckpt.*" + re.escape(name)):
        CrossModalSetup.load_from_checkpoint(hostile)


def test_a_checkpoint_may_not_make_unimodality_import_a_module(data, checkpoint, tmp_path):
    hostile = tampered(checkpoint, tmp_path, _set("hyper_parameters.loss.class_path", "antigravity.Loss"))
    assert_user_error(predict(hostile, data["tx"]), r"antigravity", r"not imported", folder=data["dir"])
    import sys

    assert "antigravity" not in sys.modules


SLOTS = {  # a config's class slots and how to point one at a hostile name
    "model": lambda c, n: c["model"].__setitem__("class_path", n),
    "data": lambda c, n: c["data"].__setitem__("class_path", n),
    "encoder": lambda c, n: c["model"]["init_args"]["encoders"]["tx"].__setitem__("class_path", n),
    "encoder as a plain path": lambda c, n: c["model"]["init_args"]["encoders"].__setitem__("tx", n),
    "loss": lambda c, n: c["model"]["init_args"]["loss"].__setitem__("class_path", n),
    "optimizer": lambda c, n: c["model"]["init_args"]["optimizer"].__setitem__("class_path", n),
    "optimizer as a plain path": lambda c, n: c["model"]["init_args"].__setitem__("optimizer", n),
    "lr_scheduler": lambda c, n: c["model"]["init_args"]["lr_scheduler"].__setitem__("class_path", n),
    "source": lambda c, n: c["data"]["init_args"]["modalities"]["ph"].__setitem__("class_path", n),
    "logger": lambda c, n: c["trainer"]["logger"].__setitem__("class_path", n),
    "callbacks": lambda c, n: c["trainer"].__setitem__("callbacks", [{"class_path": n}]),
    "strategy": lambda c, n: c["trainer"].__setitem__("strategy", n),
}


@pytest.mark.parametrize("name", ["os.system", "subprocess.Popen", "builtins.eval"])
@pytest.mark.parametrize("slot", list(SLOTS))
def test_a_config_naming_a_function_or_foreign_class_is_refused(data, tmp_path, slot, name):
    config = yaml.safe_load((CONFIGS / "clip.yaml").read_text())
    SLOTS[slot](config, name)
    witness = tmp_path / "ran"
    if name == "subprocess.Popen":  # were it called, it would leave a file behind
        arm(config, name, witness)
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(config))
    printed = assert_user_error(["fit", "--config", str(path), *QUICK], r"hostile\.yaml", re.escape(name),
                                folder=data["dir"])
    assert len(printed.strip().splitlines()) == 1, printed
    assert not witness.exists()
    # the same through the command line (jsonargparse would call it at instantiation)
    option = json.dumps({"tx": {"class_path": name, "init_args": {"args": ["touch", str(witness)]}}})
    assert_user_error(["fit", "--config", str(CONFIGS / "clip.yaml"), "--model.init_args.encoders", option, *QUICK],
                      re.escape(name))
    assert not witness.exists()


@pytest.mark.parametrize("name", ["builtins.print", "os.system", "builtins.eval"])
def test_a_function_given_to_a_callable_argument_is_refused(data, checkpoint, tmp_path, name):
    """A scheduler's `lr_lambda` is typed as a callable: jsonargparse would import the path and LambdaLR
    call it every epoch. Such a string must name an accepted class too, in a config and in a checkpoint."""
    scheduler = {"class_path": "torch.optim.lr_scheduler.LambdaLR", "init_args": {"lr_lambda": name}}
    config = yaml.safe_load((CONFIGS / "clip.yaml").read_text())
    config["model"]["init_args"]["lr_scheduler"] = scheduler
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(config))
    culprit = r"lr_scheduler\.init_args\.lr_lambda"
    printed = assert_user_error(["fit", "--config", str(path), *QUICK], r"hostile\.yaml", culprit, re.escape(name),
                                r"not a class", folder=data["dir"])
    assert len(printed.strip().splitlines()) == 1, printed
    assert_user_error(["fit", "--config", str(CONFIGS / "clip.yaml"), "--model.init_args.lr_scheduler",
                       json.dumps(scheduler), *QUICK], culprit, r"not a class")  # (os.system is posix.system)

    def change(content):
        content["hyper_parameters"]["lr_scheduler"] = scheduler

    hostile = tampered(checkpoint, tmp_path, change)
    assert_user_error(predict(hostile, data["tx"], "--data.output", str(data["dir"] / "out.h5ad")),
                      r"tampered\.ckpt", culprit, re.escape(name), folder=data["dir"])


def test_a_class_given_to_a_callable_argument_is_accepted(tmp_path, capsys):
    """The same check lets the classes a config is meant to name through: an optimizer given as a plain path."""
    from unimodality.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "clip.yaml"), "--model.init_args.optimizer", "torch.optim.SGD",
              "--print_config"])
    assert exit_info.value.code == 0 and "torch.optim.SGD" in capsys.readouterr().out


def arm(config, name: str, witness: Path) -> None:
    """Give every entry naming ``name`` the arguments that would create ``witness`` if it were called."""
    if isinstance(config, dict):
        if config.get("class_path") == name:
            config["init_args"] = {"args": ["touch", str(witness)]}
        for value in config.values():
            arm(value, name, witness)
    elif isinstance(config, list):
        for value in config:
            arm(value, name, witness)


# -- predict never writes over its input ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["same path", "relative path", "symlink", "hard link"])
@pytest.mark.parametrize("kind", ["ph", "tx", "tx streaming"])
def test_predict_refuses_to_write_over_its_input(data, checkpoint, how, kind, monkeypatch):
    source = data[kind.split()[0]]
    output = {"same path": source, "relative path": Path(os.path.relpath(source)),
              "symlink": data["dir"] / f"link{source.suffix}", "hard link": data["dir"] / f"hard{source.suffix}"}[how]
    if how == "symlink":
        output.symlink_to(source)
    if how == "hard link":
        os.link(source, output)
    extra = ["--data.streaming", "true"] if "streaming" in kind else []
    assert_user_error(predict(checkpoint, source, "--data.output", str(output), "--data.overwrite", "true", *extra),
                      r"is the input file", r"never writes over its input", folder=data["dir"])


def test_predict_refuses_to_write_over_the_checkpoint(data, checkpoint, tmp_path):
    fake = tmp_path / "model.parquet"
    fake.write_bytes(checkpoint.read_bytes())
    assert_user_error(predict(fake, data["ph"], "--data.output", str(fake), "--data.overwrite", "true"),
                      r"model\.parquet", r"checkpoint", folder=tmp_path)


# -- files with no rows, and columns the output would overwrite -------------------------------------------------

def test_predict_on_a_file_without_rows(data, checkpoint):
    data["ph_table"].iloc[:0].to_parquet(data["dir"] / "empty.parquet")
    assert_user_error(predict(checkpoint, data["dir"] / "empty.parquet", "--data.output",
                              str(data["dir"] / "out.parquet")),
                      r"empty\.parquet", r"no rows", folder=data["dir"])
    assert not (data["dir"] / "out.parquet").exists()


def test_training_on_a_file_without_rows(data):
    data["ph_table"].iloc[:0].to_parquet(data["dir"] / "empty.parquet")
    assert_user_error(fit(data, ph=data["dir"] / "empty.parquet"), r"empty\.parquet", r"no rows", folder=data["dir"])


@pytest.mark.parametrize("column", ["obs_names", "X_unimodality_0"])
def test_metadata_columns_named_like_the_outputs_are_found_before_embedding(data, checkpoint, column, monkeypatch):
    tx = data["tx_adata"].copy()
    tx.obs[column] = "x"
    tx.write_h5ad(data["dir"] / "clash.h5ad")
    from unimodality.plugins.setups.cross_modal import CrossModalSetup

    embedded = []
    monkeypatch.setattr(CrossModalSetup, "predict_step", lambda *a, **k: embedded.append(1))
    assert_user_error(predict(checkpoint, data["dir"] / "clash.h5ad", "--data.output",
                              str(data["dir"] / "out.parquet")),
                      r"clash\.h5ad", column, r"rename them", folder=data["dir"])
    assert not embedded  # refused before any row was embedded


# -- keys that differ only in precision, and unmatched rows ------------------------------------------------

def test_float32_and_float64_keys_pair_every_row(data, tmp_path):
    from unimodality.plugins.datamodules.paired import PairedDataModule
    from unimodality.plugins.sources.anndata import AnnDataSource
    from unimodality.plugins.sources.table import TableSource

    tx, table = data["tx_adata"].copy(), data["ph_table"].copy()
    tx.obs["concentration"] = tx.obs["concentration"] * 0.1  # 0.1 and 1.0, as float64
    tx.write_h5ad(tmp_path / "f64.h5ad")
    table["concentration"] = (table["concentration"] * 0.1).astype(np.float32)
    table.to_parquet(tmp_path / "f32.parquet")
    assert (table["concentration"].astype(np.float64) != data["ph_table"]["concentration"] * 0.1).any()

    def perturbations(tx: Path, ph: Path, **options) -> int:
        sources = {"tx": AnnDataSource(str(tx)), "ph": TableSource(str(ph), feature_prefix="feat_")}
        dm = PairedDataModule(sources, keys=["smiles", "concentration"], split_column="split", **options)
        _, shared, _, _ = dm._index()
        return len(shared)

    assert perturbations(tmp_path / "f64.h5ad", tmp_path / "f32.parquet") == perturbations(data["tx"], data["ph"])
    # compared exactly, the 0.1 doses find no partner: too many rows unmatched, an error that shows them
    with pytest.raises(DataError, match=r"max_unmatched.*0\.1"):
        perturbations(tmp_path / "f64.h5ad", tmp_path / "f32.parquet", key_digits=None)


def test_many_unmatched_rows_stop_training_with_examples_of_each_side(data, tmp_path):
    table = data["ph_table"].copy()
    table.loc[: len(table) // 4, "smiles"] = "X" + table.loc[: len(table) // 4, "smiles"].astype(str)
    table.to_parquet(tmp_path / "renamed.parquet")
    assert_user_error(fit(data, ph=tmp_path / "renamed.parquet"), r"max_unmatched=0\.1", r"ph \(renamed\.parquet\)",
                      r"tx \(tx\.h5ad\)", r"e\.g\. \[\(.X", folder=data["dir"])
    code, printed = run(fit(data, "--data.init_args.max_unmatched", "1.0", ph=tmp_path / "renamed.parquet"))
    assert code == 0, printed


# -- training settings that would silently do nothing -----------------------------------------------------

@pytest.mark.parametrize("option", ["--trainer.max_epochs", "--trainer.max_steps"])
def test_a_training_length_of_zero(data, option):
    args = trained(fit(data, option, "0"))
    assert_user_error(args, option.lstrip("-"), r"trains nothing", folder=data["dir"])


def test_a_validation_split_of_one_perturbation_warns(data, tmp_path, caplog):
    import logging

    from unimodality.plugins.datamodules.paired import PairedDataModule
    from unimodality.plugins.sources.anndata import AnnDataSource
    from unimodality.plugins.sources.table import TableSource

    tx, ph = data["tx_adata"].copy(), data["ph_table"].copy()
    first = (ph["smiles"] == ph["smiles"].iloc[0]) & (ph["concentration"] == ph["concentration"].iloc[0])
    ph["split"] = np.where(first, "val", "train")
    keys = set(zip(ph.loc[first, "smiles"], ph.loc[first, "concentration"]))
    tx.obs["split"] = ["val" if k in keys else "train" for k in zip(tx.obs["smiles"], tx.obs["concentration"])]
    tx.write_h5ad(tmp_path / "tx.h5ad")
    ph.to_parquet(tmp_path / "ph.parquet")
    dm = PairedDataModule({"tx": AnnDataSource(str(tmp_path / "tx.h5ad")),
                           "ph": TableSource(str(tmp_path / "ph.parquet"), feature_prefix="feat_")},
                          keys=["smiles", "concentration"], split_column="split")
    with caplog.at_level(logging.WARNING, logger="unimodality"):
        dm.setup("fit")
    assert "'val' split holds a single perturbation" in caplog.text and "1.0 by construction" in caplog.text


# -- one run per run directory ------------------------------------------------------------------------------

def hold_lock(run_dir: Path, ready: int, forget_inherited: bool = False) -> None:
    from unimodality import run_lock

    if forget_inherited:  # a forked child inherits the parent's record of the locks it holds, not the locks
        run_lock._held.clear()
    run_lock.lock_run_directory(run_dir)
    os.write(ready, b"locked\n")
    time.sleep(120)


def test_a_run_directory_in_use_is_refused_at_once_and_freed_when_its_run_dies(data, tmp_path):
    run_dir = tmp_path / "runs" / "clip" / "shared"
    ready, told = os.pipe()
    holder = fork(hold_lock, run_dir, told)  # another process holds the run directory
    os.close(told)
    try:
        with os.fdopen(ready) as pipe:
            assert pipe.readline().strip() == "locked"
        args = trained(fit(data, "--trainer.max_epochs", "1", "--trainer.logger.init_args.save_dir",
                           str(tmp_path / "runs"), "--trainer.logger.init_args.version", "shared"))
        assert_user_error(args, rf"run directory .*shared is in use by fit pid {holder}\b",
                          r"--trainer\.logger\.init_args\.version")
        assert not (run_dir / "checkpoints").exists()
    finally:
        os.kill(holder, signal.SIGKILL)  # no clean-up of its own, the operating system releases the lock
        os.waitpid(holder, 0)
    code, printed = run(args)
    assert code == 0, printed
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # the fit has ended: the directory is free again (for a resumed run in another process)
    ready, told = os.pipe()
    holder = fork(hold_lock, run_dir, told, True)
    os.close(told)
    try:
        with os.fdopen(ready) as pipe:
            assert pipe.readline().strip() == "locked"
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def test_runs_started_together_claim_distinct_numbered_directories(tmp_path):
    from unimodality.run_lock import claim_new_directory

    assert claim_new_directory(tmp_path, "version_0")
    assert not claim_new_directory(tmp_path, "version_0")  # the second run moves on to version_1


# -- every checkpoint read is the safe read -----------------------------------------------------------------

def test_fit_resume_from_a_truncated_or_pickled_checkpoint(data, checkpoint, tmp_path):
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:4000])
    assert_user_error(fit(data, "--ckpt_path", str(truncated)), r"cut\.ckpt", r"truncated or corrupt",
                      folder=data["dir"])
    content = torch.load(checkpoint, weights_only=True)
    content["payload"] = Path("/etc/passwd")
    torch.save(content, tmp_path / "pickled.ckpt")
    assert_user_error(fit(data, "--ckpt_path", str(tmp_path / "pickled.ckpt")), r"pickled\.ckpt",
                      r"--trust_checkpoint", folder=data["dir"])


def test_weights_only_false_needs_trust_checkpoint_and_then_warns(data, checkpoint, tmp_path):
    args = trained(fit(data, "--ckpt_path", str(checkpoint), "--trainer.max_epochs", "2",
                       "--trainer.logger.init_args.save_dir", str(tmp_path)))
    assert_user_error([*args, "--weights_only", "false"], r"--weights_only false", r"--trust_checkpoint true")
    with pytest.warns(UserWarning, match=r"weights_only=False \(--trust_checkpoint\)"):
        code, printed = run([*args, "--weights_only", "false", "--trust_checkpoint", "true"])
    assert code == 0, printed


def test_trusting_a_checkpoint_loads_a_pickled_one_with_a_warning(data, checkpoint, tmp_path):
    content = torch.load(checkpoint, weights_only=True)
    content["payload"] = Path("/etc/passwd")
    torch.save(content, tmp_path / "pickled.ckpt")
    output = tmp_path / "out.parquet"
    with pytest.warns(UserWarning, match=r"pickled\.ckpt: loaded with weights_only=False"):
        code, printed = run(predict(tmp_path / "pickled.ckpt", data["ph"], "--data.output", str(output),
                                    "--trust_checkpoint", "true"))
    assert code == 0, printed
    assert len(pd.read_parquet(output)) == len(data["ph_table"])


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_model_weights_from_a_truncated_or_pickled_file(data, checkpoint, tmp_path, damage):
    weights = tmp_path / "weights.ckpt"
    if damage == "truncated":
        weights.write_bytes(checkpoint.read_bytes()[:4000])
    else:
        torch.save({"state_dict": {}, "payload": Path("/etc/passwd")}, weights)
    assert_user_error(fit(data, "--model.init_args.modes", json.dumps({"tx": "frozen"}),
                          "--model.init_args.weights", json.dumps({"tx": str(weights)})),
                      r"weights\.ckpt", r"truncated or corrupt" if damage == "truncated" else "weights_only",
                      folder=data["dir"])


# -- exit codes -----------------------------------------------------------------------------------------------

def test_sigterm_during_fit_saves_a_checkpoint_and_exits_143(data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from unimodality.checkpoint import read_checkpoint

    args = trained(fit(data, "--trainer.max_epochs", "1000", "--trainer.logger.init_args.save_dir", str(tmp_path),
                       "--trainer.logger.init_args.version", "killed"))
    job = subprocess.Popen([sys.executable, "-m", "unimodality", *args], stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run_dir = tmp_path / "clip" / "killed"
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)  # training: the first epoch's checkpoint is written
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err[-3000:]
    saved = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert len(saved) == 1 and "stopped by SIGTERM: saved" in err and str(saved[0]) in err, err[-3000:]
    assert read_checkpoint(saved[0])["global_step"] > 0


def test_a_checkpoint_naming_a_source_by_its_old_class_path_still_predicts(data, checkpoint, tmp_path):
    def old_paths(content):  # as checkpoints written before the sources moved under unimodality.plugins name them
        for name, old in (("tx", "unimodality.sources.AnnDataSource"), ("ph", "unimodality.sources.TableSource")):
            content["hyper_parameters"]["schema"][name]["class_path"] = old
            content["datamodule_hyper_parameters"]["modalities"][name]["class_path"] = old

    older = tampered(checkpoint, tmp_path, old_paths)
    code, printed = run(predict(older, data["ph"], "--data.output", str(tmp_path / "out.parquet")))
    assert code == 0, printed
    code, printed = run(["validate", "--ckpt_path", str(older), "--trainer.enable_progress_bar", "false"])
    assert code == 0, printed
    # a checkpoint outside a run directory: its results beside it, never in the working directory
    assert (tmp_path / "val_results_tampered.csv").is_file() and not Path("val_results_tampered.csv").exists()


def test_predict_reads_a_zarr_store_like_its_h5ad(data, checkpoint, tmp_path):
    data["tx_adata"].write_zarr(tmp_path / "tx.zarr")
    outputs = {}
    for name in ("tx.zarr", "tx.h5ad"):
        source = tmp_path / name if name.endswith(".zarr") else data["tx"]
        output = tmp_path / f"from_{name.split('.')[1]}.h5ad"
        code, printed = run(predict(checkpoint, source, "--data.output", str(output)))
        assert code == 0, printed
        outputs[name] = ad.read_h5ad(output)
    np.testing.assert_allclose(outputs["tx.zarr"].obsm["X_unimodality"], outputs["tx.h5ad"].obsm["X_unimodality"],
                               atol=1e-6)
    assert outputs["tx.zarr"].n_vars == data["tx_adata"].n_vars  # a copy of the input, its matrix included
