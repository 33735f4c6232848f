"""The evaluator interface (plugin group ``unimodality.evaluators``) and what evaluators return.

An evaluator scores one representation (the embedding or a baseline) of one dataset, already aligned, and
returns a `Result` of `Score` rows; the core names evaluators only through the plugin
registry and imports none of them.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd

from unimodality import registry
from unimodality.errors import DataError

if TYPE_CHECKING:
    from unimodality.evaluation.data import EvaluationData

GROUP = "unimodality.evaluators"


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


class Evaluator:
    """Base class of evaluators (plugin group ``unimodality.evaluators``).

    Implement `evaluate`, which scores one representation of one dataset and returns a
    `Result`; the core calls it for the embedding and for every baseline on identically aligned data,
    so an evaluator never needs to know which one it sees. An evaluator that compares datasets (cross-modal
    retrieval) sets ``across_datasets = True`` and implements `evaluate_datasets` instead.
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
