"""Graph neural network encoder for molecules: GIN/GINE message passing from torch_geometric."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from unimodality.encoder import Encoder
from unimodality.plugins.sources.molecules import BOND_FEATURES

_NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": nn.Identity}


def _torch_geometric() -> Any:
    try:
        import torch_geometric.nn as gnn
    except ImportError as err:  # an optional dependency: say how to get it
        raise ImportError(
            "GNNEncoder needs torch_geometric (and RDKit to read SMILES): pip install 'unimodality[molecules]'"
        ) from err
    return gnn


class GNNEncoder(Encoder):
    """Graph isomorphism network (Xu et al. 2019) over molecular graphs, pooled to one vector per molecule.

    ``atom features -> Linear -> [GIN(E) conv -> norm -> ReLU -> dropout] x num_layers -> pooling``.
    GINE (Hu et al. 2020) also passes the bond features along each edge; GIN ignores them. Each conv's
    update is a two-layer MLP; a residual connection adds each layer's input to its output.

    Args:
        in_features: atom feature size (set from the data, not the config).
        hidden_size: width of the atom states and of the output.
        num_layers: message-passing layers (the receptive field in bonds).
        conv: ``gine`` (uses bond features) or ``gin``.
        pooling: readout over atoms: ``mean``, ``sum``, or ``attention`` (a learned gate per atom).
        norm: normalisation after each conv.
        dropout: dropout after each layer.
        edge_features: bond feature size (default: that of `unimodality.plugins.sources.molecules`).
    """

    def __init__(
        self,
        in_features: int,
        hidden_size: int = 128,
        num_layers: int = 3,
        conv: Literal["gine", "gin"] = "gine",
        pooling: Literal["mean", "sum", "attention"] = "mean",
        norm: Literal["batch", "layer", "none"] = "batch",
        dropout: float = 0.1,
        edge_features: int = len(BOND_FEATURES),
    ) -> None:
        super().__init__(in_features)
        gnn = _torch_geometric()
        if num_layers < 1 or hidden_size < 1:
            raise ValueError("GNNEncoder: num_layers and hidden_size must be at least 1")
        if conv not in ("gine", "gin") or pooling not in ("mean", "sum", "attention"):
            raise ValueError(f"GNNEncoder: conv must be gine or gin and pooling mean, sum or attention; got {conv}, "
                             f"{pooling}")
        self.conv = conv
        self.embed_atoms = nn.Linear(in_features, hidden_size)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for _ in range(num_layers):
            update = nn.Sequential(
                nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size)
            )
            self.convs.append(
                gnn.GINEConv(update, edge_dim=edge_features) if conv == "gine" else gnn.GINConv(update)
            )
            self.norms.append(_NORMS[norm](hidden_size))
        self.dropout = nn.Dropout(dropout)
        if pooling == "attention":
            self.pool = gnn.aggr.AttentionalAggregation(nn.Linear(hidden_size, 1))
        else:
            self.pool = gnn.aggr.MeanAggregation() if pooling == "mean" else gnn.aggr.SumAggregation()
        self.out_features = hidden_size

    def check_input(self, batch: Any) -> None:
        x = getattr(batch, "x", None)
        if not isinstance(x, torch.Tensor) or getattr(batch, "edge_index", None) is None:
            raise ValueError(
                f"GNNEncoder expects a torch_geometric batch of molecular graphs (e.g. from MoleculeSource), "
                f"got {type(batch).__name__}"
            )
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"GNNEncoder expects atom features of shape (atoms, {self.in_features}), "
                             f"got {tuple(x.shape)}")

    def forward(self, batch: Any) -> torch.Tensor:
        self.check_input(batch)
        h = self.embed_atoms(batch.x)
        for conv, norm in zip(self.convs, self.norms):
            update = conv(h, batch.edge_index, batch.edge_attr) if self.conv == "gine" else conv(h, batch.edge_index)
            h = h + self.dropout(torch.relu(norm(update)))
        index = getattr(batch, "batch", None)
        if index is None:  # a single graph
            index = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        return self.pool(h, index, dim_size=getattr(batch, "num_graphs", 1))
