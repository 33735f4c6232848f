"""Which built-in source reads a file, and the metadata columns of any supported file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from unimodality.errors import DataError
from unimodality.plugins.sources.anndata import SUFFIXES, AnnDataSource
from unimodality.plugins.sources.table import TableSource
from unimodality.sources import ModalitySource, is_parquet, parquet_dataset, read_table


def read_metadata_of(file: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Columns (all when None) of any supported file: ``obs`` of an ``.h5ad`` (the obs index too), or a table."""
    if str(file).lower().endswith((".h5ad", ".zarr")):
        return AnnDataSource(str(file)).read_metadata(columns)
    source_for(file)  # an unsupported file type gets the usual message
    names = parquet_dataset(file).schema.names if is_parquet(file) else read_table(file).schema.names
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise DataError(f"{file}: has no column(s) {missing}; available: {names[:20]}")
    return read_table(file, columns).to_pandas()


def source_for(path: str | Path | list[str]) -> type[ModalitySource]:
    """The source class that reads a file (or a folder, pattern or list of files), by its extension."""
    if isinstance(path, list | tuple):
        return AnnDataSource if path and all(str(p).lower().endswith(SUFFIXES) for p in path) else source_for("")
    name = str(path).lower().rstrip("/")
    for cls in (AnnDataSource, TableSource):
        if name.endswith(cls.suffixes):
            return cls
    if Path(path).is_dir():  # a folder of .h5ad files, or of parquet files (a sharded table)
        return AnnDataSource if any(p.suffix in SUFFIXES for p in Path(path).iterdir()) else TableSource
    raise DataError(f"{path}: unsupported file type; expected .h5ad, .parquet, .csv(.gz) or .tsv(.gz)")
