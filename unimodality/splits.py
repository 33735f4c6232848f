"""Keys and splits shared by the datamodules: which perturbation a row belongs to, and which split it is in.

A perturbation (the values of the key columns) is never in two splits. Splits come from a column of
``train``/``val``/``test`` labels, from a column of named values (experiments, plates) listed per held-out
split, or from seeded held-out fractions of the keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from unimodality.errors import DataError
from unimodality.sources import ModalitySource

SPLITS = ("train", "val", "test")
#: significant digits of floating-point key values (see PairedDataModule's ``key_digits``)
KEY_DIGITS = 6


def check_fractions(owner: str, val_fraction: float, test_fraction: float) -> None:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"{owner}: need 0 <= val_fraction, test_fraction and their sum < 1")


def read_keys(
    source: ModalitySource, keys: list[str], split_column: str | None, digits: int | None = KEY_DIGITS
) -> pd.DataFrame:
    """The key columns of a source (renamed to ``keys``, floating-point ones in canonical form, see
    `canonical_keys`) and its split column when it has one.

    A file without rows, and rows missing a key value, are errors naming the file (and rows).
    """
    own = source.key_columns or keys
    columns = list(own)
    if split_column is not None and split_column in source.read_metadata().columns:
        columns.append(split_column)
    meta = source.read_metadata(columns).rename(columns=dict(zip(own, keys)))
    if meta.empty:
        raise DataError(f"{source.file}: has no rows")
    missing = meta[keys].isna().any(axis=1).to_numpy()
    if missing.any():
        raise DataError(
            f"{source.file}: {missing.sum()} rows have no value in key column(s) {own} "
            f"(e.g. rows {np.flatnonzero(missing)[:5].tolist()})"
        )
    return canonical_keys(meta.reset_index(drop=True), keys, digits)


def canonical_keys(meta: pd.DataFrame, keys: list[str], digits: int | None) -> pd.DataFrame:
    """Floating-point key columns rounded to ``digits`` significant digits (``None``: left as they are), so
    that one value stored at two precisions is one key."""
    if digits is None:
        return meta
    for key in keys:
        if pd.api.types.is_float_dtype(meta[key]):
            values = meta[key].to_numpy(dtype=np.float64)
            unique, inverse = np.unique(values, return_inverse=True)  # few distinct doses: round each once
            rounded = np.array([float(f"{v:.{digits}g}") for v in unique.tolist()], dtype=np.float64)
            meta[key] = rounded[inverse.ravel()]
    return meta


def held_out_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Split of ``n`` items (keys, or rows): seeded held-out fractions for val and test, the rest train."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = _held_out(val_fraction, n)
    n_test = _held_out(test_fraction, n)
    split = np.full(n, "train", dtype=object)
    split[order[:n_val]] = "val"
    split[order[n_val:n_val + n_test]] = "test"
    return split


def check_split_values(file: Any, column: str, values: pd.Series) -> None:
    bad = ~values.isin(SPLITS)
    if bad.any():
        raise DataError(
            f"{file}: column {column!r} must hold train, val or test; "
            f"found {sorted(map(str, values[bad].unique()))[:5]} in {bad.sum()} rows"
        )


def split_of_keys(
    labelled: list[tuple[Any, np.ndarray, pd.Series]], column: str, codes: np.ndarray, keys: list[str],
    uniques: list[tuple],
) -> np.ndarray:
    """The split of each key of ``codes`` from split columns: ``(file, key code per row, split per row)``.

    A key found in two splits is an error.
    """
    frames = []
    for file, row_codes, values in labelled:
        check_split_values(file, column, values)
        frames.append(pd.DataFrame({"code": row_codes, "split": values.to_numpy()}))
    per_key = pd.concat(frames).drop_duplicates().groupby("code")["split"].agg(list)
    conflicts = per_key[per_key.map(len) > 1]
    if len(conflicts):
        code = conflicts.index[0]
        raise DataError(
            f"{len(conflicts)} keys appear in more than one split, e.g. {dict(zip(keys, uniques[code]))} "
            f"in {sorted(conflicts.iloc[0])}: a perturbation must belong to one split only"
        )
    return per_key.reindex(codes).map(lambda s: s[0] if isinstance(s, list) else "train").to_numpy()


def plain_key(values: tuple) -> tuple:
    """Key values as plain Python scalars (np.float64(1.0) -> 1.0 in messages)."""
    return tuple(v.item() if isinstance(v, np.generic) else v for v in values)


def _held_out(fraction: float, n: int) -> int:
    return 0 if fraction == 0 else max(1, int(round(fraction * n)))


def check_split_values_option(owner: str, split_column: str | None, split_values: dict[str, list] | None) -> None:
    """``split_values`` names held-out splits (``val``, ``test``) and needs a ``split_column``."""
    if split_values is None:
        return
    if split_column is None:
        raise ValueError(f"{owner}: split_values needs split_column, the column holding those values")
    unknown = sorted(set(split_values) - {"val", "test"})
    if unknown:
        raise ValueError(f"{owner}: split_values names {unknown}; it lists the values held out for val and test "
                         "(every other value trains)")
    both = set(map(str, split_values.get("val", []))) & set(map(str, split_values.get("test", [])))
    if both:
        raise ValueError(f"{owner}: split_values lists {sorted(both)} under both val and test")


def named_splits(values: pd.Series, split_values: dict[str, list]) -> pd.Series:
    """Split labels of rows from their value in a column of named values: a row whose value is listed under
    ``val`` or ``test`` goes there, every other row trains. Values are compared as text (``7`` is ``"7"``)."""
    text = values.astype(str)
    labels = pd.Series("train", index=values.index, dtype=object)
    for split in ("val", "test"):
        labels[text.isin([str(v) for v in split_values.get(split, [])])] = split
    return labels


def check_named_values_found(split_values: dict[str, list], column: str, found: Iterable[pd.Series],
                             files: str) -> None:
    """A held-out value found in no file is a typo that would train on what was meant to be held out."""
    present = set().union(*(set(values.astype(str)) for values in found))
    missing = sorted({str(v) for vs in split_values.values() for v in vs} - present)
    if missing:
        raise DataError(f"split_values names {missing}, found in no row of column {column!r} ({files}); values "
                        f"there are e.g. {sorted(present)[:5]}")
