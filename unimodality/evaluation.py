"""Evaluating embeddings the way the field does, with their baselines in the same report.

The core of ``unimodality evaluate`` and of :func:`evaluate` (the same from a notebook):

1. **inputs**: ``.h5ad`` files (an ``obsm`` key, ``X``, or a checkpoint that embeds the file first, exactly as
   ``predict`` does), tables (parquet/CSV with embedding columns), or in-memory ``AnnData``/``DataFrame``;
2. **representations**: the embedding, and the baselines every number is read against: the raw input
   features, their PCA to the embedding's dimension, and a random projection of them;
3. **alignment** (:class:`Alignment`), the same for every representation: each batch centred (and
   optionally scaled) on its control rows, optionally typical variation normalisation (TVN); replicates
   are aggregated per perturbation (mean or median) by the evaluators that score perturbations;
4. **evaluators** (:class:`Evaluator`, plugin group ``unimodality.evaluators``) score each representation;
5. **report**: one tidy table (``evaluator, dataset, metric, target, value, raw, pca, random, chance, n``),
   written atomically as CSV + JSON with PNG plots.

The core names evaluators only through the plugin registry; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

from unimodality import registry
from unimodality.errors import DataError
from unimodality.files import atomic_write
from unimodality.sources import Transform

log = logging.getLogger(__name__)

GROUP = "unimodality.evaluators"
#: the name of the representation being evaluated (the table's ``value`` column)
EMBEDDING = "embedding"
#: the baselines scored beside every embedding
BASELINES = ("raw", "pca", "random")
TABLE_COLUMNS = ["evaluator", "dataset", "metric", "target", "value", *BASELINES, "chance", "n"]
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".csv.gz", ".tsv.gz")
ANNDATA_SUFFIXES = (".h5ad",)
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


# -- what evaluators return ---------------------------------------------------------------------------------
@dataclass
class Score:
    """One number of a report.

    Args:
        metric: what is measured, e.g. ``mAP``, ``fraction_retrieved``, ``recall_0.05_0.95``.
        value: its value.
        target: what it is about: a label column, an annotation source, a direction ``a->b``; or ``""``.
        n: how many items it summarises (perturbations, pairs, labels, rows).
        chance: its expected value for a random ranking or prediction, where there is one.
    """

    metric: str
    value: float
    target: str = ""
    n: float = math.nan
    chance: float = math.nan


@dataclass
class Result:
    """What an evaluator found on one representation.

    Args:
        scores: the numbers.
        details: per-item results (one row per perturbation, label, source, ...), written beside the report.
        notes: remarks to keep with the report (skipped items, licences of annotation files).
    """

    scores: list[Score] = field(default_factory=list)
    details: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


# -- the data an evaluator sees -------------------------------------------------------------------------------
class EvaluationData:
    """The profiles an evaluator scores: one matrix (rows: samples) and their metadata.

    Args:
        x: ``(n, d)`` profiles (an embedding or a baseline), aligned already.
        obs: ``n`` rows of metadata.
        dataset: the dataset's name (for messages and the report).
        representation: ``embedding`` or a baseline's name.
        perturbation: the column(s) naming each row's perturbation (several: their combination).
        batch: the column naming each row's batch.
        control: the value marking control rows (in ``control_column``).
        control_column: where ``control`` is looked for; default the first perturbation column.
        labels: label columns (MOA, target, cell type) some evaluators score.
        aggregate: how replicates are combined per perturbation: ``mean`` or ``median``.
    """

    def __init__(
        self,
        x: np.ndarray,
        obs: pd.DataFrame,
        dataset: str = "data",
        representation: str = EMBEDDING,
        perturbation: list[str] | None = None,
        batch: str | None = None,
        control: str | None = None,
        control_column: str | None = None,
        labels: list[str] | None = None,
        aggregate: Literal["mean", "median"] = "mean",
    ) -> None:
        if len(x) != len(obs):
            raise ValueError(f"{dataset}: {len(x)} profiles but {len(obs)} rows of metadata")
        self.x = np.asarray(x)
        self.obs = obs.reset_index(drop=True)
        self.dataset = dataset
        self.representation = representation
        self.perturbation = list(perturbation or [])
        self.batch = batch
        self.control = control
        self.control_column = control_column or (self.perturbation[0] if self.perturbation else None)
        self.labels = list(labels or [])
        self.aggregate = aggregate
        #: the perturbation of each row, for aggregated data (see :meth:`aggregated`)
        self.names: np.ndarray | None = None
        self._aggregated: dict[bool, EvaluationData] = {}

    def __len__(self) -> int:
        return len(self.x)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def like(self, x: np.ndarray, obs: pd.DataFrame | None = None, **changes: Any) -> EvaluationData:
        """The same description around other profiles (and optionally other rows of metadata)."""
        settings = dict(dataset=self.dataset, representation=self.representation, perturbation=self.perturbation,
                        batch=self.batch, control=self.control, control_column=self.control_column,
                        labels=self.labels, aggregate=self.aggregate)
        return EvaluationData(x, self.obs if obs is None else obs, **{**settings, **changes})

    def subset(self, rows: np.ndarray) -> EvaluationData:
        """The rows selected by a boolean mask or an index array."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        subset = self.like(self.x[rows], self.obs.iloc[rows])
        subset.names = None if self.names is None else self.names[rows]
        return subset

    def require(self, evaluator: str, *what: str) -> None:
        """Fail with one line when a setting an evaluator needs (``perturbation``, ``control``, ``batch``,
        ``labels``) was not given."""
        missing = [w for w in what if not getattr(self, w)]
        if missing:
            options = ", ".join(f"--{w}" for w in missing)
            raise DataError(f"{evaluator} needs {' and '.join(missing)} (options {options}); dataset {self.dataset}")

    def perturbation_key(self) -> pd.Series:
        """Each row's perturbation as one string (several columns joined by `` | ``); missing: ``None``."""
        if not self.perturbation:
            raise DataError(f"{self.dataset}: no perturbation column given (--perturbation)")
        columns = self.obs[self.perturbation]
        missing = columns.isna().any(axis=1)
        if len(self.perturbation) > 1:
            key = columns.astype(str).agg(" | ".join, axis=1)
        else:
            key = columns.iloc[:, 0].astype(str)
        return key.where(~missing, None)

    def control_mask(self) -> np.ndarray:
        """Boolean: is each row a control row (``control`` in ``control_column``)?"""
        if self.control is None or self.control_column is None:
            return np.zeros(len(self), dtype=bool)
        return (self.obs[self.control_column].astype(str) == str(self.control)).to_numpy()

    def aggregated(self, drop_controls: bool = True) -> EvaluationData:
        """One row per perturbation: its replicates' mean (or median); rows without a perturbation are left
        out, and controls too unless ``drop_controls`` is false. ``obs`` keeps the perturbation and label
        columns (a label's first value within the perturbation) and ``n_replicates``."""
        if drop_controls in self._aggregated:
            return self._aggregated[drop_controls]
        key = self.perturbation_key()
        keep = key.notna().to_numpy() & (~self.control_mask() if drop_controls else True)
        key = key[keep]
        codes, names = pd.factorize(key, sort=True)
        frame = pd.DataFrame(self.x[keep])
        grouped = frame.groupby(codes, sort=True)
        x = (grouped.median() if self.aggregate == "median" else grouped.mean()).to_numpy(dtype=self.x.dtype)
        columns = list(dict.fromkeys([*self.perturbation, *self.labels]))
        obs = self.obs.loc[keep, columns].groupby(codes, sort=True).first().reset_index(drop=True)
        obs["n_replicates"] = np.bincount(codes, minlength=len(names))
        aggregated = self.like(x, obs, batch=None)
        aggregated.names = np.asarray(names, dtype=object)
        self._aggregated[drop_controls] = aggregated
        return aggregated


# -- evaluators ---------------------------------------------------------------------------------------------
class Evaluator:
    """Base class of evaluators (plugin group ``unimodality.evaluators``).

    Implement :meth:`evaluate`, which scores one representation of one dataset and returns a
    :class:`Result`; the core calls it for the embedding and for every baseline on identically aligned data,
    so an evaluator never needs to know which one it sees. An evaluator that compares datasets (cross-modal
    retrieval) sets ``across_datasets = True`` and implements :meth:`evaluate_datasets` instead.
    Type-hint and document every ``__init__`` argument: jsonargparse builds ``--help`` from them.
    """

    #: the evaluator's name in the report
    name: ClassVar[str] = ""
    #: scores pairs of datasets (``evaluate_datasets``) rather than each dataset alone
    across_datasets: ClassVar[bool] = False
    #: a column of the details whose distribution is plotted per representation (e.g. per-perturbation mAP)
    distribution: ClassVar[str | None] = None

    @property
    def report_name(self) -> str:
        return self.name or re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    def evaluate(self, data: EvaluationData) -> Result:
        """Score one representation of one dataset."""
        raise NotImplementedError(f"{type(self).__name__} does not score a single dataset")

    def evaluate_datasets(self, datasets: Mapping[str, EvaluationData]) -> Result:
        """Score several datasets together (``across_datasets`` evaluators); scores' ``target`` names them."""
        raise NotImplementedError(f"{type(self).__name__} scores each dataset alone")

    def config(self) -> dict[str, Any]:
        """The evaluator as a config (``class_path`` + ``init_args``), for the report's record."""
        args = {}
        for name in list(inspect.signature(type(self).__init__).parameters)[1:]:
            if hasattr(self, name):
                args[name] = _plain(getattr(self, name))
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def resolve_evaluator(spec: Evaluator | str | Mapping[str, Any]) -> Evaluator:
    """An evaluator from an instance, a registered name (``ConsistencyMAP``) or a config
    (``{"class_path": "ConsistencyMAP", "init_args": {...}}``); names resolve through the plugin registry."""
    if isinstance(spec, Evaluator):
        return spec
    if isinstance(spec, str):
        name, init_args = spec, {}
    elif isinstance(spec, Mapping) and "class_path" in spec:
        name, init_args = spec["class_path"], dict(spec.get("init_args") or {})
    else:
        raise DataError(f"an evaluator is a name, a {{class_path, init_args}} config or an Evaluator; got {spec!r}")
    plugins = registry.registered(GROUP)
    found = [p for ps in plugins.values() for p in ps if name in (p.name, p.class_path)]
    if len(found) > 1:
        paths = ", ".join(p.class_path for p in found)
        raise DataError(f"evaluator {name!r} is exported by several plugins ({paths}): use the full class path")
    if not found:
        raise DataError(registry.name_hint(name, [GROUP]))
    try:
        return found[0].cls(**init_args)
    except TypeError as error:
        raise DataError(f"evaluator {name}: {error}") from None


def default_evaluators(perturbation: list[str], control: str | None, labels: list[str],
                       n_datasets: int) -> list[str]:
    """The evaluators that apply to what the options describe (used when none is named)."""
    names = []
    if perturbation and control is not None:
        names.append("ReplicateRetrievalMAP")
    if perturbation and labels:
        names.append("ConsistencyMAP")
    if labels:
        names += ["KNNClassification", "LinearProbe"]
    if perturbation and n_datasets > 1:
        names.append("CrossModalRetrieval")
    return names


# -- alignment ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Alignment:
    """How profiles are aligned before they are scored: the same steps for the embedding and every baseline.

    Args:
        center: subtract from every batch the mean of its control rows (of all its rows when no control
            value is given). A batch without a control row is an error.
        scale: also divide every batch by its control rows' standard deviation, per feature (a feature
            constant on the controls is left unscaled).
        tvn: typical variation normalisation, as in EFAAR (Celik et al. 2024): the controls' PCA whitens
            every row (centred and scaled on all controls before and after), then CORAL aligns each batch's
            control covariance to the identity (``x @ (C_batch + r I)^(-1/2)``). Needs a control value. The
            dimension becomes at most the number of control rows.
        coral_regularization: ``r`` above: added to each batch's control covariance before it is inverted.
        aggregate: how evaluators that score perturbations (known-relationship recall, consistency mAP,
            cross-modal retrieval) combine a perturbation's replicates: ``mean`` or ``median``.
    """

    center: bool = True
    scale: bool = False
    tvn: bool = False
    coral_regularization: float = 0.5
    aggregate: Literal["mean", "median"] = "mean"

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "median"):
            raise DataError(f"alignment.aggregate must be mean or median, got {self.aggregate!r}")
        if self.coral_regularization < 0:
            raise DataError(f"alignment.coral_regularization must be >= 0, got {self.coral_regularization}")

    def describe(self) -> str:
        steps = [("centre" + ("+scale" if self.scale else "")) + " per batch on controls" if self.center else "",
                 "TVN" if self.tvn else ""]
        return ", ".join(s for s in steps if s) or "none"


def align(data: EvaluationData, alignment: Alignment) -> EvaluationData:
    """``data`` aligned as :class:`Alignment` describes (float64 profiles)."""
    x = np.array(data.x, dtype=np.float64)
    controls = data.control_mask()
    if alignment.center or alignment.scale:
        for batch, rows in _batches(data):
            reference = rows & controls if data.control is not None else rows
            if not reference.any():
                raise DataError(
                    f"{data.dataset}: batch {batch!r} (column {data.batch!r}) has no control row "
                    f"({data.control_column} == {data.control!r}); centring on controls needs one in every batch: "
                    "drop that batch, or set alignment.center false"
                )
            x[rows] = _standardize(x[rows], x[reference], scale=alignment.scale)
    if alignment.tvn:
        if data.control is None:
            raise DataError(f"{data.dataset}: alignment.tvn whitens on the control rows: give --control")
        x = _tvn(data, x, controls, alignment.coral_regularization)
    return data.like(x, aggregate=alignment.aggregate)


def _batches(data: EvaluationData) -> Iterable[tuple[Any, np.ndarray]]:
    if data.batch is None:
        yield "(all rows)", np.ones(len(data), dtype=bool)
        return
    values = data.obs[data.batch]
    for batch in pd.unique(values):
        yield batch, (values == batch).to_numpy() if not pd.isna(batch) else values.isna().to_numpy()


def _standardize(x: np.ndarray, reference: np.ndarray, scale: bool) -> np.ndarray:
    """``x`` centred (and scaled) on ``reference``'s statistics, as scikit-learn's ``StandardScaler``."""
    x = x - reference.mean(axis=0)
    if scale:
        std = reference.std(axis=0)
        x /= np.where(std > 10 * np.finfo(np.float64).eps, std, 1.0)
    return x


def _tvn(data: EvaluationData, x: np.ndarray, controls: np.ndarray, regularization: float) -> np.ndarray:
    from sklearn.decomposition import PCA

    if controls.sum() < 2:
        raise DataError(f"{data.dataset}: alignment.tvn needs at least 2 control rows, found {int(controls.sum())}")
    x = _standardize(x, x[controls], scale=True)
    x = PCA().fit(x[controls]).transform(x)
    x = _standardize(x, x[controls], scale=True)
    if data.batch is None:
        return x
    for batch, rows in _batches(data):
        reference = rows & controls
        if reference.sum() < 2:
            raise DataError(f"{data.dataset}: batch {batch!r} (column {data.batch!r}) has {int(reference.sum())} "
                            "control row(s); CORAL (alignment.tvn) needs at least 2 per batch")
        covariance = np.cov(x[reference], rowvar=False, ddof=1) + regularization * np.eye(x.shape[1])
        values, vectors = np.linalg.eigh(np.atleast_2d(covariance))
        x[rows] = x[rows] @ (vectors * values.clip(min=np.finfo(np.float64).tiny) ** -0.5) @ vectors.T
    return x


# -- baselines ----------------------------------------------------------------------------------------------
def baseline_profiles(raw: np.ndarray, dim: int, baselines: Iterable[str], seed: int = 0) -> dict[str, np.ndarray]:
    """The baselines of an embedding of dimension ``dim`` computed from the raw features.

    ``raw``: the features themselves; ``pca``: their first ``dim`` principal components (the field's
    strongest simple baseline); ``random``: a Gaussian random projection to ``dim`` dimensions.
    """
    out: dict[str, np.ndarray] = {}
    for name in baselines:
        if name == "raw":
            out[name] = raw
        elif name == "pca":
            from sklearn.decomposition import PCA

            components = max(1, min(dim, raw.shape[0], raw.shape[1]))
            out[name] = PCA(n_components=components, random_state=seed).fit_transform(raw.astype(np.float64))
        elif name == "random":
            rng = np.random.default_rng(seed)
            projection = rng.standard_normal((raw.shape[1], dim)) / math.sqrt(dim)
            out[name] = raw.astype(np.float64) @ projection
        else:
            raise DataError(f"unknown baseline {name!r}; baselines are {', '.join(BASELINES)}")
    return out


# -- inputs -------------------------------------------------------------------------------------------------
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
) -> LoadedDataset:
    """Read one input: an ``AnnData``, a ``DataFrame`` or a file (``.h5ad``, parquet, CSV/TSV).

    ``embedding`` is an ``obsm`` key (or ``obsm/KEY``, ``layers/NAME``), ``X`` (the raw features themselves),
    a checkpoint path (the file is embedded first with the matching tower, as ``predict`` does) or, for a
    table, the prefix of its embedding columns (``X_unimodality`` for ``X_unimodality_0 ...``) or a column of
    vectors. ``features`` selects the raw features the baselines start from: a matrix of an ``.h5ad``
    (``X``, ``layers/NAME``, ``obsm/KEY``; default ``X``) or a regular expression of a table's columns
    (default: its numeric columns not starting with ``Metadata`` that are not embedding columns).
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
        raw, feature_names = _anndata_matrix(item, features or "X", where, "features"), None
        if (features or "X") == "X":
            feature_names = [str(v) for v in item.var_names]
        if checkpoint:
            rows, vectors = _embed_checkpoint(item, path, embedding, modality, source_options, batch_size)
        else:
            rows, vectors = None, _anndata_matrix(item, embedding, where, "embedding")
        is_raw = embedding in ("X", features or "X") and not checkpoint
    elif isinstance(item, pd.DataFrame):
        table = item.reset_index(drop=True)
        embedding_columns: list[str] = []
        if checkpoint:
            rows, vectors = _embed_checkpoint(table, path, embedding, modality, source_options, batch_size)
        elif embedding != "X":
            embedding_columns, vectors = _table_embedding(table, embedding, where)
            rows = None
        feature_names = _feature_columns(table, features, exclude=set(embedding_columns), where=where)
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
    if rows is not None:  # a checkpoint's source may leave rows out (filters): they are not evaluated
        if len(rows) < len(obs):
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
        embedding_is_raw=is_raw, origin={"input": where, "embedding": embedding, "features": features or "default"},
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


def _embed_checkpoint(item: Any, path: Path | None, checkpoint: str, modality: str | None,
                      source_options: dict[str, Any] | None, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Embed a file with a checkpoint's tower exactly as ``predict`` does (``EmbedDataModule`` reading it the
    way the model's training data was read); the checkpoint is read by the one safe reader."""
    with tempfile.TemporaryDirectory(prefix="unimodality-evaluate-") as folder:
        if path is None:  # an in-memory input: the datamodule reads files
            path = Path(folder) / ("input.h5ad" if not isinstance(item, pd.DataFrame) else "input.parquet")
            if isinstance(item, pd.DataFrame):
                item.to_parquet(path)
            else:
                item.write_h5ad(path)
        return embed_with_checkpoint(path, checkpoint, modality=modality, source_options=source_options,
                                     batch_size=batch_size, scratch=Path(folder))


def embed_with_checkpoint(
    path: str | Path, checkpoint: str | Path, modality: str | None = None,
    source_options: dict[str, Any] | None = None, batch_size: int = 512, scratch: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of ``path`` and their embeddings by the checkpoint's tower (predict's machinery).

    Args:
        path: the file to embed.
        checkpoint: a checkpoint of a trained model.
        modality: which tower embeds it (default: the one whose training files had this file's type).
        source_options: settings replacing those of the tower's source recorded in the checkpoint.
        batch_size: rows per forward pass.
        scratch: a folder for the (never written) output path the datamodule requires.
    """
    from lightning.pytorch import Callback, Trainer

    from unimodality import trust
    from unimodality.checkpoint import read_checkpoint
    from unimodality.datamodule import INDEX
    from unimodality.errors import CheckpointError

    try:
        content = read_checkpoint(checkpoint)  # readable, tensors only, known classes: before anything is built
    except CheckpointError as error:
        if "--trust_checkpoint" not in str(error):
            raise
        raise CheckpointError(
            f"{error} [unimodality evaluate never unpickles a checkpoint: embed a trusted one with "
            "`unimodality predict --trust_checkpoint true` and evaluate the file it writes]"
        ) from None
    saved = trust.upgrade_class_paths(content.get("hyper_parameters") or {}).get("_class_path")
    if not saved:
        raise DataError(f"{checkpoint}: holds no model config (hyper_parameters._class_path); is it a unimodality "
                        "checkpoint?")
    setup = trust.check_class(saved, "setup", str(checkpoint), "hyper_parameters._class_path", imports=False)
    model = setup.load_from_checkpoint(str(checkpoint)).eval()
    datamodule_cls = trust.check_class("EmbedDataModule", "datamodule", "unimodality evaluate", "embedding")

    class Collect(Callback):
        def __init__(self) -> None:
            self.rows: list[np.ndarray] = []
            self.vectors: list[np.ndarray] = []

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.rows.append(outputs[INDEX].detach().cpu().numpy())
            self.vectors.append(outputs["embedding"].detach().float().cpu().numpy())

    with tempfile.TemporaryDirectory(prefix="unimodality-embed-", dir=scratch) as folder:
        # nothing is written there: without predict's EmbeddingWriter the embeddings stay in memory
        datamodule = datamodule_cls(path=str(path), modality=modality, output=str(Path(folder) / "unused.parquet"),
                                    source_options=source_options, batch_size=batch_size)
        collect = Collect()
        quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # "GPU available: ..." lines would bury the report
        try:
            trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False, callbacks=[collect], devices=1)
            trainer.predict(model, datamodule=datamodule, return_predictions=False)
        finally:
            quiet.setLevel(level)
    rows = np.concatenate(collect.rows)
    rows, first = np.unique(rows, return_index=True)
    return rows, np.concatenate(collect.vectors)[first]


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


def _inputs(data: Any) -> list[tuple[str | None, Any]]:
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


def _check_columns(dataset: LoadedDataset, perturbation: list[str], batch: str | None, control: str | None,
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
            raise DataError(f"{dataset.origin.get('input', dataset.name)}: control value {control!r} is found in no "
                            f"row of column {column!r} (values include {examples})")


# -- the evaluation -----------------------------------------------------------------------------------------
def evaluate(
    data: Any,
    embedding: str = "X_unimodality",
    features: str | None = None,
    features_transform: Transform = "none",
    perturbation: str | list[str] | None = None,
    batch: str | None = None,
    control: str | None = None,
    control_column: str | None = None,
    labels: str | list[str] | None = None,
    evaluators: list[Evaluator | str] | None = None,
    baselines: list[str] = list(BASELINES),
    alignment: Alignment = Alignment(),
    combine: bool = False,
    modality: str | None = None,
    source_options: dict[str, Any] | None = None,
    batch_size: int = 512,
    seed: int = 0,
    output: str | Path | None = None,
    overwrite: bool = False,
    plots: bool = True,
) -> pd.DataFrame:
    """Score an embedding with the field's metrics, next to its baselines, and return the report table.

    Example (a notebook)::

        table = unimodality.evaluate(adata, embedding="X_unimodality", perturbation="gene", batch="plate",
                                     control="non-targeting", evaluators=["KnownRelationshipRecall"])

    Args:
        data: the input(s): an ``AnnData``, a ``DataFrame``, a file (``.h5ad``, parquet, CSV/TSV, gzipped
            too) or folder of them, a list of those, or a dict naming them. Each input is one dataset.
        embedding: what to evaluate: an ``obsm`` key (also ``obsm/KEY``, ``layers/NAME``), ``X`` (the raw
            features), a checkpoint (``.ckpt``: each file is embedded first with the right tower, as
            ``predict`` does), or for tables the prefix of embedding columns ``<prefix>_0 ...`` or a column of
            vectors.
        features: the raw features the baselines start from: ``X``, ``layers/NAME`` or ``obsm/KEY`` of an
            ``.h5ad`` (default ``X``); a regular expression of a table's feature columns (default: its numeric
            columns not starting with ``Metadata`` that are not embedding columns).
        features_transform: applied to the raw features first (``log1p``, ``normalize_log1p`` for counts,
            ``clr`` for protein counts).
        perturbation: metadata column(s) naming each row's perturbation (gene, compound; several columns:
            their combination, e.g. compound and dose).
        batch: metadata column naming each row's batch (plate, experiment), for the alignment.
        control: the value of control rows (``DMSO``, ``non-targeting``) in ``control_column``.
        control_column: where ``control`` is found; default the (first) perturbation column.
        labels: label columns (MOA, target, cell type) scored by consistency mAP, kNN and the linear probe.
        evaluators: registered evaluator names (``unimodality plugins`` lists them), configs
            (``{class_path, init_args}``) or instances; default: those the given columns allow.
        baselines: scored beside the embedding: ``raw`` (the input features), ``pca`` (their PCA to the
            embedding's dimension), ``random`` (a random projection to it); ``[]`` for none.
        alignment: centring/scaling on controls per batch, TVN, and how replicates are aggregated.
        combine: stack all inputs into one dataset (with a ``file`` column, usable as ``batch``).
        modality: with a checkpoint: which tower embeds the files (default: by file type).
        source_options: with a checkpoint: settings replacing those of the tower's recorded source, e.g.
            ``{"exclude": null}`` to embed control rows a training filter left out.
        batch_size: with a checkpoint: rows per forward pass.
        seed: seed of the PCA and random-projection baselines.
        output: folder for ``evaluation.csv``/``.json``, ``details/`` and ``plots/``; ``None``: no files.
        overwrite: replace an existing report in ``output`` (by default it is an error, left untouched).
        plots: draw the PNG plots (needs matplotlib).

    Returns:
        The report: one row per (evaluator, dataset, metric, target) with ``value`` (the embedding), the
        baselines' values (``raw``, ``pca``, ``random``), ``chance`` and ``n``. ``table.attrs["details"]``
        holds the per-item results.
    """
    started = time.perf_counter()
    perturbation = [perturbation] if isinstance(perturbation, str) else list(perturbation or [])
    labels = [labels] if isinstance(labels, str) else list(labels or [])
    if isinstance(alignment, Mapping):
        alignment = Alignment(**alignment)
    baselines = list(baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise DataError(f"unknown baseline(s) {unknown}; baselines are {', '.join(BASELINES)}")
    files = _output_files(output, overwrite) if output is not None else None

    inputs = _inputs(data)
    # evaluators are resolved before any file is read: a misspelt name fails at once
    n_datasets = 1 if combine else len(inputs)
    specs = evaluators if evaluators is not None else default_evaluators(perturbation, control, labels, n_datasets)
    if not specs:
        raise DataError("no evaluator applies: name some (--evaluators), or give the columns they need "
                        "(--perturbation with --control, --labels)")
    chosen = [resolve_evaluator(s) for s in specs]

    loaded = [load_dataset(item, name, embedding, features, features_transform, modality, source_options, batch_size)
              for name, item in inputs]
    if combine and len(loaded) > 1:
        loaded = [combine_datasets(loaded)]
    seen: dict[str, int] = {}
    for dataset in loaded:  # two files of one name: both kept, told apart
        seen[dataset.name] = seen.get(dataset.name, 0) + 1
        if seen[dataset.name] > 1:
            dataset.name = f"{dataset.name}_{seen[dataset.name]}"
    for dataset in loaded:
        _check_columns(dataset, perturbation, batch, control, control_column, labels)

    describe = dict(perturbation=perturbation, batch=batch, control=control, control_column=control_column,
                    labels=labels, aggregate=alignment.aggregate)
    representations: dict[str, dict[str, EvaluationData]] = {}
    notes: list[str] = []
    for dataset in loaded:
        profiles = {EMBEDDING: dataset.embedding}
        if baselines and dataset.raw is None:
            notes.append(f"{dataset.name}: no raw features found (features={features!r}): no baselines")
        elif baselines:
            wanted = [b for b in baselines if not (b == "raw" and dataset.embedding_is_raw)]
            profiles |= baseline_profiles(dataset.raw, dataset.embedding.shape[1], wanted, seed=seed)
        representations[dataset.name] = {
            rep: align(EvaluationData(x, dataset.obs, dataset.name, rep, **describe), alignment)
            for rep, x in profiles.items()
        }

    scored: list[dict[str, Any]] = []
    details: dict[tuple[str, str], pd.DataFrame] = {}
    timings: list[dict[str, Any]] = []
    said: dict[str, list[str]] = {}  # note -> the representations it was made for (one line for all of them)
    for evaluator in chosen:
        groups = ([("+".join(representations), {rep: {n: r[rep] for n, r in representations.items()}
                                               for rep in [EMBEDDING]})] if evaluator.across_datasets
                  else [(name, reps) for name, reps in representations.items()])
        for dataset_name, reps in groups:
            frames = []
            for rep, profiles in reps.items():
                tic = time.perf_counter()
                if evaluator.across_datasets:
                    result = evaluator.evaluate_datasets(profiles)
                else:
                    result = evaluator.evaluate(profiles)
                timings.append({"evaluator": evaluator.report_name, "dataset": dataset_name, "representation": rep,
                                "seconds": round(time.perf_counter() - tic, 4)})
                for note in result.notes:
                    said.setdefault(f"{evaluator.report_name} on {dataset_name}: {note}", []).append(rep)
                for score in result.scores:
                    scored.append({"evaluator": evaluator.report_name, "dataset": dataset_name, "representation": rep,
                                   **dataclasses.asdict(score)})
                if result.details is not None:
                    frames.append(result.details.assign(representation=rep))
            if frames:
                details[(evaluator.report_name, dataset_name)] = pd.concat(frames, ignore_index=True)
    table = report_table(scored, embedding_is_raw={d.name: d.embedding_is_raw and "raw" in baselines
                                                  for d in loaded})
    table.attrs["details"] = details
    all_reps = {rep for reps in representations.values() for rep in reps}
    notes += [note if set(reps) >= all_reps else f"{note} ({', '.join(reps)})" for note, reps in said.items()]
    table.attrs["notes"] = list(dict.fromkeys(notes))
    if files is not None:
        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "unimodality_version": _version(),
            "datasets": [{"name": d.name, "rows": len(d.obs), "embedding_dim": int(d.embedding.shape[1]),
                          "raw_features": None if d.raw is None else int(d.raw.shape[1]), **d.origin} for d in loaded],
            "columns": {"perturbation": perturbation, "batch": batch, "control": control,
                        "control_column": control_column, "labels": labels},
            "alignment": dataclasses.asdict(alignment), "baselines": baselines, "seed": seed,
            "evaluators": [e.config() for e in chosen], "notes": table.attrs["notes"], "timings": timings,
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_report(table, details, record, files, plots=plots, evaluators=chosen)
    return table


def report_table(scored: list[dict[str, Any]], embedding_is_raw: Mapping[str, bool] | None = None) -> pd.DataFrame:
    """The scores of every representation as one row per (evaluator, dataset, metric, target): the embedding's
    value, each baseline's beside it, and the embedding's ``chance`` and ``n``."""
    if not scored:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    long = pd.DataFrame(scored)
    keys = ["evaluator", "dataset", "metric", "target"]
    order = long[keys].drop_duplicates()
    wide = long.pivot_table(index=keys, columns="representation", values="value", aggfunc="first", dropna=False)
    wide = wide.reindex(pd.MultiIndex.from_frame(order)).reset_index()
    ours = long[long["representation"] == EMBEDDING].set_index(keys)[["chance", "n"]]
    wide = wide.join(ours, on=keys)
    wide = wide.rename(columns={EMBEDDING: "value"})
    for column in TABLE_COLUMNS:
        if column not in wide.columns:
            wide[column] = math.nan
    for dataset, is_raw in (embedding_is_raw or {}).items():
        if is_raw:  # the embedding is the raw features: its own values are the raw baseline's
            rows = wide["dataset"] == dataset
            wide.loc[rows, "raw"] = wide.loc[rows, "value"]
    wide = wide[TABLE_COLUMNS]
    wide.columns.name = None
    return wide


def _version() -> str:
    from unimodality import __version__

    return __version__


# -- the report files ---------------------------------------------------------------------------------------
def _output_files(output: str | Path, overwrite: bool) -> dict[str, Path]:
    folder = Path(output)
    files = {"csv": folder / "evaluation.csv", "json": folder / "evaluation.json", "folder": folder}
    existing = [str(p) for key, p in files.items() if key != "folder" and p.exists()]
    if existing and not overwrite:
        raise DataError(f"output {folder}: a report is there already ({', '.join(existing)}); pass --overwrite true "
                        "to replace it, or choose another --output")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"output {folder}: is a file, not a folder")
    return files


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")[:100] or "x"


def write_report(table: pd.DataFrame, details: Mapping[tuple[str, str], pd.DataFrame], record: dict[str, Any],
                 files: Mapping[str, Path], plots: bool = True,
                 evaluators: list[Evaluator] | None = None) -> list[Path]:
    """Write the table (CSV, and JSON with the run's record), the details and the plots; each file atomically."""
    folder = files["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (evaluator, dataset), frame in details.items():
        path = folder / "details" / f"{_safe(evaluator)}__{_safe(dataset)}.csv"
        written.append(atomic_write(path, lambda tmp, f=frame: f.to_csv(tmp, index=False)))
    if plots:
        written += plot_report(table, details, folder / "plots", evaluators or [])
    document = {**record, "table": json.loads(table.to_json(orient="records"))}
    written.append(atomic_write(files["csv"], lambda tmp: table.to_csv(tmp, index=False)))
    written.append(atomic_write(files["json"], lambda tmp: tmp.write_text(json.dumps(document, indent=2,
                                                                                      default=str) + "\n")))
    return written


def plot_report(table: pd.DataFrame, details: Mapping[tuple[str, str], pd.DataFrame], folder: Path,
                evaluators: list[Evaluator]) -> list[Path]:
    """PNGs: per evaluator and dataset, each metric's value beside its baselines (and chance); and where an
    evaluator has per-item scores (mAP per perturbation), their distribution per representation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plots (pip install \"unimodality[plots]\")")
        return []
    written = []
    colours = {"value": "#1f77b4", "raw": "#7f7f7f", "pca": "#ff7f0e", "random": "#bcbd22"}
    for (evaluator, dataset), rows in table.groupby(["evaluator", "dataset"], sort=False):
        try:
            names = [f"{m}\n{t}" if t else m for m, t in zip(rows["metric"], rows["target"])]
            series = [c for c in colours if rows[c].notna().any()]
            fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) * max(1, len(series)) / 2 + 2), 3.6))
            width = 0.8 / max(1, len(series))
            positions = np.arange(len(rows))
            for i, column in enumerate(series):
                label = EMBEDDING if column == "value" else column
                ax.bar(positions + (i - (len(series) - 1) / 2) * width, rows[column].to_numpy(float), width,
                       label=label, color=colours[column])
            if rows["chance"].notna().any():
                ax.scatter(positions, rows["chance"].to_numpy(float), marker="_", s=400, color="black", zorder=3,
                           label="chance")
            crowded = len(rows) > 4
            ax.set_xticks(positions, names, rotation=30 if crowded else 0, ha="right" if crowded else "center",
                          fontsize=8)
            ax.set_title(f"{evaluator} - {dataset}", fontsize=9)
            ax.legend(fontsize=7, frameon=False)
            fig.tight_layout()
            path = folder / f"{_safe(evaluator)}__{_safe(dataset)}.png"
            written.append(_save_png(fig, path))
        except Exception as error:  # a plot is a convenience: it never fails the report
            log.warning("plot of %s on %s failed: %s", evaluator, dataset, error)
    distributions = {e.report_name: e.distribution for e in evaluators if e.distribution}
    for (evaluator, dataset), frame in details.items():
        column = distributions.get(evaluator)
        if column is None or column not in frame.columns:
            continue
        try:
            fig, ax = plt.subplots(figsize=(4.8, 3.4))
            for rep, values in frame.groupby("representation", sort=False)[column]:
                values = np.sort(values.dropna().to_numpy(float))
                if len(values):
                    ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=rep,
                            color=colours.get("value" if rep == EMBEDDING else rep))
            ax.set_xlabel(column)
            ax.set_ylabel("fraction of items")
            ax.set_title(f"{evaluator} - {dataset}", fontsize=9)
            ax.legend(fontsize=7, frameon=False)
            fig.tight_layout()
            path = folder / f"{_safe(evaluator)}__{_safe(dataset)}_distribution.png"
            written.append(_save_png(fig, path))
        except Exception as error:
            log.warning("distribution plot of %s on %s failed: %s", evaluator, dataset, error)
    return written


def format_table(table: pd.DataFrame, digits: int = 3) -> str:
    """The report as a short text table (what ``unimodality evaluate`` prints)."""
    if table.empty:
        return "(no scores)"
    shown = table.copy()
    shown["n"] = shown["n"].map(lambda v: "" if pd.isna(v) else f"{int(v)}")
    for column in ["value", *BASELINES, "chance"]:
        if shown[column].isna().all():
            shown = shown.drop(columns=column)
        else:
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.{digits}f}")
    if shown["dataset"].nunique() == 1:
        shown = shown.drop(columns="dataset")
    return shown.to_string(index=False)


def _save_png(fig: Any, path: Path) -> Path:
    """A figure written atomically as PNG, then closed."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), suffix=".png")
    finally:
        plt.close(fig)
