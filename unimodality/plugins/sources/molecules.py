"""Molecules as a modality: SMILES parsed by RDKit into graphs with documented atom and bond features.

Atom features (one-hot blocks, concatenated; the names are the schema's feature names):

- ``element``: H, B, C, N, O, F, Si, P, S, Cl, Se, Br, I, or ``other``
- ``degree``: number of heavy-atom neighbours, 0-5, or ``6+``
- ``charge``: formal charge -2 to +2 (beyond that: clipped)
- ``hydrogens``: total attached hydrogens 0-3, or ``4+``
- ``hybridization``: SP, SP2, SP3, SP3D, SP3D2, or ``other``
- ``aromatic``, ``in_ring``: single flags
- ``chirality``: CW, CCW (tetrahedral tags), or ``none``

Bond features: ``bond_type`` (single, double, triple, aromatic), ``conjugated``, ``in_ring``, and
``stereo`` (none, Z/cis, E/trans, other). Hydrogens are implicit (not nodes); every bond is two directed
edges. Graphs are ``torch_geometric.data.Data`` with ``x``, ``edge_index`` and ``edge_attr``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from unimodality.errors import DataError
from unimodality.plugins.sources.formats import read_metadata_of
from unimodality.sources import ModalitySource, RowFilter

log = logging.getLogger(__name__)

_ELEMENTS = ["H", "B", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Se", "Br", "I"]
_DEGREES = [0, 1, 2, 3, 4, 5]
_CHARGES = [-2, -1, 0, 1, 2]
_HYDROGENS = [0, 1, 2, 3]
_HYBRIDIZATIONS = ["SP", "SP2", "SP3", "SP3D", "SP3D2"]
_CHIRALITY = {"CHI_TETRAHEDRAL_CW": "CW", "CHI_TETRAHEDRAL_CCW": "CCW"}
_BOND_TYPES = ["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC"]
_STEREO = {"STEREOZ": "Z", "STEREOCIS": "Z", "STEREOE": "E", "STEREOTRANS": "E"}

ATOM_FEATURES: list[str] = (
    [f"element={e}" for e in _ELEMENTS] + ["element=other"]
    + [f"degree={d}" for d in _DEGREES] + ["degree=6+"]
    + [f"charge={c:+d}" if c else "charge=0" for c in _CHARGES]
    + [f"hydrogens={h}" for h in _HYDROGENS] + ["hydrogens=4+"]
    + [f"hybridization={h}" for h in _HYBRIDIZATIONS] + ["hybridization=other"]
    + ["aromatic", "in_ring"]
    + ["chirality=CW", "chirality=CCW", "chirality=none"]
)
BOND_FEATURES: list[str] = (
    [f"bond_type={t.lower()}" for t in _BOND_TYPES]
    + ["conjugated", "in_ring"]
    + ["stereo=none", "stereo=Z", "stereo=E", "stereo=other"]
)


def _one_hot(value: Any, choices: Sequence[Any], other: bool = True) -> list[float]:
    hot = [float(value == c) for c in choices]
    return hot + [float(not any(hot))] if other else hot


def atom_features(atom: Any) -> list[float]:
    """The `ATOM_FEATURES` of one RDKit atom."""
    chirality = _CHIRALITY.get(str(atom.GetChiralTag()), "none")
    return (
        _one_hot(atom.GetSymbol(), _ELEMENTS)
        + _one_hot(min(atom.GetDegree(), 6), _DEGREES)
        + _one_hot(int(np.clip(atom.GetFormalCharge(), -2, 2)), _CHARGES, other=False)
        + _one_hot(min(atom.GetTotalNumHs(), 4), _HYDROGENS)
        + _one_hot(str(atom.GetHybridization()), _HYBRIDIZATIONS)
        + [float(atom.GetIsAromatic()), float(atom.IsInRing())]
        + _one_hot(chirality, ["CW", "CCW", "none"], other=False)
    )


def bond_features(bond: Any) -> list[float]:
    """The `BOND_FEATURES` of one RDKit bond."""
    stereo = str(bond.GetStereo())
    stereo = "none" if stereo == "STEREONONE" else _STEREO.get(stereo, "other")
    return (
        _one_hot(str(bond.GetBondType()), _BOND_TYPES, other=False)
        + [float(bond.GetIsConjugated()), float(bond.IsInRing())]
        + _one_hot(stereo, ["none", "Z", "E", "other"], other=False)
    )


def parse_smiles(smiles: str) -> Any | None:
    """The RDKit molecule of a SMILES string, or None when RDKit cannot parse or sanitise it."""
    from rdkit import Chem, RDLogger

    if not isinstance(smiles, str) or not smiles.strip():
        return None
    RDLogger.DisableLog("rdApp.*")  # invalid inputs are reported together, not one RDKit line each
    try:
        return Chem.MolFromSmiles(smiles)
    finally:
        RDLogger.EnableLog("rdApp.*")


def mol_to_graph(mol: Any) -> Any:
    """A ``torch_geometric`` graph of an RDKit molecule: ``x`` (atoms), ``edge_index``, ``edge_attr``."""
    from torch_geometric.data import Data

    x = torch.tensor([atom_features(a) for a in mol.GetAtoms()], dtype=torch.float32).reshape(-1, len(ATOM_FEATURES))
    sources, targets, edges = [], [], []
    for bond in mol.GetBonds():
        i, j, features = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), bond_features(bond)
        sources += [i, j]
        targets += [j, i]
        edges += [features, features]
    edge_index = torch.tensor([sources, targets], dtype=torch.long).reshape(2, -1)
    edge_attr = torch.tensor(edges, dtype=torch.float32).reshape(-1, len(BOND_FEATURES))
    return Data(x=x, edge_index=edge_index, edge_attr=edge_attr)


def smiles_to_graph(smiles: str) -> Any:
    """The graph of a SMILES string; an unparsable one is a ``ValueError``."""
    mol = parse_smiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse the SMILES {smiles!r}")
    return mol_to_graph(mol)


class MoleculeGraphs:
    """The molecules of a block of rows: each distinct SMILES featurised once, shared by its rows.

    ``take(rows)`` batches the graphs of ``rows`` (positions in the block) for a model.
    """

    def __init__(self, graphs: list[Any], graph_of_row: np.ndarray) -> None:
        self.graphs = graphs
        self.graph_of_row = graph_of_row

    def __len__(self) -> int:
        return len(self.graph_of_row)

    def take(self, rows: np.ndarray) -> Any:
        from torch_geometric.data import Batch

        return Batch.from_data_list([self.graphs[i] for i in self.graph_of_row[np.asarray(rows)]])


class MoleculeSource(ModalitySource):
    """Molecules named by a SMILES column of any supported file (``.h5ad`` obs, parquet, CSV/TSV).

    The column can be a pairing key itself (the perturbation's compound) or a column of its own. Each
    distinct SMILES is parsed and featurised once per run (see `unimodality.plugins.sources.molecules` for the atom
    and bond features); rows sharing a molecule share its graph.

    Args:
        path: the file holding the SMILES column.
        smiles_column: the column of SMILES strings.
        invalid: what to do with rows whose SMILES RDKit cannot parse: ``error`` (default; the message
            lists the first offending rows and their count) or ``drop`` (leave those rows out and report
            how many were dropped).
        key_columns: see `ModalitySource`.
        include: keep only rows whose metadata holds the listed values; see `ModalitySource`.
        exclude: leave out rows whose metadata holds the listed values; see `ModalitySource`.
    """

    format = "molecules"
    input_kind = "graphs"

    def __init__(
        self,
        path: str,
        smiles_column: str = "smiles",
        invalid: Literal["error", "drop"] = "error",
        key_columns: list[str] | None = None,
        include: RowFilter | None = None,
        exclude: RowFilter | None = None,
    ) -> None:
        super().__init__(path, key_columns=key_columns, include=include, exclude=exclude)
        if invalid not in ("error", "drop"):
            raise ValueError(f"MoleculeSource: invalid must be 'error' or 'drop', got {invalid!r}")
        self.smiles_column = smiles_column
        self.invalid = invalid
        self._graphs: dict[str, Any] = {}  # SMILES -> graph, kept for the run (close() keeps it)
        self._smiles: np.ndarray | None = None
        self._usable: np.ndarray | None = None

    def _read_feature_names(self) -> list[str]:
        return list(ATOM_FEATURES)

    def read_metadata(self, columns: list[str] | None = None) -> pd.DataFrame:
        return read_metadata_of(self.file, columns)

    def smiles(self) -> np.ndarray:
        """The SMILES of every row of the file."""
        if self._smiles is None:
            column = read_metadata_of(self.file, [self.smiles_column])[self.smiles_column]
            self._smiles = column.astype(object).where(column.notna(), None).to_numpy()
        return self._smiles

    def num_rows(self) -> int:
        return len(self.smiles())

    def valid_rows(self) -> np.ndarray | None:
        """Rows with a parsable SMILES; with ``invalid="error"`` any other row is an error."""
        if self._usable is None:
            smiles = self.smiles()
            distinct = pd.unique(smiles)
            valid = {s: self._featurise(s) is not None for s in distinct}
            self._usable = np.fromiter((valid[s] for s in smiles), dtype=bool, count=len(smiles))
            bad = np.flatnonzero(~self._usable)
            if len(bad) and self.invalid == "error":
                examples = ", ".join(f"row {r}: {smiles[r]!r}" for r in bad[:5])
                raise DataError(
                    f"{self.file}: {len(bad)} rows have a SMILES in column {self.smiles_column!r} that RDKit cannot "
                    f"parse ({examples}{', ...' if len(bad) > 5 else ''}); fix them, or set invalid: drop"
                )
            if len(bad):
                warnings.warn(
                    f"{self.file}: dropped {len(bad)} of {len(smiles)} rows whose SMILES RDKit cannot parse "
                    f"(e.g. {', '.join(repr(smiles[r]) for r in bad[:3])})",
                    stacklevel=2,
                )
        return None if self._usable.all() else self._usable

    def _featurise(self, smiles: Any) -> Any | None:
        if smiles not in self._graphs:
            mol = parse_smiles(smiles)
            self._graphs[smiles] = None if mol is None else mol_to_graph(mol)
        return self._graphs[smiles]

    def read_features(
        self, rows: np.ndarray | None = None, align_to: list[str] | None = None, empty_rows: str = "error"
    ) -> MoleculeGraphs:
        if align_to is not None and list(align_to) != ATOM_FEATURES:
            raise DataError(
                f"the model's molecule tower was trained on {len(align_to)} atom features that differ from this "
                f"version's {len(ATOM_FEATURES)} ({ATOM_FEATURES[:3]}...): featurise with the version that trained it"
            )
        usable = self.valid_rows()
        rows = np.arange(self.num_rows()) if rows is None else np.asarray(rows)
        if usable is not None and not usable[rows].all():
            raise DataError(f"{self.file}: asked for rows whose SMILES cannot be parsed: {rows[~usable[rows]][:5]}")
        smiles = self.smiles()[rows]
        distinct, graph_of_row = np.unique(smiles.astype(str), return_inverse=True)
        return MoleculeGraphs([self._featurise(s) for s in distinct], graph_of_row.astype(np.int64))

    def close(self) -> None:
        self._smiles = None
