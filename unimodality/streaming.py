"""Streaming rows of files larger than memory: contiguous block reads, a shuffle buffer, disjoint shards.

Reading one random row at a time from a large ``.h5ad`` is slow (a CSR row through anndata's backed mode
costs milliseconds) and reading the whole file needs the file's size in RAM. Here a training epoch is
planned as a permutation of contiguous *blocks* of rows; each process (rank) takes an equal share of the
blocks, and rows are read a *buffer* (``buffer_batches`` batches) at a time with one read per contiguous
run, then shuffled inside the buffer. Memory stays bounded by about one buffer per DataLoader worker.

Stores read row ranges of one file: `H5Store` reads ``X``/a layer/an ``obsm`` of an ``.h5ad``
straight from its HDF5 datasets (dense, or CSR keeping only ``indptr`` in RAM), `ZarrStore` the same
from a ``.zarr`` store; `NpyStore` reads a row-major ``.npy`` cache that tables (parquet, CSV) are
converted to once, because Arrow has no fast random row access. The cache is rebuilt when the source file
or its feature selection changes. `ConcatStore` reads the files of a source of several ``.h5ad``
files as one, with a bounded number of them open.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset, DistributedSampler

from unimodality.batch import GROUP, check_sizes, take_rows
from unimodality.files import atomic_write
from unimodality.sources import (
    DataError,
    Matrix,
    ModalitySource,
    bad_entries,
    check_feature_columns,
    feature_columns,
    features_block,
    is_parquet,
    non_finite_error,
    parquet_files,
)

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted tables are cached: ``$UNIMODALITY_CACHE_DIR`` or ``~/.cache/unimodality/streaming``."""
    root = os.environ.get("UNIMODALITY_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "unimodality" / "streaming"


def cache_folder(cache_dir: str | Path | None = None) -> Path:
    """The cache folder (``cache_dir``, else `cache_root`), created if missing; refused with a message
    when it cannot be created or written."""
    folder = Path(cache_dir) if cache_dir is not None else cache_root()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only filesystem, a parent that is a file, no permission
        raise DataError(_unwritable(folder, error.strerror or str(error))) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(_unwritable(folder, "permission denied"))
    return folder


def _unwritable(folder: Path, reason: str) -> str:
    return (f"streaming cache folder {folder} is not writable ({reason}); choose another with --data.cache_dir "
            "or the UNIMODALITY_CACHE_DIR environment variable")


# -- stores: row ranges of one file ---------------------------------------------------------------------

class RowStore:
    """Raw feature rows of one file (the source's own column order, before transforms)."""

    n_rows: int
    n_features: int
    #: a CSR store's row pointers (None for dense stores)
    indptr: np.ndarray | None = None

    def read_range(self, start: int, stop: int) -> Matrix:
        return self.read_runs(np.array([start]), np.array([max(stop, start)]))

    def read_rows(self, rows: np.ndarray, max_gap: int = 16) -> Matrix:
        """Rows ``rows`` (sorted, unique) with one read per run of nearby rows.

        Rows closer than ``max_gap`` are read together (and the rows between them dropped): one larger
        read is cheaper than several small ones.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if np.any(np.diff(rows) <= 0):
            raise ValueError("read_rows needs sorted, unique rows")
        if len(rows) == 0:
            return self.read_range(0, 0)
        breaks = np.flatnonzero(np.diff(rows) > max_gap) + 1
        firsts = rows[np.r_[0, breaks]]
        stops = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
        block = self.read_runs(firsts, stops)
        if stops.sum() - firsts.sum() == len(rows):  # no gaps: the block is the rows
            return block
        offsets = np.cumsum(np.r_[0, stops - firsts])[:-1]
        run_of_row = np.searchsorted(firsts, rows, side="right") - 1
        return block[offsets[run_of_row] + rows - firsts[run_of_row]]

    def read_runs(self, starts: np.ndarray, stops: np.ndarray) -> Matrix:
        """Row ranges ``starts[i]:stops[i]`` (increasing, disjoint), one after the other, read in place."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles (a forked worker reopens its own)."""


class H5Store(RowStore):
    """Rows of a dense or CSR matrix inside an ``.h5ad`` (``X``, ``layers/<name>``, ``obsm/<name>``).

    The file is opened lazily and once per process: HDF5 handles must not cross a fork into workers.
    """

    def __init__(self, file: Path, key: str) -> None:
        self.file = Path(file)
        self.key = key
        self._handle: Any = None
        self._datasets: dict[str, Any] | None = None
        self._pid: int | None = None
        element = self._element()
        if self._is_group(element):
            encoding = element.attrs.get("encoding-type", "")
            if encoding != "csr_matrix":
                raise DataError(
                    f"{self.file}: {key} is stored as {encoding or 'an unknown encoding'}; streaming reads rows, "
                    "so it needs CSR (convert with adata.X = scipy.sparse.csr_matrix(adata.X)) or dense"
                )
            self.n_rows, self.n_features = (int(v) for v in element.attrs["shape"])
            self.indptr = element["indptr"][()].astype(np.int64)  # small: one integer per row
        else:
            self.n_rows, self.n_features = element.shape

    def _open_root(self) -> Any:
        return h5py.File(self.file, "r")

    @staticmethod
    def _is_group(element: Any) -> bool:
        return isinstance(element, h5py.Group)

    def _element(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            self._handle = self._open_root()
            self._pid = os.getpid()
            element = self._handle[self.key]
            # dataset handles, looked up once: a lookup costs as much as a small read
            self._datasets = {"data": element["data"], "indices": element["indices"]} if self._is_group(
                element) else {"X": element}
        return self._handle[self.key]

    @property
    def is_open(self) -> bool:
        return self._handle is not None and self._pid == os.getpid()

    def _read(self, name: str, starts: list[int], stops: list[int], out: np.ndarray) -> None:
        """Ranges ``starts[i]:stops[i]`` (rows, or CSR entries) of a dataset, one after the other, into ``out``
        with one HDF5 read of a union of hyperslabs: h5py's indexing costs a few hundred microseconds of
        Python per call, more than a 64-row read itself, and HDF5 merges the ranges' I/O."""
        if not self.is_open:
            self._element()
        dataset = self._datasets[name]
        trailing = tuple(dataset.shape[1:])
        file_space = dataset.id.get_space()
        file_space.select_none()
        for a, b in zip(starts, stops):
            if b > a:
                file_space.select_hyperslab((a,) + (0,) * len(trailing), (b - a, *trailing), op=h5py.h5s.SELECT_OR)
        if out.size:
            dataset.id.read(h5py.h5s.create_simple(out.shape), file_space, out)

    def entries(self, starts: np.ndarray, stops: np.ndarray) -> int:
        """How many stored values the runs hold: rows x features (dense) or non-zeros (CSR)."""
        if self.indptr is None:
            return int((stops - starts).sum()) * self.n_features
        return int((self.indptr[stops] - self.indptr[starts]).sum())

    def row_lengths(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Non-zeros per row of the runs, one row after the other (CSR)."""
        if not len(starts):
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(self.indptr[a:b + 1]) for a, b in zip(starts, stops)])

    def read_into(self, starts: np.ndarray, stops: np.ndarray, values: np.ndarray,
                  indices: np.ndarray | None = None) -> None:
        """The runs' rows into ``values`` (dense: rows x features), or their non-zeros into ``values`` and
        their column indices into ``indices`` (CSR): arrays the caller allocated, so that several files'
        runs fill one buffer without a copy."""
        if self.indptr is None:
            self._read("X", starts.tolist(), stops.tolist(), values)
            return
        lo, hi = self.indptr[starts].tolist(), self.indptr[stops].tolist()
        self._read("data", lo, hi, values)
        self._read("indices", lo, hi, indices)

    def read_runs(self, starts: np.ndarray, stops: np.ndarray) -> Matrix:
        n = int((stops - starts).sum())
        if self.indptr is None:
            out = np.empty((n, self.n_features), dtype=np.float32)
            self.read_into(starts, stops, out)
            return out
        nnz = self.entries(starts, stops)
        data, indices = np.empty(nnz, dtype=np.float32), np.empty(nnz, dtype=_index_dtype(nnz, self.n_features))
        self.read_into(starts, stops, data, indices)
        return _csr(data, indices, self.row_lengths(starts, stops), self.n_features)

    def close(self) -> None:
        if self.is_open and hasattr(self._handle, "close"):
            self._handle.close()
        self._handle = self._datasets = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = state["_datasets"] = None  # reopened in the receiving process
        return state


class ZarrStore(H5Store):
    """Rows of a dense or CSR matrix inside a ``.zarr`` AnnData store, read range by range through zarr
    (which reads whole chunks: rows are read a block at a time, as for ``.h5ad``)."""

    def _open_root(self) -> Any:
        import zarr

        return zarr.open_group(str(self.file), mode="r")

    @staticmethod
    def _is_group(element: Any) -> bool:
        return not hasattr(element, "dtype") and hasattr(element, "keys")

    def _read(self, name: str, starts: list[int], stops: list[int], out: np.ndarray) -> None:
        if not self.is_open:
            self._element()
        array, at = self._datasets[name], 0
        for a, b in zip(starts, stops):
            if b > a:
                out[at:at + b - a] = array[a:b]
                at += b - a


def _index_dtype(nnz: int, n_features: int) -> type:
    # 32-bit column indices and row pointers when they fit (they nearly always do within a buffer): half the
    # memory of 64-bit ones, and scipy keeps them as they are instead of copying to unify
    return np.int32 if max(nnz, n_features) < 2**31 else np.int64


def _csr(data: np.ndarray, indices: np.ndarray, row_lengths: np.ndarray, n_features: int) -> sp.csr_matrix:
    indptr = np.zeros(len(row_lengths) + 1, dtype=indices.dtype)
    np.cumsum(row_lengths, out=indptr[1:])
    return sp.csr_matrix((data, indices, indptr), shape=(len(row_lengths), n_features))


class ConcatStore(RowStore):
    """The rows of several stores (the files of one source) one after the other.

    At most ``max_open`` files are open at once, the least recently read closed first, so a source of
    thousands of files holds a bounded number of handles (each HDF5 file keeps its own metadata cache).
    """

    def __init__(self, stores: list[H5Store], max_open: int = 8) -> None:
        if not stores:
            raise ValueError("ConcatStore needs at least one store")
        widths = {store.n_features for store in stores}
        if len(widths) > 1:
            raise DataError(f"the files of one source have different numbers of features: {sorted(widths)}")
        self.stores = stores
        self.max_open = max_open
        self.n_features = stores[0].n_features
        self.offsets = np.cumsum([0] + [store.n_rows for store in stores])
        self.n_rows = int(self.offsets[-1])
        self._recent: list[int] = []  # open stores, least recently read first
        for store in stores:
            store.close()
        sparse = [store.indptr is not None for store in stores]
        if any(sparse) and not all(sparse):
            raise DataError("the files of one source mix dense and sparse matrices; store them alike")
        self._sparse = all(sparse)

    def _use(self, k: int) -> H5Store:
        if k in self._recent:
            self._recent.remove(k)
        elif len(self._recent) >= self.max_open:
            self.stores[self._recent.pop(0)].close()
        self._recent.append(k)
        return self.stores[k]

    def _pieces(self, starts: np.ndarray, stops: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """The runs cut at file boundaries: (file number, its local starts, stops), in row order."""
        pieces = []
        if not len(starts):
            return pieces
        first = int(np.searchsorted(self.offsets, starts[0], side="right") - 1)
        last = int(np.searchsorted(self.offsets, max(stops[-1] - 1, starts[0]), side="right") - 1)
        for k in range(first, min(last, len(self.stores) - 1) + 1):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            a, b = np.clip(starts, lo, hi), np.clip(stops, lo, hi)
            inside = b > a
            if inside.any():
                pieces.append((k, a[inside] - lo, b[inside] - lo))
        return pieces

    def read_runs(self, starts: np.ndarray, stops: np.ndarray) -> Matrix:
        # every file's runs read straight into one buffer: no per-file block, no copy to stack them
        pieces = self._pieces(np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64))
        sizes = [self.stores[k].entries(a, b) for k, a, b in pieces]
        if not self._sparse:
            out = np.empty((sum(sizes) // max(self.n_features, 1), self.n_features), dtype=np.float32)
            at = 0
            for (k, a, b), size in zip(pieces, sizes):
                rows = size // max(self.n_features, 1)
                self._use(k).read_into(a, b, out[at:at + rows])
                at += rows
            return out
        data = np.empty(sum(sizes), dtype=np.float32)
        indices = np.empty(sum(sizes), dtype=_index_dtype(sum(sizes), self.n_features))
        at = 0
        for (k, a, b), size in zip(pieces, sizes):
            self._use(k).read_into(a, b, data[at:at + size], indices[at:at + size])
            at += size
        lengths = [self.stores[k].row_lengths(a, b) for k, a, b in pieces]
        return _csr(data, indices, np.concatenate(lengths) if lengths else np.zeros(0, np.int64), self.n_features)

    def close(self) -> None:
        for store in self.stores:
            store.close()
        self._recent = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_recent"] = []  # the stores reopen lazily in the receiving process
        return state


class NpyStore(RowStore):
    """Rows of a row-major float32 ``.npy`` file, read with ``pread``.

    Not a memory map on purpose: mapped pages count in the process's resident memory until the kernel
    reclaims them, so walking a 20 GB map looks like a 20 GB process to a cluster's memory limit.
    """

    def __init__(self, file: Path) -> None:
        self.file = Path(file)
        with open(self.file, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or dtype != np.float32 or len(shape) != 2:
            raise DataError(f"{self.file}: expected a C-ordered float32 matrix, got {dtype} {shape}")
        self.n_rows, self.n_features = shape
        self.row_bytes = self.n_features * 4
        self._fd: int | None = None
        self._pid: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.file, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read_runs(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        out = np.empty((int((stops - starts).sum()), self.n_features), dtype=np.float32)
        view, at = memoryview(out).cast("B"), 0
        for a, b in zip(starts.tolist(), stops.tolist()):
            size = (b - a) * self.row_bytes
            if os.preadv(self._descriptor(), [view[at:at + size]], self.offset + a * self.row_bytes) != size:
                raise DataError(f"{self.file}: truncated cache (rows {a}-{b} missing); delete it to rebuild")
            at += size
        return out

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = None
        return state


#: raised when what a cache holds changes (2: feature columns checked as in memory, NaN and inf refused)
CACHE_FORMAT = 2


def table_cache(source: ModalitySource, cache_dir: str | Path | None = None, chunk_rows: int = 65536) -> Path:
    """The ``.npy`` cache of a table source's feature columns, built (atomically) if missing or stale.

    The cache is keyed by the file's path and valid while the file's size and modification time and the
    selected feature names are those it was built from. The columns get the checks of a table read into
    memory: numeric types only, and no NaN or infinite value (nulls included), reported with file rows.
    """
    file = source.file.resolve()
    names = source.feature_names()
    stats = [p.stat() for p in parquet_files(file)] if file.is_dir() else [file.stat()]
    fingerprint = {"file": str(file), "size": sum(s.st_size for s in stats),
                   "mtime_ns": max(s.st_mtime_ns for s in stats), "n_files": len(stats),
                   "features": hashlib.sha1("\n".join(names).encode()).hexdigest(), "n_features": len(names),
                   "format": CACHE_FORMAT}
    folder = cache_folder(cache_dir)
    stem = f"{file.stem}-{hashlib.sha1(str(file).encode()).hexdigest()[:12]}"
    target, meta = folder / f"{stem}.npy", folder / f"{stem}.json"
    if target.is_file() and _read_fingerprint(meta) == fingerprint:
        return target
    log.info("converting the feature columns of %s to a row-major cache %s (once)", file, target)
    try:
        atomic_write(target, lambda tmp: _write_cache(source, file, names, tmp, chunk_rows))
        # after the matrix: a fingerprint never describes a matrix not yet in place
        atomic_write(meta, lambda tmp: tmp.write_text(json.dumps(fingerprint)))
    except PermissionError as error:  # e.g. a network filesystem refusing what os.access allowed
        if error.filename is None or Path(error.filename).parent != folder:
            raise
        raise DataError(_unwritable(folder, error.strerror or str(error))) from None
    return target


def _read_fingerprint(meta: Path) -> dict[str, Any] | None:
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):  # missing, or unreadable: the cache is rebuilt
        return None


def _write_cache(source: ModalitySource, file: Path, names: list[str], tmp: Path, chunk_rows: int) -> None:
    """Write the ``.npy`` with plain writes, chunk by chunk: a full disk then fails a write (reported),
    where writing through a memory map kills the process with SIGBUS. Messages name ``source.file`` as
    the in-memory reads do."""
    import pyarrow.parquet as pq

    if is_parquet(file):
        files = [pq.ParquetFile(path) for path in parquet_files(file)]  # a sharded table: its files in order
        check_feature_columns(source.file, files[0].schema_arrow, names)
        n_rows = sum(f.metadata.num_rows for f in files)
        columns = feature_columns(names, files[0].schema_arrow)
        batches = (batch for f in files for batch in f.iter_batches(batch_size=chunk_rows, columns=columns))
        blocks = _blocks(source.file, batches, names)
    else:  # text tables are read whole anyway (and checked by the source)
        n_rows = source.num_rows()
        blocks = iter([source._read_raw(None)])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (n_rows, len(names))}
    bad, bad_rows, examples, start = 0, 0, [], 0
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float32).reshape(-1, len(names))
            rows, cols = bad_entries(block, None, np.isfinite)
            if len(rows):  # counted over the whole file, as when it is read into memory
                bad, bad_rows = bad + len(rows), bad_rows + len(np.unique(rows))
                examples += [(start + r, names[c]) for r, c in zip(rows[:5], cols[:5])][:5 - len(examples)]
            elif not bad:
                f.write(block.data)
            start += len(block)
    if bad:
        raise non_finite_error(source.file, bad, bad_rows, examples)
    if start != n_rows:
        raise DataError(f"{source.file}: {start} rows read, {n_rows} expected; the file changed while it was read")


def _blocks(file: Path, batches: Iterator[Any], names: list[str]) -> Iterator[np.ndarray]:
    """Features ``names`` of each record batch (scalar columns and list-column elements), as the in-memory
    read makes them."""
    import pyarrow as pa

    start = 0
    for batch in batches:
        yield features_block(file, pa.Table.from_batches([batch]), names, first_row=start)
        start += batch.num_rows


def open_store(source: ModalitySource, cache_dir: str | Path | None = None) -> RowStore:
    """A row store over a vector source's file: the source's own (``.h5ad`` read in place, tables through
    `table_cache`)."""
    if source.input_kind != "vectors":
        raise DataError(f"{source.file}: streaming reads feature vectors; {type(source).__name__} gives "
                        f"{source.input_kind} (keep it in memory)")
    return source.row_store(cache_dir)


# -- the epoch plan ------------------------------------------------------------------------------------

def epoch_plan(
    n: int, batch_size: int, block_size: int, buffer_batches: int, seed: int, epoch: int, rank: int, world: int,
) -> list[np.ndarray]:
    """Positions (into ``n`` rows) that one rank reads this epoch, as shuffle buffers.

    Blocks of ``block_size`` consecutive rows are permuted (from ``seed`` and ``epoch``, the same on every
    rank); rank ``r`` takes the ``r``-th equal share of the permuted rows, so ranks are disjoint and have
    the same number of batches. The ``n mod (world * batch_size)`` rows left over are dropped, different
    ones each epoch. Each buffer holds ``buffer_batches`` batches (the last may hold fewer), its rows
    shuffled.
    """
    per_rank = (n // (world * batch_size)) * batch_size
    rng = np.random.default_rng([seed, epoch])
    starts = np.arange(0, n, block_size)[rng.permutation(math.ceil(n / block_size))]
    order = np.concatenate([np.arange(s, min(s + block_size, n)) for s in starts]) if n else np.zeros(0, np.int64)
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    size = buffer_batches * batch_size
    buffers = [mine[i:i + size] for i in range(0, per_rank, size)]
    for k, buffer in enumerate(buffers):
        np.random.default_rng([seed, epoch, rank, k]).shuffle(buffer)
    return buffers


class BufferSampler(DistributedSampler):
    """Yields ``(epoch, buffer, batch)`` for this rank, ordered so DataLoader worker ``w`` gets whole buffers.

    A DataLoader hands the ``i``-th item to worker ``i mod num_workers``; interleaving buffers this way
    lets each worker read a buffer once and serve all its batches. A ``DistributedSampler`` so Lightning
    neither wraps it nor replaces it, and calls ``set_epoch``.
    """

    def __init__(self, dataset: StreamingDataset, num_replicas: int, rank: int, num_workers: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=dataset.seed)
        self.dataset = dataset
        self.workers = max(num_workers, 1)

    def _batches_per_buffer(self) -> list[int]:
        d = self.dataset
        per_rank = (len(d.rows) // (self.num_replicas * d.batch_size)) * d.batch_size
        size = d.buffer_batches * d.batch_size
        return [min(size, per_rank - i) // d.batch_size for i in range(0, per_rank, size)]

    def __len__(self) -> int:
        return sum(self._batches_per_buffer())

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        counts = self._batches_per_buffer()
        # buffers go to workers round-robin; walk the workers' queues in the order the DataLoader asks them
        queues = [[(k, j) for k in range(w, len(counts), self.workers) for j in range(counts[k])]
                  for w in range(self.workers)]
        for i in range(max((len(q) for q in queues), default=0)):
            for queue in queues:
                if i < len(queue):
                    yield (self.epoch, *queue[i])
        # a worker whose queue ran out gets nothing more: DataLoader then asks the next worker


class ReadAhead:
    """One read running in a thread while the caller works on the result of the one before (cold files,
    network file systems): the disk and the model work at the same time.

    A read is known by a key; `take` returns the pending read's result when it is for that key (its error,
    if any, raised there, where a read in place would have raised it) and otherwise reads in place. One
    thread per process: a thread does not survive a fork, and none is pickled to a DataLoader worker.
    """

    def __init__(self) -> None:
        self._pending: tuple[Any, Future] | None = None
        self._executor: tuple[int, ThreadPoolExecutor] | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def start(self, key: Any, read: Callable[..., Any], *args: Any) -> None:
        """Start ``read(*args)``, the result for ``key``, in the thread (a read still pending is dropped)."""
        self.discard()
        if self._executor is None or self._executor[0] != os.getpid():
            self._executor = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="unimodality-read-ahead"))
        self._pending = (key, self._executor[1].submit(read, *args))

    def take(self, key: Any, read: Callable[..., Any], *args: Any) -> Any:
        """The result for ``key``: the pending read's if it is that one, else ``read(*args)`` now."""
        if self._pending is not None and self._pending[0] == key:
            future, self._pending = self._pending[1], None
            return future.result()
        self.discard()
        return read(*args)

    def discard(self) -> None:
        """Drop the pending read, once it no longer runs (its store may be reused or closed next)."""
        if self._pending is not None:
            self._pending[1].cancel()
            wait([self._pending[1]])
            self._pending = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_pending": None, "_executor": None}  # a thread and its pending read stay in this process


@dataclass
class Partner:
    """A modality paired with the streamed one: a replicate of each example's key is drawn from it.

    ``members`` maps each key (its index among the split's keys) to rows: file rows of ``store`` when the
    modality is read from disk, positions in ``features`` when it is held in memory (e.g. molecule graphs).
    """

    members: Any
    source: ModalitySource
    store: RowStore | None = None
    features: Any = None


class StreamingDataset(Dataset):
    """Training examples read from disk a buffer at a time.

    Every row of the streamed modality is an example once per epoch (up to the remainder that keeps ranks
    equal), paired, when there are partners, with a replicate of the same key drawn from each of them
    (from ``seed``, the epoch and the buffer: repeatable). Items are ``(epoch, buffer, batch)`` from a
    `BufferSampler`; a worker keeps the buffer it is serving and reads the next when asked for it.

    Args:
        name: the streamed modality's name (its key in batches).
        source: its source (transform and checks); ``store`` reads its rows.
        rows: the file rows of this split, sorted.
        groups: the integer group id (key) of each row, what batches carry as ``group``.
        batch_size: rows per batch.
        block_size: consecutive rows read and shuffled as a unit.
        buffer_batches: batches per shuffle buffer.
        seed: seed of the epoch plans and partner draws.
        partners: other modalities by name.
        key_index: each row's key as an index into the partners' ``members`` (needed with partners).
    """

    def __init__(
        self,
        name: str,
        source: ModalitySource,
        store: RowStore,
        rows: np.ndarray,
        groups: np.ndarray,
        batch_size: int,
        block_size: int = 64,
        buffer_batches: int = 16,
        seed: int = 0,
        partners: dict[str, Partner] | None = None,
        key_index: np.ndarray | None = None,
    ) -> None:
        check_sizes("StreamingDataset", batch_size=batch_size, block_size=block_size, buffer_batches=buffer_batches)
        self.name = name
        self.source = source
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.groups = np.asarray(groups, dtype=np.int64)
        self.batch_size = batch_size
        self.block_size = block_size
        self.buffer_batches = buffer_batches
        self.seed = seed
        self.partners = partners or {}
        self.key_index = key_index
        if self.partners and key_index is None:
            raise ValueError("StreamingDataset: partners need key_index")
        self.rank, self.world = 0, 1
        self._plan: tuple[int, list[np.ndarray]] | None = None
        self._buffer: tuple[tuple[int, int], dict[str, Any]] | None = None
        #: the next buffer of this process, read in a thread while the current one is served
        self._ahead = ReadAhead()

    def __len__(self) -> int:
        return len(self.rows)

    def shard(self, rank: int, world: int) -> None:
        """Read the share of rank ``rank`` of ``world`` processes."""
        self.rank, self.world = rank, world
        self._plan = self._buffer = None
        self._ahead.discard()

    def plan(self, epoch: int) -> list[np.ndarray]:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_plan(len(self.rows), self.batch_size, self.block_size, self.buffer_batches,
                                            self.seed, epoch, self.rank, self.world))
        return self._plan[1]

    def _read_buffer(self, epoch: int, k: int) -> dict[str, Any]:
        positions = self.plan(epoch)[k]  # shuffled
        # read in file order, then serve in the shuffled order: no second copy of the buffer
        rows, where = np.unique(self.rows[positions], return_inverse=True)
        buffer: dict[str, Any] = {
            self.name: _Deferred(self.source.finish(self.store.read_rows(rows), rows), where),
            GROUP: self.groups[positions],
        }
        rng = np.random.default_rng([self.seed, epoch, self.rank, k, 1])
        for name, partner in self.partners.items():
            keys, m = self.key_index[positions], partner.members
            drawn = m.rows[m.offsets[keys] + (rng.random(len(keys)) * m.counts()[keys]).astype(np.int64)]
            if partner.store is not None:
                unique, where = np.unique(drawn, return_inverse=True)
                buffer[name] = _Deferred(partner.source.finish(partner.store.read_rows(unique), unique), where)
            else:
                buffer[name] = _Deferred(partner.features, drawn)
        return buffer

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        epoch, k, j = item
        if self._buffer is None or self._buffer[0] != (epoch, k):
            self._buffer = None  # let the old buffer go before reading the next
            self._buffer = ((epoch, k), self._ahead.take((epoch, k), self._read_buffer, epoch, k))
            self._read_ahead(epoch, k)
        span = slice(j * self.batch_size, (j + 1) * self.batch_size)
        batch = {}
        for name, value in self._buffer[1].items():
            if name == GROUP:
                batch[name] = torch.from_numpy(value[span])
            else:
                batch[name] = take_rows(value.features, value.rows[span])
        return batch

    def _read_ahead(self, epoch: int, k: int) -> None:
        """Start reading the next buffer this process serves (buffers go to DataLoader workers round-robin:
        buffer ``k + workers``): two buffers are held, the one served and the next."""
        info = torch.utils.data.get_worker_info()
        following = k + (info.num_workers if info is not None else 1)
        if following < len(self.plan(epoch)):
            self._ahead.start((epoch, following), self._read_buffer, epoch, following)


@dataclass
class _Deferred:
    """Rows of a buffer or of an in-memory modality, taken batch by batch (graphs are batched when served)."""

    features: Any
    rows: np.ndarray
