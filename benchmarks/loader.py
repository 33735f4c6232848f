"""Streaming loader benchmark: samples/s and peak memory reading a file larger than a loader should hold.

Generates (once, into --dir) a CSR ``.h5ad`` of at least 2 GB (default 260,000 cells x 20,000 genes, 5 %
non-zero), a dense ``.h5ad`` and a parquet table, then measures, in one run:

  A  in-memory random indexing (the whole matrix in RAM; the ceiling, at the file's size in memory)
  B  one random sample at a time: straight from the HDF5 datasets (h5py) and through anndata's backed mode
  C  unimodality's streaming loader at its defaults (blocks of 64 rows, buffers of 16 batches)
  D  near-sequential streaming of the same file (blocks as large as a buffer)

C and D are measured with a warm page cache and a cold one (the file's pages dropped with
``posix_fadvise(DONTNEED)`` before the pass). Sharded cases read the same rows as several files: the CSR
file split into 4 ``.h5ad`` files (``csr_sharded``, one source over their folder) and the table into 8
parquet files (``parquet_sharded``); their C and D are reported as ratios to the single file's (goal >= 0.8).
Each streaming pass runs in a fresh process so its peak resident memory (VmHWM) is its own; the baseline is
that process after setup, before the first batch.
Goals (printed as ratios): C >= 0.5 x D warm; for CSR C >= 10 x B(h5py) and >= 100 x B(anndata);
peak RSS of C <= baseline + 4 buffers (the one served, the next read ahead, a read's runs before its rows are
selected); C feeds >= 2 x what an MLP encoder consumes.

    python benchmarks/loader.py --dir /tmp/unimodality-bench     # about 10 min the first time (generation)
    python benchmarks/loader.py --cases csr csr_sharded           # some cases only
    python benchmarks/loader.py --huge-gb 20 --batches 2000        # a 20 GB file streamed cold, then deleted

Seen with --huge-gb 20 (2.5 M cells x 20,000 genes, 5 % non-zero, 20.1 GB on 24 GB of RAM; 2 cores, 512,000
rows per pass, cold), with the next buffer read ahead while one is served: peak RSS 0.83 GB; C 21,269 rows/s =
0.50 x reading the same rows in order into dense batches with h5py (42,682 rows/s; 0.11 x raw sequential reads,
1,588 MB/s); D (the loader with buffer-sized blocks) 55,053 rows/s = 1.29 x that baseline. Interleaved passes
of C on the same file: 22,547 rows/s reading ahead, 17,089 rows/s reading each buffer when it is needed (medians
of 2; asking the kernel for the next buffer's chunks with posix_fadvise(WILLNEED) instead gave 20,912).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from unimodality.streaming import H5Store

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 256


# -- data generation -------------------------------------------------------------------------------------

def write_obs_var(f: h5py.File, n_obs: int, n_var: int) -> None:
    import pandas as pd
    from anndata.io import write_elem

    write_elem(f, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_obs)]))
    write_elem(f, "var", pd.DataFrame(index=[f"GENE{j}" for j in range(n_var)]))
    f.attrs["encoding-type"] = "anndata"
    f.attrs["encoding-version"] = "0.1.0"


def make_csr(path: Path, n_obs: int, n_var: int, density: float, seed: int = 0, chunk: int = 10000) -> None:
    """A CSR .h5ad written in chunks (never the whole matrix in memory)."""
    rng = np.random.default_rng(seed)
    nnz_per_row = int(n_var * density)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        write_obs_var(f, n_obs, n_var)
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_obs, n_var)})
        total = n_obs * nnz_per_row
        # h5py's automatic chunk size, as anndata's writer uses (a row block then touches one or two chunks)
        data = X.create_dataset("data", (total,), dtype=np.float32, chunks=True)
        indices = X.create_dataset("indices", (total,), dtype=np.int32, chunks=True)
        X.create_dataset("indptr", data=np.arange(n_obs + 1, dtype=np.int64) * nnz_per_row)
        for start in range(0, n_obs, chunk):
            rows = min(chunk, n_obs - start)
            cols = np.sort(rng.random((rows, n_var)).argpartition(nnz_per_row, axis=1)[:, :nnz_per_row], axis=1)
            lo, hi = start * nnz_per_row, (start + rows) * nnz_per_row
            indices[lo:hi] = cols.ravel().astype(np.int32)
            data[lo:hi] = rng.poisson(2.0, hi - lo).astype(np.float32) + 1
    os.replace(tmp, path)


def make_csr_fast(path: Path, n_obs: int, n_var: int, density: float, seed: int = 0, chunk: int = 50000) -> None:
    """A CSR .h5ad of any size, written at disk speed: row ``r`` holds columns ``k * step + r % step`` (sorted,
    distinct, every column used), Poisson values; what a loader reads is the same as for random columns."""
    rng = np.random.default_rng(seed)
    step = max(1, int(round(1 / density)))
    nnz_per_row = n_var // step
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        write_obs_var(f, n_obs, n_var)
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_obs, n_var)})
        total = n_obs * nnz_per_row
        data = X.create_dataset("data", (total,), dtype=np.float32, chunks=True)
        indices = X.create_dataset("indices", (total,), dtype=np.int32, chunks=True)
        X.create_dataset("indptr", data=np.arange(n_obs + 1, dtype=np.int64) * nnz_per_row)
        base = np.arange(nnz_per_row, dtype=np.int32) * step
        for start in range(0, n_obs, chunk):
            rows = min(chunk, n_obs - start)
            cols = base[None, :] + (np.arange(start, start + rows, dtype=np.int32) % step)[:, None]
            lo, hi = start * nnz_per_row, (start + rows) * nnz_per_row
            indices[lo:hi] = cols.ravel()
            data[lo:hi] = rng.poisson(2.0, hi - lo).astype(np.float32) + 1
    os.replace(tmp, path)


def make_dense(path: Path, n_obs: int, n_var: int, seed: int = 1, chunk: int = 20000) -> None:
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        write_obs_var(f, n_obs, n_var)
        X = f.create_dataset("X", (n_obs, n_var), dtype=np.float32)
        X.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        for start in range(0, n_obs, chunk):
            X[start:start + chunk] = rng.random((min(chunk, n_obs - start), n_var), dtype=np.float32)
    os.replace(tmp, path)


def make_parquet(path: Path, n_rows: int, n_features: int, seed: int = 2, chunk: int = 50000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("well", pa.string())] + [(f"feat_{j:04d}", pa.float32()) for j in range(n_features)])
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, n_rows, chunk):
            rows = min(chunk, n_rows - start)
            block = rng.standard_normal((rows, n_features), dtype=np.float32)
            columns = [pa.array([f"w{i}" for i in range(start, start + rows)])] + [pa.array(c) for c in block.T]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    os.replace(tmp, path)


def split_csr(path: Path, folder: Path, shards: int, chunk: int = 2_000_000) -> None:
    """The rows of a CSR .h5ad as ``shards`` consecutive .h5ad files, copied range by range."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "r") as source:
        n_obs, n_var = (int(v) for v in source["X"].attrs["shape"])
        indptr = source["X/indptr"][()]
        bounds = np.linspace(0, n_obs, shards + 1).astype(int)
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            with h5py.File(tmp / f"plate_{k}.h5ad", "w") as f:
                write_obs_var(f, b - a, n_var)
                X = f.create_group("X")
                X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (b - a, n_var)})
                lo, hi = int(indptr[a]), int(indptr[b])
                X.create_dataset("indptr", data=indptr[a:b + 1] - lo)
                for name in ("data", "indices"):
                    out = X.create_dataset(name, (hi - lo,), dtype=source["X"][name].dtype, chunks=True)
                    for start in range(lo, hi, chunk):
                        out[start - lo:min(start + chunk, hi) - lo] = source["X"][name][start:min(start + chunk, hi)]
    os.replace(tmp, folder)


def split_parquet(path: Path, folder: Path, shards: int) -> None:
    import pyarrow.parquet as pq

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(path)
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(table.slice(a, b - a), tmp / f"part-{k}.parquet")
    os.replace(tmp, folder)


# -- one-sample reads (B) and in-memory indexing (A) ------------------------------------------------------

def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def drop_cache(path: Path) -> None:
    """Evict a file's pages (every file's, for a folder) from the page cache (cold reads), without privileges."""
    for file in files_of(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(path: Path) -> None:
    """Read a file (every file of a folder) once so that its pages are in the page cache (a warm pass must not
    pay for disk)."""
    for file in files_of(path):
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def one_sample_h5py(path: Path, n: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r") as f:
        X = f["X"]
        rows = rng.integers(0, X.attrs["shape"][0] if isinstance(X, h5py.Group) else X.shape[0], n)
        t = time.perf_counter()
        if isinstance(X, h5py.Group):
            indptr = X["indptr"][()]
            data, indices = X["data"], X["indices"]
            for r in rows:
                lo, hi = indptr[r], indptr[r + 1]
                data[lo:hi], indices[lo:hi]
        else:
            for r in rows:
                X[r]
        return n / (time.perf_counter() - t)


def one_sample_anndata(path: Path, n: int, seed: int = 0) -> float:
    import anndata as ad

    adata = ad.read_h5ad(path, backed="r")
    rows = np.random.default_rng(seed).integers(0, adata.n_obs, n)
    t = time.perf_counter()
    for r in rows:
        adata.X[int(r)]
    rate = n / (time.perf_counter() - t)
    adata.file.close()
    return rate


def in_memory(path: Path, n_batches: int, seed: int = 0) -> tuple[float, float]:
    """Random batches from the whole matrix held in RAM; returns (samples/s, bytes held)."""
    import scipy.sparse as sp

    from unimodality.plugins.sources.anndata import AnnDataSource

    matrix = AnnDataSource(str(path))._read_raw(None)
    held = matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes if sp.issparse(matrix) else matrix.nbytes
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for _ in range(n_batches):
        block = matrix[np.sort(rng.integers(0, matrix.shape[0], BATCH))]
        block = block.toarray() if sp.issparse(block) else block
    return n_batches * BATCH / (time.perf_counter() - t), held


# -- streaming passes (C, D), each in its own process -------------------------------------------------------

STREAM_PASS = f"""
import json, sys, time
BATCH = {BATCH}
from unimodality.plugins.datamodules.single import SingleDataModule
from unimodality.plugins.sources.formats import source_for

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

path, block, buffers, batches, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
cls = source_for(path)
source = cls(path) if cls.__name__ == "AnnDataSource" else cls(path, feature_prefix="feat_")
data = SingleDataModule(source, val_fraction=0.0, test_fraction=0.0, batch_size=BATCH, streaming=True,
                        block_size=block, buffer_batches=buffers, cache_dir=cache)
data.prepare_data()
data.setup("fit")
loader = data.train_dataloader()
base = hwm()
t = time.perf_counter()
n = 0
for i, batch in enumerate(loader):
    n += len(batch["group"])
    if i + 1 == batches:
        break
print(json.dumps({{"rate": n / (time.perf_counter() - t), "base": base, "peak": hwm()}}))
"""


def stream_pass(path: Path, block: int, buffers: int, batches: int, cold: bool, cache: Path) -> dict:
    target = path
    if path.suffix == ".parquet" or path.name.startswith("table"):  # the streamed file is the cache; convert once
        from unimodality.plugins.sources.table import TableSource
        from unimodality.streaming import table_cache

        target = table_cache(TableSource(str(path), feature_prefix="feat_"), cache)
    if cold:
        drop_cache(target)
    else:
        warm_cache(target)
    result = subprocess.run([sys.executable, "-c", STREAM_PASS, str(path), str(block), str(buffers), str(batches),
                             str(cache)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def model_rate(n_features: int, steps: int = 20) -> float:
    """Samples/s an MLP encoder (512, 256) trains on at this batch size: what a loader must feed."""
    import torch

    from unimodality.plugins.encoders.mlp import MLPEncoder

    model = MLPEncoder(n_features, hidden_sizes=[512, 256])
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.rand(BATCH, n_features)
    for i in range(steps + 3):
        if i == 3:
            t = time.perf_counter()
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    return steps * BATCH / (time.perf_counter() - t)


def sequential_read(path: Path, rows: int, dense: bool, seed: int = 0) -> float:
    """Rows/s of reading ``rows`` consecutive CSR rows from a random start with h5py, with no loader in the way:
    in 64 MB ranges (the disk's sequential speed), or with ``dense`` batch by batch into dense float32 batches
    (what a plain training loop over the file in order does: the loader's output, without its shuffling)."""
    with h5py.File(path, "r") as f:
        X = f["X"]
        indptr = X["indptr"][()]
        n_obs, n_var = (int(v) for v in X.attrs["shape"])
        start = int(np.random.default_rng(seed).integers(0, max(1, n_obs - rows)))
        data, indices = X["data"], X["indices"]
        t = time.perf_counter()
        if not dense:
            lo, hi = int(indptr[start]), int(indptr[start + rows])
            step = (64 << 20) // 8
            for a in range(lo, hi, step):
                data[a:min(a + step, hi)], indices[a:min(a + step, hi)]
        else:
            for a in range(start, start + rows, BATCH):
                b = min(a + BATCH, start + rows)
                lo, hi = int(indptr[a]), int(indptr[b])
                batch = np.zeros((b - a, n_var), dtype=np.float32)
                batch[np.repeat(np.arange(b - a), np.diff(indptr[a:b + 1])), indices[lo:hi]] = data[lo:hi]
        return rows / (time.perf_counter() - t)


def huge(args: argparse.Namespace) -> None:
    """A CSR .h5ad of ``--huge-gb`` GB (bigger than this machine's page cache can hold), streamed cold: peak
    RSS (goal < 1 GB) and throughput against sequential reading of the same file (goal >= 0.5x). The file is
    deleted afterwards unless ``--keep``."""
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    nnz_per_row = args.genes // max(1, int(round(1 / args.density)))
    cells = int(np.ceil(args.huge_gb * 1e9 / (nnz_per_row * 8)))
    path = folder / f"huge_{cells}x{args.genes}.h5ad"
    t = time.perf_counter()
    if not path.exists():
        make_csr_fast(path, cells, args.genes, args.density)
    size = path.stat().st_size / 1e9
    print(f"{path.name}: {size:.1f} GB ({cells:,} cells x {args.genes:,} genes, {nnz_per_row} non-zeros per row), "
          f"ready in {time.perf_counter() - t:.0f} s")
    try:
        rows = args.batches * BATCH
        cache = folder / "cache"
        row = {"file_gb": size, "cells": cells, "genes": args.genes, "rows_per_pass": rows}
        drop_cache(path)
        row["sequential_rows_per_s"] = sequential_read(path, rows, dense=False)
        drop_cache(path)
        row["sequential_dense_rows_per_s"] = sequential_read(path, rows, dense=True, seed=1)
        drop_cache(path)
        row["C_cold"] = stream_pass(path, 64, 16, args.batches, cold=True, cache=cache)
        row["D_cold"] = stream_pass(path, 16 * BATCH, 16, args.batches, cold=True, cache=cache)
        row["ratios"] = {
            "C/sequential": row["C_cold"]["rate"] / row["sequential_rows_per_s"],
            "D/sequential": row["D_cold"]["rate"] / row["sequential_rows_per_s"],
            "C/sequential dense batches": row["C_cold"]["rate"] / row["sequential_dense_rows_per_s"],
            "C/D": row["C_cold"]["rate"] / row["D_cold"]["rate"],
        }
        row["C_peak_rss_gb"] = row["C_cold"]["peak"] / 1e9
        print(f"  sequential h5py read {row['sequential_rows_per_s']:>12,.0f} rows/s "
              f"({row['sequential_rows_per_s'] * nnz_per_row * 8 / 1e6:,.0f} MB/s)")
        print(f"  sequential, dense    {row['sequential_dense_rows_per_s']:>12,.0f} rows/s (batches of {BATCH})")
        for name in ("C_cold", "D_cold"):
            r = row[name]
            print(f"  {name:20s} {r['rate']:>12,.0f} rows/s   peak RSS {r['peak'] / 1e9:.2f} GB "
                  f"(baseline {r['base'] / 1e9:.2f} GB)")
        for name, value in row["ratios"].items():
            print(f"  {name:20s} {value:8.2f}")
        print(f"  goals: C peak RSS < 1 GB: {row['C_peak_rss_gb'] < 1.0}; C >= 0.5 x sequential (dense batches): "
              f"{row['ratios']['C/sequential dense batches'] >= 0.5}")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            print(f"  deleted {path}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "loader_huge.json"
    out.write_text(json.dumps(row, indent=2))
    print(f"\nwritten {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/unimodality-bench")
    parser.add_argument("--cells", type=int, default=260_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batches", type=int, default=400, help="batches per streaming pass")
    parser.add_argument("--quick", action="store_true", help="small files (a smoke run, not the goal's 2 GB)")
    parser.add_argument("--cases", nargs="+", default=["csr", "dense", "parquet", "csr_sharded", "parquet_sharded"])
    parser.add_argument("--huge-gb", type=float, default=None,
                        help="the bigger-than-memory mode: stream a generated CSR file of this many GB (e.g. 20)")
    parser.add_argument("--keep", action="store_true", help="with --huge-gb: keep the file (deleted by default)")
    args = parser.parse_args()
    if args.huge_gb:
        return huge(args)
    if args.quick:
        args.cells, args.genes, args.batches = 20_000, 2_000, 50
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"csr": folder / f"csr_{args.cells}x{args.genes}_autochunks.h5ad",
             "dense": folder / f"dense_{args.cells // 4}x{args.genes // 10}.h5ad",
             "parquet": folder / f"table_{args.cells // 2}x{args.genes // 20}.parquet"}
    t = time.perf_counter()
    if not files["csr"].exists():
        make_csr(files["csr"], args.cells, args.genes, args.density)
    if not files["dense"].exists():
        make_dense(files["dense"], args.cells // 4, args.genes // 10)
    if not files["parquet"].exists():
        make_parquet(files["parquet"], args.cells // 2, args.genes // 20)
    files["csr_sharded"] = files["csr"].with_name(files["csr"].stem + "_4plates")
    files["parquet_sharded"] = files["parquet"].with_name(files["parquet"].stem + "_8parts")
    if not files["csr_sharded"].exists():
        split_csr(files["csr"], files["csr_sharded"], 4)
    if not files["parquet_sharded"].exists():
        split_parquet(files["parquet"], files["parquet_sharded"], 8)
    files = {kind: path for kind, path in files.items() if kind in args.cases}
    size = {kind: sum(f.stat().st_size for f in files_of(path)) / 1e9 for kind, path in files.items()}
    print(f"data ready in {time.perf_counter() - t:.0f} s: " + ", ".join(f"{k} {v:.2f} GB" for k, v in size.items()))

    cache = folder / "cache"
    results = {}
    for kind, path in files.items():
        first = files_of(path)[0]
        n_features = H5Store(first, "X").n_features if first.suffix == ".h5ad" else args.genes // 20
        row = {"file_gb": size[kind], "n_features": int(n_features)}
        buffer_rows = 16 * BATCH
        row["C_warm"] = stream_pass(path, 64, 16, args.batches, cold=False, cache=cache)
        row["C_cold"] = stream_pass(path, 64, 16, args.batches, cold=True, cache=cache)
        row["D_warm"] = stream_pass(path, buffer_rows, 16, args.batches, cold=False, cache=cache)
        row["D_cold"] = stream_pass(path, buffer_rows, 16, args.batches, cold=True, cache=cache)
        single = results.get(kind.removesuffix("_sharded"))
        if kind.endswith("_sharded"):
            if single is not None:  # the same rows in one file, measured in this run
                row["ratios_to_single_file"] = {name: row[name]["rate"] / single[name]["rate"]
                                                for name in ("C_warm", "C_cold", "D_warm", "D_cold")}
        elif path.suffix == ".h5ad":
            n_single = 300 if kind == "csr" else 3000
            row["B_h5py"] = one_sample_h5py(path, n_single)
            row["B_anndata"] = one_sample_anndata(path, n_single if kind == "dense" else 100)
            row["A_in_memory"], row["A_bytes"] = in_memory(path, 50)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=[f"feat_{j:04d}" for j in range(n_features)])
            rng = np.random.default_rng(0)
            t = time.perf_counter()
            for _ in range(20):
                table.take(pa.array(rng.integers(0, table.num_rows, 64)))
            row["B_arrow_take"] = 20 * 64 / (time.perf_counter() - t)
            del table
        row["model_rate"] = model_rate(int(n_features))
        dense_buffer = buffer_rows * n_features * 4
        row["buffer_bytes_dense"] = dense_buffer
        c = row["C_warm"]
        row["ratios"] = {
            "C/D warm": c["rate"] / row["D_warm"]["rate"],
            "C/D cold": row["C_cold"]["rate"] / row["D_cold"]["rate"],
            "C/model": c["rate"] / row["model_rate"],
            "C peak-base / dense buffer": (c["peak"] - c["base"]) / dense_buffer,
        }
        if "B_h5py" in row:
            row["ratios"]["C/B(h5py)"] = c["rate"] / row["B_h5py"]
            row["ratios"]["C/B(anndata)"] = c["rate"] / row["B_anndata"]
            row["ratios"]["C/A"] = c["rate"] / row["A_in_memory"]
        results[kind] = row
        print(f"\n{kind}: {path.name} ({row['file_gb']:.2f} GB, {n_features} features)")
        for name, value in row.get("ratios_to_single_file", {}).items():
            print(f"  {name} / single file {value:8.2f}")
        for name in ("A_in_memory", "B_h5py", "B_anndata", "B_arrow_take"):
            if name in row:
                print(f"  {name:14s} {row[name]:>12,.0f} samples/s")
        for name in ("C_warm", "C_cold", "D_warm", "D_cold"):
            r = row[name]
            print(f"  {name:14s} {r['rate']:>12,.0f} samples/s   peak RSS over baseline "
                  f"{(r['peak'] - r['base']) / 1e6:7.1f} MB")
        print(f"  {'model':14s} {row['model_rate']:>12,.0f} samples/s (MLP 512-256 training, batch {BATCH})")
        for name, value in row["ratios"].items():
            print(f"  {name:28s} {value:8.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("loader_quick.json" if args.quick else "loader.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
