"""``AnnDataSource``: a modality stored in AnnData files (``.h5ad``, ``.zarr``): one, or several read as one."""

from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from unimodality.errors import DataError
from unimodality.paths import resolve_path
from unimodality.sources import Matrix, ModalitySource, RowFilter, Scale, Transform, check_readable

if TYPE_CHECKING:
    from unimodality.streaming import RowStore


SUFFIXES = (".h5ad", ".zarr")


def anndata_files(path: str | list[str]) -> list[Path]:
    """The AnnData files a path names: an ``.h5ad`` file or ``.zarr`` store; a folder of them (every
    ``*.h5ad``/``*.zarr`` in it, sorted by name); a glob pattern (``plates/*.h5ad``, sorted); or a list of
    paths, in their order. A pattern or folder matching nothing is an error."""
    if isinstance(path, list | tuple):
        if not path:
            raise DataError("AnnDataSource: path is an empty list; name one or more .h5ad files")
        return [file for item in path for file in anndata_files(str(item))]
    file = resolve_path(path)
    if file.suffix in SUFFIXES and file.exists():
        return [file]
    if file.is_dir():
        files = sorted(p for p in file.iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
        if not files:
            raise DataError(f"{file}: a folder with no .h5ad file (or .zarr store) in it")
        return files
    if glob.has_magic(str(file)):
        files = sorted(Path(p) for p in glob.glob(str(file)) if Path(p).suffix in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"AnnDataSource: no .h5ad file matches {file}")
        return files
    raise FileNotFoundError(f"AnnDataSource: file not found: {file}")


class AnnDataSource(ModalitySource):
    """A modality stored in an AnnData ``.h5ad`` file (or a ``.zarr`` AnnData store), or in several read as
    one; rows are observations, key columns come from ``obs`` (the obs index too: by its name, e.g.
    ``barcode``, or as ``obs_names``).

    Several files (one per plate or batch) are one source when they have the same features (``var_names``
    in the same order, or ``obsm`` of the same width): their rows follow one another in file order, their
    ``obs`` tables are stacked (a column missing from one file is missing values there), and streaming keeps
    at most 8 of them open at a time.

    Args:
        path: the ``.h5ad`` file or ``.zarr`` store; or several: a folder of them, a glob pattern
            (``plates/*.h5ad``), or a list of paths.
        layer: read ``layers[layer]`` instead of ``X``.
        obsm: read ``obsm[obsm]`` (an embedding) instead of ``X``; features are named ``{obsm}_{i}``.
        obsm_alternatives: other ``obsm`` keys holding other representations of the same rows (e.g.
            ``[scVICenterScale]`` beside ``obsm: scVI``: raw and batch-corrected embeddings), of the same
            width. Training draws one representation per example, as augmentation ("perturbation embedding
            augmentation"); validation, testing and predict use ``obsm``.
        alternative_weights: how often each representation is drawn in training: ``obsm`` first, then the
            alternatives in order (default: equally often).
        key_columns: see `ModalitySource`.
        transform: see `ModalitySource`.
        include: keep only rows whose metadata holds the listed values; see `ModalitySource`.
        exclude: leave out rows whose metadata holds the listed values; see `ModalitySource`.
        metadata_features: numeric metadata columns fed to the tower too (dose as an input, e.g.
            ``{treatment_concentration: log10}``); see `ModalitySource`.
    """

    format = "h5ad"
    suffixes = SUFFIXES
    reads_folders = True  # a .zarr store is a folder

    def __init__(
        self,
        path: str | list[str],
        layer: str | None = None,
        obsm: str | None = None,
        obsm_alternatives: list[str] | None = None,
        alternative_weights: list[float] | None = None,
        key_columns: list[str] | None = None,
        transform: Transform = "none",
        include: RowFilter | None = None,
        exclude: RowFilter | None = None,
        metadata_features: dict[str, Scale] | None = None,
    ) -> None:
        super().__init__(path, key_columns=key_columns, transform=transform, include=include, exclude=exclude,
                         metadata_features=metadata_features)
        if layer is not None and obsm is not None:
            raise ValueError("AnnDataSource: give layer or obsm, not both")
        alternatives = list(obsm_alternatives or [])
        if alternatives and obsm is None:
            raise ValueError("AnnDataSource: obsm_alternatives are other obsm keys beside obsm; set obsm too")
        if alternative_weights is not None:
            weights = np.asarray(alternative_weights, dtype=np.float64)
            if len(weights) != 1 + len(alternatives) or (weights < 0).any() or not weights.sum() > 0:
                raise ValueError(
                    f"AnnDataSource: alternative_weights {list(alternative_weights)} must give one non-negative "
                    f"weight to obsm and each of the {len(alternatives)} obsm_alternatives, not all zero"
                )
        self.layer = layer
        self.obsm = obsm
        self.obsm_alternatives = alternatives
        self.alternative_weights = alternative_weights
        self._parts: list[AnnDataSource] | None = None
        self._row_offsets: np.ndarray | None = None

    # -- one file or several -------------------------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        return [part.file for part in self.parts] if self.is_sharded else [self.file]

    @property
    def is_sharded(self) -> bool:
        """Whether ``path`` names several files (a folder, a pattern or a list), even if it matches one."""
        if isinstance(self.path, list | tuple):
            return len(self.path) != 1 or self._names_several(str(self.path[0]))
        return self._names_several(str(self.path))

    @staticmethod
    def _names_several(path: str) -> bool:
        file = resolve_path(path)
        return not (file.suffix in SUFFIXES and file.exists()) and (file.is_dir() or glob.has_magic(path))

    @property
    def file(self) -> Path:
        """The file; for several files, the folder or pattern naming them (in messages)."""
        if not self.is_sharded:
            path = self.path[0] if isinstance(self.path, list | tuple) else self.path
            file = resolve_path(path)
            if not file.exists():
                raise FileNotFoundError(f"AnnDataSource: file not found: {file}")
            if file.is_file():
                check_readable(file)
            return file
        if isinstance(self.path, list | tuple):
            files = [resolve_path(p) for p in self.path]
            return Path(os.path.commonpath([f.parent for f in files])) / "{" + ",".join(f.name for f in files) + "}"
        return resolve_path(self.path)

    @property
    def parts(self) -> list[AnnDataSource]:
        """One single-file source per file (raw reads: transforms and filters apply to the whole source)."""
        if self._parts is None:
            self._parts = [AnnDataSource(str(f), layer=self.layer, obsm=self.obsm) for f in anndata_files(self.path)]
        return self._parts

    def _offsets(self) -> np.ndarray:
        """Where each file's rows start (and the total); read once, as ``parts`` are found once."""
        if self._row_offsets is None:
            self._row_offsets = np.cumsum([0] + [part.num_rows() for part in self.parts])
        return self._row_offsets

    @property
    def element_key(self) -> str:
        """Where the matrix lives in the file: ``X``, ``layers/<layer>`` or ``obsm/<key>``."""
        if self.layer is not None:
            return f"layers/{self.layer}"
        return "X" if self.obsm is None else f"obsm/{self.obsm}"

    @property
    def is_zarr(self) -> bool:
        return self.file.suffix == ".zarr"

    def _open(self) -> Any:
        """The file's root group: HDF5 (``.h5ad``) or zarr (``.zarr``), read-only."""
        file = self.file
        if file.suffix == ".zarr":
            import zarr

            try:
                return contextlib.nullcontext(zarr.open_group(str(file), mode="r"))
            except Exception as err:  # zarr raises several kinds for a folder that is no store
                raise DataError(f"{file}: not a readable zarr AnnData store: {err}") from None
        if file.is_dir():
            raise DataError(f"{file}: a folder; AnnDataSource reads an .h5ad file or a .zarr store")
        return h5py.File(file, "r")

    def _element(self, f: Any) -> Any:
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

        if self.is_sharded:
            first, *others = self.parts
            names = first._read_feature_names()
            for other in others:
                _check_same_features(first.file, names, other.file, other._read_feature_names())
            return names
        with self._open() as f:
            if self.obsm is not None:
                element = self._element(f)
                width = element.attrs["shape"][1] if _is_group(element) else element.shape[1]
                return [f"{self.obsm}_{i}" for i in range(width)]
            return list(read_elem(f["var"]).index)

    def num_rows(self) -> int:
        if self.is_sharded:
            return int(self._offsets()[-1])
        with self._open() as f:
            element = self._element(f)
            return int(element.attrs["shape"][0] if _is_group(element) else element.shape[0])

    def read_metadata(self, columns: list[str] | None = None) -> pd.DataFrame:
        from anndata.io import read_elem

        if self.is_sharded:
            return _stack_obs([part.read_metadata(columns) for part in self.parts])
        with self._open() as f:
            obs = read_elem(f["obs"])
        # the obs index (cell barcodes, sample ids) can be a key: by its name or as "obs_names"
        if columns is not None:
            for name in {obs.index.name, "obs_names"} & set(columns) - set(obs.columns):
                obs[name] = obs.index.to_numpy()
            missing = [c for c in columns if c not in obs.columns]
            if missing:
                index_names = " or ".join(repr(n) for n in dict.fromkeys([obs.index.name, "obs_names"]) if n)
                raise DataError(
                    f"{self.file}: obs has no column(s) {missing}; available: {list(obs.columns)}, and the obs "
                    f"index as {index_names}"
                )
            obs = obs[columns]
        return obs

    def read_alternatives(self, rows: np.ndarray | None) -> tuple[list[Matrix], list[float]] | None:
        """The rows ``rows`` in each ``obsm_alternatives`` representation (transformed like ``obsm``), with the
        weights of all representations (``obsm`` first); ``None`` without alternatives."""
        if not self.obsm_alternatives:
            return None
        matrices = []
        for key in self.obsm_alternatives:
            other = AnnDataSource(self.path, obsm=key, transform=self.transform,
                                  metadata_features=self.metadata_features)
            if len(other.feature_names()) != len(self.feature_names()):
                raise DataError(
                    f"{self.file}: obsm[{key!r}] has {len(other.feature_names())} columns, obsm[{self.obsm!r}] "
                    f"{len(self.feature_names())}: alternative representations must have the same width"
                )
            matrices.append(other.read_features(rows))
        weights = self.alternative_weights or [1.0] * (1 + len(matrices))
        return matrices, [float(w) for w in weights]

    def row_store(self, cache_dir: str | Path | None = None) -> RowStore:
        """The file's matrix read in place, batch by batch (dense, or CSR with only the row pointers in RAM)."""
        from unimodality.streaming import ConcatStore, H5Store, ZarrStore

        if self.is_sharded:
            self.feature_names()  # files with other features are refused before any row is read
            return ConcatStore([part.row_store(cache_dir) for part in self.parts])
        with self._open() as f:
            self._element(f)  # a missing layer gets the source's own message
        return (ZarrStore if self.is_zarr else H5Store)(self.file, self.element_key)

    def _read_raw(self, rows: np.ndarray | None) -> Matrix:
        from anndata.io import sparse_dataset

        if self.is_sharded:
            return self._read_parts(rows)
        with self._open() as f:
            element = self._element(f)
            if _is_group(element):
                encoding = element.attrs.get("encoding-type", "")
                if encoding not in ("csr_matrix", "csc_matrix"):
                    raise DataError(f"{self.file}: cannot read matrix of encoding {encoding!r}")
                if rows is None or encoding == "csc_matrix":
                    matrix = sp.csr_matrix(sparse_dataset(element).to_memory())
                    matrix = matrix if rows is None else matrix[rows]
                    return compact_indices(sp.csr_matrix(matrix, dtype=np.float32))
            elif rows is None:
                return np.asarray(element[...], dtype=np.float32)
        # chosen rows through the streaming store: one read per run of nearby rows, where anndata's backed
        # indexing reads row by row (400,000 HDF5 reads for a 200,000-cell file)
        unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        store = self.row_store()
        try:
            block = store.read_rows(unique)
        finally:
            store.close()
        if len(unique) != len(inverse) or not np.array_equal(unique, rows):
            block = block[inverse]
        return compact_indices(block) if sp.issparse(block) else np.asarray(block, dtype=np.float32)

    def _read_parts(self, rows: np.ndarray | None) -> Matrix:
        """Rows of several files: each file's rows read at once, then put back in the order asked for."""
        self.feature_names()  # files with other features are refused before any row is read
        offsets = self._offsets()
        if rows is None:
            blocks = [part._read_raw(None) for part in self.parts]
            order = None
        else:
            rows = np.asarray(rows, dtype=np.int64)
            part_of = np.searchsorted(offsets, rows, side="right") - 1
            order = np.argsort(part_of, kind="stable")
            blocks = [self.parts[k]._read_raw(rows[order][part_of[order] == k] - offsets[k])
                      for k in np.unique(part_of)]
        if not blocks:  # no rows asked for
            return self.parts[0]._read_raw(np.zeros(0, dtype=np.int64))
        sparse = [sp.issparse(block) for block in blocks]
        if any(sparse) and not all(sparse):
            raise DataError(f"{self.file}: its files mix dense and sparse matrices; store them alike")
        matrix = compact_indices(sp.vstack(blocks, format="csr")) if all(sparse) else np.concatenate(blocks)
        if order is None:
            return matrix
        restore = np.empty_like(order)
        restore[order] = np.arange(len(order))
        return matrix[restore]


def _stack_obs(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """``obs`` tables one after the other; a column categorical in every file stays categorical (the union of
    the files' categories, sorted when each file's are) instead of becoming plain objects."""
    from pandas.api.types import union_categoricals

    stacked = pd.concat(frames)
    for column in stacked.columns:
        parts = [frame[column] for frame in frames if column in frame]
        if len(parts) == len(frames) and all(isinstance(part.dtype, pd.CategoricalDtype) for part in parts):
            ordered = all(part.cat.categories.is_monotonic_increasing for part in parts)
            stacked[column] = pd.Categorical(union_categoricals(parts, sort_categories=ordered), ordered=False)
    return stacked


def _check_same_features(first: Path, names: list[str], other: Path, other_names: list[str]) -> None:
    if other_names == names:
        return
    if len(other_names) != len(names):
        detail = f"{len(other_names)} features, {first.name} {len(names)}"
    elif set(other_names) == set(names):
        detail = "the same features in another order"
    else:
        at = next(i for i, (a, b) in enumerate(zip(names, other_names)) if a != b)
        detail = f"feature {at} is {other_names[at]!r}, in {first.name} {names[at]!r}"
    raise DataError(f"{other}: its features differ from those of {first} ({detail}); the files of one source need "
                    "the same var_names in the same order (e.g. adata[:, common_genes] for each)")


def compact_indices(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """32-bit row pointers and column indices where they fit. ``.h5ad`` files often store 64-bit row pointers
    beside 32-bit indices; scipy then converts the whole index array to 64 bits on every row selection (a
    copy of the matrix's indices per batch: 0.4 s for a 2 GB matrix)."""
    if matrix.nnz < 2**31 and max(matrix.shape) < 2**31:
        matrix.indptr = matrix.indptr.astype(np.int32, copy=False)
        matrix.indices = matrix.indices.astype(np.int32, copy=False)
    return matrix


def _is_group(element: Any) -> bool:
    """A group (a sparse matrix's data/indices/indptr) rather than a dense array, in HDF5 or zarr."""
    return isinstance(element, h5py.Group) or (not hasattr(element, "dtype") and hasattr(element, "keys"))
