"""Images as a modality: multi-channel microscopy images (Cell Painting's 5-6 stains, or any other count).

A table (parquet, CSV/TSV or an ``.h5ad``'s obs) holds one row per image with its metadata and key columns;
the pixels come from either

- an **array file** aligned to the table's rows: ``.npy`` (memory-mapped, nothing is loaded up front),
  an HDF5 dataset (``.h5``/``.hdf5``) or a zarr array (``.zarr``, when zarr is installed), of shape
  ``(rows, channels, height, width)`` (or ``(rows, height, width, channels)`` with ``channels_last``, or
  ``(rows, height, width)`` for one channel); or
- **image files** named in a column: one multi-channel file per row (TIFF pages or samples, via tifffile
  when installed and PIL otherwise; PNG via PIL), or one single-channel file per channel
  (``channel_columns``).

Each channel is normalised as ``(x - mean) / std``; statistics not given are computed from an evenly
spaced sample of the file's images and recorded in the model's schema, so ``unimodality predict`` reads new
images with the training statistics. Batches are float32 tensors ``(batch, channels, height, width)``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from unimodality.errors import DataError
from unimodality.paths import resolve_path
from unimodality.plugins.sources.formats import read_metadata_of
from unimodality.sources import ModalitySource, RowFilter

log = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy", ".h5", ".hdf5", ".zarr")
FILE_SUFFIXES = (".tif", ".tiff", ".png")


def table_stem(file: Path) -> str:
    """A table's name without its suffixes (``wells.csv.gz`` -> ``wells``): what ``{stem}`` stands for."""
    return file.name.split(".")[0]


def read_image_file(file: Path) -> np.ndarray:
    """The pixels of one image file as ``(channels, height, width)``, in the file's own dtype.

    TIFF: with tifffile, the first series (pages or a ``C``/``Q`` axis are channels; ``S``, samples per
    pixel as in RGB, are moved first); without it, PIL reads every page as a channel. PNG and other
    formats: PIL, grey images are one channel, RGB(A) one per band.
    """
    if not file.is_file():
        raise FileNotFoundError(file)
    if file.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            tifffile = None
        if tifffile is not None:
            with tifffile.TiffFile(file) as tif:
                series = tif.series[0]
                pixels, axes = series.asarray(), series.axes
            if pixels.ndim == 3 and axes.endswith("S"):
                pixels = np.moveaxis(pixels, -1, 0)
            return pixels[None] if pixels.ndim == 2 else pixels
    from PIL import Image, ImageSequence

    with Image.open(file) as image:
        frames = [np.asarray(frame) for frame in ImageSequence.Iterator(image)]
    frames = [f[None] if f.ndim == 2 else np.moveaxis(f, -1, 0) for f in frames]
    if len({f.shape[1:] for f in frames}) > 1:
        raise DataError(f"{file}: its pages have different sizes {[f.shape[1:] for f in frames]}")
    return np.concatenate(frames) if len(frames) > 1 else frames[0]


class _ArrayReader:
    """Rows of an image array file (``.npy``, HDF5, zarr), as ``(n, C, H, W)`` in the file's channel order.

    Handles are opened lazily and once per process (DataLoader workers fork), never pickled open.
    """

    def __init__(self, file: Path, dataset: str | None, channels_last: bool) -> None:
        self.file = file
        self.dataset = dataset
        self.channels_last = channels_last
        self._array: Any = None
        self._pid: int | None = None
        self._h5: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None, "_pid": None, "_h5": None}

    def array(self) -> Any:
        if self._array is not None and self._pid == os.getpid():
            return self._array
        suffix = self.file.suffix.lower()
        if not self.file.exists():
            raise DataError(f"image array file not found: {self.file}")
        if suffix == ".npy":
            try:
                self._array = np.load(self.file, mmap_mode="r")  # memory-mapped: rows are read as asked
            except ValueError as err:
                raise DataError(f"{self.file}: cannot memory-map the array ({err})") from err
        elif suffix in (".h5", ".hdf5"):
            import h5py

            self._h5 = h5py.File(self.file, "r")
            self._array = self._member(self._h5, "HDF5 dataset")
        elif suffix == ".zarr":
            try:
                import zarr
            except ImportError as err:
                raise ImportError(f"{self.file}: reading zarr needs the zarr package: pip install zarr") from err
            self._array = self._member(zarr.open(str(self.file), mode="r"), "zarr array")
        else:
            raise DataError(f"{self.file}: unsupported image array file; expected {', '.join(ARRAY_SUFFIXES)}")
        self._pid = os.getpid()
        return self._array

    def _member(self, root: Any, what: str) -> Any:
        if hasattr(root, "shape"):  # the file is the array itself (a zarr array)
            return root
        names = sorted(root.keys())
        name = self.dataset
        if name is None:
            arrays = [n for n in names if hasattr(root[n], "shape")]
            name = arrays[0] if len(arrays) == 1 else "images"
        if name not in root or not hasattr(root[name], "shape"):
            raise DataError(
                f"{self.file}: no {what} {name!r}; it holds {names}. Name the images with dataset: <name>"
            )
        return root[name]

    def channel_names(self) -> list[str] | None:
        """Channel names stored with the array (an HDF5/zarr ``channels`` attribute), if any."""
        attrs = getattr(self.array(), "attrs", None)
        if attrs is None or "channels" not in attrs:
            return None
        return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(attrs["channels"]).ravel()]

    def shape(self) -> tuple[int, int, int, int]:
        """``(rows, C, H, W)``."""
        shape = tuple(self.array().shape)
        if len(shape) == 3:
            return (shape[0], 1, shape[1], shape[2])
        if len(shape) != 4:
            layout = "(rows, height, width, channels)" if self.channels_last else "(rows, channels, height, width)"
            raise DataError(f"{self.file}: expected an image array of shape {layout}, got {shape}")
        return (shape[0], shape[3], shape[1], shape[2]) if self.channels_last else shape

    def dtype(self) -> np.dtype:
        return np.dtype(self.array().dtype)

    def read(self, rows: np.ndarray) -> np.ndarray:
        array = self.array()
        unique, inverse = np.unique(rows, return_inverse=True)  # HDF5/zarr want increasing indices
        block = array.oindex[unique] if hasattr(array, "oindex") else array[unique]  # zarr: orthogonal indexing
        block = np.asarray(block)[inverse]
        if block.ndim == 3:
            return block[:, None]
        return np.moveaxis(block, -1, 1) if self.channels_last else block

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._array, self._h5, self._pid = None, None, None


class _FileReader:
    """Rows of a table whose columns name image files: one multi-channel file per row, or one per channel."""

    def __init__(self, files: list[np.ndarray], columns: list[str], table: Path) -> None:
        self.files = files  # per column: every row's resolved file
        self.columns = columns
        self.table = table
        self._shape: tuple[int, int, int] | None = None

    def _read_one(self, row: int, column: int) -> np.ndarray:
        file = Path(self.files[column][row])
        try:
            pixels = read_image_file(file)
        except FileNotFoundError:
            raise DataError(
                f"{self.table}: row {row}: image file not found: {file} (column {self.columns[column]!r})"
            ) from None
        except DataError:
            raise
        except Exception as err:  # a corrupt or unsupported file: name it
            raise DataError(f"{file} (row {row}, column {self.columns[column]!r}): cannot read the image: {err}") \
                from err
        if len(self.columns) > 1 and pixels.shape[0] != 1:
            raise DataError(
                f"{file} (row {row}, column {self.columns[column]!r}): has {pixels.shape[0]} channels; with "
                "channel_columns each file holds one channel"
            )
        return pixels

    def _read_row(self, row: int) -> np.ndarray:
        parts = [self._read_one(row, c) for c in range(len(self.columns))]
        sizes = {p.shape[1:] for p in parts}
        if len(sizes) > 1:
            raise DataError(f"{self.table}: row {row}: its channel files have different sizes {sorted(sizes)}")
        pixels = np.concatenate(parts) if len(parts) > 1 else parts[0]
        expected = self.first_shape()
        if pixels.shape != expected:
            raise DataError(
                f"{self.files[0][row]} (row {row}): image of shape (channels, height, width) {pixels.shape}, "
                f"expected {expected} as the first row's; images of one source must share their shape"
            )
        return pixels

    def first_shape(self) -> tuple[int, int, int]:
        if self._shape is None:
            parts = [self._read_one(0, c) for c in range(len(self.columns))]
            self._shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        return self._shape

    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files[0]), *self.first_shape())

    def channel_names(self) -> list[str] | None:
        return list(self.columns) if len(self.columns) > 1 else None

    def dtype(self) -> np.dtype:
        return self._read_row(0).dtype

    def read(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([self._read_row(int(r)) for r in rows])

    def close(self) -> None:
        pass


class ImageStore:
    """The images of a block of rows, read a batch at a time: ``take(rows)`` gives a normalised float32
    tensor ``(batch, channels, height, width)`` (rows are positions in the block), channels in the model's
    order."""

    def __init__(
        self, reader: Any, rows: np.ndarray, channel_index: np.ndarray, channel_names: list[str],
        mean: np.ndarray | None, std: np.ndarray | None, source: str,
    ) -> None:
        self.reader = reader
        self.rows = rows
        self.channel_index = channel_index
        self.channel_names = channel_names
        self.mean = None if mean is None else torch.from_numpy(mean.astype(np.float32))[None, :, None, None]
        self.std = None if std is None else torch.from_numpy(std.astype(np.float32))[None, :, None, None]
        self.source = source

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, rows: np.ndarray) -> torch.Tensor:
        file_rows = self.rows[np.asarray(rows)]
        pixels = self.reader.read(file_rows)
        pixels = np.asarray(pixels[:, self.channel_index], dtype=np.float32)
        if not np.isfinite(pixels).all():
            bad = ~np.isfinite(pixels)
            bad_rows, bad_channels = np.nonzero(bad.any(axis=(2, 3)))
            examples = ", ".join(
                f"row {file_rows[r]} / {self.channel_names[c]}" for r, c in list(zip(bad_rows, bad_channels))[:5]
            )
            raise DataError(
                f"{self.source}: {int(bad.sum())} NaN or infinite pixel values in {len(np.unique(bad_rows))} images "
                f"(e.g. {examples}); clean them first"
            )
        batch = torch.from_numpy(pixels)
        if self.mean is not None:
            batch = (batch - self.mean) / self.std
        return batch


class ImageSource(ModalitySource):
    """Multi-channel images, one per row of a table (parquet, CSV/TSV, or an ``.h5ad``'s obs).

    Give the pixels with exactly one of ``images`` (an array file aligned to the table's rows),
    ``image_column`` (a column naming one multi-channel file per row) or ``channel_columns`` (columns
    naming one single-channel file per channel). Relative paths are taken from the table's folder, and
    ``{stem}`` in ``images`` stands for the table's name without suffixes: with
    ``images: "{stem}_images.npy"`` a trained model embeds ``new.parquet`` with the images in
    ``new_images.npy`` beside it (``unimodality predict --data.path new.parquet``). An absolute ``images``
    path is recorded as it is and read again at predict time.

    Channels are the features: they are named by ``channels``, else by the array's ``channels`` attribute
    (HDF5/zarr) or the ``channel_columns``, else ``ch0``, ``ch1``, ...; a model reads another file's
    channels by name (another order works, a missing channel is an error).

    Args:
        path: the table of metadata and key columns (``.parquet``, ``.csv``, ``.tsv``, ``.h5ad``).
        images: the image array file: ``.npy``, ``.h5``/``.hdf5`` or ``.zarr``; ``(rows, channels, height,
            width)``, or ``(rows, height, width)`` for one channel.
        dataset: the HDF5 dataset or zarr array inside ``images``; default: its only array, or ``images``.
        channels_last: the array is ``(rows, height, width, channels)``.
        image_column: the column naming each row's image file (multi-channel TIFF, PNG).
        channel_columns: columns naming one single-channel image file per channel, in channel order.
        image_dir: folder of the image files named in the table (default: the table's folder).
        channels: the channel names, in the file's channel order (e.g. ``[DNA, ER, RNA, AGP, Mito]``).
        normalize: normalise each channel to ``(x - mean) / std``.
        mean: per-channel means (a list in channel order, or by channel name); default: computed.
        std: per-channel standard deviations, likewise.
        stats_sample: how many images (evenly spaced over the file) the statistics are computed from.
        key_columns: see `ModalitySource`.
        include: keep only rows whose metadata holds the listed values; see `ModalitySource`.
        exclude: leave out rows whose metadata holds the listed values; see `ModalitySource`.
    """

    format = "images"
    input_kind = "images"

    def __init__(
        self,
        path: str,
        images: str | None = None,
        dataset: str | None = None,
        channels_last: bool = False,
        image_column: str | None = None,
        channel_columns: list[str] | None = None,
        image_dir: str | None = None,
        channels: list[str] | None = None,
        normalize: bool = True,
        mean: list[float] | dict[str, float] | None = None,
        std: list[float] | dict[str, float] | None = None,
        stats_sample: int = 512,
        key_columns: list[str] | None = None,
        include: RowFilter | None = None,
        exclude: RowFilter | None = None,
    ) -> None:
        super().__init__(path, key_columns=key_columns, include=include, exclude=exclude)
        given = [images is not None, image_column is not None, channel_columns is not None]
        if sum(given) != 1:
            raise ValueError(
                "ImageSource: give the pixels with exactly one of images (an array file), image_column (a "
                f"column of image files) or channel_columns (one file column per channel) (path: {path})"
            )
        if channel_columns is not None and not channel_columns:
            raise ValueError("ImageSource: channel_columns must name at least one column")
        if stats_sample < 1:
            raise ValueError(f"ImageSource: stats_sample must be at least 1, got {stats_sample}")
        self.images = images
        self.dataset = dataset
        self.channels_last = channels_last
        self.image_column = image_column
        self.channel_columns = list(channel_columns) if channel_columns is not None else None
        self.image_dir = image_dir
        self.channels = list(channels) if channels is not None else None
        self.normalize = normalize
        self.mean = mean
        self.std = std
        self.stats_sample = stats_sample
        self._reader: Any = None
        self._stats: tuple[dict[str, float], dict[str, float]] | None = None
        self._num_rows: int | None = None

    # -- where the pixels are ------------------------------------------------------------------------
    def _relative_to_table(self, name: str) -> Path:
        if name.startswith("example://"):
            return resolve_path(name)
        path = Path(name.replace("{stem}", table_stem(self.file))).expanduser()
        return path if path.is_absolute() else self.file.parent / path

    @property
    def images_file(self) -> Path | None:
        """The image array file (None when images are files named in the table)."""
        return None if self.images is None else self._relative_to_table(self.images)

    def reader(self) -> Any:
        if self._reader is None:
            if self.images is not None:
                self._reader = _ArrayReader(self.images_file, self.dataset, self.channels_last)
            else:
                columns = [self.image_column] if self.image_column is not None else self.channel_columns
                folder = self._relative_to_table(self.image_dir) if self.image_dir is not None else self.file.parent
                table = read_metadata_of(self.file, columns)
                files = []
                for column in columns:
                    values = table[column]
                    if values.isna().any():
                        rows = np.flatnonzero(values.isna().to_numpy())
                        raise DataError(f"{self.file}: column {column!r} names no image file in rows {rows[:5]}")
                    files.append(np.array([str(folder / Path(str(v)).expanduser()) for v in values], dtype=object))
                self._reader = _FileReader(files, columns, self.file)
        return self._reader

    def _check_files_exist(self, rows: np.ndarray) -> None:
        reader = self.reader()
        if not isinstance(reader, _FileReader):
            return
        for column, files in zip(reader.columns, reader.files):
            missing = [r for r in rows if not os.path.isfile(files[r])]
            if missing:
                raise DataError(
                    f"{self.file}: {len(missing)} image files named in column {column!r} do not exist "
                    f"(e.g. row {missing[0]}: {files[missing[0]]})"
                )

    # -- ModalitySource ------------------------------------------------------------------------------
    def read_metadata(self, columns: list[str] | None = None) -> pd.DataFrame:
        return read_metadata_of(self.file, columns)

    def num_rows(self) -> int:
        if self._num_rows is None:
            table_rows = self._table_rows()
            reader = self.reader()
            shape = reader.shape()
            if shape[0] != table_rows:
                raise DataError(
                    f"{self.images_file}: holds {shape[0]} images but the table {self.file} has {table_rows} rows; "
                    "the image array must hold one image per table row, in the table's order"
                )
            self._num_rows = table_rows
        return self._num_rows

    def _table_rows(self) -> int:
        name = self.file.name.lower()
        if name.endswith(".h5ad"):
            from unimodality.plugins.sources.anndata import AnnDataSource

            return len(AnnDataSource(str(self.file)).read_metadata())
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.file).metadata.num_rows
        return len(read_metadata_of(self.file))

    def _read_feature_names(self) -> list[str]:
        reader = self.reader()
        _, n_channels, height, width = reader.shape()
        where = self.images_file or f"{self.file} (column {self.image_column or self.channel_columns})"
        dtype = reader.dtype()
        if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(dtype, np.complexfloating):
            raise DataError(f"{where}: image pixels must be real numbers, got dtype {dtype}")
        names = self.channels or reader.channel_names() or [f"ch{i}" for i in range(n_channels)]
        if len(names) != n_channels:
            raise DataError(
                f"{where}: images have {n_channels} channels (shape (channels, height, width) = "
                f"{(n_channels, height, width)}) but {len(names)} channel names are given ({names})"
            )
        return list(names)

    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the file's images."""
        return tuple(self.reader().shape()[1:])

    # -- normalisation --------------------------------------------------------------------------------
    def _given(self, values: list[float] | dict[str, float], what: str) -> dict[str, float]:
        names = self.feature_names()
        if isinstance(values, dict):
            missing = [n for n in names if n not in values]
            if missing:
                raise ValueError(f"ImageSource: {what} has no value for channel(s) {missing} (it has {list(values)})")
            return {n: float(values[n]) for n in names}
        if len(values) != len(names):
            raise ValueError(f"ImageSource: {what} has {len(values)} values for {len(names)} channels {names}")
        return {n: float(v) for n, v in zip(names, values)}

    def statistics(self) -> tuple[dict[str, float], dict[str, float]]:
        """Per-channel mean and standard deviation: as given, or computed from a sample of the images."""
        if self._stats is None:
            names = self.feature_names()
            if self.mean is not None and self.std is not None:
                mean, std = self._given(self.mean, "mean"), self._given(self.std, "std")
            else:
                n = self.num_rows()
                sample = np.unique(np.linspace(0, n - 1, min(n, self.stats_sample)).round().astype(np.int64))
                self._check_files_exist(sample)
                store = ImageStore(self.reader(), sample, np.arange(len(names)), names, None, None, self._where())
                sums = np.zeros(len(names))
                squares = np.zeros(len(names))
                count = 0
                for start in range(0, len(sample), 64):  # a block at a time: large images stay within memory
                    block = store.take(np.arange(start, min(start + 64, len(sample)))).double()
                    sums += block.sum(dim=(0, 2, 3)).numpy()
                    squares += (block ** 2).sum(dim=(0, 2, 3)).numpy()
                    count += block.shape[0] * block.shape[2] * block.shape[3]
                computed_mean = sums / count
                computed_std = np.sqrt(np.maximum(squares / count - computed_mean ** 2, 0))
                constant = [n for n, s in zip(names, computed_std) if s < 1e-8]
                if constant:
                    warnings.warn(f"{self._where()}: channel(s) {constant} are constant; their std is set to 1",
                                  stacklevel=2)
                computed_std[computed_std < 1e-8] = 1.0
                mean = self._given(self.mean, "mean") if self.mean is not None else dict(
                    zip(names, computed_mean.tolist()))
                std = self._given(self.std, "std") if self.std is not None else dict(zip(names, computed_std.tolist()))
                log.info("%s: per-channel mean %s, std %s (from %d images)", self._where(),
                         _rounded(mean), _rounded(std), len(sample))
            bad = [n for n in names if not (np.isfinite(std[n]) and std[n] > 0 and np.isfinite(mean[n]))]
            if bad:
                raise ValueError(f"ImageSource: channel(s) {bad} have a non-finite mean or a std that is not > 0")
            self._stats = (mean, std)
        return self._stats

    def _where(self) -> str:
        return str(self.images_file) if self.images is not None else str(self.file)

    # -- reading -----------------------------------------------------------------------------------------
    def read_features(
        self, rows: np.ndarray | None = None, align_to: list[str] | None = None, empty_rows: str = "error"
    ) -> ImageStore:
        """A store of the images of ``rows`` (all when None), channels aligned by name to ``align_to``."""
        names = self.feature_names()
        n = self.num_rows()
        rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"{self.file}: rows out of range for {n} rows")
        target = names if align_to is None else list(align_to)
        index = pd.Index(names).get_indexer(target)
        if (index < 0).any():
            missing = [t for t, i in zip(target, index) if i < 0]
            raise DataError(
                f"{self._where()}: has no channel(s) {missing} that the model was trained on; it has channels "
                f"{names} (name them with channels: [...], in the file's channel order)"
            )
        self._check_files_exist(rows)
        mean = std = None
        if self.normalize:
            stats_mean, stats_std = self.statistics()
            mean = np.array([stats_mean[t] for t in target])
            std = np.array([stats_std[t] for t in target])
        return ImageStore(self.reader(), rows, index, target, mean, std, self._where())

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.normalize:  # a new file is normalised with this file's statistics
            mean, std = self.statistics()
            described["init_args"].update(mean=dict(mean), std=dict(std))
        return described

    def close(self) -> None:
        # the reader is kept: a store made by read_features still reads through it (file handles reopen
        # lazily); the statistics are kept for the run
        self._num_rows = None


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in values.items()}
