"""Molecules as a modality: RDKit featurisation, invalid SMILES, the GNN encoder, training and embedding."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("rdkit")
pytest.importorskip("torch_geometric")

from rdkit import Chem  # noqa: E402
from torch_geometric.data import Batch  # noqa: E402

from tests.helpers import quiet_trainer  # noqa: E402
from unimodality.cli import main  # noqa: E402
from unimodality.plugins.datamodules.paired import PairedDataModule  # noqa: E402
from unimodality.plugins.encoders.gnn import GNNEncoder  # noqa: E402
from unimodality.plugins.encoders.mlp import MLPEncoder  # noqa: E402
from unimodality.plugins.setups.cross_modal import CrossModalSetup  # noqa: E402
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.molecules import (  # noqa: E402
    ATOM_FEATURES,
    BOND_FEATURES,
    MoleculeSource,
    mol_to_graph,
    smiles_to_graph,
)
from unimodality.sources import DataError  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def column(graph_x: torch.Tensor, name: str, features: list[str] = ATOM_FEATURES) -> torch.Tensor:
    return graph_x[:, features.index(name)]


# -- featurisation against known molecules ------------------------------------------------------------

def test_benzene():
    g = smiles_to_graph("c1ccccc1")
    assert g.x.shape == (6, len(ATOM_FEATURES)) and g.edge_attr.shape == (12, len(BOND_FEATURES))
    assert g.edge_index.shape == (2, 12)
    assert column(g.x, "element=C").sum() == 6 and column(g.x, "aromatic").sum() == 6
    assert column(g.x, "in_ring").sum() == 6 and column(g.x, "hydrogens=1").sum() == 6
    assert column(g.x, "hybridization=SP2").sum() == 6
    assert column(g.edge_attr, "bond_type=aromatic", BOND_FEATURES).sum() == 12
    # each block is one-hot: every atom has exactly one element, degree, charge, ...
    for prefix in ("element=", "degree=", "charge=", "hydrogens=", "hybridization=", "chirality="):
        block = [i for i, n in enumerate(ATOM_FEATURES) if n.startswith(prefix)]
        assert torch.all(g.x[:, block].sum(1) == 1), prefix


def test_aspirin_counts_atoms_rings_and_bonds():
    g = smiles_to_graph("CC(=O)Oc1ccccc1C(=O)O")
    assert g.num_nodes == 13  # heavy atoms; hydrogens are implicit
    assert column(g.x, "element=C").sum() == 9 and column(g.x, "element=O").sum() == 4
    assert column(g.x, "aromatic").sum() == 6 and column(g.x, "in_ring").sum() == 6
    bonds = g.edge_attr[::2]  # one row per bond (edges come in both directions)
    assert len(bonds) == 13
    assert column(bonds, "bond_type=double", BOND_FEATURES).sum() == 2
    assert column(bonds, "bond_type=aromatic", BOND_FEATURES).sum() == 6
    # edges are symmetric: (i, j) and (j, i) with the same features
    assert torch.equal(g.edge_index[:, ::2], g.edge_index[[1, 0], 1::2])
    assert torch.equal(g.edge_attr[::2], g.edge_attr[1::2])


def test_charges_hydrogens_elements_and_chirality():
    ammonium = smiles_to_graph("[NH4+]")
    assert column(ammonium.x, "charge=+1").item() == 1 and column(ammonium.x, "hydrogens=4+").item() == 1
    acetate = smiles_to_graph("CC(=O)[O-]")
    assert column(acetate.x, "charge=-1").sum() == 1 and column(acetate.x, "charge=0").sum() == 3
    salt = smiles_to_graph("[Na+].[Cl-]")  # disconnected fragments: two atoms, no bond
    assert salt.num_nodes == 2 and salt.edge_index.shape == (2, 0)
    assert column(salt.x, "element=other").sum() == 1 and column(salt.x, "element=Cl").sum() == 1
    alanine = smiles_to_graph("C[C@H](N)C(=O)O")
    assert column(alanine.x, "chirality=CW").sum() + column(alanine.x, "chirality=CCW").sum() == 1
    left, right = smiles_to_graph("N[C@@H](C)C(=O)O"), smiles_to_graph("N[C@H](C)C(=O)O")
    assert not torch.equal(left.x, right.x)  # enantiomers differ only in their chirality tag


def test_bond_types_and_stereo():
    assert column(smiles_to_graph("C=C").edge_attr, "bond_type=double", BOND_FEATURES).all()
    assert column(smiles_to_graph("C#N").edge_attr, "bond_type=triple", BOND_FEATURES).all()
    trans, cis = smiles_to_graph("F/C=C/F"), smiles_to_graph("F/C=C\\F")
    assert column(trans.edge_attr, "stereo=E", BOND_FEATURES).sum() == 2
    assert column(cis.edge_attr, "stereo=Z", BOND_FEATURES).sum() == 2


def test_unparsable_smiles_is_an_error():
    with pytest.raises(ValueError, match="cannot parse the SMILES 'C1CC'"):
        smiles_to_graph("C1CC")


# -- MoleculeSource: rows, caching, invalid SMILES ----------------------------------------------------

@pytest.fixture
def smiles_table(tmp_path) -> Path:
    path = tmp_path / "compounds.csv"
    pd.DataFrame({
        "compound": ["a", "b", "c", "d", "e", "f"],
        "canonical_smiles": ["CCO", "c1ccccc1", "CCO", "not-a-smiles", "CC(=O)O", "C1CC"],
    }).to_csv(path, index=False)
    return path


def test_invalid_smiles_are_listed_by_row(smiles_table):
    source = MoleculeSource(str(smiles_table), smiles_column="canonical_smiles")
    with pytest.raises(DataError) as error:
        source.usable_rows()
    message = str(error.value)
    assert "compounds.csv" in message and "2 rows" in message and "'canonical_smiles'" in message
    assert "row 3: 'not-a-smiles'" in message and "row 5: 'C1CC'" in message and "invalid: drop" in message


def test_drop_invalid_smiles_reports_and_keeps_the_rest(smiles_table):
    source = MoleculeSource(str(smiles_table), smiles_column="canonical_smiles", invalid="drop")
    with pytest.warns(UserWarning, match="dropped 2 of 6 rows"):
        usable = source.usable_rows()
    assert usable.tolist() == [True, True, True, False, True, False]
    graphs = source.read_features(np.array([0, 1, 2, 4]))
    assert len(graphs.graphs) == 3  # CCO is featurised once for rows 0 and 2
    batch = graphs.take(np.array([0, 2, 1]))
    assert isinstance(batch, Batch) and batch.num_graphs == 3
    assert torch.equal(batch.get_example(0).x, batch.get_example(1).x)
    with pytest.raises(DataError, match="cannot be parsed"):
        source.read_features(np.array([3]))


def test_missing_smiles_column_names_the_file(smiles_table):
    with pytest.raises(DataError, match=r"compounds.csv: has no column\(s\) \['smiles'\]"):
        MoleculeSource(str(smiles_table)).num_rows()


def test_predict_refuses_another_atom_featurisation(smiles_table):
    source = MoleculeSource(str(smiles_table), smiles_column="canonical_smiles", invalid="drop")
    with pytest.raises(DataError, match="atom features"):
        source.read_features(np.array([0]), align_to=ATOM_FEATURES[:-1])


def test_paired_datamodule_drops_rows_of_invalid_smiles(tmp_path, example_data_dir):
    """A molecule file of its own, paired by compound, with one unparsable SMILES among them."""
    tx = AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p")
    compounds = pd.unique(tx.read_metadata(["smiles"])["smiles"].astype(str))
    table = pd.DataFrame({"compound": compounds, "structure": compounds})
    table.loc[0, "structure"] = "C1CC"  # the first compound's structure is broken
    table.to_parquet(tmp_path / "compounds.parquet")
    mol = MoleculeSource(str(tmp_path / "compounds.parquet"), smiles_column="structure", invalid="drop",
                         key_columns=["compound"])
    data = PairedDataModule({"tx": tx, "mol": mol}, keys=["smiles"], val_fraction=0.2, test_fraction=0.0,
                            batch_size=16)
    with pytest.warns(UserWarning, match="dropped 1 of"):
        data.setup("fit")
    train, val = data.datasets["train"], data.datasets["val"]
    assert len(train) + len(val.groups) == len(compounds) - 1  # every compound but the broken one
    batch = train.__getitems__(list(range(16)))
    assert batch["mol"].num_graphs == 16 and batch["tx"].shape == (16, 500)


# -- the GNN encoder ---------------------------------------------------------------------------------

def permuted(smiles: str, seed: int) -> Chem.Mol:
    mol = Chem.MolFromSmiles(smiles)
    order = np.random.default_rng(seed).permutation(mol.GetNumAtoms()).tolist()
    return Chem.RenumberAtoms(mol, order)


@pytest.mark.parametrize("pooling", ["mean", "sum", "attention"])
@pytest.mark.parametrize("conv", ["gine", "gin"])
def test_gnn_is_invariant_to_atom_order(conv, pooling):
    torch.manual_seed(0)
    encoder = GNNEncoder(len(ATOM_FEATURES), hidden_size=32, num_layers=3, conv=conv, pooling=pooling).eval()
    smiles = ["CC(=O)Oc1ccccc1C(=O)O", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "C[C@H](N)C(=O)O"]
    original = encoder(Batch.from_data_list([smiles_to_graph(s) for s in smiles]))
    for seed in range(3):
        shuffled = Batch.from_data_list([mol_to_graph(permuted(s, seed)) for s in smiles])
        assert not torch.equal(shuffled.x, Batch.from_data_list([smiles_to_graph(s) for s in smiles]).x)
        torch.testing.assert_close(encoder(shuffled), original, atol=1e-5, rtol=1e-5)
    # batching does not mix molecules: each row equals the molecule embedded on its own
    alone = torch.cat([encoder(Batch.from_data_list([smiles_to_graph(s)])) for s in smiles])
    torch.testing.assert_close(alone, original, atol=1e-5, rtol=1e-5)
    assert original.shape == (3, 32) and encoder.out_features == 32


def test_gnn_tells_molecules_apart_and_learns():
    torch.manual_seed(0)
    encoder = GNNEncoder(len(ATOM_FEATURES), hidden_size=16, num_layers=2, dropout=0.0)
    batch = Batch.from_data_list([smiles_to_graph(s) for s in ["CCO", "CCN", "c1ccccc1", "CC(=O)O"]])
    out = encoder(batch)
    assert torch.cdist(out, out)[~torch.eye(4, dtype=torch.bool)].min() > 1e-4
    out.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())


def test_gnn_input_contract():
    encoder = GNNEncoder(len(ATOM_FEATURES), hidden_size=8)
    with pytest.raises(ValueError, match="expects a torch_geometric batch of molecular graphs.*got Tensor"):
        encoder(torch.zeros(4, len(ATOM_FEATURES)))
    narrow = GNNEncoder(10, hidden_size=8)
    with pytest.raises(ValueError, match=r"atom features of shape \(atoms, 10\), got \(3, 42\)"):
        narrow(Batch.from_data_list([smiles_to_graph("CCC")]))
    with pytest.raises(ValueError, match="num_layers and hidden_size"):
        GNNEncoder(10, num_layers=0)


def test_a_molecule_tower_cannot_be_disabled():
    schema = {
        "tx": {"class_path": "x", "init_args": {}, "features": ["g1", "g2"], "input": "vectors"},
        "mol": {"class_path": "x", "init_args": {}, "features": ATOM_FEATURES, "input": "graphs"},
    }
    model = CrossModalSetup(encoders={"tx": partial(MLPEncoder, hidden_sizes=[8])}, modes={"mol": "disabled"})
    with pytest.raises(ValueError, match="'mol' has graphs as input: a disabled tower"):
        model.build(schema)


# -- end to end: transcriptomics <-> molecules --------------------------------------------------------

@pytest.fixture(scope="module")
def tx_mol_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tx-mol")
    out = io.StringIO()
    with redirect_stdout(out):
        main(["fit", "--config", str(CONFIGS / "clip_tx_mol.yaml"), "--trainer.max_epochs", "15",
              "--model.lr_scheduler.init_args.T_max", "15", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(root / "runs")])
    return Path(re.search(r"Run directory: (\S+)", out.getvalue()).group(1))


def test_tx_mol_alignment_retrieves_unseen_molecules(tx_mol_run):
    """Validation compounds are unseen molecules: retrieval must beat chance by a wide margin."""
    metrics = pd.read_csv(tx_mol_run / "metrics.csv")
    final = metrics.dropna(subset=["val/recall@1"]).iloc[-1]
    n_val = 20  # compounds in the example data's validation split
    assert final["val/recall@1/tx->mol"] > 4 / n_val
    assert final["val/recall@1/mol->tx"] > 4 / n_val


def test_predict_embeds_a_smiles_table(tx_mol_run, tmp_path, smiles_table, capsys):
    ckpt = tx_mol_run / "checkpoints" / "last.ckpt"
    table = pd.read_csv(smiles_table).rename(columns={"canonical_smiles": "smiles"})
    table.to_parquet(tmp_path / "new.parquet")
    output = tmp_path / "new_embedded.parquet"
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", str(ckpt), "--data.path", str(tmp_path / "new.parquet"),
              "--data.modality", "mol", "--data.output", str(output), "--trainer.enable_progress_bar", "false"])
    assert "invalid: drop" in capsys.readouterr().err
    assert not output.exists()
    with pytest.warns(UserWarning, match="dropped 2 of 6"):
        main(["predict", "--ckpt_path", str(ckpt), "--data.path", str(tmp_path / "new.parquet"),
              "--data.modality", "mol", "--data.output", str(output), "--trainer.enable_progress_bar", "false",
              "--data.source_options", '{"invalid": "drop"}'])
    embedded = pd.read_parquet(output)
    assert embedded["compound"].tolist() == ["a", "b", "c", "e"]
    vectors = embedded.filter(like="X_unimodality_").to_numpy()
    assert vectors.shape == (4, 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)  # the same molecule, the same embedding
    # the checkpoint's model embeds the same molecules identically from Python
    model = CrossModalSetup.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        direct = model.towers["mol"](Batch.from_data_list([smiles_to_graph(s) for s in ["CCO", "c1ccccc1"]]))
    np.testing.assert_allclose(direct.numpy(), vectors[:2], atol=1e-5)


def test_training_steps_with_molecules_in_python(example_data_dir):
    data = PairedDataModule(
        {"tx": AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p"),
         "mol": MoleculeSource("example://transcriptomics.h5ad")},
        keys=["smiles"], split_column="split", batch_size=32,
    )
    model = CrossModalSetup(
        encoders={"tx": partial(MLPEncoder, hidden_sizes=[64]), "mol": partial(GNNEncoder, hidden_size=32)},
        embed_dim=16,
    )
    quiet_trainer(max_epochs=1, limit_val_batches=1).fit(model, datamodule=data)
    assert model.schema["mol"]["input"] == "graphs" and model.schema["mol"]["features"] == ATOM_FEATURES


def test_a_frozen_molecule_tower_loads_a_trained_gnn(tx_mol_run, example_data_dir):
    """Pretrained weights from a unimodality checkpoint, selected by key prefix, for a frozen tower."""
    ckpt = tx_mol_run / "checkpoints" / "last.ckpt"
    trained = CrossModalSetup.load_from_checkpoint(ckpt)
    data = PairedDataModule(
        {"tx": AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p"),
         "mol": MoleculeSource("example://transcriptomics.h5ad")},
        keys=["smiles"], split_column="split", batch_size=32,
    )
    model = CrossModalSetup(
        encoders={"tx": partial(MLPEncoder, hidden_sizes=[64]),
                  "mol": partial(GNNEncoder, hidden_size=128, num_layers=3)},
        modes={"mol": "frozen"}, weights={"mol": str(ckpt)}, weights_prefix={"mol": "towers.mol.encoder."},
    )
    quiet_trainer(max_epochs=1, limit_val_batches=1).fit(model, datamodule=data)
    for (name, got), want in zip(model.towers["mol"].encoder.state_dict().items(),
                                 trained.towers["mol"].encoder.state_dict().values()):
        assert torch.equal(got, want), name  # loaded, and unchanged by training
    with pytest.raises(RuntimeError, match="size mismatch"):  # another architecture does not load silently
        CrossModalSetup(
            encoders={"tx": partial(MLPEncoder, hidden_sizes=[64]), "mol": partial(GNNEncoder, hidden_size=64)},
            modes={"mol": "frozen"}, weights={"mol": str(ckpt)}, weights_prefix={"mol": "towers.mol.encoder."},
        ).build(model.schema)
