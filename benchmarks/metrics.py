"""Time of the validation retrieval metrics, against the per-query implementation they replaced.

What ``CrossModalSetup`` computes at the end of every validation epoch (``evaluation_metrics``: row-level
recall@k both ways, perturbation-level recall@k and MRR, replicate mAP per modality), timed in two settings:

- ``quickstart``: the validation rows of the README's quickstart (``configs/clip.yaml``: the bundled
  example data, tx and ph towers as in the config, untrained: the metrics' cost does not depend on the
  weights), the model built and its collectors filled as validation does;
- ``synthetic``: ``--rows`` rows per modality, four replicates per perturbation, ``--dim`` dimensions:
  how the cost grows with the evaluation set.

The baseline is the former implementation, measured in the same run on the same rows: torchmetrics'
functional retrieval metrics called once per query (``per_query_retrieval_scores`` below, transcribed from
``unimodality.metrics`` before it was vectorised) and row recall computed once per direction. The two must
give the same values (the script checks it; the data are untied). Repeats are interleaved; medians with
range; 1 thread unless ``--threads``. Memory (synthetic): the rise of the process's peak resident set over
one call of the new metrics (``/proc/self/clear_refs`` reset before it).

    python benchmarks/metrics.py
    python benchmarks/metrics.py --rows 1000 4000 --repeats 3

Writes ``benchmarks/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.json"


def per_query_retrieval_scores(sim, target, ks=(), mrr=False, average_precision=False):
    """The former ``unimodality.metrics.retrieval_scores``: torchmetrics' functions, one query at a time."""
    from torchmetrics.functional.retrieval import (
        retrieval_average_precision,
        retrieval_hit_rate,
        retrieval_reciprocal_rank,
    )

    from unimodality.metrics import EXCLUDED

    functions = {f"recall@{k}": partial(retrieval_hit_rate, top_k=k) for k in ks}
    if mrr:
        functions["mrr"] = retrieval_reciprocal_rank
    if average_precision:
        functions["map"] = retrieval_average_precision
    sim = sim.float()
    scores = sim - sim.amin(dim=1, keepdim=True) + 1.0
    totals = dict.fromkeys(functions, 0.0)
    answerable = 0
    for row, row_target in zip(scores, target):
        keep = row_target != EXCLUDED
        row, row_target = row[keep], row_target[keep].bool()
        if not row_target.any():
            continue
        answerable += 1
        for name, function in functions.items():
            totals[name] += float(function(row, row_target))
    if answerable == 0:
        return {"queries": torch.tensor(0)}
    return {**{name: torch.tensor(total / answerable) for name, total in totals.items()},
            "queries": torch.tensor(answerable)}


def two_pass_cross_recall(a, b, group_a, group_b, ks, chunk_size=None):
    """The former way: one similarity matrix per direction."""
    from unimodality.metrics import row_recall

    return row_recall(a, b, group_a, group_b, ks, 1024), row_recall(b, a, group_b, group_a, ks, 1024)


@contextmanager
def former_implementation():
    import unimodality.metrics as metrics
    import unimodality.plugins.setups.cross_modal as cross_modal

    saved = metrics.retrieval_scores, cross_modal.cross_recall
    metrics.retrieval_scores, cross_modal.cross_recall = per_query_retrieval_scores, two_pass_cross_recall
    try:
        yield
    finally:
        metrics.retrieval_scores, cross_modal.cross_recall = saved


def quickstart_model():
    """The quickstart's model and validation rows (``configs/clip.yaml``), collectors filled as validation does."""
    from lightning.pytorch import Trainer

    from unimodality.batch import GROUP, INDEX
    from unimodality.plugins.datamodules.paired import PairedDataModule
    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.setups.cross_modal import CrossModalSetup
    from unimodality.plugins.sources.anndata import AnnDataSource
    from unimodality.plugins.sources.table import TableSource

    torch.manual_seed(0)
    datamodule = PairedDataModule(
        modalities={"tx": AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p"),
                    "ph": TableSource("example://phenomics.parquet", feature_prefix="feat_")},
        keys=["smiles", "concentration"], split_column="split", batch_size=64)
    model = CrossModalSetup(encoders={"tx": partial(MLPEncoder, hidden_sizes=[512, 256], dropout=0.1),
                                      "ph": partial(MLPEncoder, hidden_sizes=[256, 256], dropout=0.1)},
                            embed_dim=128)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.validate(model, datamodule=datamodule, verbose=False)  # builds the towers from the data's schema
    model.eval()
    datamodule.setup("validate")  # validate's teardown dropped the datasets
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            for name, embedding in model.normalized(model.loss_inputs(batch)).items():
                model.retrieval[name].update(embedding, batch[GROUP], batch.get(INDEX))
    rows = {name: int(len(metric.compute()[1])) for name, metric in model.retrieval.items()}
    return model, rows


def synthetic(rows: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(rows // 4).repeat_interleave(4)
    centres = torch.randn(rows // 4, dim, generator=g)
    a = F.normalize(centres[group] + torch.randn(len(group), dim, generator=g), dim=1)
    b = F.normalize(centres[group] + torch.randn(len(group), dim, generator=g), dim=1)
    return a, b, group


def synthetic_metrics(a, b, group):
    """What ``evaluation_metrics`` computes for one pair of modalities."""
    import unimodality.metrics as metrics
    import unimodality.plugins.setups.cross_modal as cross_modal

    out = {}
    forward, backward = cross_modal.cross_recall(a, b, group, group, (1, 5, 10))
    out |= {"recall@1/forward": forward[0], "recall@1/backward": backward[0]}
    out |= metrics.perturbation_retrieval(a, group, b, group, (1, 5, 10))
    out |= {f"map/{name}": metrics.replicate_map(x, group)["map"] for name, x in (("a", a), ("b", b))}
    return out


def _resident_peak_rise(function) -> float | None:
    try:
        before = int(dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
                     ["VmRSS"].split()[0])
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    function()
    peak = int(dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
               ["VmHWM"].split()[0])
    return (peak - before) / 1024


def interleaved(functions: dict, repeats: int) -> tuple[dict, dict]:
    values = {name: {k: float(v) for k, v in f().items()} for name, f in functions.items()}  # warm-up
    times = {name: [] for name in functions}
    names = list(functions)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return values, times


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "rounds": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-former", type=int, default=4000, help="largest synthetic set the former code runs on")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536" and Path("/proc/self/status").exists():
        # glibc's mmap threshold pinned, so freed blocks leave the resident set and its peak rise is honest
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    def former(function):
        def run():
            with former_implementation():
                return function()
        return run

    results, failures = [], []
    model, rows = quickstart_model()
    cases = [("quickstart", rows, model.evaluation_metrics)]
    for n in args.rows:
        a, b, group = synthetic(n, args.dim)
        cases.append((f"synthetic {n}", {"a": n, "b": n}, partial(synthetic_metrics, a, b, group)))
    print(f"torch {torch.__version__}, threads {args.threads}, repeats {args.repeats}")
    print(f"{'case':18s} {'rows':>12s} {'ms [range]':>22s} {'former ms [range]':>24s} {'speedup':>8s} "
          f"{'MiB':>7s}  agree")
    for name, sizes, function in cases:
        functions = {"vectorised": function}
        run_former = name == "quickstart" or max(sizes.values()) <= args.max_former
        if run_former:
            functions["former"] = former(function)
        values, times = interleaved(functions, args.repeats)
        memory = _resident_peak_rise(function) if name != "quickstart" else None
        agree = None
        if run_former:
            agree = all(abs(values["vectorised"][k] - values["former"][k]) <= 1e-5 for k in values["former"])
            if not agree:
                failures.append(name)
        row = {"case": name, "rows": sizes, "seconds": summary(times["vectorised"]),
               "former_seconds": summary(times["former"]) if run_former else None,
               "speedup": statistics.median(times["former"]) / statistics.median(times["vectorised"])
               if run_former else None,
               "peak_mib": memory, "agree": agree, "values": values["vectorised"]}
        results.append(row)

        def spread(t):
            return "n/a" if t is None else f"{1e3 * t['median']:.1f} [{1e3 * t['min']:.0f}-{1e3 * t['max']:.0f}]"

        print(f"{name:18s} {'/'.join(map(str, sizes.values())):>12s} {spread(row['seconds']):>22s} "
              f"{spread(row['former_seconds']):>24s} "
              f"{'n/a' if row['speedup'] is None else format(row['speedup'], '7.1f') + 'x':>8s} "
              f"{'n/a' if memory is None else format(memory, '7.1f'):>7s}  "
              f"{'skipped' if agree is None else 'yes' if agree else 'NO'}", flush=True)
    print("\nspeedup = former time / vectorised time of one validation epoch's metrics; quickstart: "
          "configs/clip.yaml validates 60 times (plus the sanity check)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
                                       "machine": platform.platform(), "rows": results}, indent=2))
    print(f"wrote {args.output}")
    if failures:
        sys.exit("the vectorised metrics disagree with the former ones: " + ", ".join(failures))


if __name__ == "__main__":
    main()
