"""The command line as a user drives it: fit -> validate -> predict from the checkpoint alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from unimodality.cli import main
from unimodality.outputs import OBSM_KEY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One short training run on the example data, shared by the tests below."""
    root = tmp_path_factory.mktemp("cli-run")
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        main([
            "fit", "--config", str(CONFIGS / "clip.yaml"),
            "--trainer.max_epochs", "10", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(root / "runs"),
        ])
    printed = out.getvalue()
    match = re.search(r"Run directory: (\S+)", printed)
    assert match, printed
    return {"root": root, "run_dir": Path(match.group(1)), "printed": printed}


def test_fit_writes_one_run_directory(run):
    run_dir = run["run_dir"]
    assert run_dir.parent == run["root"] / "runs" / "clip"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert f"best on val/pert/mrr checkpoint: {run_dir / 'checkpoints' / 'best.ckpt'}" in run["printed"]
    assert f"latest checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}" in run["printed"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    # last.ckpt holds the final epoch's weights, whatever epoch was best
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == 9
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    # best.ckpt is selected on perturbation-level retrieval (a small validation set's loss is a poor selector)
    metrics_at_best = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["val/pert/mrr"])
    assert metrics_at_best["val/pert/mrr"].max() == pytest.approx(
        float(metrics_at_best.loc[metrics_at_best["epoch"] == best["epoch"], "val/pert/mrr"].iloc[0]))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    for column in ("train/loss", "val/loss", "train/logit_scale"):
        assert metrics[column].notna().any(), column
    for k in (1, 5, 10):
        for direction in ("tx->ph", "ph->tx"):
            values = metrics[f"val/recall@{k}/{direction}"].dropna()
            assert len(values) == 10 and values.between(0, 1).all()
    # learning happened: top-1 retrieval is well above chance (about 1/40: 40 validation perturbations)
    assert metrics["val/recall@1"].dropna().iloc[-1] > 0.1
    # the resolved config names plugins by their full class paths
    config = (run_dir / "config.yaml").read_text()
    assert "unimodality.plugins.setups.cross_modal.CrossModalSetup" in config
    assert "unimodality.plugins.losses.clip.ClipLoss" in config


def test_validate_from_checkpoint_alone(run, capsys):
    main(["validate", "--ckpt_path", str(run["run_dir"] / "checkpoints" / "best.ckpt"),
          "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    printed = capsys.readouterr().out
    assert re.search(r"val/recall@1/tx->ph\s+0\.\d+", printed), printed


def test_test_stage_from_checkpoint_alone(run, capsys):
    main(["test", "--ckpt_path", str(run["run_dir"] / "checkpoints" / "last.ckpt"),
          "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    assert re.search(r"test/recall@5/ph->tx\s+0\.\d+", capsys.readouterr().out)


def predict(run, *args: str) -> None:
    main(["predict", "--ckpt_path", str(run["run_dir"] / "checkpoints" / "last.ckpt"),
          "--trainer.enable_progress_bar", "false", *args])


def test_predict_h5ad_keeps_obs_and_adds_embedding(run, example_data_dir, tmp_path):
    output = tmp_path / "emb.h5ad"
    predict(run, "--data.path", str(example_data_dir / "transcriptomics.h5ad"), "--data.output", str(output),
            "--data.n_samples", "50")
    source = ad.read_h5ad(example_data_dir / "transcriptomics.h5ad")
    result = ad.read_h5ad(output)
    assert result.n_obs == 50
    pd.testing.assert_frame_equal(result.obs.astype(str), source.obs.iloc[:50].astype(str))
    embedding = result.obsm[OBSM_KEY]
    assert embedding.shape == (50, 128)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)


def test_predict_parquet_picks_phenomics_tower(run, example_data_dir, tmp_path):
    ph_file = example_data_dir / "phenomics.parquet"
    output = tmp_path / "ph.parquet"
    predict(run, "--data.path", "example://phenomics.parquet", "--data.output", str(output))
    table = pd.read_parquet(output)
    assert {"smiles", "concentration", "well"} <= set(table.columns)
    assert not any(c.startswith("feat_") for c in table.columns)
    embedding = table.filter(like=f"{OBSM_KEY}_").to_numpy()
    assert embedding.shape == (len(pd.read_parquet(ph_file)), 128)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)


def test_predict_aligns_genes_by_name(run, example_data_dir, tmp_path):
    source = ad.read_h5ad(example_data_dir / "transcriptomics.h5ad")[:80].copy()
    source.write_h5ad(tmp_path / "original.h5ad")
    shuffled = source[:, np.random.default_rng(0).permutation(source.n_vars)].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    subset = source[:, 25:].copy()
    subset.write_h5ad(tmp_path / "subset.h5ad")

    for name in ("original", "shuffled"):
        predict(run, "--data.path", str(tmp_path / f"{name}.h5ad"), "--data.output", str(tmp_path / f"{name}_e.h5ad"))
    with pytest.warns(UserWarning, match="25 of the model's 500 features are missing"):
        predict(run, "--data.path", str(tmp_path / "subset.h5ad"), "--data.output", str(tmp_path / "subset_e.h5ad"))

    original = ad.read_h5ad(tmp_path / "original_e.h5ad").obsm[OBSM_KEY]
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "shuffled_e.h5ad").obsm[OBSM_KEY], original, atol=1e-5)
    assert not np.allclose(ad.read_h5ad(tmp_path / "subset_e.h5ad").obsm[OBSM_KEY], original, atol=1e-3)


def test_predict_refuses_a_file_without_shared_genes(run, tmp_path, capsys):
    other = ad.AnnData(X=np.ones((5, 3), dtype=np.float32))
    other.var_names = ["A", "B", "C"]
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(SystemExit):
        predict(run, "--data.path", str(tmp_path / "other.h5ad"), "--data.output", str(tmp_path / "o.h5ad"))
    assert "none of its 3 feature names match the 500 features" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()


def test_help_and_print_config(capsys):
    for args in (["--help"], ["fit", "--help"], ["fit", "--config", str(CONFIGS / "clip.yaml"), "--print_config"],
                 ["fit", "--model.help", "CrossModalSetup"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0, args
    printed = capsys.readouterr().out
    assert "unimodality predict --ckpt_path" in printed  # top-level help
    assert "class_path: unimodality.plugins.losses.clip.ClipLoss" in printed  # print_config
    assert "--model.embed_dim" in printed  # --model.help


def test_unknown_plugin_lists_registered_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "clip.yaml"), "--model.loss", "ClipLos"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "Did you mean 'ClipLoss'?" in err
    assert re.search(r"losses: .*ClipLoss", err) and re.search(r"encoders: .*MLPEncoder", err)


def test_plugins_command_lists_builtins(capsys):
    main(["plugins"])
    printed = capsys.readouterr().out
    assert re.search(r"ClipLoss\s+unimodality\.plugins\.losses\.clip\.ClipLoss\s+\(unimodality\)", printed)


def test_ambiguous_short_name_asks_for_the_full_path(tmp_path):
    """Two importable classes named ClipLoss: the short name fails and says which full paths exist."""
    (tmp_path / "other_losses.py").write_text(
        "from unimodality.loss import ContrastiveLoss\n\n\n"
        "class ClipLoss(ContrastiveLoss):\n    \"\"\"A second loss called ClipLoss.\"\"\"\n"
    )
    full_path = tmp_path / "full_path.yaml"
    full_path.write_text((CONFIGS / "clip.yaml").read_text().replace(
        "class_path: ClipLoss", "class_path: unimodality.plugins.losses.clip.ClipLoss"))
    # one process for both configs (each costs ~10 s of imports): it reports each main()'s exit status on stderr
    script = (
        "import sys, other_losses\n"
        "from unimodality.cli import main\n"
        "for config in sys.argv[1:]:\n"
        "    try:\n"
        "        main(['fit', '--config', config, '--print_config'])\n"
        "        code = 0\n"
        "    except SystemExit as exit_:\n"
        "        code = exit_.code\n"
        "    print(f'<<exit {code}>>', file=sys.stderr, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(CONFIGS / "clip.yaml"), str(full_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ambiguous_err, ambiguous_code, resolved_err, resolved_code, _ = re.split(r"<<exit (.*)>>\n", done.stderr)
    assert ambiguous_code not in ("0", "None")
    assert "'ClipLoss' is ambiguous" in ambiguous_err
    assert "other_losses.ClipLoss" in ambiguous_err
    assert "unimodality.plugins.losses.clip.ClipLoss" in ambiguous_err
    assert resolved_code in ("0", "None"), resolved_err[-2000:]
