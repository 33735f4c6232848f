"""Sharded tables: reading a folder of parquet files against the same rows in one file, in one run.

Writes (into --dir) a parquet table of --rows rows x --features float32 feature columns plus metadata, and the
same rows as --shards files of a folder. Measures, interleaving single and sharded repeats so a slow moment
of the machine hits both alike: reading every row's features into memory (``TableSource.read_features``), and
converting the table to the streaming ``.npy`` cache (``streaming.table_cache``, rebuilt each repeat). Prints
medians with their spread, the sharded / single ratios (goal: <= 1.2x), and writes
``benchmarks/results/sharded.json``.

    OMP_NUM_THREADS=1 python benchmarks/sharded.py [--rows 200000] [--features 256] [--shards 8] [--repeats 5]

Seen (defaults, 2 shared CPU cores, medians of 5 with min-max): reading into memory 2.71 s (2.33-2.94) single,
2.34 s (1.86-2.48) sharded: 0.86x; the streaming cache 2.33 s (1.86-2.64) single, 1.78 s (1.69-1.87) sharded: 0.76x.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RESULTS = Path(__file__).resolve().parent / "results" / "sharded.json"


def write_tables(folder: Path, rows: int, features: int, shards: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(rows, features)).astype(np.float32)
    columns = {"well": pa.array([f"w{i}" for i in range(rows)]),
               **{f"feat_{j:03d}": pa.array(values[:, j]) for j in range(features)}}
    table = pa.table(columns)
    folder.mkdir(parents=True, exist_ok=True)
    single, sharded = folder / "single.parquet", folder / "shards"
    pq.write_table(table, single)
    shutil.rmtree(sharded, ignore_errors=True)
    sharded.mkdir()
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(table.slice(start, stop - start), sharded / f"part-{i:03d}.parquet")
    return single, sharded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/unimodality-sharded")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()

    from unimodality.plugins.sources.table import TableSource
    from unimodality.streaming import table_cache

    single, sharded = write_tables(Path(options.dir), options.rows, options.features, options.shards)
    times: dict[str, list[float]] = {
        f"{what}/{kind}": [] for what in ("read", "cache") for kind in ("single", "sharded")
    }
    for _ in range(options.repeats):
        for kind, path in (("single", single), ("sharded", sharded)):
            source = TableSource(str(path), feature_prefix="feat_")
            start = time.perf_counter()
            matrix = source.read_features()
            times[f"read/{kind}"].append(time.perf_counter() - start)
            assert matrix.shape == (options.rows, options.features)
            cache = Path(options.dir) / f"cache-{kind}"
            shutil.rmtree(cache, ignore_errors=True)
            start = time.perf_counter()
            table_cache(TableSource(str(path), feature_prefix="feat_"), cache)
            times[f"cache/{kind}"].append(time.perf_counter() - start)
    summary = {}
    for what in ("read", "cache"):
        single_s, sharded_s = (statistics.median(times[f"{what}/{kind}"]) for kind in ("single", "sharded"))
        spread = {kind: (min(times[f"{what}/{kind}"]), max(times[f"{what}/{kind}"])) for kind in ("single", "sharded")}
        summary[what] = {"single_s": single_s, "sharded_s": sharded_s, "ratio": sharded_s / single_s,
                         "rows_per_s_single": options.rows / single_s, "rows_per_s_sharded": options.rows / sharded_s,
                         "spread_s": spread}
        print(f"{what:5s}: single {single_s:.3f} s ({spread['single'][0]:.3f}-{spread['single'][1]:.3f}), "
              f"{options.shards} shards {sharded_s:.3f} s ({spread['sharded'][0]:.3f}-{spread['sharded'][1]:.3f}): "
              f"ratio {sharded_s / single_s:.2f}x, {options.rows / sharded_s:,.0f} rows/s sharded")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"options": vars(options), "summary": summary, "times": times,
                                   "machine": platform.platform()}, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
