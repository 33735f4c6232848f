"""Throughput of the built-in encoders on the bundled example data, with the cost of getting a batch ready.

Per encoder and batch size: samples per second of the data step (the source's ``read_features`` store
turning rows into a batch: dense vectors, molecular graphs, normalised image tensors), of the forward pass
(eval mode, no gradients) and of forward+backward (train mode). Encoders and inputs:

- ``MLPEncoder`` ([512, 256]) on transcriptomics vectors (``normalize_log1p``, 500 genes);
- ``GNNEncoder`` (GINE, 3 layers, 128 wide) on molecules (``MoleculeSource`` on the transcriptomics
  file's ``smiles`` column); also the one-time featurisation rate of SMILES into graphs;
- ``CNNEncoder`` (the ``configs/simclr_cnn.yaml`` network) on the example 5-channel 24x24 images.

Ratios are against a baseline measured in the same run: forward+backward time over forward time
(``bwd x``), and each encoder's forward+backward time per sample over the MLP's at the same batch size
(``vs MLP``). Times are medians of ``--repeats`` timed rounds, each of at least ``--min-seconds``.

    python benchmarks/encoders.py                       # batch 32/128/512
    python benchmarks/encoders.py --batch 64 256 --threads 1

Writes ``benchmarks/results/encoders.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "encoders.json"


def rate(step: Callable[[], Any], samples: int, repeats: int, min_seconds: float, sync: Callable[[], None]) -> float:
    """Samples per second of ``step`` (median over ``repeats`` rounds of at least ``min_seconds``)."""
    step()  # warm-up: allocations, lazy initialisation
    sync()
    rates = []
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while True:
            step()
            sync()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        rates.append(count * samples / elapsed)
    return statistics.median(rates)


def workloads(device: str) -> dict[str, tuple[Any, torch.nn.Module, int]]:
    """name -> (store with ``take`` or a matrix, encoder, number of rows)."""
    from unimodality.plugins.encoders.cnn import CNNEncoder
    from unimodality.plugins.encoders.gnn import GNNEncoder
    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.sources.anndata import AnnDataSource
    from unimodality.plugins.sources.images import ImageSource
    from unimodality.plugins.sources.molecules import MoleculeSource

    torch.manual_seed(0)
    tx = AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p")
    molecules = MoleculeSource("example://transcriptomics.h5ad", smiles_column="smiles")
    images = ImageSource("example://phenomics.parquet", images="{stem}_images.npy",
                         channels=["DNA", "ER", "RNA", "AGP", "Mito"])
    out = {}
    for name, source, make in (
        ("MLPEncoder", tx, lambda n: MLPEncoder(n, hidden_sizes=[512, 256])),
        ("GNNEncoder", molecules, lambda n: GNNEncoder(n, hidden_size=128, num_layers=3)),
        ("CNNEncoder", images, lambda n: CNNEncoder(n, width=16, blocks=[1, 1, 1])),
    ):
        store = source.read_features()
        encoder = make(len(source.feature_names())).to(device)
        out[name] = (store, encoder, source.num_rows())
    return out


def featurisation_rate() -> dict[str, float]:
    """SMILES -> graphs from scratch (a new source: nothing cached), per row and per distinct molecule."""
    from unimodality.plugins.sources.molecules import MoleculeSource

    source = MoleculeSource("example://transcriptomics.h5ad", smiles_column="smiles")
    rows, distinct = source.num_rows(), len(set(source.smiles()))
    start = time.perf_counter()
    source.read_features()
    seconds = time.perf_counter() - start
    return {"rows_per_s": rows / seconds, "molecules_per_s": distinct / seconds, "rows": rows,
            "molecules": distinct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from unimodality.datamodule import take_rows

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    loads = workloads(device)
    featurise = featurisation_rate()
    rng = np.random.default_rng(0)
    rows_out = []
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"SMILES featurisation (uncached): {featurise['molecules_per_s']:.0f} molecules/s "
          f"({featurise['molecules']} distinct for {featurise['rows']} rows)\n")
    header = (f"{'encoder':11s} {'batch':>5s} {'data/s':>9s} {'fwd/s':>9s} {'fwd+bwd/s':>10s} {'bwd x':>6s} "
              f"{'vs MLP':>7s}")
    print(header)
    for batch in args.batch:
        mlp_time = None
        for name, (store, encoder, n) in loads.items():
            rows = rng.choice(n, size=batch, replace=batch > n)
            data_rate = rate(lambda s=store, r=rows: take_rows(s, r), batch, args.repeats, args.min_seconds,
                             lambda: None)
            x = take_rows(store, rows).to(device)

            def forward(encoder=encoder, x=x) -> None:
                with torch.no_grad():
                    encoder(x)

            def forward_backward(encoder=encoder, x=x) -> None:
                encoder.zero_grad(set_to_none=True)
                encoder(x).square().mean().backward()

            encoder.eval()
            fwd = rate(forward, batch, args.repeats, args.min_seconds, sync)
            encoder.train()
            fwd_bwd = rate(forward_backward, batch, args.repeats, args.min_seconds, sync)
            if name == "MLPEncoder":
                mlp_time = 1 / fwd_bwd
            row = {"encoder": name, "batch": batch, "data_samples_per_s": data_rate, "forward_samples_per_s": fwd,
                   "train_samples_per_s": fwd_bwd, "backward_ratio": fwd / fwd_bwd,
                   "time_vs_mlp": (1 / fwd_bwd) / mlp_time, "parameters": sum(p.numel() for p in encoder.parameters())}
            rows_out.append(row)
            print(f"{name:11s} {batch:5d} {data_rate:9.0f} {fwd:9.0f} {fwd_bwd:10.0f} {row['backward_ratio']:5.1f}x "
                  f"{row['time_vs_mlp']:6.1f}x", flush=True)
    print("\nsamples per second; data = store.take (batching, featurised graphs, image normalisation); bwd x = "
          "forward+backward time / forward time; vs MLP = forward+backward time per sample / the MLP's")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0],
        "smiles_featurisation": featurise, "rows": rows_out,
    }, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
