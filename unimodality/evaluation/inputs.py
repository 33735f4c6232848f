"""Reading what is evaluated: ``.h5ad`` files (an ``obsm`` key, ``X``, a layer, or a checkpoint that embeds the
file first), parquet/CSV tables with embedding columns, in-memory ``AnnData``/``DataFrame``, folders of
them; with the raw features the baselines start from, and checks of the metadata columns named."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from unimodality.errors import DataError
from unimodality.evaluation.embedding import embed_with_checkpoint
from unimodality.sources import Transform

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".csv.gz", ".tsv.gz")
ANNDATA_SUFFIXES = (".h5ad",)
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


@dataclass
class LoadedDataset:
    """One dataset read for evaluation: metadata, its embedding and (for the baselines) its raw features."""

    name: str
    obs: pd.DataFrame
    embedding: np.ndarray
    raw: np.ndarray | None
    feature_names: list[str] | None
    embedding_is_raw: bool
    origin: dict[str, Any]


def load_dataset(
    item: Any,
    name: str | None = None,
    embedding: str = "X_unimodality",
    features: str | None = None,
    features_transform: Transform = "none",
    modality: str | None = None,
    source_options: dict[str, Any] | None = None,
    batch_size: int = 512,
    trust_checkpoint: bool = False,
    metadata: Iterable[str] = (),
) -> LoadedDataset:
    """Read one input: an ``AnnData``, a ``DataFrame`` or a file (``.h5ad``, parquet, CSV/TSV).

    ``embedding`` is an ``obsm`` key (or ``obsm/KEY``, ``layers/NAME``), ``X`` (the raw features themselves),
    a checkpoint path (the file is embedded first with the matching tower, as ``predict`` does) or, for a
    table, the prefix of its embedding columns (``X_unimodality`` for ``X_unimodality_0 ...``) or a column of
    vectors. ``features`` selects the raw features the baselines start from: a matrix of an ``.h5ad``
    (``X``, ``layers/NAME``, ``obsm/KEY``; default ``X``) or a regular expression of a table's columns
    (default: its numeric columns not starting with ``Metadata`` that are not embedding columns).
    Columns named in ``metadata`` (the perturbation, batch, label columns) are never taken for features.
    ``trust_checkpoint`` unpickles a checkpoint's objects (see ``embedding.load_model``).
    """
    import anndata as ad

    from unimodality.paths import resolve_path

    path: Path | None = None
    if isinstance(item, str | Path):
        path = resolve_path(item)
        if not path.exists():
            raise DataError(f"input {item}: no such file")
        name = name or _stem(path)
        if _is_table(path):
            item = _read_table(path)
        elif path.suffix in ANNDATA_SUFFIXES:
            try:
                item = ad.read_h5ad(path)
            except Exception as error:  # truncated, not HDF5, ...
                raise DataError(f"{path}: not a readable .h5ad file: {type(error).__name__}: {error}") from None
        else:
            raise DataError(f"input {path}: unsupported file type; expected .h5ad, .parquet, .csv or .tsv "
                            "(gzipped too)")
    where = str(path) if path is not None else (name or "data")
    name = name or "data"
    checkpoint = _is_checkpoint(embedding)
    if isinstance(item, ad.AnnData):
        obs = item.obs.copy()
        obs.index = obs.index.astype(str)
        if features is None and item.X is None:  # e.g. predict's output for a table: no raw features
            raw, feature_names = None, None
        else:
            raw, feature_names = _anndata_matrix(item, features or "X", where, "features"), None
            if (features or "X") == "X":
                feature_names = [str(v) for v in item.var_names]
        if checkpoint:
            rows, vectors = embed_with_checkpoint(item if path is None else path, embedding, modality,
                                                  source_options, batch_size, trust_checkpoint)
        else:
            rows, vectors = None, _anndata_matrix(item, embedding, where, "embedding")
        is_raw = embedding in ("X", features or "X") and not checkpoint
    elif isinstance(item, pd.DataFrame):
        table = item.reset_index(drop=True)
        embedding_columns: list[str] = []
        if checkpoint:
            rows, vectors = embed_with_checkpoint(table if path is None else path, embedding, modality,
                                                  source_options, batch_size, trust_checkpoint)
        elif embedding != "X":
            embedding_columns, vectors = _table_embedding(table, embedding, where)
            rows = None
        feature_names = _feature_columns(table, features, exclude={*embedding_columns, *metadata}, where=where)
        raw = table[feature_names].to_numpy(np.float64) if feature_names else None
        if embedding == "X":
            if raw is None:
                raise DataError(f"{where}: embedding X means the feature columns, and none was found "
                                f"(features={features!r})")
            rows, vectors = None, raw
        obs = table.drop(columns=[*embedding_columns, *(feature_names or [])])
        is_raw = embedding == "X"
    else:
        raise DataError(f"an input is an AnnData, a DataFrame or a file path; got {type(item).__name__}")
    if raw is not None and features_transform != "none":
        from unimodality.sources import apply_transform

        raw = np.asarray(apply_transform(raw, features_transform), dtype=np.float64)
        is_raw = False
    vectors = np.asarray(vectors)
    left_out = 0
    if rows is not None:  # a checkpoint's source may leave rows out (filters): they are not evaluated
        left_out = len(obs) - len(rows)
        if left_out:
            log.warning("%s: the checkpoint's source embedded %d of %d rows; the others are left out",
                        where, len(rows), len(obs))
        obs = obs.iloc[rows]
        raw = raw[rows] if raw is not None else None
    _check_finite(vectors, where, f"embedding {embedding!r}", "drop or impute those rows first")
    if raw is not None:
        _check_finite(raw, where, "raw features", "impute them, or set baselines: [] (no raw/pca/random)")
    return LoadedDataset(
        name=name, obs=obs.reset_index(drop=True), embedding=vectors.astype(np.float64, copy=False),
        raw=None if raw is None else np.asarray(raw, dtype=np.float64), feature_names=feature_names,
        embedding_is_raw=is_raw,
        origin={"input": where, "embedding": embedding, "features": features or "default", "left_out": left_out},
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".h5ad", ".parquet", ".pq", ".csv", ".tsv"):
        name = name.removesuffix(suffix)
    return name


def _is_table(path: Path) -> bool:
    return path.name.endswith(TABLE_SUFFIXES)


def _is_checkpoint(embedding: str) -> bool:
    return str(embedding).endswith(CHECKPOINT_SUFFIXES)


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if path.name.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if ".tsv" in path.name else ",")
    except Exception as error:
        raise DataError(f"{path}: not a readable table: {type(error).__name__}: {error}") from None


def _anndata_matrix(adata: Any, spec: str, where: str, what: str) -> np.ndarray:
    """``X``, ``layers/NAME``, ``obsm/KEY`` or a bare obsm key of an AnnData, dense."""
    import scipy.sparse as sp

    if spec == "X":
        matrix = adata.X
        if matrix is None:
            raise DataError(f"{where}: has no X matrix; name an obsm key or a layer for the {what}")
    elif spec.startswith("layers/"):
        key = spec[len("layers/"):]
        if key not in adata.layers:
            raise DataError(f"{where}: has no layer {key!r} ({what}); its layers: {sorted(adata.layers) or 'none'}")
        matrix = adata.layers[key]
    else:
        key = spec.removeprefix("obsm/")
        if key not in adata.obsm:
            raise DataError(f"{where}: has no obsm key {key!r} ({what}); its obsm keys: "
                            f"{sorted(adata.obsm) or 'none'} (or use X, layers/NAME or a checkpoint)")
        matrix = adata.obsm[key]
        if isinstance(matrix, pd.DataFrame):
            matrix = matrix.to_numpy()
    if sp.issparse(matrix):
        matrix = matrix.toarray()
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise DataError(f"{where}: {spec} ({what}) is not a numeric matrix (shape {matrix.shape}, {matrix.dtype})")
    return matrix


def _table_embedding(table: pd.DataFrame, prefix: str, where: str) -> tuple[list[str], np.ndarray]:
    """The embedding of a table: columns ``<prefix>_<i>`` (as ``predict`` writes them) or one column of vectors."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)$")
    numbered = sorted((int(m.group(1)), c) for c in table.columns if (m := pattern.match(str(c))))
    if numbered:
        columns = [c for _, c in numbered]
        return columns, table[columns].to_numpy(np.float64)
    if prefix in table.columns:
        try:
            return [prefix], np.stack([np.asarray(v, dtype=np.float64) for v in table[prefix]])
        except (TypeError, ValueError):
            raise DataError(f"{where}: column {prefix!r} does not hold vectors of one length") from None
    prefixes = sorted({m.group(1) for c in table.columns if (m := re.match(r"^(.*)_\d+$", str(c)))})
    raise DataError(f"{where}: no embedding columns {prefix}_0, {prefix}_1, ... nor a column {prefix!r} of vectors; "
                    f"numbered column prefixes found: {prefixes[:10] or 'none'} (or use X, or a checkpoint)")


def _feature_columns(table: pd.DataFrame, features: str | None, exclude: set[str], where: str) -> list[str] | None:
    if features is not None:
        try:
            pattern = re.compile(features)
        except re.error as error:
            raise DataError(f"features {features!r}: not a valid regular expression: {error}") from None
        columns = [c for c in table.columns if pattern.search(str(c)) and c not in exclude]
        bad = [c for c in columns if not pd.api.types.is_numeric_dtype(table[c])]
        if bad:
            raise DataError(f"{where}: feature columns matching {features!r} are not numeric: {bad[:5]}")
        if not columns:
            raise DataError(f"{where}: no column matches features {features!r}")
        return columns
    columns = [c for c in table.columns if c not in exclude and not str(c).startswith("Metadata")
               and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])]
    return columns or None


def _check_finite(matrix: np.ndarray, where: str, what: str, hint: str) -> None:
    if not np.issubdtype(matrix.dtype, np.number):
        raise DataError(f"{where}: {what} is not numeric ({matrix.dtype})")
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise DataError(f"{where}: {what} has NaN or infinite values in {int(bad.sum())} of {len(matrix)} rows "
                        f"(first: row {int(np.flatnonzero(bad)[0])}); {hint}")


def combine_datasets(datasets: list[LoadedDataset], name: str = "combined") -> LoadedDataset:
    """Several inputs stacked as one dataset (e.g. the plates of one screen); a ``file`` column says where each
    row came from (usable as the batch). Raw features are matched by name (those all inputs have)."""
    dims = {d.embedding.shape[1] for d in datasets}
    if len(dims) > 1:
        raise DataError(f"combine: the inputs' embeddings differ in dimension ({sorted(dims)})")
    raw = None
    names = [d.feature_names for d in datasets]
    if all(d.raw is not None for d in datasets):
        if all(n is not None for n in names):
            shared = [f for f in names[0] if all(f in set(n) for n in names[1:])]
            if not shared:
                raise DataError("combine: the inputs share no raw feature name; set baselines: []")
            raw = np.vstack([d.raw[:, pd.Index(n).get_indexer(shared)] for d, n in zip(datasets, names)])
            names = shared
        elif len({d.raw.shape[1] for d in datasets}) == 1:
            raw, names = np.vstack([d.raw for d in datasets]), None
    obs = pd.concat([d.obs.assign(file=d.name) for d in datasets], ignore_index=True)
    named = isinstance(names, list) and bool(names) and isinstance(names[0], str)
    return LoadedDataset(name=name, obs=obs, embedding=np.vstack([d.embedding for d in datasets]), raw=raw,
                         feature_names=names if named else None,
                         embedding_is_raw=all(d.embedding_is_raw for d in datasets),
                         origin={"inputs": [d.origin for d in datasets]})


def list_inputs(data: Any) -> list[tuple[str | None, Any]]:
    """``(name, item)`` of every input: a dict maps names to inputs; a folder holds its supported files."""
    if isinstance(data, Mapping):
        return [(str(k), v) for k, v in data.items()]
    items = list(data) if isinstance(data, list | tuple) else [data]
    out: list[tuple[str | None, Any]] = []
    from unimodality.paths import resolve_path

    for item in items:
        if isinstance(item, str | Path) and resolve_path(item).is_dir():
            folder = resolve_path(item)
            files = sorted(p for p in folder.iterdir() if p.suffix in ANNDATA_SUFFIXES or _is_table(p))
            if not files:
                raise DataError(f"input folder {folder}: holds no .h5ad, parquet or CSV file")
            out += [(None, f) for f in files]
        else:
            out.append((None, item))
    return out


def check_columns(dataset: LoadedDataset, perturbation: list[str], batch: str | None, control: str | None,
                   control_column: str | None, labels: list[str]) -> None:
    import difflib

    columns = list(dataset.obs.columns)
    named = [("perturbation", c) for c in perturbation] + [("batch", batch), ("control_column", control_column)]
    named += [("labels", c) for c in labels]
    for option, column in named:
        if column is not None and column not in dataset.obs.columns:
            close = difflib.get_close_matches(str(column), [str(c) for c in columns], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(map(str, columns[:30])) + (" ..." if len(columns) > 30 else "")
            raise DataError(f"{dataset.origin.get('input', dataset.name)}: no metadata column {column!r} "
                            f"(--{option}).{hint} Columns: {listed}")
    if control is not None:
        column = control_column or (perturbation[0] if perturbation else None)
        if column is None:
            raise DataError("--control names a value of the perturbation column: give --perturbation (or "
                            "--control_column)")
        values = dataset.obs[column].astype(str)
        if not (values == str(control)).any():
            examples = ", ".join(repr(v) for v in pd.unique(values)[:8])
            # a training filter that left the controls out is recorded in the checkpoint and applied here too
            parts = dataset.origin.get("inputs", [dataset.origin])  # combined inputs: each one's origin
            left_out = sum(part.get("left_out", 0) for part in parts)
            filtered = (f"; the checkpoint's source filters left out {left_out} rows: if the controls are among "
                        "them, set source_options {exclude: null}") if left_out else ""
            raise DataError(f"{dataset.origin.get('input', dataset.name)}: control value {control!r} is found in no "
                            f"row of column {column!r} (values include {examples}){filtered}")
