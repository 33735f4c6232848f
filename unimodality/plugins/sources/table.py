"""``TableSource``: a modality stored in a table (parquet, CSV or TSV): metadata + feature columns."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from unimodality.errors import DataError
from unimodality.sources import (
    Matrix,
    ModalitySource,
    RowFilter,
    Scale,
    Transform,
    align_features,
    check_feature_columns,
    feature_column,
    feature_columns,
    features_block,
    is_numeric_type,
    is_parquet,
    is_vector_type,
    parquet_dataset,
    read_table,
    vector_width,
)

if TYPE_CHECKING:
    from unimodality.streaming import RowStore

#: ``features: numeric``: every numeric column that is not metadata
NUMERIC = "numeric"


class TableSource(ModalitySource):
    """A modality stored in a table (parquet, or CSV/TSV, optionally gzipped): metadata + feature columns.

    Select the feature columns with exactly one of ``features``, ``feature_prefix`` or ``feature_regex``;
    every other column is metadata. ``features: numeric`` selects every numeric (or list-of-numbers) column
    except the ``key_columns`` (which it needs, so that a numeric key such as a dose is never taken for a
    feature), the columns the row filters and ``metadata_features`` name, and those listed in
    ``metadata_columns``: e.g. CITE-seq protein counts, whose names share no prefix.

    A selected column may hold one vector per row (a list, large list or fixed-size list of numbers, e.g. an
    image model's embedding of each well): its elements are features named ``<column>[0]``, ``<column>[1]``,
    ...; scalar and list columns mix freely.

    Args:
        path: the table file (``.parquet``, ``.csv``, ``.csv.gz``, ``.tsv``, ``.tsv.gz``), or a folder of
            parquet files read as one table (in path order; Hive-style partition folders such as
            ``plate=P1/`` become metadata columns; every file must have the same columns).
        features: the feature columns by name (a list column stands for all its elements; ``col[i]`` names one),
            or ``numeric``: every numeric column that is not metadata (see above).
        feature_prefix: every column whose name starts with this prefix is a feature.
        feature_regex: every column whose name matches this regular expression is a feature.
        metadata_columns: with ``features: numeric``, numeric columns that are metadata, not features (e.g. a
            plate number or a dose kept for reference).
        key_columns: see `ModalitySource`.
        transform: see `ModalitySource`.
        include: keep only rows whose metadata holds the listed values; see `ModalitySource`.
        exclude: leave out rows whose metadata holds the listed values; see `ModalitySource`.
        metadata_features: numeric metadata columns fed to the tower too (dose as an input, e.g.
            ``{treatment_concentration: log10}``); see `ModalitySource`.
    """

    format = "table"
    suffixes = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv", ".tsv.gz")
    reads_folders = True

    def __init__(
        self,
        path: str,
        features: list[str] | Literal["numeric"] | None = None,
        feature_prefix: str | None = None,
        feature_regex: str | None = None,
        metadata_columns: list[str] | None = None,
        key_columns: list[str] | None = None,
        transform: Transform = "none",
        include: RowFilter | None = None,
        exclude: RowFilter | None = None,
        metadata_features: dict[str, Scale] | None = None,
    ) -> None:
        super().__init__(path, key_columns=key_columns, transform=transform, include=include, exclude=exclude,
                         metadata_features=metadata_features)
        given = [x is not None for x in (features, feature_prefix, feature_regex)]
        if sum(given) != 1:
            raise ValueError(
                "TableSource: select the feature columns with exactly one of features (a list of names), "
                f"feature_prefix or feature_regex (path: {path})"
            )
        if isinstance(features, str) and features != NUMERIC:
            raise ValueError(f"TableSource: features is a list of column names or {NUMERIC!r}, got {features!r} "
                             f"(path: {path})")
        if features == NUMERIC and not key_columns:
            raise ValueError(f"TableSource: features: {NUMERIC} needs key_columns (the key columns are metadata, "
                             f"never features, even when numeric) (path: {path})")
        if metadata_columns and features != NUMERIC:
            raise ValueError("TableSource: metadata_columns goes with features: numeric (with a list, prefix or regex "
                             f"every other column is metadata already) (path: {path})")
        self.features = features
        self.metadata_columns = list(metadata_columns or [])
        self.feature_prefix = feature_prefix
        self.feature_regex = feature_regex
        self._table: pa.Table | None = None

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        # a new file is read by the exact columns the model was trained on
        described["init_args"].update(features=list(self.feature_names()), feature_prefix=None, feature_regex=None)
        described["init_args"].pop("metadata_columns", None)  # (features: numeric only) the list says it all
        return described

    @property
    def _is_parquet(self) -> bool:
        return is_parquet(self.file)

    def _schema(self) -> pa.Schema:
        if self._is_parquet:
            return parquet_dataset(self.file).schema
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
        if self.features == NUMERIC:
            return self._expand(self._numeric_columns(schema), schema)
        if self.features is not None:  # checked against the file when read (align or error)
            return self._expand(list(self.features), schema)
        if self.feature_prefix is not None:
            names = [c for c in columns if c.startswith(self.feature_prefix)]
            what = f"prefix {self.feature_prefix!r}"
        else:
            pattern = re.compile(self.feature_regex)
            names = [c for c in columns if pattern.search(c)]
            what = f"regex {self.feature_regex!r}"
        if not names:
            raise DataError(f"{self.file}: no column matches the feature {what}; columns: {columns[:10]}...")
        return self._expand(names, schema)

    def _numeric_columns(self, schema: pa.Schema) -> list[str]:
        """``features: numeric``: the numeric (or list-of-numbers) columns that no setting names as metadata."""
        metadata = {*self.key_columns, *self.include, *self.exclude, *self.metadata_features, *self.metadata_columns}
        absent = [c for c in [*self.key_columns, *self.metadata_columns] if c not in schema.names]
        if absent:
            raise DataError(f"{self.file}: has no column(s) {absent} (key_columns / metadata_columns); columns: "
                            f"{schema.names[:10]}...")
        names = [field.name for field in schema if field.name not in metadata
                 and (is_numeric_type(field.type) or is_vector_type(field.type))]
        if not names:
            raise DataError(f"{self.file}: features: numeric found no numeric column besides the metadata "
                            f"{sorted(metadata)}; columns: {schema.names[:10]}...")
        return names

    def _expand(self, names: list[str], schema: pa.Schema) -> list[str]:
        """Feature names with each list column replaced by the names of its elements."""
        out = []
        for name in names:
            if name in schema.names and is_vector_type(schema.field(name).type):
                width = vector_width(self.file, self._read_table([name]).column(name), name)
                out += [f"{name}[{i}]" for i in range(width)]
            else:
                out.append(name)
        return out

    def num_rows(self) -> int:
        if self._is_parquet:
            return parquet_dataset(self.file).count_rows()
        return self._read_table().num_rows

    def read_metadata(self, columns: list[str] | None = None) -> pd.DataFrame:
        schema = self._schema()
        names = schema.names
        if columns is None:
            features = set(feature_columns(self.feature_names(), schema))
            columns = [c for c in names if c not in features]
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{self.file}: has no column(s) {missing}; available: {names[:20]}...")
        return self._read_table(columns).to_pandas()

    def _own_columns(self, wanted: list[str]) -> list[str]:
        """The features of ``wanted`` this file has (a column, or an element of a list column)."""
        schema = self._schema()
        return [name for name in wanted if feature_column(name, schema) in schema.names]

    def _read_raw(self, rows: np.ndarray | None) -> Matrix:
        names = self.feature_names()
        if self.features is not None and self.features != NUMERIC:
            check_feature_columns(self.file, self._schema(), names)
        return self._read_columns(self._own_columns(names), rows)

    def _read_columns(self, names: list[str], rows: np.ndarray | None) -> np.ndarray:
        """Features ``names`` (of columns this file has) of ``rows`` (all when None)."""
        table = self._read_table(feature_columns(names, self._schema()))
        check_feature_columns(self.file, table.schema, names)
        if rows is not None:
            table = table.take(pa.array(np.asarray(rows, dtype=np.int64)))
        return features_block(self.file, table, names)

    def row_store(self, cache_dir: str | Path | None = None) -> RowStore:
        """Rows read from a row-major ``.npy`` cache of the feature columns, built once (Arrow has no fast
        random row access); see `unimodality.streaming.table_cache`."""
        from unimodality.streaming import NpyStore, table_cache

        return NpyStore(table_cache(self, cache_dir))

    def _read_aligned(self, rows: np.ndarray | None, align_to: list[str]) -> Matrix:
        # read only the model's columns that this file has, by name
        available = self._own_columns(align_to)
        if not available:
            raise DataError(
                f"{self.file}: none of the model's {len(align_to)} feature columns are in this file "
                f"(model expects e.g. {align_to[:3]})"
            )
        return align_features(self._read_columns(available, rows), available, align_to, self.file)
