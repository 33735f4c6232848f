"""Every cross-modal method with one fixed budget on real paired data, next to ridge and CCA in the same run.

The data, folds, training budget and scoring are those of ``benchmarks/quality_citefuse.py`` (ECCITE-seq RNA
<-> 49 surface proteins of 500 PBMCs, 5-fold cross-validation over cells, 360 training cells, 40 inner
validation cells that pick the epoch by MRR, 100 held-out cells scored in both directions). Each method is
a loss plugin (picked by its registered name, so a third-party loss can be added with ``--methods``) or a
setup from ``SETUPS`` trained with the same towers, optimizer, epochs and checkpoint selection; ridge and CCA
are computed on the same folds. The table gives top-1 / top-10 / MRR (mean of both directions over folds)
with the fold standard deviation, and each method's MRR difference from ridge in units of that spread.

    python benchmarks/methods.py                              # every method (about 1 h on 2 CPU cores)
    python benchmarks/methods.py --methods ridge ClipLoss VICRegLoss --folds 3

Writes ``benchmarks/results/methods.json``.

Seen (seed 0, torch 2.13 CPU, 60 epochs, epoch picked by inner-validation MRR; MRR mean of both directions
over 5 folds +- the folds' standard deviation; MRR - ridge paired over folds): SigLIP 0.270 +- 0.018
(+0.017 +- 0.028), Sinkhorn 0.265 +- 0.011 (+0.012 +- 0.016), CLIP 0.265 +- 0.013 (+0.012 +- 0.022), VICReg
0.255, ridge 0.253 +- 0.012, S2L 0.253, CWCL 0.241, CCA 0.239, Hopfield 0.232, deep CCA 0.054 (chance 0.052:
the CCA objective alone does not align the two embeddings for cosine retrieval; give ``DCCALoss`` an
``alignment`` weight). Three losses lead ridge in 4 of 5 folds, none by more than the paired fold spread:
with 360 training cells a linear map remains hard to beat.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_citefuse as citefuse  # noqa: E402  (the same data, folds, budget and scoring)

RESULTS = Path(__file__).resolve().parent / "results" / "methods.json"
BASELINES = ("ridge", "CCA")
#: the losses trained by default (registered names in `unimodality.losses`)
LOSSES = ("ClipLoss", "SigLipLoss", "HopfieldLoss", "VICRegLoss", "DCCALoss", "S2LLoss", "CWCLLoss", "SinkhornLoss")


def loss_factory(name: str):
    """The loss class registered as ``name`` (a one-line error listing the registered ones otherwise)."""
    from unimodality import registry

    plugins = registry.registered("unimodality.losses")
    if name not in plugins:
        raise SystemExit(f"unknown method {name!r}: not ridge/CCA nor a registered loss ({', '.join(sorted(plugins))})")
    return plugins[name][0].cls


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
                    sim, info = citefuse.unimodality_model(loss_factory(method), folder, labels, args.data,
                                                           args.seed + i)
                seconds[method] += time.perf_counter() - start
                per_fold[method].append({"fold": i, **citefuse.score(sim), **info})
                row = per_fold[method][-1]
                mrr = (row["mrr/rna->adt"] + row["mrr/adt->rna"]) / 2
                print(f"fold {i} {method:13s} MRR {mrr:.3f} ({time.perf_counter() - start:.0f} s) {info}", flush=True)
    return {"per_fold": per_fold, "seconds": seconds, "n_test": int(np.mean([len(t) for _, t in folds]))}


def summarise(per_fold: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for method, rows in per_fold.items():
        frame = pd.DataFrame(rows)
        summary[method] = {}
        for metric in ("recall@1", "recall@10", "mrr"):
            both = frame[[f"{metric}/rna->adt", f"{metric}/adt->rna"]].mean(axis=1)
            summary[method][metric] = {"mean": float(both.mean()), "fold_std": float(both.std(ddof=1)),
                                       "per_fold": [float(v) for v in both]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=citefuse.DATA)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=[*BASELINES, *LOSSES])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"data not found: {args.data} (see ../shared/data/README.md)")
    torch.set_num_threads(1)
    for method in args.methods:
        if method not in BASELINES:
            loss_factory(method)  # an unknown name fails before an hour of training
    result = run(args)
    summary = summarise(result["per_fold"])
    from unimodality.metrics import chance_levels

    chance = chance_levels(result["n_test"], citefuse.KS)
    ridge = summary.get("ridge")
    print(f"\n{args.folds}-fold CV, {result['n_test']} held-out cells per fold, the same folds and budget for every "
          "method; mean of both directions over folds ± the folds' standard deviation")
    print(f"{'method':14s} {'top-1':>15s} {'top-10':>15s} {'MRR':>15s} {'MRR - ridge':>12s} {'in spreads':>10s} "
          f"{'s':>6s}")
    for method, values in sorted(summary.items(), key=lambda kv: -kv[1]["mrr"]["mean"]):
        cells = [f"{values[m]['mean']:.3f} ±{values[m]['fold_std']:.3f}" for m in ("recall@1", "recall@10", "mrr")]
        if ridge:
            # paired over folds: the same cells are held out for both methods
            diffs = np.subtract(values["mrr"]["per_fold"], ridge["mrr"]["per_fold"])
            spread = max(values["mrr"]["fold_std"], ridge["mrr"]["fold_std"])
            values["mrr_minus_ridge"] = {"mean": float(diffs.mean()), "fold_std": float(diffs.std(ddof=1)),
                                         "in_spreads": float(diffs.mean() / spread) if spread else float("nan")}
            delta = f"{diffs.mean():+.3f} {values['mrr_minus_ridge']['in_spreads']:+9.2f}"
        else:
            delta = ""
        print(f"{method:14s} {cells[0]:>15s} {cells[1]:>15s} {cells[2]:>15s} {delta:>23s} "
              f"{result['seconds'][method]:6.0f}")
    print(f"{'chance':14s} {chance['recall@1']:15.3f} {chance['recall@10']:15.3f} {chance['mrr']:15.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "data": str(args.data), "folds": args.folds, "seed": args.seed, "held_out_per_fold": result["n_test"],
        "chance": chance, "training": citefuse.TRAINING, "summary": summary, "per_fold": result["per_fold"],
        "seconds": result["seconds"], "torch": torch.__version__, "machine": platform.platform(),
    }, indent=2))
    print(f"\nwritten {args.output}")


if __name__ == "__main__":
    main()
