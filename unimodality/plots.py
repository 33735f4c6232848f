"""Pictures of a run: an embedding map, a cross-modal similarity heatmap, loss and metric curves.

Written as PNG files into the run directory (``plots/``) at the end of ``fit`` and ``test``, and as images
into TensorBoard when a ``TensorBoardLogger`` is used. matplotlib is optional (``pip install
"unimodality[plots]"``): without it the plots are skipped with one log line. UMAP is used for the map when
``umap-learn`` is installed, PCA otherwise. Everything is drawn from samples (at most ``max_points`` rows per
modality and split, ``max_perturbations`` perturbations in the heatmap) with the Agg backend, so a plot costs
about a second whatever the data size.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device

from unimodality.metrics import group_means
from unimodality.outputs import run_directory

log = logging.getLogger(__name__)

#: the logged metrics drawn as curves (the first of each panel's names that the CSV has is drawn, all of them)
CURVE_PANELS = {
    "loss": ("train/loss", "val/loss"),
    "retrieval (perturbation level)": ("val/pert/recall@1", "val/pert/recall@10", "val/pert/mrr",
                                       "val/pert/chance@1", "val/pert/chance@10"),
    "retrieval (row level)": ("val/recall@1", "val/recall@5", "val/recall@10"),
    "replicate mAP": ("val/map/",),
}


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; a user's interactive backend is left alone
    import matplotlib.pyplot as plt

    return plt


def reduce_2d(points: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of ``points`` and the method used (``umap`` when installed and asked for, else ``pca``).

    Args:
        points: ``(n, d)`` embeddings.
        method: ``auto`` (UMAP if ``umap-learn`` is installed), ``umap`` or ``pca``.
        seed: random state of UMAP.
    """
    points = np.asarray(points, dtype=np.float32)
    if method in ("auto", "umap") and importlib.util.find_spec("umap") is not None and len(points) > 15:
        import umap

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(points), "umap"
    if method == "umap":
        log.info("umap-learn is not installed: the embedding map uses PCA")
    centred = points - points.mean(axis=0)
    if min(centred.shape) < 2:
        return np.pad(centred[:, :2], ((0, 0), (0, max(0, 2 - centred.shape[1])))), "pca"
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "pca"


def embedding_map(
    embeddings: dict[tuple[str, str], np.ndarray], path: Path, title: str = "", method: str = "auto"
) -> Path:
    """Draw the embeddings in 2-D twice: coloured by modality, and by split.

    Args:
        embeddings: ``{(modality, split): (n, d) array}``; all share one embedding space.
        path: the PNG to write.
        title: figure title.
        method: see `reduce_2d`.
    """
    plt = _pyplot()
    keys = [key for key, value in embeddings.items() if len(value)]
    stacked = np.concatenate([embeddings[key] for key in keys])
    coords, used = reduce_2d(stacked, method)
    labels = np.concatenate([[i] * len(embeddings[key]) for i, key in enumerate(keys)])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), constrained_layout=True)
    for ax, position, what in ((axes[0], 0, "modality"), (axes[1], 1, "split")):
        values = sorted({key[position] for key in keys})
        for j, value in enumerate(values):
            mask = np.isin(labels, [i for i, key in enumerate(keys) if key[position] == value])
            ax.scatter(coords[mask, 0], coords[mask, 1], s=6, alpha=0.6, color=f"C{j}", label=value, linewidths=0)
        ax.set_title(f"by {what}")
        ax.set_xlabel(f"{used.upper()} 1")
        ax.set_ylabel(f"{used.upper()} 2")
        ax.legend(markerscale=3, frameon=False)
    fig.suptitle(title or f"embeddings ({used.upper()})")
    return _save(fig, path)


def similarity_heatmap(
    a: np.ndarray, b: np.ndarray, names: tuple[str, str], path: Path, labels: list[str] | None = None
) -> Path:
    """Cosine similarity of perturbations of modality A (rows) to the same perturbations of B (columns).

    Rows and columns are in the same order, so a good alignment shows a bright diagonal.

    Args:
        a: ``(p, d)`` L2-normalised perturbation means of modality A.
        b: ``(p, d)`` the same perturbations' means in modality B.
        names: the two modalities' names.
        path: the PNG to write.
        labels: perturbation names for the ticks (shown up to 40).
    """
    plt = _pyplot()
    sim = a @ b.T
    fig, ax = plt.subplots(figsize=(6.5, 5.5), constrained_layout=True)
    # the data's own range: with a modality gap every similarity sits in a narrow band that [-1, 1] would flatten
    image = ax.imshow(sim, cmap="viridis", vmin=float(sim.min()), vmax=float(sim.max()))
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set_ylabel(f"{names[0]} (perturbation mean)")
    ax.set_xlabel(f"{names[1]} (perturbation mean)")
    if labels is not None and len(labels) <= 40:
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
    diagonal_wins = float(np.mean(np.argmax(sim, axis=1) == np.arange(len(sim))))
    ax.set_title(f"{names[0]} vs {names[1]}: {len(sim)} perturbations, top-1 on the diagonal {diagonal_wins:.2f}")
    return _save(fig, path)


def metric_curves(metrics_csv: Path, path: Path) -> Path | None:
    """Loss and metric curves from a CSV logger's ``metrics.csv``; ``None`` when it has none of them.

    Args:
        metrics_csv: the CSV file (one row per logging step, NaN where a metric was not logged).
        path: the PNG to write.
    """
    import pandas as pd  # when plotting: the command's --help need not pay for it

    table = pd.read_csv(metrics_csv)
    panels = {}
    for title, names in CURVE_PANELS.items():
        columns = [c for c in table.columns if any(c == n or (n.endswith("/") and c.startswith(n)) for n in names)]
        columns = [c for c in columns if table[c].notna().any() and "/chance/" not in c]
        if columns:
            panels[title] = columns
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), constrained_layout=True, squeeze=False)
    for ax, (title, columns) in zip(axes[0], panels.items()):
        for column in columns:
            x = "step" if column.startswith("train/") or "epoch" not in table else "epoch"
            values = table[[x, column]].dropna()
            style = {"linestyle": "--", "color": "grey"} if "chance" in column else {}
            ax.plot(values[x], values[column], marker="." if len(values) < 30 else None, label=column, **style)
        ax.set_title(title)
        ax.set_xlabel("step / epoch" if title == "loss" else "epoch")
        ax.legend(fontsize=7, frameon=False)
    if "loss" in panels and {"train/loss", "val/loss"} <= set(panels["loss"]) and "epoch" in table:
        # train loss is logged per step and val loss per epoch: put both on the epoch axis
        ax = axes[0][list(panels).index("loss")]
        ax.clear()
        for column in panels["loss"]:
            per_epoch = table[["epoch", column]].dropna().groupby("epoch")[column].mean()
            ax.plot(per_epoch.index, per_epoch.values, marker=".", label=column)
        ax.set_title("loss")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _read_png(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 pixels of a PNG written here (for TensorBoard)."""
    image = _pyplot().imread(path)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return image[..., :3]


def log_images(trainer: Trainer, images: dict[str, Path]) -> None:
    """Add the PNGs to every TensorBoard logger of ``trainer`` (tag ``plots/<name>``)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, path in images.items():
                logger.experiment.add_image(f"plots/{name}", _read_png(path), trainer.global_step, dataformats="HWC")


class PlotCallback(Callback):
    """At the end of ``fit`` (validation data, and a sample of training data) and ``test`` (test data): the
    embedding map, the similarity heatmap and the curves, as PNG files in ``<run dir>/plots/`` and as
    TensorBoard images.

    The embeddings are those the setup's last evaluation epoch collected (``last_evaluation``, see
    `unimodality.plugins.setups.cross_modal.CrossModalSetup`); setups without it get the curves only.

    Args:
        max_points: at most this many rows per modality and split on the map.
        max_perturbations: at most this many perturbations in the heatmap.
        method: ``auto`` (UMAP when installed, else PCA), ``umap`` or ``pca``.
        seed: seed of the samples.
    """

    def __init__(self, max_points: int = 1000, max_perturbations: int = 30, method: str = "auto",
                 seed: int = 0) -> None:
        self.max_points = max_points
        self.max_perturbations = max_perturbations
        self.method = method
        self.seed = seed
        self.written: dict[str, Path] = {}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plot(trainer, pl_module, "fit")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plot(trainer, pl_module, "test")

    def _plot(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_directory(trainer, prefer_checkpoint=stage == "test")  # collective: every process calls it
        if not trainer.is_global_zero or folder is None or trainer.sanity_checking:
            return
        if not have_matplotlib():
            log.warning('matplotlib is not installed: no plots (pip install "unimodality[plots]")')
            return
        try:
            self.written = self.draw(trainer, pl_module, stage, folder / "plots")
        except Exception as error:  # a picture must never cost the user a finished run
            log.warning("plots failed (%s: %s); the run itself is fine", type(error).__name__, error)
            return
        log_images(trainer, self.written)
        if self.written:
            log.info("plots written to %s", folder / "plots")

    def draw(self, trainer: Trainer, pl_module: LightningModule, stage: str, folder: Path) -> dict[str, Path]:
        """Write the plots of ``stage`` (``fit`` or ``test``) into ``folder``; returns them by name."""
        rng = np.random.default_rng(self.seed)
        written: dict[str, Path] = {}
        evaluation = getattr(pl_module, "last_evaluation", None) or {}
        rows = evaluation.get("embeddings", {})
        split = "test" if evaluation.get("stage") == "test" else "val"
        points: dict[tuple[str, str], np.ndarray] = {}
        for modality, (embedding, _) in rows.items():
            points[(modality, split)] = self._sample(embedding.numpy(), rng)
        if stage == "fit":
            for modality, embedding in self._training_sample(trainer, pl_module).items():
                points[(modality, "train")] = embedding
        if points:
            written[f"embedding_map_{stage}"] = embedding_map(
                points, folder / f"embedding_map_{stage}.png", f"{type(pl_module).__name__}: embeddings", self.method)
        pairs = getattr(pl_module, "pairs", [])
        if pairs and all(m in rows for m in pairs[0]):
            a, b = pairs[0]
            heatmap = self._heatmap(rows[a], rows[b], (a, b), folder / f"similarity_{stage}.png", rng)
            if heatmap is not None:
                written[f"similarity_{stage}"] = heatmap
        metrics_csv = self._metrics_csv(trainer, checkpoint_first=stage == "test")
        if metrics_csv is not None:
            curves = metric_curves(metrics_csv, folder / "curves.png")
            if curves is not None:
                written["curves"] = curves
        return written

    def _sample(self, embedding: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if len(embedding) <= self.max_points:
            return embedding
        return embedding[np.sort(rng.choice(len(embedding), self.max_points, replace=False))]

    def _heatmap(self, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                 names: tuple[str, str], path: Path, rng: np.random.Generator) -> Path | None:
        mean_a, ids_a = group_means(*a)
        mean_b, ids_b = group_means(*b)
        common = ids_a[torch.isin(ids_a, ids_b)].numpy()
        if len(common) < 2:
            return None
        chosen = np.sort(rng.choice(common, min(self.max_perturbations, len(common)), replace=False))
        chosen = torch.from_numpy(chosen)
        rows_a = mean_a[torch.searchsorted(ids_a, chosen)].numpy()
        rows_b = mean_b[torch.searchsorted(ids_b, chosen)].numpy()
        return similarity_heatmap(rows_a, rows_b, names, path, labels=[str(int(g)) for g in chosen])

    def _training_sample(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, np.ndarray]:
        """Embeddings of up to ``max_points`` training examples (setups with ``embed(batch)`` only)."""
        datasets = getattr(trainer.datamodule, "datasets", None) or {}
        dataset = datasets.get("train") if isinstance(datasets, dict) else None
        embed: Callable | None = getattr(pl_module, "embed", None)
        if dataset is None or embed is None or not hasattr(dataset, "__getitems__") or not len(dataset):
            return {}
        indices = np.sort(np.random.default_rng(self.seed).choice(
            len(dataset), min(self.max_points, len(dataset)), replace=False)).tolist()
        was_training = pl_module.training
        pl_module.eval()
        try:
            # the dataset may draw replicates at random: keep the global random stream as it was
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(self.seed)
                batch = move_data_to_device(dataset.__getitems__(indices), pl_module.device)
                out = embed(batch)
        finally:
            pl_module.train(was_training)
        return {name: value.float().cpu().numpy() for name, value in out.items()}

    @staticmethod
    def _metrics_csv(trainer: Trainer, checkpoint_first: bool) -> Path | None:
        """The CSV log with the training curves: the checkpoint's run's (when testing a checkpoint: this
        run's own log holds test metrics only) or this run's CSV logger's."""
        from lightning.pytorch.loggers import CSVLogger

        candidates = []
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()  # flush what is buffered: the file is complete only after teardown otherwise
                candidates.append(Path(logger.experiment.metrics_file_path))
        ckpt_path = getattr(trainer, "ckpt_path", None)
        if ckpt_path:
            from_checkpoint = Path(ckpt_path).resolve().parent.parent / "metrics.csv"
            candidates.insert(0 if checkpoint_first else len(candidates), from_checkpoint)
        return next((path for path in candidates if path.is_file()), None)
