"""Training throughput of `unimodality fit`'s machinery versus a plain PyTorch loop doing the same work.

Both sides train the same model (two towers built by ``CrossModalSetup.build`` from the data's schema,
``ClipLoss`` with replicate-aware positives, AdamW with the setup's parameter groups) with the same batch
size on the same data pipeline: the ``PairedDataModule`` of ``configs/clip.yaml`` on the bundled example
data, and both iterate *its* ``train_dataloader()`` (one replicate per perturbation redrawn every epoch),
so the only differences are the training loop and the optimizer's kernels. The framework side is a
Lightning ``Trainer`` fitting ``CrossModalSetup`` with the datamodule, validation, checkpointing, logging,
the progress bar and the model summary switched off.

Two plain loops: "plain" builds ``torch.optim.AdamW`` with torch's defaults, as a script of one's own would
(per-tensor kernels on CPU, ``foreach`` on CUDA), and is the baseline of the headline figure; "plain, fused
AdamW" steps the optimizer the framework builds (torch's fused kernel, `unimodality.fused`), so the
framework's figure against it is the cost of the loop alone.

The one-time cost of parsing a config and reading the files is not timed: each side is timed over
``--epochs`` epochs after ``--warmup`` epochs, the loops run back to back ``--repeats`` times (alternating
which goes first), and the headline figure is the median over repeats of the time ratio, which holds up
best when other work shares the machine (medians and best runs are reported too). Every loop ends with
the same weights to rounding (same seed, same random draws): the "loss afterwards" they print must agree.

    python benchmarks/train_overhead.py                      # batch size 64 (5 steps per epoch)
    python benchmarks/train_overhead.py --breakdown          # + without self.log, bare Lightning, CSV log/bar
    python benchmarks/train_overhead.py --batch-size 256 --epochs 150
    python benchmarks/train_overhead.py --hidden 2048 2048 --epochs 10   # a heavier model

Writes ``benchmarks/results/train_overhead.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from unimodality.datamodule import GROUP
from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.table import TableSource

RESULTS = Path(__file__).resolve().parent / "results" / "train_overhead.json"
#: encoder widths of configs/clip.yaml
CLIP_HIDDEN = {"tx": [512, 256], "ph": [256, 256]}
#: the framework variants: the measurement, and (with --breakdown) three that locate its overhead
LIGHTNING, NO_LOG, WITH_LOGGING = "lightning", "lightning, no self.log", "lightning + CSV log + progress bar"
#: the plain loops: torch's default AdamW (the headline baseline), and the fused AdamW the framework builds
PLAIN, PLAIN_FUSED = "plain", "plain, fused AdamW"
#: Lightning's own floor: the same towers, loss and optimizer in a LightningModule with only a training step
BARE = "bare LightningModule"
DATA_PIPELINE = (
    "both loops iterate PairedDataModule.train_dataloader() (example data, transform normalize_log1p, "
    "one replicate per perturbation redrawn each epoch, shuffle, drop_last, num_workers={})"
)


# -- the shared pieces ---------------------------------------------------------------------------------
def make_datamodule(batch_size: int, num_workers: int) -> PairedDataModule:
    """The data of configs/clip.yaml."""
    return PairedDataModule(
        modalities={
            "tx": AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p"),
            "ph": TableSource("example://phenomics.parquet", feature_prefix="feat_"),
        },
        keys=["smiles", "concentration"],
        split_column="split",
        batch_size=batch_size,
        num_workers=num_workers,
    )


def make_model(
    schema: dict[str, Any], hidden: dict[str, list[int]], embed_dim: int, seed: int, cls: type = CrossModalSetup
) -> CrossModalSetup:
    """``CrossModalSetup`` with its towers already built from ``schema`` (same seed -> same weights)."""
    seed_everything(seed, verbose=False)
    return cls(
        encoders={
            name: functools.partial(MLPEncoder, hidden_sizes=hidden[name], dropout=0.1) for name in schema
        },
        loss=ClipLoss(use_groups=True),
        embed_dim=embed_dim,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
        schema=schema,
    )


# -- (a) a plain PyTorch loop ---------------------------------------------------------------------------
def train_plain(schema, args, hidden, fused: bool = False) -> dict[str, float]:
    datamodule = make_datamodule(args.batch_size, args.num_workers)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    setup = make_model(schema, hidden, args.embed_dim, args.seed)
    towers, loss_fn = setup.towers, setup.loss  # exactly the modules the Lightning side trains
    pairs = list(itertools.combinations(schema, 2))
    # AdamW over the setup's parameter groups (no decay on biases, norms, scalars): the optimizer Lightning
    # gets, or the same with torch's default kernels
    if fused:
        optimizer = setup.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        assert optimizer.defaults["fused"], "the framework built AdamW without its fused kernel"
    else:
        optimizer = torch.optim.AdamW(setup.parameter_groups(), lr=1e-3, weight_decay=0.01)
    setup.train()

    def epoch() -> int:
        steps = 0
        for batch in loader:
            embeddings = {name: tower(batch[name]) for name, tower in towers.items()}
            loss = torch.stack([loss_fn(embeddings[a], embeddings[b], batch[GROUP]) for a, b in pairs]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        return steps

    for _ in range(args.warmup):
        epoch()
    start = time.perf_counter()
    steps = sum(epoch() for _ in range(args.epochs))
    seconds = time.perf_counter() - start
    datamodule.teardown("fit")
    return {"seconds": seconds, "steps": steps, "final_loss": float(loss_of(setup, loader, pairs))}


# -- (b) unimodality fit's machinery ------------------------------------------------------------------
class EpochTimer(Callback):
    """Wall-clock time from the start of the first timed epoch to the end of the last one."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.end = time.perf_counter()


class UnloggedCrossModalSetup(CrossModalSetup):
    """``CrossModalSetup`` whose training step logs nothing (for the breakdown: the cost of ``self.log``). Its
    own training step, with no step a logging step: a copy of the step would drift from the setup's."""

    def is_logging_step(self) -> bool:
        return False


class BareModule(LightningModule):
    """The plain loop's step as a LightningModule (training step and optimizer only, nothing logged): what
    Lightning's loop costs by itself, so that the framework's own share of the overhead shows."""

    def __init__(self, setup: CrossModalSetup) -> None:
        super().__init__()
        self.towers, self.loss = setup.towers, setup.loss
        self.pairs = list(itertools.combinations(setup.towers, 2))
        self._optimizer = setup.configure_optimizers()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        embeddings = {name: tower(batch[name]) for name, tower in self.towers.items()}
        return torch.stack([self.loss(embeddings[a], embeddings[b], batch[GROUP]) for a, b in self.pairs]).mean()

    def configure_optimizers(self) -> Any:
        return self._optimizer


def train_lightning(schema, args, hidden, variant: str = "lightning") -> dict[str, float]:
    datamodule = make_datamodule(args.batch_size, args.num_workers)
    cls = UnloggedCrossModalSetup if variant == NO_LOG else CrossModalSetup
    setup = make_model(schema, hidden, args.embed_dim, args.seed, cls)
    module = BareModule(setup) if variant == BARE else setup
    timer = EpochTimer(args.warmup)
    with tempfile.TemporaryDirectory() as run_dir:
        with_logging = variant == WITH_LOGGING  # as `unimodality fit --config configs/clip.yaml`, minus validation
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=args.warmup + args.epochs,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=CSVLogger(run_dir, name="bench") if with_logging else False,
            log_every_n_steps=args.log_every_n_steps,
            enable_progress_bar=with_logging,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[timer],
            default_root_dir=run_dir,
        )
        trainer.fit(module, datamodule=datamodule)
    assert timer.start is not None and timer.end is not None
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    final = loss_of(setup, loader, list(itertools.combinations(schema, 2)))
    return {"seconds": timer.end - timer.start, "steps": timer.steps, "final_loss": float(final)}


@torch.no_grad()
def loss_of(setup: CrossModalSetup, loader, pairs) -> float:
    """Mean training loss over one pass in eval mode (a sanity check that both sides learned alike)."""
    setup.eval()
    losses = []
    for batch in loader:
        embeddings = {name: tower(batch[name]) for name, tower in setup.towers.items()}
        losses.append(torch.stack([setup.loss(embeddings[a], embeddings[b], batch[GROUP]) for a, b in pairs]).mean())
    return torch.stack(losses).mean().item()


def data_only(args) -> dict[str, float]:
    """The data pipeline alone: iterate the train loader for the timed epochs, no model."""
    datamodule = make_datamodule(args.batch_size, args.num_workers)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    for _ in range(args.warmup):
        for _batch in loader:
            pass
    start = time.perf_counter()
    steps = 0
    for _ in range(args.epochs):
        for _batch in loader:
            steps += 1
    return {"seconds": time.perf_counter() - start, "steps": steps}


# -- driver -------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _summarise(results: list[dict[str, float]], batch_size: int) -> dict[str, float]:
    steps = results[0]["steps"]
    seconds = [r["seconds"] for r in results]
    return {
        "steps": steps,
        "median_seconds": statistics.median(seconds),
        "best_seconds": min(seconds),
        "median_samples_per_s": statistics.median(r["samples_per_s"] for r in results),
        "best_samples_per_s": max(r["samples_per_s"] for r in results),
        "median_ms_per_step": 1e3 * statistics.median(seconds) / steps,
        "best_ms_per_step": 1e3 * min(seconds) / steps,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="perturbations per step; the example data has 320 training perturbations, so 64 "
                        "gives 5 steps per epoch and 256 gives 1 (default 64)")
    parser.add_argument("--epochs", type=int, default=30, help="timed epochs per run (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed epochs before timing (default 3)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="runs of each loop, alternating which goes first; the median over repeats of the "
                        "time ratio is reported (default 7)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help="encoder widths of both towers (default: configs/clip.yaml's, tx 512 256, ph 256 256)")
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 gives steadier figures on a busy machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every-n-steps", type=int, default=5,
                        help="the framework's logging interval: the steps whose loss and diagnostics are logged "
                        "(default 5, as configs/clip.yaml; Lightning's own default is 50)")
    parser.add_argument("--breakdown", action="store_true",
                        help=f"also time '{NO_LOG}' (the cost of the training step's self.log calls), "
                        f"'{BARE}' (Lightning's own loop, with nothing of ours) and '{WITH_LOGGING}'")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file (default: %(default)s)")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    datamodule = make_datamodule(args.batch_size, args.num_workers)
    schema = datamodule.schema
    datamodule.setup("fit")
    n_train = len(datamodule.datasets["train"])
    if n_train < args.batch_size:
        parser.error(f"--batch-size {args.batch_size} exceeds the {n_train} training perturbations")
    steps_per_epoch = n_train // args.batch_size
    hidden = {name: list(args.hidden) for name in schema} if args.hidden else CLIP_HIDDEN
    n_params = sum(p.numel() for p in make_model(schema, hidden, args.embed_dim, args.seed).parameters())

    variants = [PLAIN, PLAIN_FUSED, LIGHTNING] + ([NO_LOG, BARE, WITH_LOGGING] if args.breakdown else [])
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in [*variants, "data only"]}
    print(f"batch size {args.batch_size}, {steps_per_epoch} steps/epoch, {args.epochs} timed epochs "
          f"(+{args.warmup} warm-up) x {args.repeats} repeats, hidden {hidden}, {n_params / 1e6:.2f} M parameters, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]  # alternate who goes first
        for variant in order:
            if variant in (PLAIN, PLAIN_FUSED):
                result = train_plain(schema, args, hidden, fused=variant == PLAIN_FUSED)
            else:
                result = train_lightning(schema, args, hidden, variant)
            result["samples_per_s"] = result["steps"] * args.batch_size / result["seconds"]
            runs[variant].append(result)
            print(f"  repeat {repeat + 1}  {variant:36s} {result['seconds']:7.3f} s {result['samples_per_s']:8.0f} "
                  f"samples/s  ({result['steps']} steps, loss afterwards {result['final_loss']:.4f})", flush=True)
        result = data_only(args)
        result["samples_per_s"] = result["steps"] * args.batch_size / result["seconds"]
        runs["data only"].append(result)

    summary = {variant: _summarise(results, args.batch_size) for variant, results in runs.items()}
    plain = summary[PLAIN]
    for variant in variants[1:]:
        s = summary[variant]
        # each repeat runs every loop back to back: the ratio within a repeat is the least disturbed by
        # other load on the machine, so the median of those is the headline figure
        paired = [p["seconds"] / v["seconds"] for p, v in zip(runs[PLAIN], runs[variant])]
        s["ratio_vs_plain"] = statistics.median(paired)
        s["ratio_vs_plain_per_repeat"] = paired
        s["ratio_of_medians"] = s["median_samples_per_s"] / plain["median_samples_per_s"]
        s["ratio_vs_plain_best"] = s["best_samples_per_s"] / plain["best_samples_per_s"]
        s["overhead_ms_per_step"] = s["median_ms_per_step"] - plain["median_ms_per_step"]
        if variant != PLAIN_FUSED:  # the loop's cost alone: against the plain loop with the same optimizer
            s["ratio_vs_plain_fused"] = statistics.median(
                p["seconds"] / v["seconds"] for p, v in zip(runs[PLAIN_FUSED], runs[variant]))

    print(f"\n{'loop (medians)':36s} {'time (s)':>9s} {'ms/step':>8s} {'samples/s':>10s} {'vs plain':>9s} "
          f"{'(best)':>7s} {'+ms/step':>9s} {'vs fused':>9s}")
    for variant, s in summary.items():
        extra = (f"{s['ratio_vs_plain']:9.3f} {s['ratio_vs_plain_best']:7.3f} {s['overhead_ms_per_step']:9.2f}"
                 if "ratio_vs_plain" in s else "")
        extra += f" {s['ratio_vs_plain_fused']:9.3f}" if "ratio_vs_plain_fused" in s else ""
        print(f"{variant:36s} {s['median_seconds']:9.3f} {s['median_ms_per_step']:8.2f} "
              f"{s['median_samples_per_s']:10.0f} {extra}")
    ratio, loop_only = summary[LIGHTNING]["ratio_vs_plain"], summary[LIGHTNING]["ratio_vs_plain_fused"]
    final_losses = {variant: runs[variant][0]["final_loss"] for variant in variants}
    same_work = max(final_losses.values()) - min(final_losses.values()) < 1e-4
    if not same_work:
        print(f"\nWARNING: the loops did not end with the same model, so they did not do the same work: {final_losses}")
    print(f"\nframework/plain = {ratio:.3f} (median over repeats of plain time / framework time; "
          f"goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
    print(f"framework/plain with the same fused AdamW = {loop_only:.3f} (the cost of the loop alone)")
    print("vs plain: median over repeats of the time ratio against the plain loop with torch's default AdamW; "
          "(best): best run / best run; +ms/step: median step time minus plain's; vs fused: the ratio against "
          "the plain loop stepping the framework's fused AdamW")
    print(f"data pipeline: {DATA_PIPELINE.format(args.num_workers)}")

    report = {
        "benchmark": "train_overhead",
        "settings": {
            "batch_size": args.batch_size,
            "steps_per_epoch": steps_per_epoch,
            "train_perturbations": n_train,
            "epochs_timed": args.epochs,
            "warmup_epochs": args.warmup,
            "repeats": args.repeats,
            "hidden": hidden,
            "embed_dim": args.embed_dim,
            "parameters": n_params,
            "loss": "ClipLoss(use_groups=True)",
            "optimizer": "AdamW(lr=1e-3, weight_decay=0.01) over Setup.parameter_groups(): fused, as built by "
            "Setup.configure_optimizers (the framework, 'plain, fused AdamW'), or torch's default kernels ('plain')",
            "num_workers": args.num_workers,
            "seed": args.seed,
            "data_pipeline": DATA_PIPELINE.format(args.num_workers),
            "lightning_trainer": "accelerator=cpu, devices=1, logger=False, enable_progress_bar=False, "
            f"enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, "
            f"log_every_n_steps={args.log_every_n_steps}",
        },
        "framework_over_plain": ratio,
        "framework_over_plain_fused": loop_only,
        "same_final_loss": same_work,
        "summary": summary,
        "runs": runs,
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "device": "cpu",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
