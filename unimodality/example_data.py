"""Bundled example data: a small paired transcriptomics + phenomics dataset generated from a seed.

Perturbations are (compound SMILES, concentration) pairs. Each compound is built from three fragments
(chain, ring, substituent); its latent effect is the sum of fragment effects plus a compound-specific
part, scaled and shifted by the dose. Both modalities are noisy readouts of that shared latent, measured
on independent replicates, so cross-modal retrieval is learnable but not trivial. The phenomics wells also
have small 5-channel images (``phenomics_images.npy``, aligned to ``phenomics.parquet``'s rows) drawn
from the same latent. Nothing is downloaded:
the files are generated on first use (``example://`` paths in configs) or by
``unimodality example-data --out DIR``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from unimodality.paths import SCHEME, resolve_path  # noqa: F401 - resolve_path: its home before paths.py

VERSION = "v2"
FILES = ("transcriptomics.h5ad", "phenomics.parquet", "phenomics_images.npy", "embeddings_transcriptomics.h5ad",
         "embeddings_phenomics.parquet")
#: the control compound of the embeddings-format files (DMSO), at concentration 0
CONTROL_SMILES = "CS(C)=O"
#: channel names of the example images (Cell Painting's stains)
IMAGE_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")

_CHAINS = ["C", "CC", "CCC", "CCCC", "CC(C)", "CC(C)C", "OCC", "NCC"]
_RINGS = ["c1ccccc1", "c1ccncc1", "C1CCCCC1", "c1ccoc1", "c1ccsc1"]
_TAILS = ["O", "N", "C(=O)O", "Cl", "F", "C#N"]


def data_dir() -> Path:
    """Where example data lives: ``$UNIMODALITY_DATA_DIR`` or ``~/.cache/unimodality/example-<version>``."""
    root = os.environ.get("UNIMODALITY_DATA_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "unimodality"
    return base / f"example-{VERSION}"


def example_file(name: str) -> Path:
    """The example data file ``name`` (the ``example://<name>`` of configs), generated on first use."""
    if name not in FILES:
        raise FileNotFoundError(f"{SCHEME}{name}: the example data has no such file; it has {', '.join(FILES)}")
    folder = data_dir()
    if not all((folder / f).is_file() for f in FILES):
        make_example_data(folder)
    return folder / name


def make_example_data(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_compounds: int = 200,
    concentrations: tuple[float, ...] = (1.0, 10.0),
    n_genes: int = 500,
    n_features: int = 128,
    latent_dim: int = 16,
    replicates: tuple[int, int] = (3, 7),
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    image_size: int = 24,
) -> dict[str, Path]:
    """Write ``transcriptomics.h5ad`` (CSR counts), ``phenomics.parquet`` and ``phenomics_images.npy``
    (uint8 images ``(wells, 5, image_size, image_size)``, one per row of the table) into ``out_dir``, and
    the same perturbations as research teams' files have them (see `embeddings_format`):
    ``embeddings_transcriptomics.h5ad`` and ``embeddings_phenomics.parquet``.

    Files are written under temporary names and renamed, so concurrent callers (several DDP ranks) and
    interrupted runs never leave a half-written file behind.
    """
    import anndata as ad
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # compounds from fragments; fragment effects give molecules a learnable relation to the latent
    combos = [(c, r, t) for c in range(len(_CHAINS)) for r in range(len(_RINGS)) for t in range(len(_TAILS))]
    if n_compounds > len(combos):
        raise ValueError(f"at most {len(combos)} example compounds, asked for {n_compounds}")
    chosen = [combos[i] for i in rng.choice(len(combos), n_compounds, replace=False)]
    smiles = [_CHAINS[c] + _RINGS[r] + _TAILS[t] for c, r, t in chosen]
    fragment_effects = [rng.normal(size=(len(f), latent_dim)) for f in (_CHAINS, _RINGS, _TAILS)]
    compound_latent = np.stack(
        [sum(e[i] for e, i in zip(fragment_effects, combo)) for combo in chosen]
    ) / np.sqrt(3) + 0.7 * rng.normal(size=(n_compounds, latent_dim))
    dose_direction = rng.normal(size=latent_dim)
    log_doses = np.log10(concentrations)
    dose_scale = 0.6 + 0.4 * (log_doses - log_doses.min()) / max(np.ptp(log_doses), 1e-9)

    keys = [(s, float(c)) for s in smiles for c in concentrations]
    latent = np.stack(
        [compound_latent[i] * dose_scale[j] + 0.5 * dose_scale[j] * dose_direction
         for i in range(n_compounds) for j in range(len(concentrations))]
    )
    # splits by compound: both concentrations of a compound are in one split, so held-out perturbations
    # are unseen molecules (what a molecule tower must generalise to)
    order = rng.permutation(n_compounds)
    n_train = int(round(split_fractions[0] * n_compounds))
    n_val = int(round(split_fractions[1] * n_compounds))
    compound_split = np.empty(n_compounds, dtype=object)
    compound_split[order[:n_train]] = "train"
    compound_split[order[n_train:n_train + n_val]] = "val"
    compound_split[order[n_train + n_val:]] = "test"
    split = np.repeat(compound_split, len(concentrations))

    def metadata(counts: np.ndarray, prefix: str) -> pd.DataFrame:
        key_index = np.repeat(np.arange(len(keys)), counts)
        replicate = np.concatenate([np.arange(n) for n in counts])
        return pd.DataFrame(
            {
                "smiles": [keys[k][0] for k in key_index],
                "concentration": [keys[k][1] for k in key_index],
                "split": split[key_index],
                "replicate": replicate,
            },
            index=[f"{prefix}{i:05d}" for i in range(len(key_index))],
        ), key_index

    # transcriptomics: Poisson counts from a softmax over genes; each gene responds to ~3 latent factors
    tx_meta, tx_keys = metadata(rng.integers(replicates[0], replicates[1] + 1, len(keys)), "tx")
    loadings = rng.normal(size=(n_genes, latent_dim)) * (rng.random((n_genes, latent_dim)) < 3 / latent_dim)
    baseline = rng.normal(-1.0, 1.0, n_genes)
    logits = baseline + 0.3 * latent[tx_keys] @ loadings.T + rng.normal(0, 0.8, (len(tx_keys), n_genes))
    rates = np.exp(logits - logits.max(axis=1, keepdims=True))
    rates /= rates.sum(axis=1, keepdims=True)
    library = rng.lognormal(np.log(1500), 0.4, len(tx_keys))
    counts = rng.poisson(rates * library[:, None]).astype(np.float32)
    tx = ad.AnnData(X=sp.csr_matrix(counts), obs=tx_meta)
    tx.var_names = [f"GENE{i:04d}" for i in range(n_genes)]

    # phenomics: a non-linear readout of the same latent plus well noise, standardised per feature
    ph_meta, ph_keys = metadata(rng.integers(replicates[0], replicates[1] + 1, len(keys)), "ph")
    readout = rng.normal(size=(latent_dim, n_features)) / np.sqrt(latent_dim)
    features = np.tanh(latent[ph_keys] @ readout) + rng.normal(0, 1.6, (len(ph_keys), n_features))
    well_mean, well_std = features.mean(0), features.std(0)
    features = (features - well_mean) / well_std
    ph_meta["well"] = ph_meta.index
    table = pa.Table.from_pandas(ph_meta.reset_index(drop=True), preserve_index=False)
    for i in range(n_features):
        table = table.append_column(f"feat_{i:03d}", pa.array(features[:, i].astype(np.float32)))

    # images of the phenomics wells, from a random stream of their own: the other files stay as they were
    images = well_images(latent[ph_keys], np.random.default_rng([seed, 1]), image_size)

    # controls (no effect: latent 0) for the embeddings-format files, from a random stream of their own
    control_rng = np.random.default_rng([seed, 2])
    control_logits = baseline + control_rng.normal(0, 0.8, (24, n_genes))
    control_rates = np.exp(control_logits - control_logits.max(axis=1, keepdims=True))
    control_rates /= control_rates.sum(axis=1, keepdims=True)
    control_counts = control_rng.poisson(control_rates * control_rng.lognormal(np.log(1500), 0.4, (24, 1)))
    control_features = (control_rng.normal(0, 1.6, (24, n_features)) - well_mean) / well_std  # tanh(0) = 0
    embedding_tx, embedding_ph = embeddings_format(
        tx, table, sp.csr_matrix(control_counts.astype(np.float32)), control_features.astype(np.float32),
        np.random.default_rng([seed, 3]))

    paths = {name: out / name for name in FILES}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tx.write_h5ad(Path(tmp) / "transcriptomics.h5ad")
        pq.write_table(table, Path(tmp) / "phenomics.parquet")
        np.save(Path(tmp) / "phenomics_images.npy", images)
        embedding_tx.write_h5ad(Path(tmp) / "embeddings_transcriptomics.h5ad")
        pq.write_table(embedding_ph, Path(tmp) / "embeddings_phenomics.parquet")
        for name, path in paths.items():
            os.replace(Path(tmp) / name, path)
    return paths


def well_images(latent: np.ndarray, rng: np.random.Generator, size: int = 24, max_cells: int = 9) -> np.ndarray:
    """Toy Cell Painting images ``(wells, 5, size, size)`` (uint8) of wells with the given latent effects.

    Each well holds a few "cells" at random positions: a Gaussian spot per cell and channel, whose
    number, size and per-channel brightness and spread are read out of the latent (through fixed random
    directions), with per-cell, per-well and per-pixel noise. What identifies a perturbation is thus in
    the intensity and morphology statistics, not in where the cells happen to lie.
    """
    n, dim = latent.shape
    channels = len(IMAGE_CHANNELS)
    readout = rng.normal(size=(dim, 2 + 2 * channels)) / np.sqrt(dim)
    z = latent @ readout  # (wells, 2 + 2 * channels)
    n_cells = np.clip(np.round(5 + 1.5 * z[:, 0] + rng.normal(0, 0.7, n)), 2, max_cells)
    radius = 1.4 * np.exp(0.3 * np.tanh(z[:, 1]))
    brightness = np.exp(0.45 * z[:, 2:2 + channels] + rng.normal(0, 0.15, (n, channels)))
    base_spread = np.array([1.0, 1.9, 1.5, 2.3, 1.7])  # the nucleus (DNA) is smallest
    spread = base_spread * np.exp(0.2 * np.tanh(z[:, 2 + channels:]))
    centres = rng.uniform(2, size - 2, (n, max_cells, 2)).astype(np.float32)
    amplitude = rng.lognormal(0, 0.25, (n, max_cells)) * (np.arange(max_cells) < n_cells[:, None])
    axis = np.arange(size, dtype=np.float32)
    d2 = (axis[None, None, :, None] - centres[..., 0, None, None]) ** 2 \
        + (axis[None, None, None, :] - centres[..., 1, None, None]) ** 2  # (wells, cells, size, size)
    images = np.empty((n, channels, size, size), dtype=np.float32)
    for c in range(channels):
        sigma = (radius * spread[:, c]).astype(np.float32)[:, None, None, None]
        spots = np.exp(-d2 / (2 * sigma**2))
        images[:, c] = np.einsum("nk,nkhw->nhw", (amplitude * brightness[:, c:c + 1]).astype(np.float32), spots)
    images += rng.normal(0, 0.08, images.shape).astype(np.float32)
    scale = np.quantile(images, 0.999, axis=(0, 2, 3))[None, :, None, None]
    return np.clip(np.round(10 + 220 * images / scale), 0, 255).astype(np.uint8)


def embeddings_format(
    tx: Any, table: Any, control_counts: Any, control_features: np.ndarray, rng: np.random.Generator,
    embedding_dim: int = 32,
) -> tuple[Any, Any]:
    """The example perturbations as a drug-discovery team's files hold them (the template of
    ``configs/clip_embeddings_format.yaml``):

    * transcriptomics ``.h5ad``: counts in ``X`` and a foundation-model embedding in ``obsm["scVI"]`` (here a
      stand-in: 32 principal components of the log-normalised counts) with a batch-corrected twin
      ``obsm["scVICenterScale"]`` (centred and scaled per experiment); keys ``canonical_smiles`` +
      ``treatment_concentration`` (float64, in mM: 0.1 and 1.0);
    * phenomics parquet: image-model embeddings of wells in ONE list column ``pheno_embedding`` (float32
      vectors), keys ``smiles`` + ``original_concentration`` (float32: 0.1 is not the float64 0.1);
    * both: control wells (DMSO, ``has_control`` true, 3 per experiment) and ``experiment_id``: training
      compounds spread over EXP1-EXP6, validation compounds in EXP7, test compounds in EXP8.
    """
    import anndata as ad
    import pandas as pd
    import pyarrow as pa
    import scipy.sparse as sp

    compounds = pd.unique(tx.obs["smiles"])
    split_of = tx.obs.drop_duplicates("smiles").set_index("smiles")["split"]
    train_experiment = dict(zip(compounds, rng.integers(1, 7, len(compounds))))
    named = {"val": "EXP7", "test": "EXP8"}

    def experiment(smiles: pd.Series) -> list[str]:
        return [named.get(split_of[s], f"EXP{train_experiment[s]}") for s in smiles]

    experiments = [f"EXP{i}" for i in range(1, 9)]
    controls = pd.DataFrame({"smiles": CONTROL_SMILES, "concentration": 0.0,
                             "experiment_id": np.repeat(experiments, 3), "has_control": True})

    obs = tx.obs[["smiles", "concentration"]].copy()
    obs["experiment_id"] = experiment(obs["smiles"])
    obs["has_control"] = False
    control_obs = controls.set_axis([f"ctl_tx{i:03d}" for i in range(len(controls))])
    obs = pd.concat([obs, control_obs])
    counts = sp.vstack([tx.X, control_counts]).tocsr()
    normalised = np.log1p(counts.multiply(1e4 / counts.sum(axis=1)).toarray())
    centred = normalised - normalised.mean(0)
    u, singular, _ = np.linalg.svd(centred, full_matrices=False)
    scvi = (u[:, :embedding_dim] * singular[:embedding_dim]).astype(np.float32)
    corrected = scvi.copy()
    for name in experiments:  # the batch-corrected twin: centred and scaled per experiment
        rows = (obs["experiment_id"] == name).to_numpy()
        corrected[rows] = (scvi[rows] - scvi[rows].mean(0)) / (scvi[rows].std(0) + 1e-6)
    obs = obs.rename(columns={"smiles": "canonical_smiles", "concentration": "treatment_concentration"})
    obs["treatment_concentration"] = obs["treatment_concentration"].to_numpy(np.float64) * 0.1
    adata = ad.AnnData(X=counts.astype(np.float32), obs=obs, var=tx.var.copy())
    adata.obsm["scVI"] = scvi
    adata.obsm["scVICenterScale"] = corrected.astype(np.float32)

    meta = table.select(["smiles", "concentration", "well"]).to_pandas()
    features = np.column_stack([table.column(name).to_numpy() for name in table.column_names
                                if name.startswith("feat_")]).astype(np.float32)
    meta["experiment_id"] = experiment(meta["smiles"])
    meta["has_control"] = False
    control_meta = controls.assign(well=[f"ctl_ph{i:03d}" for i in range(len(controls))])
    meta = pd.concat([meta, control_meta], ignore_index=True)
    meta = meta.rename(columns={"concentration": "original_concentration"})
    meta["original_concentration"] = (meta["original_concentration"].to_numpy(np.float64) * 0.1).astype(np.float32)
    vectors = np.concatenate([features, control_features])
    phenomics = pa.Table.from_pandas(meta, preserve_index=False).append_column(
        "pheno_embedding", pa.array(list(vectors), type=pa.list_(pa.float32())))
    return adata, phenomics
