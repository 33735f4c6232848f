"""Evaluation time and memory against the number of perturbations (genes), with efaar-benchmarking's own
implementation of known-relationship recall as the reference where it fits.

For each size, a screen of ``n`` genes (real gene symbols from the annotation files, then made-up ones),
``--replicates`` rows each and 200 control rows, with a ``--dim``-dimensional embedding in which genes of a
CORUM complex lie near each other, is evaluated in a fresh process by ``unimodality.evaluate``:
known-relationship recall on the five sources, and replicate-retrieval mAP (copairs, ``--null-size``),
each beside PCA and random-projection baselines of ``--raw-dim`` raw features. Reported: wall and CPU time
of the whole evaluation and of the recall alone (embedding only), and the rise of the process's peak
resident memory over each, next to what the dense ``n x n`` similarity matrix alone would need (the full
pairwise similarity is never held: its quantiles are found in two passes over blocks of rows).

efaar's ``known_relationship_benchmark`` (dense matrix in a DataFrame, one ``.loc`` per pair) is timed on
the same aggregated embedding for sizes up to ``--efaar-max``; the two must give the same recalls.

    python benchmarks/evaluation.py                      # 1k, 5k, 20k genes
    python benchmarks/evaluation.py --sizes 1000 5000 --efaar-max 1000
    python benchmarks/evaluation.py --callback           # the evaluation callback's cost per training epoch

Writes ``benchmarks/results/evaluation.json``. Needs copairs and efaar-benchmarking (``pip install
"unimodality[eval]"``; ``--no-deps`` suffices for efaar-benchmarking: geomloss, which its module imports for
another metric, is replaced by a stand-in when missing).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "evaluation.json"


def screen(n: int, replicates: int, dim: int, raw_dim: int, seed: int = 0):
    import numpy as np
    import pandas as pd

    from unimodality.plugins.evaluators.recall import SOURCES, annotation_folder, read_pairs

    rng = np.random.default_rng(seed)
    folder = annotation_folder()
    known = sorted(set().union(*({*p.entity1, *p.entity2} for p in (read_pairs(str(folder / f"{s}.txt"))
                                                                       for s in SOURCES))))
    genes = list(rng.permutation(known)[:n]) + [f"GENE{i:05d}" for i in range(max(0, n - len(known)))]
    centre = {g: rng.standard_normal(dim) for g in genes}
    for line in open(folder / "CORUM_clusters.tsv"):  # genes of one complex share a centre
        members = [g for g in line.rstrip("\n").split("\t")[1].split() if g in centre]
        if len(members) > 1:
            shared = rng.standard_normal(dim)
            for g in members:
                centre[g] = 0.3 * centre[g] + shared
    rows = np.repeat(np.asarray(genes, dtype=object), replicates)
    embedding = np.stack([centre[g] for g in rows]) + rng.standard_normal((len(rows), dim))
    embedding = np.vstack([embedding, rng.standard_normal((200, dim))]).astype(np.float32)
    mixing = rng.standard_normal((dim, raw_dim)) / np.sqrt(dim)
    raw = (embedding @ mixing + rng.standard_normal((len(embedding), raw_dim))).astype(np.float32)
    obs = pd.DataFrame({"gene": [*rows, *["non-targeting"] * 200]})
    obs["plate"] = [f"plate{i % 4}" for i in range(len(obs))]
    table = pd.concat([obs, pd.DataFrame(embedding).add_prefix("emb_"), pd.DataFrame(raw).add_prefix("feat_")], axis=1)
    return table


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(n: int, replicates: int, dim: int, raw_dim: int, null_size: int, efaar: bool) -> dict:
    """One size, in this (fresh) process."""
    import numpy as np
    import pandas as pd

    import unimodality
    from unimodality.evaluation import Alignment, EvaluationData, align
    from unimodality.plugins.evaluators.recall import KnownRelationshipRecall

    options = dict(embedding="emb", features="^feat_", perturbation="gene", batch="plate", control="non-targeting")
    evaluators = ["KnownRelationshipRecall",
                  {"class_path": "ReplicateRetrievalMAP", "init_args": {"null_size": null_size}}]
    # a small run first, so that imports and the annotation files' parsing are not measured
    unimodality.evaluate(screen(50, replicates, dim, raw_dim), evaluators=evaluators, baselines=["pca", "random"],
                         **options)
    table = screen(n, replicates, dim, raw_dim)
    # the recall alone first (its memory is the peak's rise while it runs), then the whole evaluation
    data = EvaluationData(table.filter(regex="^emb_").to_numpy(np.float64), table[["gene", "plate"]],
                          perturbation=["gene"], batch="plate", control="non-targeting")
    aligned = align(data, Alignment())
    aligned.aggregated()
    before = peak_rss_bytes()
    tic, cpu = time.perf_counter(), time.process_time()
    ours = KnownRelationshipRecall().evaluate(aligned)
    recall_seconds, recall_cpu = time.perf_counter() - tic, time.process_time() - cpu
    recall_rise = peak_rss_bytes() - before

    before = peak_rss_bytes()
    tic, cpu = time.perf_counter(), time.process_time()
    report = unimodality.evaluate(table, evaluators=evaluators, baselines=["pca", "random"], **options)
    total, total_cpu = time.perf_counter() - tic, time.process_time() - cpu
    rise = peak_rss_bytes() - before
    mean = report[(report.evaluator == "known_relationship_recall") & (report.target == "mean")].iloc[0]
    activity = report[(report.evaluator == "replicate_retrieval_map") & (report.metric == "fraction_retrieved")].iloc[0]
    out = {
        "genes": n, "rows": len(table), "pairs": n * (n - 1) // 2, "seconds_total": round(total, 2),
        "cpu_seconds_total": round(total_cpu, 2), "seconds_recall": round(recall_seconds, 2),
        "cpu_seconds_recall": round(recall_cpu, 2), "recall_peak_rss_rise_mb": round(recall_rise / 2**20, 1),
        "peak_rss_rise_mb": round(rise / 2**20, 1),
        "dense_similarity_mb": round(n * n * 8 / 2**20, 1),
        "recall_mean": {"embedding": mean.value, "pca": mean.pca, "random": mean.random},
        "fraction_retrieved": {"embedding": activity.value, "pca": activity.pca, "random": activity.random},
    }
    if efaar:
        from sklearn.utils import Bunch

        known_relationship_benchmark = efaar_benchmark()

        genes = aligned.aggregated()
        tic, cpu = time.perf_counter(), time.process_time()
        theirs = known_relationship_benchmark(Bunch(features=pd.DataFrame(genes.x), metadata=pd.DataFrame(
            {"gene": genes.names})), "gene")
        out["seconds_efaar"] = round(time.perf_counter() - tic, 2)
        out["cpu_seconds_efaar"] = round(time.process_time() - cpu, 2)
        ours_by_source = {s.target: s.value for s in ours.scores if s.metric == "recall_0.05_0.95"}
        out["max_difference_to_efaar"] = float(max(abs(ours_by_source[r.source] - r["recall_0.05_0.95"])
                                                   for _, r in theirs.iterrows()))
    return out


def efaar_benchmark():
    """efaar-benchmarking's ``known_relationship_benchmark``; its module imports geomloss for a metric this
    benchmark never calls, so without geomloss a stand-in that fails if called takes its place."""
    import importlib.util
    import types

    if importlib.util.find_spec("geomloss") is None and "geomloss" not in sys.modules:
        geomloss = types.ModuleType("geomloss")

        def samples_loss(*args, **kwargs):
            raise RuntimeError("geomloss is not installed")

        geomloss.SamplesLoss = samples_loss
        sys.modules["geomloss"] = geomloss
    from efaar_benchmarking.benchmarking import known_relationship_benchmark

    return known_relationship_benchmark


def callback_overhead(epochs: int, repeats: int) -> dict:
    """Seconds per training epoch of a small CLIP fit on the example data without the evaluation callback,
    with it evaluating every epoch (cross-modal retrieval of the test split of both files), and with it
    between evaluations (``every_n_epochs`` larger than the run); the variants interleaved, medians."""
    import statistics
    from functools import partial

    import torch
    from lightning.pytorch import Trainer

    from unimodality.evaluation import EvaluationCallback
    from unimodality.plugins.datamodules.paired import PairedDataModule
    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.setups.cross_modal import CrossModalSetup
    from unimodality.plugins.sources.anndata import AnnDataSource
    from unimodality.plugins.sources.table import TableSource

    torch.set_num_threads(1)
    files = ["example://transcriptomics.h5ad", "example://phenomics.parquet"]

    def fit(every: int | None) -> float:
        torch.manual_seed(0)
        callbacks = [] if every is None else [EvaluationCallback(
            files, evaluators=["CrossModalRetrieval"], perturbation=["smiles", "concentration"], every_n_epochs=every,
            source_options={"include": {"split": ["test"]}})]
        datamodule = PairedDataModule(
            modalities={"tx": AnnDataSource(files[0], transform="normalize_log1p"),
                        "ph": TableSource(files[1], feature_prefix="feat_")},
            keys=["smiles", "concentration"], split_column="split", batch_size=64)
        model = CrossModalSetup(encoders={m: partial(MLPEncoder, hidden_sizes=[256]) for m in ("tx", "ph")},
                                embed_dim=64)
        trainer = Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                          num_sanity_val_steps=0)
        tic = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        return (time.perf_counter() - tic) / epochs

    variants = {"plain": None, "skipped": 10**6, "every_epoch": 1}
    fit(None)  # imports and the example files' first read are not measured
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, every in variants.items():
            seconds[name].append(fit(every))
    plain = statistics.median(seconds["plain"])
    return {name: {"seconds_per_epoch_median": round(statistics.median(v), 3),
                   "spread": [round(min(v), 3), round(max(v), 3)],
                   "ratio_vs_plain": round(statistics.median(v) / plain, 3)} for name, v in seconds.items()}


def run_child(args, n: int) -> dict:
    command = [sys.executable, __file__, "--child", str(n), "--replicates", str(args.replicates), "--dim",
               str(args.dim), "--raw-dim", str(args.raw_dim), "--null-size", str(args.null_size)]
    if n <= args.efaar_max:
        command.append("--efaar")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"size {n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--replicates", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--raw-dim", type=int, default=256)
    parser.add_argument("--null-size", type=int, default=1000)
    parser.add_argument("--efaar-max", type=int, default=5000, help="largest size efaar's implementation runs at")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--callback", action="store_true",
                        help="measure the evaluation callback's cost per training epoch instead (every epoch, and "
                        "between evaluations) against a fit without it")
    parser.add_argument("--epochs", type=int, default=4, help="with --callback: epochs per fit")
    parser.add_argument("--repeats", type=int, default=3, help="with --callback: fits per variant")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--efaar", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.replicates, args.dim, args.raw_dim, args.null_size, args.efaar)))
        return
    if args.callback:
        import logging
        import os

        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        found = callback_overhead(args.epochs, args.repeats)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'variant':>12} {'s/epoch':>8} {'spread':>15} {'vs plain':>9}")
        for name, r in found.items():
            print(f"{name:>12} {r['seconds_per_epoch_median']:8.3f} {str(r['spread']):>15} {r['ratio_vs_plain']:8.2f}x")
        output = args.output.with_name("evaluation_callback.json") if args.output == RESULTS else args.output
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"benchmark": "evaluation_callback", "epochs": args.epochs,
                                      "repeats": args.repeats, "load_average": os.getloadavg()[0],
                                      "results": found}, indent=2) + "\n")
        print(f"\nwritten {output}")
        return
    results = []
    import os

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall time suffers on a shared machine; "
          "CPU time less)")
    print(f"{'genes':>6} {'pairs':>12} {'total s':>8} {'cpu s':>7} {'recall s':>8} {'cpu s':>7} {'efaar cpu':>9} "
          f"{'speed-up':>8} {'recall MB':>9} {'peak MB':>8} {'dense MB':>9} {'recall emb/pca/random':>24} "
          f"{'retrieved emb/pca/random':>26}")
    for n in args.sizes:
        r = run_child(args, n)
        results.append(r)
        efaar = f"{r['cpu_seconds_efaar']:9.2f}" if "seconds_efaar" in r else f"{'-':>9}"
        ratio = (f"{r['cpu_seconds_efaar'] / max(r['cpu_seconds_recall'], 1e-3):7.1f}x" if "seconds_efaar" in r
                 else f"{'-':>8}")
        recall = "/".join(f"{r['recall_mean'][k]:.3f}" for k in ("embedding", "pca", "random"))
        retrieved = "/".join(f"{r['fraction_retrieved'][k]:.3f}" for k in ("embedding", "pca", "random"))
        print(f"{n:>6} {r['pairs']:>12,} {r['seconds_total']:8.2f} {r['cpu_seconds_total']:7.2f} "
              f"{r['seconds_recall']:8.2f} {r['cpu_seconds_recall']:7.2f} {efaar} {ratio} "
              f"{r['recall_peak_rss_rise_mb']:9.1f} {r['peak_rss_rise_mb']:8.1f} "
              f"{r['dense_similarity_mb']:9.1f} {recall:>24} {retrieved:>26}", flush=True)
        if "max_difference_to_efaar" in r and r["max_difference_to_efaar"] > 1e-9:
            print(f"  recall differs from efaar's by {r['max_difference_to_efaar']:.2e}", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "evaluation", "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "efaar", "output")},
        "results": results,
    }, indent=2, default=str) + "\n")
    print(f"\nwritten {args.output}")


if __name__ == "__main__":
    main()
