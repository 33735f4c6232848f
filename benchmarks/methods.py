"""Every cross-modal method with one fixed budget on real paired data, next to ridge and CCA in the same run.

The data, folds, training budget and scoring are those of ``benchmarks/quality_citefuse.py`` (ECCITE-seq RNA
<-> 49 surface proteins of 500 PBMCs, 5-fold cross-validation over cells, 360 training cells, 40 inner
validation cells that pick the epoch by MRR, 100 held-out cells scored in both directions). Each method is
a loss plugin (picked by its registered name, so a third-party loss can be added with ``--methods``) or a
setup from ``SETUPS`` (KD, C2KD, SHAKE with the proteins as teacher and each training cell as a class;
clipped DINO; Semi-Clipped's adapter tower, see `setup_factory`) trained with the same towers, optimizer,
epochs and checkpoint selection; ridge and CCA are computed on the same folds. The table gives top-1 /
top-10 / MRR (mean of both directions over folds) with the fold standard deviation, and each method's MRR
difference from ridge in units of that spread.

    python benchmarks/methods.py                              # every method (about 1.5 h on 2 CPU cores)
    python benchmarks/methods.py --methods ridge ClipLoss KD --folds 3
    python benchmarks/methods.py --methods --merge a.json b.json  # one table of earlier runs (same folds)
    python benchmarks/methods.py --example                    # the example data: every config, seeds 0-2

Writes ``benchmarks/results/methods.json`` (``--example``: ``methods_example.json``).

Seen (seed 0, torch 2.13 CPU, 60 epochs, epoch picked by inner-validation MRR; MRR mean of both directions
over 5 folds +- the folds' standard deviation; MRR - ridge paired over folds, in units of the larger fold
spread): SigLIP 0.270 +- 0.018 (+0.96), Sinkhorn 0.265 +- 0.011 (+1.04), CLIP 0.265 +- 0.013 (+0.93), SHAKE
0.264 +- 0.008 (+0.95), KD 0.263 +- 0.016 (+0.66), VICReg 0.255, ridge 0.253 +- 0.012, S2L 0.253, CWCL 0.241,
C2KD 0.241 +- 0.032, CCA 0.240, Hopfield 0.232, SemiClipped 0.228 +- 0.011 (-2.05), clipped DINO 0.076 +- 0.020,
deep CCA 0.056 (chance 0.052: the CCA objective alone does not align the two embeddings for cosine retrieval;
give ``DCCALoss`` an ``alignment`` weight). Sinkhorn's lead is +1.04 spreads, the only one above one spread,
but its paired difference (+0.012 +- 0.016 over folds) is not: with 360 training cells a linear map remains
hard to beat. KD/SHAKE with a cell per class (360 classes) match the contrastive losses.

Example data (``--example``; 60 epochs, each config as shipped, last epoch's val/pert/mrr over 40 held-out
perturbations, seeds 0-2, mean +- std; chance 0.107; ridge tx -> ph on every training replicate pair 0.736,
CCA 0.683): S2L 0.789 +- 0.005 (+10.3 spreads above ridge), CLIP 0.767 +- 0.019 (+1.7), SigLIP 0.765 +- 0.025
(+1.2), Hopfield 0.764 +- 0.014 (+2.1), clip_disabled_tx 0.759, CWCL 0.758, Sinkhorn 0.741, SemiClipped
0.741 +- 0.011 (its own data: ridge 0.742), VICReg 0.696, SHAKE 0.693, KD 0.680, C2KD 0.667 +- 0.056, deep CCA
0.453, clipped DINO 0.146 +- 0.019. The spread is over training seeds only (one fixed held-out split).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_citefuse as citefuse  # noqa: E402  (the same data, folds, budget and scoring)

RESULTS = Path(__file__).resolve().parent / "results" / "methods.json"
EXAMPLE_RESULTS = Path(__file__).resolve().parent / "results" / "methods_example.json"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASELINES = ("ridge", "CCA")
#: the losses trained by default (registered names in `unimodality.losses`)
LOSSES = ("ClipLoss", "SigLipLoss", "HopfieldLoss", "VICRegLoss", "DCCALoss", "S2LLoss", "CWCLLoss", "SinkhornLoss")
#: the setups trained by default on CITE-seq (see `setup_factory`): on CITE-seq each cell is its own pairing key,
#: so the distillation setups' classes are the training cells (the teacher is the protein side, the cleaner
#: readout) and a held-out cell is described by its class probabilities over the training cells
SETUPS = ("KD", "C2KD", "SHAKE", "DINO", "SemiClipped")
#: the example-data methods: each config as shipped, trained with the same epoch budget (``--epochs``)
EXAMPLE_CONFIGS = {
    "ClipLoss": "clip.yaml", "SigLipLoss": "siglip.yaml", "HopfieldLoss": "hopfield.yaml", "VICRegLoss": "vicreg.yaml",
    "DCCALoss": "dcca.yaml", "S2LLoss": "s2l.yaml", "CWCLLoss": "cwcl.yaml", "SinkhornLoss": "sinkhorn.yaml",
    "KD": "kd.yaml", "C2KD": "c2kd.yaml", "SHAKE": "shake.yaml", "DINO": "dino_clipped.yaml",
    "SemiClipped": "semi_clipped.yaml", "clip_disabled_tx": "clip_disabled_tx.yaml", "clip_queue": "clip_queue.yaml",
}


def loss_factory(name: str):
    """The loss class registered as ``name`` (a one-line error listing the registered ones otherwise)."""
    from unimodality import registry

    plugins = registry.registered("unimodality.losses")
    if name not in plugins:
        raise SystemExit(f"unknown method {name!r}: not ridge/CCA, a setup ({', '.join(SETUPS)}) nor a registered "
                         f"loss ({', '.join(sorted(plugins))})")
    return plugins[name][0].cls


def setup_factory(name: str, n_proteins: int) -> Callable[..., Any]:
    """Builds the setup ``name`` of `SETUPS` from `quality_citefuse.unimodality_model`'s keywords (the same
    towers, optimizer and embedding width as the losses, except where the method fixes them).

    ``DINO`` is `CrossModalDINOSetup` with ``configs/dino_clipped.yaml``'s small-data settings (256
    prototypes, teacher momentum 0.95, 30 warm-up steps of the teacher temperature; about 360 steps here);
    ``SemiClipped`` is ``configs/semi_clipped.yaml`` transposed: the proteins are the fixed target space
    (disabled tower, identity head, so the embedding width is the number of proteins) and the RNA side an
    `AdapterEncoder` (``x + f(x)``, identity at the start) under an orthogonal head; CITE-seq has no foundation
    embedding, so the adapter sits on the normalised counts.
    """
    from unimodality.plugins.encoders.adapter import AdapterEncoder
    from unimodality.plugins.losses.clip import ClipLoss
    from unimodality.plugins.losses.dino import DINOLoss
    from unimodality.plugins.setups.cross_modal import CrossModalSetup
    from unimodality.plugins.setups.dino import CrossModalDINOSetup
    from unimodality.plugins.setups.distillation import C2KDSetup, KDSetup, SHAKESetup

    distillation = {"KD": KDSetup, "C2KD": C2KDSetup, "SHAKE": SHAKESetup}
    if name in distillation:
        return partial(distillation[name], teacher="adt", student="rna")
    if name == "DINO":
        def dino(**kwargs: Any) -> CrossModalDINOSetup:
            # a fresh loss per model: its centres are state
            return CrossModalDINOSetup(loss=DINOLoss(warmup_teacher_temperature_steps=30), n_prototypes=256,
                                       teacher_momentum=0.95, **kwargs)
        return dino
    if name == "SemiClipped":
        def semi_clipped(encoders: dict, modes: dict, embed_dim: int, **kwargs: Any) -> CrossModalSetup:
            return CrossModalSetup(
                encoders={"rna": partial(AdapterEncoder, hidden_sizes=[256], dropout=0.1)},
                modes={"adt": "disabled"}, heads={"adt": "identity", "rna": "orthogonal"}, embed_dim=n_proteins,
                loss=ClipLoss(), **kwargs)
        return semi_clipped
    raise SystemExit(f"unknown setup {name!r}: one of {', '.join(SETUPS)}")


def check_method(name: str) -> None:
    """Fail at once on a name that is neither a baseline, a setup nor a registered loss."""
    if name not in BASELINES and name not in SETUPS:
        loss_factory(name)


def run(args: argparse.Namespace) -> dict:
    from sklearn.model_selection import KFold

    x, y, barcodes = citefuse.load(args.data)
    folds = list(KFold(args.folds, shuffle=True, random_state=args.seed).split(np.arange(len(barcodes))))
    per_fold: dict[str, list[dict]] = {m: [] for m in args.methods}
    seconds = dict.fromkeys(args.methods, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (train, test) in enumerate(folds):
            labels = citefuse.fold_labels(len(barcodes), train, test, citefuse.TRAINING["inner_val_cells"],
                                          args.seed + i)
            for method in args.methods:
                start = time.perf_counter()
                if method == "ridge":
                    sim, info = citefuse.ridge(x, y, train, test)
                elif method == "CCA":
                    sim, info = citefuse.cca(x, y, train, test)
                else:
                    folder = Path(tmp) / f"fold{i}-{method}"
                    folder.mkdir()
                    loss, setup = ((None, setup_factory(method, y.shape[1])) if method in SETUPS
                                   else (loss_factory(method), None))
                    sim, info = citefuse.unimodality_model(loss, folder, labels, args.data, args.seed + i,
                                                           settings=args.settings, setup=setup)
                seconds[method] += time.perf_counter() - start
                per_fold[method].append({"fold": i, **citefuse.score(sim), **info})
                row = per_fold[method][-1]
                mrr = (row["mrr/rna->adt"] + row["mrr/adt->rna"]) / 2
                print(f"fold {i} {method:13s} MRR {mrr:.3f} ({time.perf_counter() - start:.0f} s) {info}", flush=True)
    return {"per_fold": per_fold, "seconds": seconds, "n_test": int(np.mean([len(t) for _, t in folds]))}


def summarise(per_fold: dict[str, list[dict]], directions: tuple[str, str] = ("rna->adt", "adt->rna")
              ) -> dict[str, dict]:
    """Per method and metric: the mean of both directions per fold (or seed), their mean and standard deviation."""
    summary = {}
    for method, rows in per_fold.items():
        frame = pd.DataFrame(rows)
        summary[method] = {}
        for metric in ("recall@1", "recall@10", "mrr"):
            both = frame[[f"{metric}/{d}" for d in directions]].mean(axis=1)
            summary[method][metric] = {"mean": float(both.mean()), "fold_std": float(both.std(ddof=1)),
                                       "per_fold": [float(v) for v in both]}
    return summary


def compare(summary: dict[str, dict], seconds: dict[str, float], baseline_of: Callable[[str], str] = lambda m: "ridge",
            note: Callable[[str], str] = lambda m: "") -> None:
    """Print the table (sorted by MRR) and add each method's paired MRR difference from its ridge baseline."""
    print(f"{'method':20s} {'top-1':>15s} {'top-10':>15s} {'MRR':>15s} {'MRR - ridge':>12s} {'in spreads':>10s} "
          f"{'s':>6s}")
    for method, values in sorted(summary.items(), key=lambda kv: -kv[1]["mrr"]["mean"]):
        cells = [f"{values[m]['mean']:.3f} ±{values[m]['fold_std']:.3f}" for m in ("recall@1", "recall@10", "mrr")]
        ridge = summary.get(baseline_of(method))
        if ridge and method != baseline_of(method):
            # paired over folds (seeds): the same rows are held out for both methods
            diffs = np.subtract(values["mrr"]["per_fold"], ridge["mrr"]["per_fold"])
            spread = max(values["mrr"]["fold_std"], ridge["mrr"]["fold_std"])
            # no spread when both are one deterministic fit on one split (CCA beside ridge on the example data)
            in_spreads = float(diffs.mean() / spread) if spread else None
            values["mrr_minus_ridge"] = {"baseline": baseline_of(method), "mean": float(diffs.mean()),
                                         "fold_std": float(diffs.std(ddof=1)), "in_spreads": in_spreads}
            delta = f"{diffs.mean():+.3f} " + (f"{in_spreads:+9.2f}" if in_spreads is not None else f"{'n/a':>9s}")
        else:
            delta = ""
        print(f"{method:20s} {cells[0]:>15s} {cells[1]:>15s} {cells[2]:>15s} {delta:>23s} "
              f"{seconds.get(method, float('nan')):6.0f} {note(method)}")


def merged(args: argparse.Namespace, per_fold: dict[str, list[dict]], seconds: dict[str, float]) -> None:
    """Add the methods of earlier runs' JSON files (``--merge``), refusing files of other folds or seeds."""
    for path in args.merge:
        earlier = json.loads(Path(path).read_text())
        if (earlier.get("folds"), earlier.get("seed")) != (args.folds, args.seed):
            raise SystemExit(f"--merge {path}: folds {earlier.get('folds')} seed {earlier.get('seed')}, this run "
                             f"{args.folds} seed {args.seed}: the folds differ")
        for method, rows in earlier["per_fold"].items():
            if method not in per_fold:
                per_fold[method], seconds[method] = rows, earlier["seconds"][method]


# -- the example data: each config as shipped, a fixed epoch budget, seeds for the spread --------------------
def _datamodule(data: dict) -> Any:
    """The datamodule a config's ``data`` section describes, parsed as the command line parses it."""
    from jsonargparse import ArgumentParser

    from unimodality import registry
    from unimodality.datamodule import DataModule

    registry.load_plugins()
    parser = ArgumentParser()
    parser.add_subclass_arguments(DataModule, "data")
    return parser.instantiate_classes(parser.parse_object({"data": data})).data


def example_baselines(data: dict) -> dict[str, dict]:
    """Ridge and CCA from the first modality to the second, fitted on every training replicate pair of a
    config's data and scored on its validation split by the setups' own perturbation retrieval."""
    from sklearn.cross_decomposition import CCA
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV

    from unimodality.batch import GROUP
    from unimodality.metrics import perturbation_retrieval, unique_rows
    from unimodality.plugins.datamodules.paired import PairedDataset

    datamodule = _datamodule(data)
    datamodule.setup("fit")
    a, b = datamodule.modalities[:2]
    train, val = datamodule.datasets["train"], datamodule.datasets["val"]
    # every replicate pair of the training perturbations (the evaluation pairing), not one random draw
    train = PairedDataset(train.features, train.members, train.groups, random=False)
    fit_rows, val_rows = (d.__getitems__(list(range(len(d)))) for d in (train, val))
    x_train, y_train = (np.asarray(fit_rows[m], dtype=np.float64) for m in (a, b))
    x_val, y_val = (np.asarray(val_rows[m], dtype=np.float64) for m in (a, b))
    y_train, y_val = citefuse.standardise(y_train, y_val)
    group = val_rows[GROUP]
    ridge = RidgeCV(alphas=citefuse.RIDGE_ALPHAS).fit(x_train, y_train)
    x_std, x_val_std = citefuse.standardise(x_train, x_val)
    pca = PCA(n_components=min(citefuse.CCA_PCS, *x_std.shape), random_state=0).fit(x_std)
    cca = CCA(n_components=min(citefuse.CCA_COMPONENTS, y_train.shape[1]), max_iter=2000).fit(
        pca.transform(x_std), y_train)
    u, v = cca.transform(pca.transform(x_val_std), y_val)
    out = {}
    for name, (ea, eb) in {"ridge": (ridge.predict(x_val), y_val), "CCA": (u, v)}.items():
        ea, eb = (torch.nn.functional.normalize(torch.as_tensor(e, dtype=torch.float32), dim=1) for e in (ea, eb))
        scores = perturbation_retrieval(*unique_rows(ea, group), *unique_rows(eb, group), (1, 10))
        out[name] = {f"{m}/{d}": float(scores[f"{m}/{key}"]) for m in ("recall@1", "recall@10", "mrr")
                     for d, key in ((f"{a}->{b}", "forward"), (f"{b}->{a}", "backward"))}
        out[name] |= {"chance_mrr": float(scores["chance_mrr"]), "count": int(scores["count"])}
    return out


def example_run(config: Path, seed: int, epochs: int, folder: Path) -> dict:
    """Train ``config`` as shipped through `unimodality.fit` for ``epochs`` epochs; its last epoch's val/pert/*."""
    import unimodality

    run = unimodality.fit(config, {"trainer.max_epochs": epochs, "seed_everything": seed,
                                   "trainer.logger.init_args.save_dir": str(folder),
                                   "trainer.enable_progress_bar": False})
    metrics = pd.read_csv(run / "metrics.csv").dropna(subset=["val/pert/mrr"])
    last = metrics.iloc[-1]
    out = {f"{m}/{d}": float(last[f"val/pert/{m}/{d}"]) for m in ("recall@1", "recall@10", "mrr")
           for d in ("tx->ph", "ph->tx")}
    return out | {"best_mrr": float(metrics["val/pert/mrr"].max()), "chance_mrr": float(last["val/pert/chance_mrr"]),
                  "count": int(last["val/pert/count"]), "epochs": int(last["epoch"]) + 1}


def example(args: argparse.Namespace) -> None:
    """The example-data half: every method of ``--methods`` in `EXAMPLE_CONFIGS`, seeds ``--seeds``."""
    import yaml

    methods = [m for m in args.methods if m not in BASELINES]
    unknown = [m for m in methods if m not in EXAMPLE_CONFIGS]
    if unknown:
        raise SystemExit(f"no example config for {unknown}: methods on the example data are "
                         f"{', '.join(EXAMPLE_CONFIGS)}")
    if len(args.seeds) < 2:
        raise SystemExit("--seeds: give two seeds or more (the spread is over seeds)")
    # one ridge/CCA per distinct data section; a method is compared with the baseline of its own data
    sections: dict[str, str] = {}  # data section (JSON) -> baseline suffix
    data_of: dict[str, str] = {}
    for method in methods:
        data = yaml.safe_load((CONFIGS / EXAMPLE_CONFIGS[method]).read_text())["data"]
        key = json.dumps(data, sort_keys=True)
        sections.setdefault(key, "" if not sections else f"@{EXAMPLE_CONFIGS[method].removesuffix('.yaml')}")
        data_of[method] = sections[key]
    per_seed: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for key, suffix in sections.items():
        start = time.perf_counter()
        for name, row in example_baselines(json.loads(key)).items():
            per_seed[name + suffix] = [{"seed": s, **row} for s in args.seeds]  # deterministic: one fit
            seconds[name + suffix] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in methods:
                start = time.perf_counter()
                row = example_run(CONFIGS / EXAMPLE_CONFIGS[method], seed, args.epochs, Path(tmp) / f"{method}-{seed}")
                seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - start
                per_seed.setdefault(method, []).append({"seed": seed, **row})
                print(f"seed {seed} {method:16s} val/pert/mrr {(row['mrr/tx->ph'] + row['mrr/ph->tx']) / 2:.3f} "
                      f"(best epoch {row['best_mrr']:.3f}; {time.perf_counter() - start:.0f} s)", flush=True)
    summary = summarise(per_seed, ("tx->ph", "ph->tx"))
    first = next(iter(per_seed.values()))[0]
    print(f"\nexample data, {len(args.seeds)} seeds, {args.epochs} epochs, each config as shipped; last epoch's "
          f"val/pert/* over {first['count']} held-out perturbations (chance MRR {first['chance_mrr']:.3f}); mean of "
          "both directions over seeds ± their standard deviation; ridge/CCA: one fit (no seed)")

    def baseline_of(method: str) -> str:  # "CCA@semi_clipped" -> "ridge@semi_clipped"
        return "ridge" + data_of.get(method, "@" + method.split("@")[1] if "@" in method else "")

    compare(summary, seconds, baseline_of, note=lambda m: f"({EXAMPLE_CONFIGS[m]})" if m in EXAMPLE_CONFIGS else "")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "data": "example data (unimodality.example_data)", "seeds": args.seeds, "epochs": args.epochs,
        "configs": {m: EXAMPLE_CONFIGS[m] for m in methods},
        "baseline_of": {m: "ridge" + suffix for m, suffix in data_of.items()},
        "summary": summary, "per_seed": per_seed, "seconds": seconds, "torch": torch.__version__,
        "machine": platform.platform(),
    }, indent=2))
    print(f"\nwritten {args.output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=citefuse.DATA)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=None,
                        help=f"default: {' '.join([*BASELINES, *LOSSES, *SETUPS])} (with --example: those of "
                             "EXAMPLE_CONFIGS too)")
    parser.add_argument("--settings", type=json.loads, default=None,
                        help="JSON overrides of quality_citefuse.TRAINING for every trained method, e.g. "
                             "'{\"max_epochs\": 10}'")
    parser.add_argument("--merge", nargs="+", default=[], type=Path,
                        help="earlier runs' JSON files (same folds and seed) whose methods join the table")
    parser.add_argument("--example", action="store_true",
                        help="the example data instead: each config of EXAMPLE_CONFIGS through unimodality.fit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="with --example")
    parser.add_argument("--epochs", type=int, default=60, help="with --example: every config's max_epochs")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"default {RESULTS.name}, with --example {EXAMPLE_RESULTS.name} (in benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.example:
        args.methods = list(args.methods if args.methods is not None else [*BASELINES, *EXAMPLE_CONFIGS])
        args.output = args.output or EXAMPLE_RESULTS
        return example(args)
    args.methods = list(args.methods if args.methods is not None else [*BASELINES, *LOSSES, *SETUPS])
    args.output = args.output or RESULTS
    if not args.data.is_dir():
        raise SystemExit(f"data not found: {args.data} (see ../shared/data/README.md)")
    for method in args.methods:
        check_method(method)  # an unknown name fails before an hour of training
    result = run(args)
    merged(args, result["per_fold"], result["seconds"])
    summary = summarise(result["per_fold"])
    from unimodality.metrics import chance_levels

    chance = chance_levels(result["n_test"], citefuse.KS)
    print(f"\n{args.folds}-fold CV, {result['n_test']} held-out cells per fold, the same folds and budget for every "
          "method; mean of both directions over folds ± the folds' standard deviation")
    compare(summary, result["seconds"])
    print(f"{'chance':20s} {chance['recall@1']:15.3f} {chance['recall@10']:15.3f} {chance['mrr']:15.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "data": str(args.data), "folds": args.folds, "seed": args.seed, "held_out_per_fold": result["n_test"],
        "chance": chance, "training": {**citefuse.TRAINING, **(args.settings or {})}, "summary": summary,
        "per_fold": result["per_fold"], "seconds": result["seconds"], "torch": torch.__version__,
        "machine": platform.platform(),
    }, indent=2))
    print(f"\nwritten {args.output}")


if __name__ == "__main__":
    main()
