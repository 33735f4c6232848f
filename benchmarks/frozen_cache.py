"""Time per epoch of training next to a frozen tower, with ``cache_frozen: true`` and without.

``CrossModalSetup`` with a frozen tower computes that tower's representation of a source row once and
reuses it (``model.init_args.cache_frozen``); without the cache its encoder runs forward on every row of
every batch, validation included. Two configurations on the bundled example data, each with a trainable
phenomics MLP (``TableSource``, [256, 256]) and ``ClipLoss`` with replicate-aware positives:

- ``cnn``: images (``ImageSource``, 5 channels, 24x24) through a frozen ``CNNEncoder`` (``--cnn-width``
  32, ``--cnn-blocks`` 1 1 1: the encoder's default, wider than the test's so the frozen tower dominates the
  step, as a real pretrained image model would); pairing key SMILES + concentration, batch 64;
- ``gnn``: molecule graphs (``MoleculeSource``) through a frozen ``GNNEncoder`` (GINE, ``--gnn-hidden`` 128,
  ``--gnn-layers`` 3: the encoder's default); pairing key SMILES, batch 32.

Each configuration is fitted for ``--epochs`` epochs (validation every epoch, no sanity check, no
logger, checkpointing or progress bar), uncached and cached interleaved (uncached, cached, uncached, ...)
for ``--repeats`` rounds, every fit from the same seed. An epoch is timed from its training start to its
end, validation included. The first epoch is reported apart: it sees every validation row and a first
replicate of every training perturbation, so the cache only fills; later epochs draw other replicates, so
the cache pays off as more of them have been seen. Per configuration: first-epoch and later-epoch (the
median of a fit's epochs after the first) and last-epoch seconds, median and range over rounds; the ratio
cached/uncached of each round, median and range; the rows each epoch showed the frozen tower and the rows
its encoder ran on (cached); and the largest difference between the final weights of the cached and the
uncached fit of a round, which must pass ``torch.testing.assert_close`` as in tests/test_frozen_cache.py
(the cache changes the time, not the result). Threads: 1 unless ``--threads``.

    python benchmarks/frozen_cache.py                               # cnn and gnn, 10 epochs, 3 rounds
    python benchmarks/frozen_cache.py --towers cnn --epochs 20 --repeats 5
    python benchmarks/frozen_cache.py --towers gnn --gnn-hidden 512 --gnn-layers 5   # a heavier GNN
    python benchmarks/frozen_cache.py --cnn-width 64 --threads 2 --output /tmp/frozen_cache.json

Writes ``benchmarks/results/frozen_cache.json`` unless ``--output``; exits non-zero when the weights of a
cached fit disagree with the uncached one's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from unimodality.batch import GROUP
from unimodality.example_data import IMAGE_CHANNELS
from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.encoders.cnn import CNNEncoder
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.plugins.sources.images import ImageSource
from unimodality.plugins.sources.table import TableSource

RESULTS = Path(__file__).resolve().parent / "results" / "frozen_cache.json"
PHENOMICS = "example://phenomics.parquet"
#: the tolerance of tests/test_frozen_cache.py's comparison of a cached and an uncached fit
ATOL, RTOL = 1e-6, 1e-5


def phenomics() -> TableSource:
    return TableSource(PHENOMICS, feature_prefix="feat_")


def cnn_config(args: argparse.Namespace) -> dict[str, Any]:
    """Phenomics features + well images, the image tower frozen."""
    def data() -> PairedDataModule:
        return PairedDataModule(
            {"ph": phenomics(),
             "img": ImageSource(PHENOMICS, images="{stem}_images.npy", channels=list(IMAGE_CHANNELS))},
            keys=["smiles", "concentration"], split_column="split", batch_size=64)

    return {"data": data, "frozen": "img",
            "encoders": {"ph": partial(MLPEncoder, hidden_sizes=[256, 256], dropout=0.1),
                         "img": partial(CNNEncoder, width=args.cnn_width, blocks=args.cnn_blocks, norm="batch")},
            "tower": f"CNNEncoder(width={args.cnn_width}, blocks={args.cnn_blocks}, norm=batch)",
            "batch_size": 64, "keys": ["smiles", "concentration"]}


def gnn_config(args: argparse.Namespace) -> dict[str, Any]:
    """Phenomics features + molecule graphs, the molecule tower frozen."""
    from unimodality.plugins.encoders.gnn import GNNEncoder
    from unimodality.plugins.sources.molecules import MoleculeSource

    def data() -> PairedDataModule:
        return PairedDataModule({"ph": phenomics(), "mol": MoleculeSource(PHENOMICS)},
                                keys=["smiles"], split_column="split", batch_size=32)

    return {"data": data, "frozen": "mol",
            "encoders": {"ph": partial(MLPEncoder, hidden_sizes=[256, 256], dropout=0.1),
                         "mol": partial(GNNEncoder, hidden_size=args.gnn_hidden, num_layers=args.gnn_layers)},
            "tower": f"GNNEncoder(hidden_size={args.gnn_hidden}, num_layers={args.gnn_layers})",
            "batch_size": 32, "keys": ["smiles"]}


CONFIGS = {"cnn": cnn_config, "gnn": gnn_config}


class EpochClock(Callback):
    """Seconds per epoch (training start to epoch end, validation included), the rows each epoch shows the
    frozen tower and, when it caches, the rows its encoder ran on."""

    def __init__(self, frozen: str) -> None:
        self.frozen = frozen
        self.seconds: list[float] = []
        self.shown: list[int] = []
        self.encoded: list[int] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        cache = module.towers[self.frozen].cache
        self._computed = cache.computed if cache is not None else 0
        self.shown.append(0)
        self._start = time.perf_counter()

    def _count(self, batch) -> None:
        if self.shown:  # not the sanity check (off here anyway)
            self.shown[-1] += len(batch[GROUP])

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._count(batch)

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(batch)

    def on_train_epoch_end(self, trainer, module) -> None:
        # Lightning runs the epoch's validation before this hook: the time includes it
        self.seconds.append(time.perf_counter() - self._start)
        cache = module.towers[self.frozen].cache
        self.encoded.append(cache.computed - self._computed if cache is not None else self.shown[-1])


def fit(config: dict[str, Any], cache: bool, epochs: int, seed: int) -> tuple[dict[str, torch.Tensor], EpochClock]:
    """The final weights and epoch times of one seeded fit."""
    seed_everything(seed, verbose=False)
    model = CrossModalSetup(encoders=config["encoders"], loss=ClipLoss(use_groups=True), embed_dim=64,
                            modes={config["frozen"]: "frozen"}, cache_frozen=cache)
    clock = EpochClock(config["frozen"])
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=epochs, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[clock])
    trainer.fit(model, datamodule=config["data"]())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, clock


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def weight_difference(cached: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> tuple[float, str | None]:
    """The largest absolute difference of the two fits' weights, and assert_close's complaint (None: agree)."""
    if cached.keys() != plain.keys():
        return float("inf"), "the state dicts have different keys"
    largest, problem = 0.0, None
    for key, expected in plain.items():
        if expected.is_floating_point():
            largest = max(largest, float((cached[key] - expected).abs().max()) if expected.numel() else 0.0)
        try:
            torch.testing.assert_close(cached[key], expected, atol=ATOL, rtol=RTOL, msg=key)
        except AssertionError as err:
            problem = problem or str(err).splitlines()[0]
    return largest, problem


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    config = CONFIGS[name](args)
    runs: dict[str, list[EpochClock]] = {"uncached": [], "cached": []}
    differences, problems = [], []
    for round_ in range(args.repeats):
        weights = {}
        for variant in ("uncached", "cached"):
            weights[variant], clock = fit(config, variant == "cached", args.epochs, args.seed)
            runs[variant].append(clock)
            print(f"  {name} round {round_ + 1} {variant:<8} first epoch {clock.seconds[0]:7.3f} s, later "
                  f"{statistics.median(clock.seconds[1:]):7.3f} s (median), encoder rows {clock.encoded}", flush=True)
        difference, problem = weight_difference(weights["cached"], weights["uncached"])
        differences.append(difference)
        if problem:
            problems.append(f"round {round_ + 1}: {problem}")
    first = {v: [c.seconds[0] for c in clocks] for v, clocks in runs.items()}
    later = {v: [statistics.median(c.seconds[1:]) for c in clocks] for v, clocks in runs.items()}
    last = {v: [c.seconds[-1] for c in clocks] for v, clocks in runs.items()}
    return {
        "tower": config["tower"], "frozen_modality": config["frozen"], "batch_size": config["batch_size"],
        "keys": config["keys"],
        "first_epoch_seconds": {v: spread(t) for v, t in first.items()},
        "later_epoch_seconds": {v: spread(t) for v, t in later.items()},
        "last_epoch_seconds": {v: spread(t) for v, t in last.items()},
        # per round: the cached fit against the uncached one just before it
        "first_epoch_ratio": spread([c / u for c, u in zip(first["cached"], first["uncached"])]),
        "later_epoch_ratio": spread([c / u for c, u in zip(later["cached"], later["uncached"])]),
        "last_epoch_ratio": spread([c / u for c, u in zip(last["cached"], last["uncached"])]),
        "rows_shown_per_epoch": runs["uncached"][0].shown,
        "rows_encoded_per_epoch": {v: clocks[0].encoded for v, clocks in runs.items()},
        "epoch_seconds": {v: [c.seconds for c in clocks] for v, clocks in runs.items()},
        "max_weight_difference": max(differences),
        "weights_agree": not problems,
        "disagreements": problems,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'tower':<44} {'variant':<9} {'1st epoch s (min-max)':>24} {'later epoch s (min-max)':>24}"]
    for r in results.values():
        for v in ("uncached", "cached"):
            f, s = r["first_epoch_seconds"][v], r["later_epoch_seconds"][v]
            lines.append(f"{r['tower']:<44} {v:<9} {f['median']:>8.3f} ({f['min']:.3f}-{f['max']:.3f}) "
                         f"{s['median']:>8.3f} ({s['min']:.3f}-{s['max']:.3f})")
        f, s, t = r["first_epoch_ratio"], r["later_epoch_ratio"], r["last_epoch_ratio"]
        lines.append(f"{'':<44} {'cached/uncached':<15} first {f['median']:.2f} ({f['min']:.2f}-{f['max']:.2f}), "
                     f"later {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}), last {t['median']:.2f} "
                     f"({t['min']:.2f}-{t['max']:.2f}); encoder rows per epoch "
                     f"{r['rows_encoded_per_epoch']['cached']} of {r['rows_shown_per_epoch']}; weights "
                     f"{'agree' if r['weights_agree'] else 'DISAGREE'} (max |diff| {r['max_weight_difference']:.1e})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=10, help="epochs per fit (default 10; at least 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (uncached, cached) fits (default 3)")
    parser.add_argument("--cnn-width", type=int, default=32, help="CNNEncoder width (default 32)")
    parser.add_argument("--cnn-blocks", type=int, nargs="+", default=[1, 1, 1], help="CNNEncoder blocks (1 1 1)")
    parser.add_argument("--gnn-hidden", type=int, default=128, help="GNNEncoder hidden_size (default 128)")
    parser.add_argument("--gnn-layers", type=int, default=3, help="GNNEncoder num_layers (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is reported apart from the later ones)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen encoder, on purpose
    for logger in ("lightning.pytorch", "lightning.fabric", "unimodality"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"{args.epochs} epochs per fit x {args.repeats} rounds (uncached, cached), torch threads "
          f"{torch.get_num_threads()}", flush=True)
    results = {name: measure(name, args) for name in args.towers}
    print(table(results))
    summary = {
        "benchmark": "frozen_cache",
        "settings": {key: getattr(args, key) for key in ("towers", "epochs", "repeats", "cnn_width", "cnn_blocks",
                                                         "gnn_hidden", "gnn_layers", "threads", "seed")}
        | {"trainable_tower": "ph: MLPEncoder([256, 256], dropout=0.1)", "loss": "ClipLoss(use_groups=True)",
           "embed_dim": 64, "tolerance": {"atol": ATOL, "rtol": RTOL}},
        "results": results,
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
                        "lightning": lightning.__version__, "torch_threads": torch.get_num_threads()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.output}")
    disagreeing = [name for name, r in results.items() if not r["weights_agree"]]
    if disagreeing:
        sys.exit(f"cached and uncached fits ended with different weights ({', '.join(disagreeing)}): "
                 + "; ".join(p for name in disagreeing for p in results[name]["disagreements"]))


if __name__ == "__main__":
    main()
