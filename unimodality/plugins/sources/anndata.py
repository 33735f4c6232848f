"""``AnnDataSource``: a modality stored in an AnnData ``.h5ad`` file."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from unimodality.errors import DataError
from unimodality.sources import Matrix, ModalitySource, RowFilter, Transform

if TYPE_CHECKING:
    from unimodality.streaming import RowStore


class AnnDataSource(ModalitySource):
    """A modality stored in an AnnData ``.h5ad`` file (or a ``.zarr`` AnnData store); rows are observations,
    key columns come from ``obs`` (the obs index too: by its name, e.g. ``barcode``, or as ``obs_names``).

    Args:
        path: the ``.h5ad`` file, or a ``.zarr`` store (read into memory; streaming reads ``.h5ad`` only).
        layer: read ``layers[layer]`` instead of ``X``.
        obsm: read ``obsm[obsm]`` (an embedding) instead of ``X``; features are named ``{obsm}_{i}``.
        obsm_alternatives: other ``obsm`` keys holding other representations of the same rows (e.g.
            ``[scVICenterScale]`` beside ``obsm: scVI``: raw and batch-corrected embeddings), of the same
            width. Training draws one representation per example, as augmentation ("perturbation embedding
            augmentation"); validation, testing and predict use ``obsm``.
        alternative_weights: how often each representation is drawn in training: ``obsm`` first, then the
            alternatives in order (default: equally often).
        key_columns: see :class:`ModalitySource`.
        transform: see :class:`ModalitySource`.
        include: keep only rows whose metadata holds the listed values; see :class:`ModalitySource`.
        exclude: leave out rows whose metadata holds the listed values; see :class:`ModalitySource`.
    """

    format = "h5ad"
    suffixes = (".h5ad", ".zarr")
    reads_folders = True  # a .zarr store is a folder

    def __init__(
        self,
        path: str,
        layer: str | None = None,
        obsm: str | None = None,
        obsm_alternatives: list[str] | None = None,
        alternative_weights: list[float] | None = None,
        key_columns: list[str] | None = None,
        transform: Transform = "none",
        include: RowFilter | None = None,
        exclude: RowFilter | None = None,
    ) -> None:
        super().__init__(path, key_columns=key_columns, transform=transform, include=include, exclude=exclude)
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

        with self._open() as f:
            if self.obsm is not None:
                element = self._element(f)
                width = element.attrs["shape"][1] if _is_group(element) else element.shape[1]
                return [f"{self.obsm}_{i}" for i in range(width)]
            return list(read_elem(f["var"]).index)

    def num_rows(self) -> int:
        with self._open() as f:
            element = self._element(f)
            return int(element.attrs["shape"][0] if _is_group(element) else element.shape[0])

    def read_metadata(self, columns: list[str] | None = None) -> pd.DataFrame:
        from anndata.io import read_elem

        with self._open() as f:
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

    def read_alternatives(self, rows: np.ndarray | None) -> tuple[list[Matrix], list[float]] | None:
        """The rows ``rows`` in each ``obsm_alternatives`` representation (transformed like ``obsm``), with the
        weights of all representations (``obsm`` first); ``None`` without alternatives."""
        if not self.obsm_alternatives:
            return None
        matrices = []
        for key in self.obsm_alternatives:
            other = AnnDataSource(self.path, obsm=key, transform=self.transform)
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
        from unimodality.streaming import H5Store

        if self.is_zarr:
            raise DataError(f"{self.file}: streaming reads .h5ad files in place; read this .zarr store into memory "
                            "(leave data.streaming off), or convert it: anndata.read_zarr(path).write_h5ad(...)")
        with self._open() as f:
            self._element(f)  # a missing layer gets the source's own message
        return H5Store(self.file, self.element_key)

    def _read_raw(self, rows: np.ndarray | None) -> Matrix:
        from anndata.io import sparse_dataset

        with self._open() as f:
            element = self._element(f)
            if _is_group(element):
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
                return np.asarray(element[...], dtype=np.float32)
            take = element.oindex.__getitem__ if hasattr(element, "oindex") else element.__getitem__  # zarr / HDF5
            return np.asarray(_take_sorted(take, rows, sparse=False), dtype=np.float32)


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


def _is_group(element: Any) -> bool:
    """A group (a sparse matrix's data/indices/indptr) rather than a dense array, in HDF5 or zarr."""
    return isinstance(element, h5py.Group) or (not hasattr(element, "dtype") and hasattr(element, "keys"))
