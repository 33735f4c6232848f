"""Modality sources: one file holding a modality's rows (metadata columns + a feature matrix).

``AnnDataSource`` reads ``.h5ad`` (``X``, a layer or an ``obsm`` key; dense or CSR) and ``TableSource``
reads parquet or CSV (metadata + numeric feature columns). Both read only the rows they are asked for,
apply a per-row transform, align features by name when asked, and refuse bad input with an error that
names the file, column or row at fault.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from unimodality.config import RecordsInitArgs, class_path
from unimodality.errors import DataError
from unimodality.example_data import resolve_path

Matrix = np.ndarray | sp.csr_matrix
Transform = Literal["none", "log1p", "normalize_log1p", "clr"]


class ModalitySource(RecordsInitArgs):
    """Base class of modality sources.

    Args:
        path: the file (``example://...`` names a file of the bundled example data).
        key_columns: columns holding the pairing key, in the order of the datamodule's ``keys``; by
            default the datamodule's key names themselves.
        transform: per-row transform applied after reading (and after aligning features by name):
            ``log1p``; ``normalize_log1p`` (scale each row to 10,000 counts, then log1p: counts);
            ``clr`` (centred log-ratio per row: protein counts).
    """

    format: str = ""
    suffixes: tuple[str, ...] = ()
    #: what ``read_features`` gives a model: ``vectors`` (a rows x features matrix), or another kind whose
    #: rows the returned object's ``take(rows)`` turns into a batch (``graphs``, ``images``)
    input_kind: str = "vectors"

    def __init__(self, path: str, key_columns: list[str] | None = None, transform: Transform = "none") -> None:
        if transform not in ("none", "log1p", "normalize_log1p", "clr"):
            raise ValueError(f"unknown transform {transform!r}; expected none, log1p, normalize_log1p or clr")
        self.path = path
        self.key_columns = key_columns
        self.transform = transform
        self._feature_names: list[str] | None = None

    @property
    def file(self) -> Path:
        file = resolve_path(self.path)
        if not file.is_file():
            raise FileNotFoundError(f"{type(self).__name__}: file not found: {file}")
        check_readable(file)
        return file

    # -- what subclasses implement ------------------------------------------------------------------
    def _read_feature_names(self) -> list[str]:
        raise NotImplementedError

    def read_metadata(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The metadata table (all columns, or those named; a missing one is an error)."""
        raise NotImplementedError

    def _read_raw(self, rows: np.ndarray | None) -> Matrix:
        """Features of ``rows`` (all rows when None) in the file's own column order, as float32."""
        raise NotImplementedError

    def num_rows(self) -> int:
        raise NotImplementedError

    def usable_rows(self) -> np.ndarray | None:
        """Boolean mask of the rows that can be used, or None when all can (e.g. dropped invalid SMILES)."""
        return None

    # -- shared behaviour -------------------------------------------------------------------------
    def feature_names(self) -> list[str]:
        if self._feature_names is None:
            names = [str(n) for n in self._read_feature_names()]
            duplicated = pd.Index(names)[pd.Index(names).duplicated()].unique().tolist()
            if duplicated:
                raise DataError(
                    f"{self.file}: {len(duplicated)} feature names occur more than once "
                    f"(e.g. {', '.join(map(repr, duplicated[:5]))}); feature names must be unique"
                )
            if not names:
                raise DataError(f"{self.file}: no feature columns selected")
            self._feature_names = names
        return self._feature_names

    def read_features(
        self, rows: np.ndarray | None = None, align_to: list[str] | None = None, empty_rows: str = "error"
    ) -> Matrix:
        """Read, align by name to ``align_to`` (missing features are zeros), transform and check.

        All-zero rows cannot be normalised by ``normalize_log1p``/``clr``: an error for training data,
        ``empty_rows="warn"`` when embedding (they get an embedding, with a warning counting them).
        """
        if align_to is None:
            return self.finish(self._read_raw(rows), rows, empty_rows=empty_rows)
        return self.finish(self._read_aligned(rows, align_to), rows, align_to, empty_rows=empty_rows)

    def finish(
        self, matrix: Matrix, rows: np.ndarray | None, names: list[str] | None = None, empty_rows: str = "error"
    ) -> Matrix:
        """Check raw rows (read here or by a streaming store) for non-finite values and, before a log
        transform, negative ones (an error when embedding too: the log of a value in (-1, 0) is finite, so
        nothing would show later); then transform them."""
        names = self.feature_names() if names is None else names
        self._check_finite(matrix, rows, names, "")
        if self.transform != "none":
            self._check_non_negative(matrix, rows, names)
        if self.transform in ("normalize_log1p", "clr"):
            self._check_not_empty(matrix, rows, empty_rows)
        matrix = apply_transform(matrix, self.transform, inplace=True)  # the rows were just read: ours to change
        self._check_finite(matrix, rows, names, f" after the {self.transform!r} transform")
        return matrix

    def _read_aligned(self, rows: np.ndarray | None, align_to: list[str]) -> Matrix:
        return align_features(self._read_raw(rows), self.feature_names(), align_to, self.file)

    def describe(self) -> dict[str, Any]:
        """What a model needs to read new files of this modality: class, settings, feature names."""
        init_args = dict(self.__dict__["_init_config"]["init_args"])
        init_args.pop("path")
        return {
            "class_path": class_path(type(self)),
            "init_args": init_args,
            "features": list(self.feature_names()),
            "input": self.input_kind,
        }

    def close(self) -> None:
        """Drop cached file contents."""

    def _check_not_empty(self, matrix: Matrix, rows: np.ndarray | None, empty_rows: str) -> None:
        """Per-row normalisations are undefined for a row of zeros (an empty droplet, a failed well)."""
        empty = np.flatnonzero(np.asarray(abs(matrix).sum(axis=1)).ravel() == 0)
        if not len(empty):
            return
        file_rows = empty if rows is None else np.asarray(rows)[empty]
        message = (
            f"{self.file}: {len(empty)} rows are all zero (e.g. rows {file_rows[:5].tolist()}), which the "
            f"{self.transform!r} transform cannot normalise"
        )
        if empty_rows == "warn":
            warnings.warn(f"{message}; they are embedded as zero vectors", stacklevel=3)
            return
        raise DataError(f"{message}; filter them out first (e.g. scanpy's sc.pp.filter_cells(adata, min_counts=1))")

    def _check_finite(self, matrix: Matrix, rows: np.ndarray | None, names: list[str], when: str) -> None:
        bad_rows, bad_cols = bad_entries(matrix, rows, np.isfinite)
        if len(bad_rows):
            raise non_finite_error(self.file, len(bad_rows), len(np.unique(bad_rows)),
                                   [(r, names[c]) for r, c in zip(bad_rows[:5], bad_cols[:5])], when)

    def _check_non_negative(self, matrix: Matrix, rows: np.ndarray | None, names: list[str]) -> None:
        """``log1p`` of a value in (-1, 0) is a finite negative number: negative input would pass unnoticed."""
        bad_rows, bad_cols = bad_entries(matrix, rows, lambda values: values >= 0)
        if not len(bad_rows):
            return
        examples = ", ".join(f"row {r} / {names[c]}" for r, c in zip(bad_rows[:5], bad_cols[:5]))
        raise DataError(
            f"{self.file}: {len(bad_rows)} negative feature values in {len(np.unique(bad_rows))} rows would be "
            f"meaningless after the {self.transform!r} transform (e.g. {examples}), which expects non-negative "
            "counts: give raw counts, or transform: none for data already transformed (log, z-scores)"
        )


def bad_entries(matrix: Matrix, rows: np.ndarray | None, good) -> tuple[np.ndarray, np.ndarray]:
    """File rows and column positions (row-major order) of the entries of ``matrix`` (rows ``rows``; all rows
    when None) where the elementwise test ``good`` fails; a sparse matrix's implicit zeros count as good."""
    values = matrix.data if sp.issparse(matrix) else matrix
    if good(values).all():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if sp.issparse(matrix):  # locate the bad entries without densifying a large matrix
        matrix = sp.csr_matrix(matrix)
        bad = np.flatnonzero(~good(matrix.data))
        bad_rows = np.searchsorted(matrix.indptr, bad, side="right") - 1
        bad_cols = matrix.indices[bad]
    else:
        bad_rows, bad_cols = np.nonzero(~good(matrix))
    return (bad_rows if rows is None else np.asarray(rows)[bad_rows]), bad_cols


def non_finite_error(file: Path, count: int, n_rows: int, examples: list[tuple[int, str]], when: str = "") -> DataError:
    """The message for ``count`` NaN or infinite values in ``n_rows`` rows of ``file`` (examples: file row,
    feature name): the same whether the rows are read into memory or converted for streaming."""
    shown = ", ".join(f"row {r} / {name}" for r, name in examples[:5])
    return DataError(f"{file}: {count} NaN or infinite feature values{when} in {n_rows} rows (e.g. {shown}); "
                     "clean or impute them first")


_READABLE: set[tuple[str, int, int]] = set()


def check_readable(file: Path) -> None:
    """Fail with a clear message when an ``.h5ad`` or parquet file cannot be opened (truncated, corrupt, not
    that format), instead of a library error deep inside a later read. Checked once per file version."""
    stat = file.stat()
    version = (str(file), stat.st_size, stat.st_mtime_ns)
    if version in _READABLE:
        return
    name = file.name.lower()
    try:
        if name.endswith(".h5ad"):
            with h5py.File(file, "r") as f:
                f.keys()
        elif name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            pq.ParquetFile(file).close()
    except (OSError, pa.ArrowException) as err:
        kind = "HDF5 (.h5ad)" if name.endswith(".h5ad") else "parquet"
        raise DataError(f"{file}: not a readable {kind} file (truncated or corrupt?): {err}") from None
    _READABLE.add(version)


def apply_transform(matrix: Matrix, transform: str, inplace: bool = False) -> Matrix:
    """Per-row transforms; sparse input stays sparse. ``inplace`` lets a dense float32 ``log1p`` overwrite
    its input (rows just read, so a large block is not held twice)."""
    if transform == "none":
        return matrix
    if transform == "clr":
        # Seurat's CLR across features: log1p(x / exp(mean(log1p(x)))); zeros stay zeros
        if sp.issparse(matrix):
            matrix = sp.csr_matrix(matrix, dtype=np.float64)
            row_of = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
            log_mean = np.bincount(row_of, np.log1p(matrix.data), minlength=matrix.shape[0]) / matrix.shape[1]
            matrix.data = np.log1p(matrix.data / np.exp(log_mean)[row_of])
            return sp.csr_matrix(matrix, dtype=np.float32)
        geometric = np.exp(np.log1p(matrix).mean(axis=1, keepdims=True))
        return np.log1p(matrix / geometric).astype(np.float32)
    if transform == "normalize_log1p":
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
        matrix = sp.diags(scale.astype(np.float32)) @ matrix if sp.issparse(matrix) else matrix * scale[:, None]
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix, dtype=np.float32)
        matrix.data = np.log1p(matrix.data)
        return matrix
    if inplace and matrix.dtype == np.float32 and matrix.flags.writeable:
        return np.log1p(matrix, out=matrix)
    return np.log1p(matrix).astype(np.float32)


def align_features(matrix: Matrix, names: list[str], target: list[str], file: Path) -> Matrix:
    """Reorder columns to ``target`` by name; target features absent from the file become zeros."""
    index = pd.Index(names).get_indexer(target)
    present = np.flatnonzero(index >= 0)
    if present.size == 0:
        raise DataError(
            f"{file}: none of its {len(names)} feature names match the {len(target)} features the model "
            f"was trained on (file has e.g. {names[:3]}, model expects e.g. {target[:3]})"
        )
    missing = len(target) - present.size
    if missing:
        warnings.warn(
            f"{file}: {missing} of the model's {len(target)} features are missing and filled with zeros "
            f"(e.g. {[target[i] for i in np.flatnonzero(index < 0)[:5]]})",
            stacklevel=3,
        )
    if sp.issparse(matrix):
        selected = sp.csr_matrix(matrix[:, index[present]])
        aligned = sp.csr_matrix(
            (selected.data, present[selected.indices], selected.indptr), shape=(matrix.shape[0], len(target))
        )
        aligned.sort_indices()
        return aligned
    aligned = np.zeros((matrix.shape[0], len(target)), dtype=np.float32)
    aligned[:, present] = matrix[:, index[present]]
    return aligned


class AnnDataSource(ModalitySource):
    """A modality stored in an AnnData ``.h5ad`` file; rows are observations, key columns come from ``obs``
    (the obs index too: by its name, e.g. ``barcode``, or as ``obs_names``).

    Args:
        path: the ``.h5ad`` file.
        layer: read ``layers[layer]`` instead of ``X``.
        obsm: read ``obsm[obsm]`` (an embedding) instead of ``X``; features are named ``{obsm}_{i}``.
        key_columns: see :class:`ModalitySource`.
        transform: see :class:`ModalitySource`.
    """

    format = "h5ad"
    suffixes = (".h5ad",)

    def __init__(
        self,
        path: str,
        layer: str | None = None,
        obsm: str | None = None,
        key_columns: list[str] | None = None,
        transform: Transform = "none",
    ) -> None:
        super().__init__(path, key_columns=key_columns, transform=transform)
        if layer is not None and obsm is not None:
            raise ValueError("AnnDataSource: give layer or obsm, not both")
        self.layer = layer
        self.obsm = obsm

    @property
    def element_key(self) -> str:
        """Where the matrix lives in the file: ``X``, ``layers/<layer>`` or ``obsm/<key>``."""
        if self.layer is not None:
            return f"layers/{self.layer}"
        return "X" if self.obsm is None else f"obsm/{self.obsm}"

    def _element(self, f: h5py.File) -> h5py.Dataset | h5py.Group:
        key = self.element_key
        if key not in f:
            if key == "X":
                layers = sorted(f["layers"]) if "layers" in f else []
                raise DataError(f"{self.file}: has no X; read a layer instead (layers: {layers or 'none'})")
            parent = "layers" if self.layer is not None else "obsm"
            available = sorted(f[parent]) if parent in f else []
            raise DataError(f"{self.file}: has no {key!r} (available {parent}: {available or 'none'})")
        return f[key]

    def _read_feature_names(self) -> list[str]:
        from anndata.io import read_elem

        with h5py.File(self.file, "r") as f:
            if self.obsm is not None:
                element = self._element(f)
                width = element.attrs["shape"][1] if isinstance(element, h5py.Group) else element.shape[1]
                return [f"{self.obsm}_{i}" for i in range(width)]
            return list(read_elem(f["var"]).index)

    def num_rows(self) -> int:
        with h5py.File(self.file, "r") as f:
            element = self._element(f)
            return int(element.attrs["shape"][0] if isinstance(element, h5py.Group) else element.shape[0])

    def read_metadata(self, columns: list[str] | None = None) -> pd.DataFrame:
        from anndata.io import read_elem

        with h5py.File(self.file, "r") as f:
            obs = read_elem(f["obs"])
        # the obs index (cell barcodes, sample ids) can be a key: by its name or as "obs_names"
        if columns is not None:
            for name in {obs.index.name, "obs_names"} & set(columns) - set(obs.columns):
                obs[name] = obs.index.to_numpy()
            missing = [c for c in columns if c not in obs.columns]
            if missing:
                raise DataError(
                    f"{self.file}: obs has no column(s) {missing}; available: {list(obs.columns)}"
                )
            obs = obs[columns]
        return obs

    def _read_raw(self, rows: np.ndarray | None) -> Matrix:
        from anndata.io import sparse_dataset

        with h5py.File(self.file, "r") as f:
            element = self._element(f)
            if isinstance(element, h5py.Group):
                encoding = element.attrs.get("encoding-type", "")
                if encoding not in ("csr_matrix", "csc_matrix"):
                    raise DataError(f"{self.file}: cannot read matrix of encoding {encoding!r}")
                data = sparse_dataset(element)
                if rows is None or encoding == "csc_matrix":
                    matrix = sp.csr_matrix(data.to_memory())
                    matrix = matrix if rows is None else matrix[rows]
                else:
                    matrix = _take_sorted(lambda r: data[r], rows, sparse=True)
                return compact_indices(sp.csr_matrix(matrix, dtype=np.float32))
            if rows is None:
                return np.asarray(element[()], dtype=np.float32)
            return np.asarray(_take_sorted(lambda r: element[r], rows, sparse=False), dtype=np.float32)


def compact_indices(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """32-bit row pointers and column indices where they fit. ``.h5ad`` files often store 64-bit row pointers
    beside 32-bit indices; scipy then converts the whole index array to 64 bits on every row selection (a
    copy of the matrix's indices per batch: 0.4 s for a 2 GB matrix)."""
    if matrix.nnz < 2**31 and max(matrix.shape) < 2**31:
        matrix.indptr = matrix.indptr.astype(np.int32, copy=False)
        matrix.indices = matrix.indices.astype(np.int32, copy=False)
    return matrix


def _take_sorted(read, rows: np.ndarray, sparse: bool) -> Matrix:
    """HDF5 reads need increasing unique indices: read those, then restore the requested order."""
    unique, inverse = np.unique(np.asarray(rows), return_inverse=True)
    block = read(unique)
    return block[inverse] if not sparse else sp.csr_matrix(block)[inverse]


class TableSource(ModalitySource):
    """A modality stored in a table (parquet, or CSV/TSV, optionally gzipped): metadata + feature columns.

    Select the feature columns with exactly one of ``features``, ``feature_prefix`` or ``feature_regex``;
    every other column is metadata.

    Args:
        path: the table file (``.parquet``, ``.csv``, ``.csv.gz``, ``.tsv``, ``.tsv.gz``).
        features: the feature columns by name.
        feature_prefix: every column whose name starts with this prefix is a feature.
        feature_regex: every column whose name matches this regular expression is a feature.
        key_columns: see :class:`ModalitySource`.
        transform: see :class:`ModalitySource`.
    """

    format = "table"
    suffixes = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv", ".tsv.gz")

    def __init__(
        self,
        path: str,
        features: list[str] | None = None,
        feature_prefix: str | None = None,
        feature_regex: str | None = None,
        key_columns: list[str] | None = None,
        transform: Transform = "none",
    ) -> None:
        super().__init__(path, key_columns=key_columns, transform=transform)
        given = [x is not None for x in (features, feature_prefix, feature_regex)]
        if sum(given) != 1:
            raise ValueError(
                "TableSource: select the feature columns with exactly one of features (a list of names), "
                f"feature_prefix or feature_regex (path: {path})"
            )
        self.features = features
        self.feature_prefix = feature_prefix
        self.feature_regex = feature_regex
        self._table: pa.Table | None = None

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        # a new file is read by the exact columns the model was trained on
        described["init_args"].update(features=list(self.feature_names()), feature_prefix=None, feature_regex=None)
        return described

    @property
    def _is_parquet(self) -> bool:
        return self.file.suffix in (".parquet", ".pq")

    def _schema(self) -> pa.Schema:
        if self._is_parquet:
            import pyarrow.parquet as pq

            return pq.read_schema(self.file)
        return self._read_table().schema

    def _read_table(self, columns: list[str] | None = None) -> pa.Table:
        if self._is_parquet:
            return read_table(self.file, columns)
        if self._table is None:  # text tables cannot be read by column: read once, keep until close()
            self._table = read_table(self.file)
        return self._table if columns is None else self._table.select(columns)

    def close(self) -> None:
        self._table = None

    def _read_feature_names(self) -> list[str]:
        schema = self._schema()
        columns = list(schema.names)
        if self.features is not None:
            return list(self.features)  # checked against the file when read (align or error)
        if self.feature_prefix is not None:
            names = [c for c in columns if c.startswith(self.feature_prefix)]
            what = f"prefix {self.feature_prefix!r}"
        else:
            pattern = re.compile(self.feature_regex)
            names = [c for c in columns if pattern.search(c)]
            what = f"regex {self.feature_regex!r}"
        if not names:
            raise DataError(f"{self.file}: no column matches the feature {what}; columns: {columns[:10]}...")
        return names

    def num_rows(self) -> int:
        if self._is_parquet:
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.file).metadata.num_rows
        return self._read_table().num_rows

    def read_metadata(self, columns: list[str] | None = None) -> pd.DataFrame:
        names = self._schema().names
        if columns is None:
            features = set(self.feature_names())
            columns = [c for c in names if c not in features]
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{self.file}: has no column(s) {missing}; available: {names[:20]}...")
        return self._read_table(columns).to_pandas()

    def _own_columns(self, wanted: list[str]) -> list[str]:
        names = set(self._schema().names)
        return [c for c in wanted if c in names]

    def _read_raw(self, rows: np.ndarray | None) -> Matrix:
        names = self.feature_names()
        if self.features is not None:
            check_feature_columns(self.file, self._schema(), names)
        return self._read_columns(self._own_columns(names), rows)

    def _read_columns(self, columns: list[str], rows: np.ndarray | None) -> np.ndarray:
        table = self._read_table(columns)
        check_feature_columns(self.file, table.schema, columns)
        if rows is not None:
            table = table.take(pa.array(np.asarray(rows, dtype=np.int64)))
        out = np.empty((table.num_rows, len(columns)), dtype=np.float32)
        for j, column in enumerate(table.columns):
            out[:, j] = column_as_float32(column)
        return out

    def _read_aligned(self, rows: np.ndarray | None, align_to: list[str]) -> Matrix:
        # read only the model's columns that this file has, by name
        available = self._own_columns(align_to)
        if not available:
            raise DataError(
                f"{self.file}: none of the model's {len(align_to)} feature columns are in this file "
                f"(model expects e.g. {align_to[:3]})"
            )
        return align_features(self._read_columns(available, rows), available, align_to, self.file)


def read_table(file: Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet, CSV or TSV file (optionally gzipped) as an Arrow table; parquet reads only ``columns``."""
    if file.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(file, columns=columns)
    import pyarrow.csv as pcsv

    delimiter = "\t" if ".tsv" in file.name else ","
    table = pcsv.read_csv(file, parse_options=pcsv.ParseOptions(delimiter=delimiter))
    return table if columns is None else table.select(columns)


def read_metadata_of(file: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Columns (all when None) of any supported file: ``obs`` of an ``.h5ad`` (the obs index too), or a table."""
    if str(file).lower().endswith(".h5ad"):
        return AnnDataSource(str(file)).read_metadata(columns)
    source_for(file)  # an unsupported file type gets the usual message
    if file.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        names = pq.read_schema(file).names
    else:
        names = read_table(file).schema.names
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise DataError(f"{file}: has no column(s) {missing}; available: {names[:20]}")
    return read_table(file, columns).to_pandas()


def check_feature_columns(file: Path, schema: pa.Schema, names: list[str]) -> None:
    """Refuse feature columns ``names`` that ``schema`` lacks or that do not hold numbers: text is refused
    even when it spells numbers (a sign of a mis-read file). The one check of tables read into memory and
    of tables converted for streaming."""
    present = set(schema.names)
    absent = [c for c in names if c not in present]
    if absent:
        raise DataError(f"{file}: feature column(s) not found: {absent[:10]} ({len(absent)} in all)")
    wanted = set(names)
    bad = [f"{field.name} ({field.type})" for field in schema if field.name in wanted and not _is_numeric(field.type)]
    if bad:
        raise DataError(
            f"{file}: feature columns must be numeric, these are not: {bad[:10]}"
            f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''}"
        )


def column_as_float32(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric column (see :func:`check_feature_columns`) as float32; nulls become NaN, which the
    finiteness check then reports with their rows."""
    return pc.cast(column, pa.float32()).to_numpy(zero_copy_only=False)


def _is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def source_for(path: str | Path) -> type[ModalitySource]:
    """The source class that reads a file, by its extension."""
    name = str(path).lower()
    for cls in (AnnDataSource, TableSource):
        if name.endswith(cls.suffixes):
            return cls
    raise DataError(f"{path}: unsupported file type; expected .h5ad, .parquet, .csv(.gz) or .tsv(.gz)")
