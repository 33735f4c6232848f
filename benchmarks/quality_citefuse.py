"""Retrieval quality on real paired data: ECCITE-seq RNA <-> 49 surface proteins (ADT) of 500 PBMCs.

5-fold cross-validation over cells. In each fold the model sees 400 cells (360 to train, 40 as an inner
validation set used only to pick the checkpoint) and is scored on the 100 held-out cells: every held-out
cell's RNA embedding queries the 100 held-out protein profiles (and back); a hit is the same cell. All
methods are scored by the same function (``unimodality.metrics.retrieval_scores``) on the same folds, in
the same run:

- ``CLIP`` / ``Hopfield``: unimodality's ``CrossModalSetup`` with ``ClipLoss`` / ``HopfieldLoss``, read with
  ``AnnDataSource`` (library-size normalisation + log1p) and ``TableSource`` (CLR), paired by barcode;
- ``ridge``: scikit-learn ridge regression RNA -> protein (penalty chosen by inner cross-validation on the
  training cells), retrieval by cosine similarity of predicted and measured (standardised) protein profiles;
- ``CCA``: scikit-learn CCA between RNA (PCA, fitted on the training cells) and standardised proteins,
  retrieval by cosine similarity in the canonical space;
- chance: a random ranking (1/100 at top-1, 10/100 at top-10, MRR = H_100 / 100).

The hyperparameters below were set beforehand (those of ``tests/test_real_data.py``) and then chosen among four
variants with ``--tune``, which trains on fold 0's training cells only and scores 100 of them (the held-out
cells are left out of the data): a linear ADT tower (``modes: {adt: disabled}``) and keeping the epoch with the
best inner-validation MRR rather than the lowest val/loss (which bottoms out after 3-7 epochs). Run
``python benchmarks/quality_citefuse.py`` (10-20 minutes on 2 shared CPU cores); writes
``benchmarks/results/quality_citefuse.json``.

Seen (seed 0, torch 2.13 CPU; mean of both directions over 5 folds, +- the folds' standard deviation):
ridge 0.109 +- 0.018 top-1, 0.595 +- 0.042 top-10, MRR 0.253; CCA 0.115 / 0.531 / 0.241; CLIP 0.112 +- 0.012 /
0.589 +- 0.071 / 0.257; Hopfield 0.095 / 0.558 / 0.235; chance 0.010 / 0.100 / 0.052. CLIP matches ridge
(within the fold-to-fold spread) but does not beat it; with 400 training cells a linear map is hard to beat.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "citefuse_eccite_pbmc"
RESULTS = Path(__file__).resolve().parent / "results" / "quality_citefuse.json"
KS = (1, 10)

#: unimodality settings (documented; chosen before looking at held-out cells)
TRAINING = {
    "embed_dim": 64,
    "rna_hidden": [256],
    "rna_dropout": 0.3,
    "adt_hidden": [128],
    "adt_dropout": 0.1,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "batch_size": 64,
    "max_epochs": 60,
    "adt_mode": "disabled",  # the 49 CLR values go straight into the projection head (a linear map)
    "monitor": "val/pert/mrr",  # the checkpoint kept: highest MRR on the inner validation cells
    "inner_val_cells": 40,  # of the 400 training cells: picks the epoch, nothing else
}
#: variants compared by ``--tune`` on fold 0's inner validation cells (the held-out cells are not used)
#: (``--tune``, seed 0, CLIP, top-1 / top-10 / MRR of 100 cells: trainable ADT MLP + val/loss selection
#: 0.080 / 0.565 / 0.205; ADT disabled 0.075 / 0.590 / 0.217; selection on val/pert/mrr 0.075 / 0.570 / 0.230;
#: both 0.145 / 0.570 / 0.271 -> the defaults above. val/loss bottoms out after 3-7 epochs on 40 cells while
#: retrieval keeps improving for 40+.)
VARIANTS = {
    "default": {"adt_mode": "trainable", "monitor": "val/loss"},
    "adt_linear": {"adt_mode": "disabled", "monitor": "val/loss"},
    "select_mrr": {"adt_mode": "trainable", "monitor": "val/pert/mrr"},
    "both": {},
}
#: cells scored when tuning (of fold 0's 400 training cells; the held-out cells are not used)
TUNE_SCORE_CELLS = 100
RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
CCA_PCS, CCA_COMPONENTS = 50, 20


def load(data: Path) -> tuple[sp.csr_matrix, np.ndarray, list[str]]:
    """RNA (library-size normalised + log1p) and ADT (CLR) exactly as unimodality's sources read them."""
    from unimodality.plugins.sources.anndata import AnnDataSource
    from unimodality.plugins.sources.table import TableSource

    rna = AnnDataSource(str(data / "rna_counts.h5ad"), transform="normalize_log1p")
    adt = TableSource(str(data / "adt_counts.parquet"), feature_regex="^(?!barcode$)", transform="clr")
    x = sp.csr_matrix(rna.read_features())
    y = np.asarray(adt.read_features(), dtype=np.float64)
    barcodes = list(adt.read_metadata()["barcode"].astype(str))
    return x, y, barcodes


def score(sim: np.ndarray) -> dict[str, float]:
    """recall@1/10 and MRR of both directions (rows: RNA queries; columns: protein queries); cell i <-> i."""
    from unimodality.metrics import retrieval_scores

    sim = torch.as_tensor(sim, dtype=torch.float32)
    target = torch.eye(len(sim), dtype=torch.long)
    out = {}
    for direction, matrix in (("rna->adt", sim), ("adt->rna", sim.T)):
        scores = retrieval_scores(matrix, target, KS, mrr=True)
        out |= {f"{name}/{direction}": float(v) for name, v in scores.items() if name != "queries"}
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-8
    return (train - mean) / std, (test - mean) / std


def ridge(x: sp.csr_matrix, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, dict]:
    from sklearn.linear_model import RidgeCV

    expressed = np.asarray((x[train] > 0).sum(axis=0)).ravel() >= 5  # genes seen in >= 5 training cells
    y_train, y_test = standardise(y[train], y[test])
    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(x[train][:, expressed].toarray(), y_train)
    predicted = model.predict(x[test][:, expressed].toarray())
    return cosine(predicted, y_test), {"alpha": float(model.alpha_), "genes": int(expressed.sum())}


def cca(x: sp.csr_matrix, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, dict]:
    from sklearn.cross_decomposition import CCA
    from sklearn.decomposition import PCA

    x_train, x_test = standardise(x[train].toarray(), x[test].toarray())
    pca = PCA(n_components=CCA_PCS, random_state=0).fit(x_train)
    y_train, y_test = standardise(y[train], y[test])
    model = CCA(n_components=CCA_COMPONENTS, max_iter=2000).fit(pca.transform(x_train), y_train)
    u, v = model.transform(pca.transform(x_test), y_test)
    return cosine(u, v), {"pcs": CCA_PCS, "components": CCA_COMPONENTS}


def fold_labels(n_cells: int, train: np.ndarray, test: np.ndarray, inner_val: int, seed: int) -> np.ndarray:
    """Split label per cell: ``test`` for the held-out cells, ``val`` for ``inner_val`` of the training cells
    (checkpoint selection only), ``train`` for the rest; ``""`` for cells left out altogether."""
    labels = np.full(n_cells, "", dtype=object)
    labels[train] = "train"
    labels[test] = "test"
    labels[np.random.default_rng(seed).choice(train, inner_val, replace=False)] = "val"
    return labels


def unimodality_model(
    loss_name: str | type | None, folder: Path, labels: np.ndarray, data: Path, seed: int,
    settings: dict | None = None, setup: Callable[..., Any] | None = None,
) -> tuple[np.ndarray, dict]:
    """Train a CrossModalSetup on the ``train`` cells (epoch picked on the ``val`` cells); similarities of the
    ``test`` cells' embeddings (rows: RNA, columns: proteins; cell i is row and column i).

    Args:
        loss_name: ``CLIP`` or ``Hopfield``, or a loss class (built with its defaults; benchmarks/methods.py);
            ``None``: the setup's own default loss.
        folder: scratch folder of this run.
        labels: split label of every cell (see :func:`fold_labels`); cells labelled ``""`` are left out.
        data: the dataset folder.
        seed: seed of training.
        settings: overrides of ``TRAINING``.
        setup: builds the model from ``encoders``, ``modes``, ``loss``, ``embed_dim`` and ``optimizer`` keywords
            (default `CrossModalSetup`; benchmarks/methods.py passes the distillation and DINO setups).
    """
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from unimodality.plugins.datamodules.paired import PairedDataModule
    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.losses.clip import ClipLoss
    from unimodality.plugins.losses.hopfield import HopfieldLoss
    from unimodality.plugins.setups.cross_modal import CrossModalSetup
    from unimodality.plugins.sources.anndata import AnnDataSource
    from unimodality.plugins.sources.table import TableSource

    config = {**TRAINING, **(settings or {})}
    # the split as a column of the protein table (a split column may sit in one file only); cells left out
    # are dropped from that table, so they pair with nothing and are not read at all
    table = pd.read_parquet(data / "adt_counts.parquet")
    table["split"] = labels
    adt_path = folder / "adt.parquet"
    table[table["split"] != ""].to_parquet(adt_path, index=False)

    seed_everything(seed, verbose=False)
    datamodule = PairedDataModule(
        modalities={
            "rna": AnnDataSource(str(data / "rna_counts.h5ad"), transform="normalize_log1p"),
            "adt": TableSource(str(adt_path), feature_regex="^(?!barcode$|split$)", transform="clr"),
        },
        keys=["barcode"], split_column="split", batch_size=config["batch_size"], seed=seed,
    )
    loss = (None if loss_name is None else loss_name() if isinstance(loss_name, type)
            else ClipLoss() if loss_name == "CLIP" else HopfieldLoss())
    loss_name = getattr(loss_name, "__name__", loss_name) or "setup"
    setup = setup or CrossModalSetup
    model = setup(
        encoders={
            "rna": partial(MLPEncoder, hidden_sizes=config["rna_hidden"], dropout=config["rna_dropout"]),
            **({"adt": partial(MLPEncoder, hidden_sizes=config["adt_hidden"], dropout=config["adt_dropout"])}
               if config["adt_mode"] != "disabled" else {}),
        },
        modes={"adt": config["adt_mode"]},
        **({"loss": loss} if loss is not None else {}), embed_dim=config["embed_dim"],
        optimizer=partial(torch.optim.AdamW, lr=config["lr"], weight_decay=config["weight_decay"]),
    )
    mode = "min" if config["monitor"].endswith("loss") else "max"
    best = ModelCheckpoint(dirpath=folder / "ckpt", monitor=config["monitor"], mode=mode, save_weights_only=True,
                           filename=f"{loss_name}-best")
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=config["max_epochs"], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[best])
    trainer.fit(model, datamodule=datamodule)
    model = type(model).load_from_checkpoint(best.best_model_path)
    datamodule.setup("test")
    dataset = datamodule.datasets["test"]
    model.eval()
    with torch.no_grad():
        batch = dataset.__getitems__(list(range(len(dataset))))
        embedding = model.embed(batch)
    # evaluation batches pair rows by key: row i of both modalities is the same cell (one replicate each)
    sim = (embedding["rna"] @ embedding["adt"].T).numpy()
    datamodule.teardown("test")
    return sim, {"best_epoch": int(torch.load(best.best_model_path, weights_only=True)["epoch"])}


def tune(train: np.ndarray, test: np.ndarray, barcodes: list[str], args: argparse.Namespace) -> None:
    """Score every variant of ``VARIANTS`` within fold 0's training cells: ``TUNE_SCORE_CELLS`` of them are
    scored, ``TRAINING["inner_val_cells"]`` pick the epoch, the rest train; fold 0's held-out cells are left
    out of the data altogether."""
    rng = np.random.default_rng(args.seed)
    scored = rng.choice(train, TUNE_SCORE_CELLS, replace=False)
    rest = np.setdiff1d(train, scored)
    labels = fold_labels(len(barcodes), rest, scored, TRAINING["inner_val_cells"], args.seed)
    labels[test] = ""
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in ((n, VARIANTS[n]) for n in args.variants):
            for method in [m for m in args.methods if m in ("CLIP", "Hopfield")]:
                start = time.perf_counter()
                folder = Path(tmp) / f"{name}-{method}"
                folder.mkdir()
                sim, info = unimodality_model(method, folder, labels, args.data, args.seed, settings)
                row = score(sim)
                mean = {m: np.mean([row[f"{m}/rna->adt"], row[f"{m}/adt->rna"]])
                        for m in ("recall@1", "recall@10", "mrr")}
                print(f"{name:12s} {method:9s} top-1 {mean['recall@1']:.3f} top-10 {mean['recall@10']:.3f} "
                      f"mrr {mean['mrr']:.3f} of {len(sim)} cells "
                      f"({time.perf_counter() - start:.0f} s) {info}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["ridge", "CCA", "CLIP", "Hopfield"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="with --tune: which VARIANTS")
    parser.add_argument("--tune", action="store_true",
                        help="compare VARIANTS on fold 0's inner validation cells (never the held-out cells)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"data not found: {args.data} (see ../shared/data/README.md)")
    from sklearn.model_selection import KFold

    x, y, barcodes = load(args.data)
    folds = list(KFold(args.folds, shuffle=True, random_state=args.seed).split(np.arange(len(barcodes))))
    if args.tune:
        return tune(folds[0][0], folds[0][1], barcodes, args)
    per_fold: dict[str, list[dict]] = {m: [] for m in args.methods}
    seconds: dict[str, float] = dict.fromkeys(args.methods, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (train, test) in enumerate(folds):
            for method in args.methods:
                start = time.perf_counter()
                if method == "ridge":
                    sim, info = ridge(x, y, train, test)
                elif method == "CCA":
                    sim, info = cca(x, y, train, test)
                else:
                    fold_dir = Path(tmp) / f"fold{i}-{method}"
                    fold_dir.mkdir()
                    labels = fold_labels(len(barcodes), train, test, TRAINING["inner_val_cells"], args.seed + i)
                    sim, info = unimodality_model(method, fold_dir, labels, args.data, args.seed + i)
                seconds[method] += time.perf_counter() - start
                per_fold[method].append({"fold": i, "n_test": len(test), **score(sim), **info})
                row = per_fold[method][-1]
                print(f"fold {i} {method:9s} top-1 {row['recall@1/rna->adt']:.2f}/{row['recall@1/adt->rna']:.2f} "
                      f"top-10 {row['recall@10/rna->adt']:.2f}/{row['recall@10/adt->rna']:.2f} "
                      f"({time.perf_counter() - start:.0f} s) {info}", flush=True)

    n_test = int(np.mean([len(t) for _, t in folds]))
    from unimodality.metrics import chance_levels

    chance = chance_levels(n_test, KS)
    summary = {}
    for method, rows in per_fold.items():
        frame = pd.DataFrame(rows)
        summary[method] = {}
        for metric in ("recall@1", "recall@10", "mrr"):
            both = frame[[f"{metric}/rna->adt", f"{metric}/adt->rna"]]
            summary[method][metric] = {
                "rna->adt": float(both.iloc[:, 0].mean()), "adt->rna": float(both.iloc[:, 1].mean()),
                "mean": float(both.mean(axis=1).mean()), "fold_std": float(both.mean(axis=1).std(ddof=1)),
            }
    baseline = summary.get("ridge")
    print(f"\n{args.folds}-fold CV, {n_test} held-out cells per fold; mean over folds of both directions "
          f"(rna->adt / adt->rna); ratio = method / ridge, same folds, same run")
    print(f"{'method':10s} {'top-1':>18s} {'top-10':>18s} {'MRR':>18s} {'top-1 vs ridge':>15s} {'s':>6s}")
    for method, values in summary.items():
        cells = [f"{values[m]['mean']:.3f} ±{values[m]['fold_std']:.3f}" for m in ("recall@1", "recall@10", "mrr")]
        ratio = values["recall@1"]["mean"] / baseline["recall@1"]["mean"] if baseline else float("nan")
        values["ratio_vs_ridge"] = {m: values[m]["mean"] / baseline[m]["mean"] for m in ("recall@1", "recall@10", "mrr")
                                    } if baseline else None
        print(f"{method:10s} {cells[0]:>18s} {cells[1]:>18s} {cells[2]:>18s} {ratio:14.2f}x {seconds[method]:6.0f}")
    print(f"{'chance':10s} {chance['recall@1']:18.3f} {chance['recall@10']:18.3f} {chance['mrr']:18.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "data": str(args.data), "cells": len(barcodes), "genes": x.shape[1], "proteins": y.shape[1],
        "folds": args.folds, "seed": args.seed, "held_out_per_fold": n_test, "chance": chance,
        "training": TRAINING, "ridge_alphas": RIDGE_ALPHAS, "cca": {"pcs": CCA_PCS, "components": CCA_COMPONENTS},
        "summary": summary, "per_fold": per_fold, "seconds": seconds,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
    }, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
