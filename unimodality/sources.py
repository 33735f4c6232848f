"""The source interface: one file holding a modality's rows (metadata columns + a feature matrix), and the
reading helpers the sources share.

The built-in sources are plugins (``unimodality/plugins/sources``): ``AnnDataSource`` (``.h5ad``),
``TableSource`` (parquet, CSV), ``MoleculeSource`` (SMILES) and ``ImageSource``. A source reads only the rows
it is asked for, applies a per-row transform, aligns features by name when asked, and refuses bad input with
an error that names the file, column or row at fault.
"""

from __future__ import annotations

import logging
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
import torch

from unimodality.config import RecordsInitArgs, class_path
from unimodality.errors import DataError
from unimodality.paths import resolve_path

Matrix = np.ndarray | sp.csr_matrix
#: a row filter: metadata column -> the values it selects
RowFilter = dict[str, list[str | int | float | bool]]
log = logging.getLogger(__name__)
Transform = Literal["none", "log1p", "normalize_log1p", "clr"]
#: how a metadata column fed to the tower is scaled (see ``ModalitySource.metadata_features``)
Scale = Literal["none", "log10", "log1p"]


class ModalitySource(RecordsInitArgs):
    """Base class of modality sources.

    Args:
        path: the file (``example://...`` names a file of the bundled example data).
        key_columns: columns holding the pairing key, in the order of the datamodule's ``keys``; by
            default the datamodule's key names themselves.
        transform: per-row transform applied after reading (and after aligning features by name):
            ``log1p``; ``normalize_log1p`` (scale each row to 10,000 counts, then log1p: counts);
            ``clr`` (centred log-ratio per row: protein counts).
        include: keep only rows whose metadata column holds one of the listed values, per column, e.g.
            ``{cell_line: [A549]}`` (several columns: all must match).
        exclude: leave out rows whose metadata column holds one of the listed values, e.g.
            ``{has_control: [true]}`` to drop control wells. Filters apply before pairing, splitting and
            prediction, are logged with counts, and are stored in the checkpoint so that ``predict`` filters
            new files alike (``--data.source_options '{"exclude": null}'`` embeds every row). Values are
            compared as they are and as text (``7`` matches ``"7"``); a missing column, or a listed value
            found in no row, is an error (a typing slip), except in ``predict`` applying a checkpoint's
            filters to a new file, which may simply hold no control row.
        metadata_features: numeric metadata columns fed to the tower as extra input features, each with its
            scale, e.g. ``{treatment_concentration: log10}`` (dose as an input): ``log10`` (positive values,
            e.g. molar concentrations), ``log1p`` (non-negative values, e.g. micromolar), or ``none``. They are
            appended after the features (after the ``transform``, which they do not go through), named
            ``log10(treatment_concentration)``; the checkpoint records them, and ``predict`` reads the same
            columns of new files. A missing, non-numeric or out-of-range value in a row read is an error.
    """

    format: str = ""
    suffixes: tuple[str, ...] = ()
    #: what ``read_features`` gives a model: ``vectors`` (a rows x features matrix), or another kind whose
    #: rows the returned object's ``take(rows)`` turns into a batch (``graphs``, ``images``)
    input_kind: str = "vectors"
    #: whether ``path`` may be a folder of files read as one (e.g. sharded parquet)
    reads_folders: bool = False

    def __init__(
        self, path: str, key_columns: list[str] | None = None, transform: Transform = "none",
        include: RowFilter | None = None, exclude: RowFilter | None = None,
        metadata_features: dict[str, Scale] | None = None,
    ) -> None:
        if transform not in ("none", "log1p", "normalize_log1p", "clr"):
            raise ValueError(f"unknown transform {transform!r}; expected none, log1p, normalize_log1p or clr")
        bad = {c: v for c, v in (metadata_features or {}).items() if v not in ("none", "log10", "log1p")}
        if bad:
            raise ValueError(f"{type(self).__name__}: metadata_features {bad}: each column's scale is none, log10 "
                             "or log1p")
        for name, given in (("include", include), ("exclude", exclude)):
            bad = [column for column, values in (given or {}).items() if not isinstance(values, list | tuple)]
            if bad:
                raise ValueError(f"{type(self).__name__}: {name} maps columns to lists of values; {bad} do not")
        self.path = path
        self.key_columns = key_columns
        self.transform = transform
        self.include = dict(include or {})
        self.exclude = dict(exclude or {})
        self.metadata_features = dict(metadata_features or {})
        #: filters (``include``/``exclude``) recorded in a checkpoint: values they match in no row are no error
        self.recorded_filters: set[str] = set()
        self._feature_names: list[str] | None = None
        self._metadata_values: pd.DataFrame | None = None
        self._filtered: np.ndarray | None = None

    @property
    def file(self) -> Path:
        file = resolve_path(self.path)
        if self.reads_folders and file.is_dir():
            return file
        if not file.is_file():
            raise FileNotFoundError(f"{type(self).__name__}: file not found: {file}")
        check_readable(file)
        return file

    @property
    def files(self) -> list[Path]:
        """Every file the source reads: the file, or the files of a sharded source."""
        return parquet_files(self.file) if is_parquet(self.file) else [self.file]

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

    def row_store(self, cache_dir: str | Path | None = None) -> Any:
        """A `RowStore` reading raw rows from disk (streaming); sources of
        feature vectors implement it."""
        raise DataError(f"{self.file}: {type(self).__name__} cannot be streamed from disk; keep it in memory "
                        "(leave data.streaming off)")

    def read_alternatives(self, rows: np.ndarray | None) -> tuple[list[Matrix], list[float]] | None:
        """Other representations of ``rows`` to draw from in training, with the weights of all (this one
        first); ``None`` when the source has none (see ``AnnDataSource.obsm_alternatives``)."""
        return None

    def valid_rows(self) -> np.ndarray | None:
        """Boolean mask of the rows the source can read, or None when all can (e.g. parsable SMILES)."""
        return None

    # -- shared behaviour -------------------------------------------------------------------------
    def usable_rows(self) -> np.ndarray | None:
        """Boolean mask of the rows to use (kept by the row filters, and valid), or None when all are."""
        kept, valid = self.filtered_rows(), self.valid_rows()
        if kept is None or valid is None:
            return valid if kept is None else kept
        return kept & valid

    def filtered_rows(self) -> np.ndarray | None:
        """Boolean mask of the rows ``include``/``exclude`` keep (None without filters); computed once."""
        if not self.include and not self.exclude:
            return None
        if self._filtered is None:
            self._filtered = self._apply_filters()
        return self._filtered

    def _apply_filters(self) -> np.ndarray:
        columns = list(dict.fromkeys([*self.include, *self.exclude]))
        available = self.read_metadata().columns
        missing = [c for c in columns if c not in available]
        if missing:
            raise DataError(f"{self.file}: row filter column(s) {missing} not found; metadata columns: "
                            f"{list(available)[:20]}")
        meta = self.read_metadata(columns)
        keep = np.ones(len(meta), dtype=bool)
        counts = []
        for kind, filters in (("include", self.include), ("exclude", self.exclude)):
            for column, values in filters.items():
                match = _matches(meta[column], values)
                found = {str(v) for v in values if _matches(meta[column], [v]).any()}
                absent = [v for v in values if str(v) not in found]
                if absent and kind in self.recorded_filters:
                    # a filter read from a checkpoint guards no typing: a new file may simply lack, e.g., controls
                    log.info("%s: %s filter %s: %s matches no row", self.file, kind, column, absent)
                elif absent:
                    raise DataError(
                        f"{self.file}: {kind} filter {column}: {absent} matches no row; the column holds e.g. "
                        f"{pd.unique(meta[column].astype(str))[:5].tolist()}"
                    )
                keep &= match if kind == "include" else ~match
                counts.append(f"{kind} {column} in {list(values)}: {int(match.sum())} rows")
        if not keep.any():
            raise DataError(f"{self.file}: the row filters ({'; '.join(counts)}) leave no row")
        log.info("%s: row filters keep %d of %d rows (%s)", self.file, keep.sum(), len(keep), "; ".join(counts))
        return keep

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
        matrix = self._read_aligned(rows, self.matrix_part(align_to))
        return self.finish(matrix, rows, align_to, empty_rows=empty_rows)

    def finish(
        self, matrix: Matrix, rows: np.ndarray | None, names: list[str] | None = None, empty_rows: str = "error"
    ) -> Matrix:
        """Check raw rows (read here or by a streaming store) for non-finite values and, before a log
        transform, negative ones (an error when embedding too: the log of a value in (-1, 0) is finite, so
        nothing would show later); then transform them."""
        names = self.feature_names() if names is None else names
        if not all_within(matrix, non_negative=self.transform != "none"):  # then find and name the bad entries
            self._check_finite(matrix, rows, names, "")
            if self.transform != "none":
                self._check_non_negative(matrix, rows, names)
        if self.transform in ("normalize_log1p", "clr"):
            self._check_not_empty(matrix, rows, empty_rows)
        matrix = apply_transform(matrix, self.transform, inplace=True)  # the rows were just read: ours to change
        if not all_within(matrix):
            self._check_finite(matrix, rows, names, f" after the {self.transform!r} transform")
        if not self.metadata_features:
            return matrix
        extra = self.metadata_block(rows)
        return sp.hstack([matrix, sp.csr_matrix(extra)], format="csr") if sp.issparse(matrix) else np.hstack(
            [matrix, extra])

    # -- metadata columns as input features ---------------------------------------------------------
    def metadata_feature_names(self) -> list[str]:
        """Names of the ``metadata_features`` columns among the model's inputs, e.g. ``log10(dose)``."""
        return [column if scale == "none" else f"{scale}({column})" for column, scale in self.metadata_features.items()]

    def input_names(self) -> list[str]:
        """What the tower reads: the features, then the ``metadata_features``."""
        return self.feature_names() + self.metadata_feature_names()

    def matrix_part(self, names: list[str]) -> list[str]:
        """A model's input names without the trailing ``metadata_features`` (those the file's matrix holds)."""
        extra = self.metadata_feature_names()
        return names[:len(names) - len(extra)] if extra and names[len(names) - len(extra):] == extra else names

    def metadata_block(self, rows: np.ndarray | None) -> np.ndarray:
        """The ``metadata_features`` of ``rows`` (all when None), scaled, as a float32 matrix; a missing,
        non-numeric or out-of-range value is an error naming the column and rows."""
        if self._metadata_values is None:
            self._metadata_values = self.read_metadata(list(self.metadata_features))
        table = self._metadata_values if rows is None else self._metadata_values.iloc[np.asarray(rows)]
        file_rows = np.arange(len(table)) if rows is None else np.asarray(rows)
        out = np.empty((len(table), len(self.metadata_features)), dtype=np.float32)
        for j, (column, scale) in enumerate(self.metadata_features.items()):
            raw = table[column]
            values = pd.to_numeric(raw.astype(object) if isinstance(raw.dtype, pd.CategoricalDtype) else raw,
                                   errors="coerce").to_numpy(dtype=np.float64)
            low, what = {"none": (-np.inf, "finite"), "log10": (0.0, "positive"), "log1p": (-1.0, "> -1")}[scale]
            bad = ~np.isfinite(values) | (values <= low)
            if bad.any():
                examples = ", ".join(f"row {r}: {v!r}" if isinstance(v, str) else f"row {r}: {v}"
                                     for r, v in zip(file_rows[bad][:5], raw.to_numpy()[bad][:5]))
                raise DataError(f"{self.file}: metadata feature column {column!r} needs {what} numbers "
                                f"({scale} scale); {int(bad.sum())} rows are not ({examples})")
            out[:, j] = {"none": values, "log10": np.log10(values), "log1p": np.log1p(values)}[scale]
        return out

    def _read_aligned(self, rows: np.ndarray | None, align_to: list[str]) -> Matrix:
        return align_features(self._read_raw(rows), self.feature_names(), align_to, self.file)

    def describe(self) -> dict[str, Any]:
        """What a model needs to read new files of this modality: class, settings, feature names."""
        init_args = dict(self.__dict__["_init_config"]["init_args"])
        init_args.pop("path")
        return {
            "class_path": class_path(type(self)),
            "init_args": init_args,
            "features": self.input_names(),
            "input": self.input_kind,
        }

    def close(self) -> None:
        """Drop cached file contents."""

    def _check_not_empty(self, matrix: Matrix, rows: np.ndarray | None, empty_rows: str) -> None:
        """Per-row normalisations are undefined for a row of zeros (an empty droplet, a failed well)."""
        empty = np.flatnonzero(~rows_with_nonzero(matrix))
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


def all_within(matrix: Matrix, non_negative: bool = False) -> bool:
    """Whether every stored value of ``matrix`` is finite (and, with ``non_negative``, >= 0): its minimum and
    maximum, which a NaN propagates to, so no array of the matrix's size is made (`bad_entries` finds them)."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if not values.size:
        return True
    low, high = values.min(), values.max()
    return bool(np.isfinite(high) and (low >= 0 if non_negative else np.isfinite(low)))


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


def rows_with_nonzero(matrix: Matrix) -> np.ndarray:
    """Whether each row holds a non-zero value; a sparse matrix's stored zeros count as zeros. Without a
    copy of the matrix (``abs(matrix)`` was one: 0.5 GB and 1.4 s for 200,000 cells)."""
    if not sp.issparse(matrix):
        return np.asarray(matrix).any(axis=1)
    matrix = sp.csr_matrix(matrix)
    indptr, data = matrix.indptr, matrix.data
    if data[:indptr[-1]].all():  # no stored zero (the usual case): a row holds a value if it stores one
        return np.diff(indptr) > 0
    found = np.zeros(matrix.shape[0], dtype=bool)
    for start, stop in _row_blocks(matrix.shape[0]):  # non-zeros counted a block of rows at a time
        ptr = indptr[start:stop + 1] - indptr[start]
        counts = np.concatenate([[0], np.cumsum(data[indptr[start]:indptr[stop]] != 0)])
        found[start:stop] = counts[ptr[1:]] > counts[ptr[:-1]]
    return found


def _row_blocks(n_rows: int, block_rows: int = 16384) -> list[tuple[int, int]]:
    return [(start, min(start + block_rows, n_rows)) for start in range(0, n_rows, block_rows)]


def _scale_rows_inplace(matrix: sp.csr_matrix, scale: np.ndarray) -> None:
    """Multiply each row of ``matrix`` by ``scale[row]`` in its own values, a block of rows at a time (the
    per-value factors of one block, not of the whole matrix, are held)."""
    indptr, data = matrix.indptr, matrix.data
    for start, stop in _row_blocks(matrix.shape[0]):
        data[indptr[start]:indptr[stop]] *= np.repeat(scale[start:stop], np.diff(indptr[start:stop + 1]))


def apply_transform(matrix: Matrix, transform: str, inplace: bool = False) -> Matrix:
    """Per-row transforms; sparse input stays sparse. ``inplace`` lets a float32 ``log1p`` (dense or CSR)
    and a float32 CSR ``normalize_log1p`` overwrite their input (rows just read, so a large block is not
    held twice); without it the input is never changed."""
    if transform == "none":
        return matrix
    if (inplace and transform in ("log1p", "normalize_log1p") and sp.isspmatrix_csr(matrix)
            and matrix.dtype == np.float32 and matrix.data.flags.writeable):
        # the same float32 products and log1p as the copying path below, without the diagonal matrix
        # product (a copy of the matrix) nor the log1p copy of its values
        if transform == "normalize_log1p":
            totals = np.asarray(matrix.sum(axis=1)).ravel()
            scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
            _scale_rows_inplace(matrix, scale.astype(np.float32))
        np.log1p(matrix.data, out=matrix.data)
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


def align_features(matrix: Matrix, names: list[str], target: list[str], file: Path,
                   warn_missing: bool = True) -> Matrix:
    """Reorder columns to ``target`` by name; target features absent from the file become zeros (with a
    warning naming them, unless ``warn_missing`` is false: a caller aligning batch after batch warns once).
    The matrix itself when its features already are ``target``, in order (no copy of a file's worth of rows)."""
    if len(names) == len(target) and list(names) == list(target):
        return matrix
    index = pd.Index(names).get_indexer(target)
    present = np.flatnonzero(index >= 0)
    if present.size == 0:
        raise DataError(
            f"{file}: none of its {len(names)} feature names match the {len(target)} features the model "
            f"was trained on (file has e.g. {names[:3]}, model expects e.g. {target[:3]})"
        )
    missing = len(target) - present.size
    if missing and warn_missing:
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


def is_parquet(file: Path) -> bool:
    """A parquet file, or a folder of them (a sharded table)."""
    return file.suffix in (".parquet", ".pq") or file.is_dir()


def parquet_files(file: Path) -> list[Path]:
    """The parquet files of a table: the file itself, or every ``*.parquet``/``*.pq`` below a folder, sorted
    by path (the order of the table's rows)."""
    if not file.is_dir():
        return [file]
    files = sorted(p for p in file.rglob("*") if p.is_file() and p.suffix in (".parquet", ".pq")
                   and not any(part.startswith((".", "_")) for part in p.relative_to(file).parts))
    if not files:
        raise DataError(f"{file}: a folder with no .parquet file in it (a sharded table holds one or more)")
    return files


def parquet_dataset(file: Path) -> Any:
    """A parquet file or folder as one ``pyarrow.dataset``: the folder's files in path order, Hive-style
    partition folders (``plate=P1/part-0.parquet``) becoming metadata columns. Files whose columns differ
    are an error naming both."""
    import pyarrow.dataset as ds

    files = parquet_files(file)
    version = (str(file), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if version in _DATASETS:
        return _DATASETS[version]
    for path in files:
        check_readable(path)
    partitioning = ds.HivePartitioning.discover(infer_dictionary=False) if file.is_dir() else None
    try:
        dataset = ds.dataset([str(p) for p in files], format="parquet", partitioning=partitioning,
                             partition_base_dir=str(file) if file.is_dir() else None)
    except pa.ArrowException as err:
        raise DataError(f"{file}: the parquet files cannot be read as one table: {err}") from None
    if len(files) > 1:
        import pyarrow.parquet as pq

        first = pq.read_schema(files[0])
        for path in files[1:]:
            schema = pq.read_schema(path)
            if not schema.equals(first, check_metadata=False):
                differ = sorted(set(first.names) ^ set(schema.names)) or [
                    n for n in first.names if first.field(n).type != schema.field(n).type]
                raise DataError(f"{path}: its columns differ from those of {files[0]} (e.g. {differ[:5]}); every "
                                "file of a sharded table must have the same columns and types")
    _DATASETS.clear()  # one table's version at a time: enough to spare the repeated schema reads
    _DATASETS[version] = dataset
    return dataset


_DATASETS: dict[tuple, Any] = {}


def read_table(file: Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet, CSV or TSV file (optionally gzipped), or a folder of parquet files, as an Arrow table;
    parquet reads only ``columns``."""
    if is_parquet(file):
        return parquet_dataset(file).to_table(columns=columns)
    import pyarrow.csv as pcsv

    delimiter = "\t" if ".tsv" in file.name else ","
    table = pcsv.read_csv(file, parse_options=pcsv.ParseOptions(delimiter=delimiter))
    return table if columns is None else table.select(columns)


#: a feature taken from element ``index`` of a list column: ``pheno_embedding[3]``
VECTOR_FEATURE = re.compile(r"^(?P<column>.+)\[(?P<index>\d+)\]$")


def _matches(column: pd.Series, values: list[Any]) -> np.ndarray:
    """Rows of ``column`` holding one of ``values``, compared as they are and as text."""
    plain = column.isin(values).to_numpy(dtype=bool)
    return plain | column.astype(str).isin([str(v) for v in values]).to_numpy(dtype=bool)


def is_vector_type(kind: pa.DataType) -> bool:
    """A list, large list or fixed-size list of numbers: a column holding one vector of features per row."""
    return _is_list(kind) and _is_numeric(kind.value_type)


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def feature_column(name: str, schema: pa.Schema) -> str:
    """The column a feature is read from: itself, or the list column of an element name ``column[i]``."""
    if name in schema.names:
        return name
    match = VECTOR_FEATURE.match(name)
    if match and match["column"] in schema.names and _is_list(schema.field(match["column"]).type):
        return match["column"]
    return name


def feature_columns(names: list[str], schema: pa.Schema) -> list[str]:
    """The distinct columns features ``names`` are read from, in order."""
    return list(dict.fromkeys(feature_column(n, schema) for n in names))


def check_feature_columns(file: Path, schema: pa.Schema, names: list[str]) -> None:
    """Refuse features ``names`` whose columns ``schema`` lacks or that do not hold numbers (or lists of
    numbers): text is refused even when it spells numbers (a sign of a mis-read file). The one check of
    tables read into memory and of tables converted for streaming."""
    columns = feature_columns(names, schema)
    present = set(schema.names)
    absent = [c for c in columns if c not in present]
    if absent:
        raise DataError(f"{file}: feature column(s) not found: {absent[:10]} ({len(absent)} in all)")
    bad = [f"{field.name} ({field.type})" for field in schema
           if field.name in set(columns) and not (_is_numeric(field.type) or is_vector_type(field.type))]
    if bad:
        raise DataError(
            f"{file}: feature columns must be numeric or lists of numbers, these are not: {bad[:10]}"
            f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''}"
        )


def column_as_float32(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric column (see `check_feature_columns`) as float32; nulls become NaN, which the
    finiteness check then reports with their rows."""
    return pc.cast(column, pa.float32()).to_numpy(zero_copy_only=False)


def vector_width(file: Path, column: pa.ChunkedArray | pa.Array, name: str, first_row: int = 0) -> int:
    """The length every row's list in a list column has; nulls and differing lengths are errors (naming file
    rows: ``first_row`` is the file row of the column's first)."""
    if pa.types.is_fixed_size_list(column.type) and column.null_count == 0:
        return column.type.list_size
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    nulls = np.flatnonzero(pd.isna(lengths))
    if len(nulls):
        raise DataError(f"{file}: column {name!r} has no list in {len(nulls)} rows (e.g. rows "
                        f"{(nulls[:5] + first_row).tolist()}); every row needs a vector of features")
    lengths = lengths.astype(np.int64)
    if len(lengths) and (lengths != lengths[0]).any():
        values, counts = np.unique(lengths, return_counts=True)
        common = int(values[counts.argmax()])
        odd = np.flatnonzero(lengths != common)
        raise DataError(
            f"{file}: column {name!r} holds lists of different lengths ({common} in most rows; e.g. "
            f"{', '.join(f'row {r + first_row}: {lengths[r]}' for r in odd[:5])}); every row's vector must have one "
            "length"
        )
    return int(lengths[0]) if len(lengths) else 0


def features_block(file: Path, table: pa.Table, names: list[str], first_row: int = 0) -> np.ndarray:
    """Features ``names`` of every row of ``table`` (scalar columns and elements of list columns) as float32.

    ``first_row``: the file row of ``table``'s first row, for messages.
    """
    out = np.empty((table.num_rows, len(names)), dtype=np.float32)
    vectors: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        column = feature_column(name, table.schema)
        if column == name:
            out[:, j] = column_as_float32(table.column(column))
            continue
        if column not in vectors:
            data = table.column(column).combine_chunks() if table.num_rows else table.column(column)
            width = vector_width(file, data, column, first_row)
            flat = column_as_float32(pc.list_flatten(data)) if table.num_rows else np.zeros(0, np.float32)
            vectors[column] = flat.reshape(table.num_rows, width)
        index = int(VECTOR_FEATURE.match(name)["index"])
        if index >= vectors[column].shape[1]:
            raise DataError(f"{file}: feature {name!r}: the lists of column {column!r} have "
                            f"{vectors[column].shape[1]} elements")
        out[:, j] = vectors[column][:, index]
    return out


def _is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def is_numeric_type(kind: pa.DataType) -> bool:
    """An integer, floating-point or boolean column: one feature per row."""
    return _is_numeric(kind)


class Alternatives:
    """Rows with several representations (e.g. raw and batch-corrected embeddings of the same cells): each row
    taken into a batch is drawn from one of them, with the given weights (torch's RNG: it follows the seed).

    Args:
        matrices: the representations, rows aligned, of the same width.
        weights: how often each is drawn.
    """

    def __init__(self, matrices: list[Matrix], weights: list[float]) -> None:
        self.matrices = matrices
        self.weights = torch.tensor(weights, dtype=torch.float64)

    def __len__(self) -> int:
        return self.matrices[0].shape[0]

    def take(self, rows: np.ndarray) -> torch.Tensor:
        from unimodality.batch import take_rows

        rows = np.asarray(rows)
        choice = torch.multinomial(self.weights, len(rows), replacement=True).numpy()
        out = torch.empty((len(rows), self.matrices[0].shape[1]), dtype=torch.float32)
        for j, matrix in enumerate(self.matrices):
            picked = np.flatnonzero(choice == j)
            if len(picked):
                out[torch.from_numpy(picked)] = take_rows(matrix, rows[picked])
        return out
