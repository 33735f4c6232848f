"""SimCLR (Chen et al. 2020): self-supervised contrastive learning of one modality from augmented views."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unimodality import diagnostics
from unimodality.augmentation import Augmentation, Compose
from unimodality.batch import GROUP
from unimodality.config import lazy_default
from unimodality.distributed import gather, gather_with_grad
from unimodality.encoder import Encoder
from unimodality.loss import ContrastiveLoss
from unimodality.metrics import SameGroupRecall
from unimodality.plugins.losses.ntxent import NTXentLoss
from unimodality.plugins.setups.single_modality import SingleModalitySteps
from unimodality.setup import Setup

log = logging.getLogger(__name__)

#: seed of the augmented views of validation/test batches (so the evaluation loss is repeatable)


class SimCLRSetup(SingleModalitySteps, Setup):
    """SimCLR on one modality: two augmented views of each sample, encoder, projection head, NT-Xent.

    ``view -> encoder -> representation -> projection head (Linear, ReLU, Linear) -> L2 normalisation``
    (no normalisation for a loss that sets ``normalized_inputs = False``, such as ``VICRegLoss``);
    the loss pulls the two views of a sample together (and, with a loss using groups, every sample of the
    same perturbation) and pushes the rest of the global batch away. As in SimCLR, the projection is for
    the loss only: ``predict`` (and the validation retrieval metric) use the encoder's representation.
    The encoder is built from the data's schema, which is stored in the checkpoint, so a trained model
    embeds new files with no config; its weights are the checkpoint's ``encoder.*`` keys (e.g. for a
    ``CrossModalSetup`` tower: ``weights_prefix: encoder.``).

    Validation and test log the loss on two augmented views (augmentations are applied in evaluation
    too, from a fixed seed, so the value is repeatable; the encoder is in eval mode) and, when samples
    share groups (a datamodule with ``keys``), ``recall@k``: how often another replicate of a sample's
    perturbation is among the ``k`` nearest representations (the sample itself excluded).

    Args:
        encoder: the encoder; its input size is filled in from the data.
        augmentations: applied in order to make each view (each with its own probability). With none,
            the two views differ only by the encoder's dropout (as in SimCSE).
        loss: contrastive loss of the two views' projections (global batch, with group ids).
        embed_dim: output size of the projection head (what the loss sees).
        projection_hidden: hidden width of the projection head; default: the encoder's output width.
        retrieval_k: the ``k`` of the evaluation recall@k metrics.
        schema: filled in from the data at the start of training; leave unset.
        **kwargs: optimizer, learning-rate scheduler, ``tower_optim`` and ``preservation`` (the one tower,
            encoder and projection head, is named by the modality; its preservation term compares the
            augmented views with their representations), see `unimodality.setup.Setup`.
    """

    def __init__(
        self,
        encoder: Callable[[int], Encoder] | None = None,
        augmentations: list[Augmentation] | None = None,
        loss: ContrastiveLoss = lazy_default(NTXentLoss),
        embed_dim: int = 128,
        projection_hidden: int | None = None,
        retrieval_k: list[int] = [1, 5, 10],
        schema: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if embed_dim < 1 or (projection_hidden is not None and projection_hidden < 1):
            raise ValueError("SimCLRSetup: embed_dim and projection_hidden must be at least 1")
        self.make_encoder = encoder
        self.augmentations = Compose(list(augmentations or []))
        self.loss = self.own_default("loss", loss)
        self.embed_dim = embed_dim
        self.projection_hidden = projection_hidden
        self.retrieval_k = tuple(retrieval_k)
        self.retrieval = SameGroupRecall(self.retrieval_k)
        self.encoder: Encoder | None = None
        self.projection: nn.Module | None = None
        self.modality: str | None = None
        if schema is not None:
            self.build(schema)

    # -- building from the data's schema -------------------------------------------------------------
    def build(self, schema: dict[str, dict[str, Any]]) -> None:
        """Create the encoder and projection head for the one modality of ``schema``."""
        name, entry = self._only_modality(schema)
        unknown = sorted((set(self.tower_optim) | set(self.preservation)) - {name})
        if unknown:
            raise ValueError(
                f"model settings (tower_optim, preservation) name {unknown}; SimCLRSetup's one tower is the "
                f"data's modality {name!r}"
            )
        encoder = self._new_encoder(entry)
        width = encoder.out_features
        hidden = self.projection_hidden or width
        self.encoder = encoder
        self.projection = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, self.embed_dim))
        self.modality = name
        self.remember_schema(schema)
        if not len(self.augmentations):
            log.warning("SimCLRSetup has no augmentations: the two views differ only by the encoder's dropout")

    def tower_modules(self) -> dict[str, nn.Module]:
        """The one tower (encoder and projection head), named by the modality."""
        if self.modality is None:
            return {}
        return {self.modality: nn.ModuleList([self.encoder, self.projection])}

    # -- the model -------------------------------------------------------------------------------------
    def project(self, representation: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """L2-normalised projections of representations (the head's raw output with ``normalize=False``)."""
        projected = self.projection(representation)
        return F.normalize(projected, dim=-1) if normalize else projected

    def _views(self, x: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """What the loss sees of two augmented views of ``x`` (one encoder pass over both): L2-normalised
        projections, or raw ones for a loss that sets ``normalized_inputs = False`` (e.g. VICReg)."""
        return self._views_and_representations(x, augment)[0]

    def _views_and_representations(
        self, x: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """`_views`, the two views stacked, and their representations (for the preservation term)."""
        views = torch.cat([augment(x), augment(x)])
        representations = self.encoder(views)
        projected = self.project(representations, normalize=self.loss.normalized_inputs).split(x.shape[0])
        return projected, views, representations

    # -- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        (a, b), views, representations = self._views_and_representations(self._input(batch), self.augmentations)
        # the loss sees the global batch: every process's projections, with gradients
        a, b = gather_with_grad(a), gather_with_grad(b)
        loss = self.loss(a, b, gather(batch[GROUP]))
        batch_size = len(batch[GROUP])
        if self.preservation:
            # the two views stacked per process, [a; b] on each rank: the same rows as one process would pair
            extra = self.preservation_loss({self.modality: views}, {self.modality: gather_with_grad(representations)},
                                           batch_size)
            if extra is not None:
                loss = loss + extra
        if self.is_logging_step():
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            for key, value in self.loss.extra_metrics().items():
                self.log(f"train/{key}", value, batch_size=batch_size)
            with torch.no_grad():
                if not self.loss.normalized_inputs:  # the diagnostics are defined on the sphere
                    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
                self.log("train/alignment", diagnostics.alignment(a.float(), b.float()), batch_size=batch_size)
                self.log("train/uniformity", diagnostics.uniformity(a.float()), batch_size=batch_size)
        return loss

    def _evaluation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> torch.Tensor:
        x, group = self._input(batch), batch[GROUP]
        self.retrieval.update(self.encoder(x), group)
        with self._evaluation_rng(batch_idx):
            a, b = self._views(x, self.augmentations.augment)  # augmented, although in eval mode
        loss = self.loss(a, b, group)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(group))
        return loss
