"""DINO (Caron et al. 2021): self-distillation with an EMA teacher, on one modality or across modalities."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unimodality.augmentation import Augmentation, Compose
from unimodality.batch import GROUP, INDEX
from unimodality.distributed import gather, gather_with_grad
from unimodality.ema import ema_update, frozen_copy
from unimodality.encoder import Encoder
from unimodality.loss import ContrastiveLoss
from unimodality.metrics import SameGroupRecall
from unimodality.plugins.losses.dino import DINOLoss
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.plugins.setups.single_modality import SingleModalitySteps
from unimodality.setup import Setup

log = logging.getLogger(__name__)


class DINOHead(nn.Module):
    """DINO's projection head: an MLP to a bottleneck, L2 normalisation, a weight-normalised linear layer
    onto ``out_dim`` prototypes (no bias), whose norm is fixed to 1 with ``norm_last_layer``.

    As ``DINOHead`` in facebookresearch/dino ``vision_transformer.py`` (GELU, truncated-normal init with
    std 0.02, zero biases), without its optional batch norm.

    Args:
        in_dim: input width.
        out_dim: number of prototypes ``K``.
        hidden_dim: width of the hidden layers.
        bottleneck_dim: width before the prototypes.
        n_layers: linear layers of the MLP (1: a single linear map to the bottleneck).
        norm_last_layer: fix the prototypes' norm to 1 (DINO's default; more stable).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 n_layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim, n_layers) < 1:
            raise ValueError("DINOHead: in_dim, out_dim (n_prototypes), hidden_dim, bottleneck_dim and n_layers "
                             "must be at least 1")
        if n_layers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(n_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def teacher_momentum(step: int, total_steps: float, base: float, final: float) -> float:
    """DINO's cosine schedule of the teacher momentum, ``final + (base - final) (1 + cos(pi step / total)) / 2``
    (``cosine_scheduler`` in facebookresearch/dino ``utils.py``, per step); ``base`` when the run has no end."""
    if not math.isfinite(total_steps) or total_steps <= 0:
        return base
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


class _EMATeacher:
    """The EMA bookkeeping both DINO setups share: the schedule, the step counter, frozen last layers."""

    teacher_momentum: float
    final_teacher_momentum: float
    freeze_last_layer_steps: int

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs the EMA updates."""
        raise NotImplementedError

    def teacher_modules(self) -> nn.Module | None:
        """The container of every teacher module (kept in eval mode)."""
        raise NotImplementedError

    def current_momentum(self) -> float:
        trainer = getattr(self, "_trainer", None)
        total = float(trainer.estimated_stepping_batches) if trainer is not None else math.inf
        return teacher_momentum(int(self.ema_steps), total, self.teacher_momentum, self.final_teacher_momentum)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # after each optimizer step, as DINO's training loop does (not per batch under gradient accumulation)
        momentum = self.current_momentum()
        for student, teacher in self.ema_pairs():
            ema_update(student, teacher, momentum)
        self.ema_steps += 1

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.global_step < self.freeze_last_layer_steps:  # DINO's cancel_gradients_last_layer
            for name, parameter in self.named_parameters():
                if "last_layer" in name:
                    parameter.grad = None

    def train(self, mode: bool = True) -> Any:
        super().train(mode)
        teachers = self.teacher_modules()
        if teachers is not None:
            teachers.eval()  # the teacher never drops out, its batch norm uses the copied statistics
        return self


def _check_schedule(owner: str, teacher_momentum: float, final_teacher_momentum: float,
                    freeze_last_layer_steps: int) -> None:
    if not (0 <= teacher_momentum <= 1 and 0 <= final_teacher_momentum <= 1):
        raise ValueError(f"{owner}: teacher_momentum and final_teacher_momentum must be in [0, 1], got "
                         f"{teacher_momentum} and {final_teacher_momentum}")
    if freeze_last_layer_steps < 0:
        raise ValueError(f"{owner}: freeze_last_layer_steps must be >= 0, got {freeze_last_layer_steps}")


class DINOSetup(_EMATeacher, SingleModalitySteps, Setup):
    """DINO on one modality: a student and its EMA teacher see two augmented views of each sample.

    ``view -> encoder -> DINOHead -> K prototype logits``, for the student and for the teacher (a copy of
    the student updated as ``teacher <- m teacher + (1 - m) student`` after every optimizer step, ``m``
    following a cosine from ``teacher_momentum`` to ``final_teacher_momentum`` over the run; it gets no
    gradient). The student's view ``v`` matches the teacher's other view through ``DINOLoss`` (centred and
    sharpened teacher). As in DINO, ``predict`` (and the validation retrieval metric) use the student
    encoder's representation; the head is for the loss only.

    Validation and test log the loss on two augmented views (from a fixed seed, so the value repeats;
    the centre is not updated) and, when samples share groups (a datamodule with ``keys``),
    ``recall@k`` of finding another replicate of a sample's perturbation among its ``k`` nearest
    representations.

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021 (the training loop
    of facebookresearch/dino ``main_dino.py``; multi-crop is left out: vector augmentations have no crops).

    Args:
        encoder: the encoder; its input size is filled in from the data.
        augmentations: applied in order to make each view (each with its own probability).
        loss: the self-distillation loss, ``DINOLoss`` (default: its defaults); its centre is sized to
            ``n_prototypes``.
        n_prototypes: ``K``, the head's output size (DINO: 65536; a few thousand suit small data).
        hidden_dim: hidden width of the head's MLP.
        bottleneck_dim: the head's bottleneck width.
        head_layers: linear layers of the head's MLP.
        norm_last_layer: fix the prototypes' norm to 1.
        teacher_momentum: EMA momentum at the first step (DINO: 0.996).
        final_teacher_momentum: EMA momentum at the last step (DINO: 1.0).
        freeze_last_layer_steps: the prototypes get no update for this many first steps (DINO: 1 epoch).
        retrieval_k: the ``k`` of the evaluation recall@k metrics.
        schema: filled in from the data at the start of training; leave unset.
        **kwargs: optimizer and learning-rate scheduler, see `unimodality.setup.Setup`.
    """

    def __init__(
        self,
        encoder: Callable[[int], Encoder] | None = None,
        augmentations: list[Augmentation] | None = None,
        loss: ContrastiveLoss | None = None,
        n_prototypes: int = 1024,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        teacher_momentum: float = 0.996,
        final_teacher_momentum: float = 1.0,
        freeze_last_layer_steps: int = 0,
        retrieval_k: list[int] = [1, 5, 10],
        schema: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        _check_schedule("DINOSetup", teacher_momentum, final_teacher_momentum, freeze_last_layer_steps)
        self.make_encoder = encoder
        self.augmentations = Compose(list(augmentations or []))
        # a stateful loss (its centre): a fresh one per model, not a shared default object
        self.loss = loss if loss is not None else DINOLoss()
        if not isinstance(self.loss, DINOLoss):
            raise ValueError(f"DINOSetup needs model.loss DINOLoss, got {type(self.loss).__name__}")
        self.head_settings = dict(out_dim=n_prototypes, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                                  n_layers=head_layers, norm_last_layer=norm_last_layer)
        self.teacher_momentum = teacher_momentum
        self.final_teacher_momentum = final_teacher_momentum
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.retrieval_k = tuple(retrieval_k)
        self.retrieval = SameGroupRecall(self.retrieval_k)
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.encoder: Encoder | None = None
        self.head: DINOHead | None = None
        self.teacher: nn.ModuleDict | None = None
        self.modality: str | None = None
        if schema is not None:
            self.build(schema)

    def build(self, schema: dict[str, dict[str, Any]]) -> None:
        """Create the student (encoder and head) for the one modality of ``schema``, and its teacher."""
        name, entry = self._only_modality(schema, ", or CrossModalDINOSetup for several modalities")
        encoder = self._new_encoder(entry)
        self.encoder = encoder
        self.head = DINOHead(encoder.out_features, **self.head_settings)
        self.teacher = frozen_copy(nn.ModuleDict({"encoder": self.encoder, "head": self.head}))
        self.loss.reset_center(self.head_settings["out_dim"])
        self.modality = name
        self.remember_schema(schema)
        if not len(self.augmentations):
            log.warning("DINOSetup has no augmentations: the two views differ only by the encoder's dropout")

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.teacher["encoder"]), (self.head, self.teacher["head"])]

    def teacher_modules(self) -> nn.Module | None:
        return getattr(self, "teacher", None)

    # -- the model -------------------------------------------------------------------------------------
    def _outputs(self, x: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Student and teacher prototype logits of two augmented views of ``x``, each stacked view after view
        over the global batch (each view gathered on its own, so the views stay in blocks)."""
        views = torch.cat([augment(x), augment(x)])
        student = self.head(self.encoder(views))
        with torch.no_grad():
            teacher = self.teacher["head"](self.teacher["encoder"](views))
        student = torch.cat([gather_with_grad(v) for v in student.chunk(2)])
        teacher = torch.cat([gather(v) for v in teacher.chunk(2)])
        return student, teacher

    # -- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        student, teacher = self._outputs(self._input(batch), self.augmentations)
        loss = self.loss(student, teacher, gather(batch[GROUP]))
        if self.is_logging_step():
            batch_size = len(batch[GROUP])
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            self.log("train/teacher_momentum", self.current_momentum(), batch_size=batch_size)
            for key, value in self.loss.extra_metrics().items():
                self.log(f"train/{key}", value, batch_size=batch_size)
            with torch.no_grad():  # collapse shows as a teacher entropy near 0 (one prototype) or log K (uniform)
                probabilities = F.softmax(teacher.float(), dim=-1).mean(dim=0)
                entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum()
                self.log("train/teacher_entropy", entropy, batch_size=batch_size)
        return loss

    def _evaluation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> torch.Tensor:
        x, group = self._input(batch), batch[GROUP]
        self.retrieval.update(self.encoder(x), group)
        with self._evaluation_rng(batch_idx):
            student, teacher = self._outputs(x, self.augmentations.augment)
        loss = self.loss(student, teacher, gather(group))  # the loss is in eval mode: no centre update
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(group))
        return loss


class CrossModalDINOSetup(_EMATeacher, CrossModalSetup):
    """"Clipped" DINO: one modality's EMA teacher teaches another modality's student, on paired rows.

    Every modality ``m`` has a student, its tower (encoder, ``modes``, ``weights`` as in
    `CrossModalSetup`; the tower's head output, not normalised) followed by a `DINOHead` onto ``K``
    prototypes, and a teacher, a copy of that student updated by EMA after every optimizer step. For each
    direction ``teacher -> student`` of ``teachers``, the student of one modality, on its rows, matches the
    centred, sharpened distribution of the other modality's teacher on the paired rows (one `DINOLoss`,
    so one centre, per direction); the loss is the mean over directions. By default every modality
    teaches every other (both directions for two).

    A modality that is nobody's student is a fixed teacher: its tower and head keep their initial
    weights and get no gradient. With ``modes: {ph: frozen}`` and ``weights: {ph: encoder.pt}`` that is a
    pretrained encoder under a fixed random prototype head; with ``modes: {ph: disabled}`` the raw
    features under a fixed random head (a random-projection teacher). The prototypes' index is what the
    two modalities share: the student's probabilities over the ``K`` prototypes (at the student
    temperature, L2-normalised) are the embedding that validation retrieval (``pert/mrr`` etc., as in
    `CrossModalSetup`) and ``predict`` use.

    This is an adaptation of DINO (Caron et al., ICCV 2021), whose two views become two modalities: the
    loss, head and EMA schedule are transcribed from facebookresearch/dino; pairing a modality's student
    with another modality's teacher is this framework's.

    Args:
        encoders: encoder per modality name, as in `CrossModalSetup`.
        loss: the self-distillation loss, ``DINOLoss`` (default: its defaults), copied once per direction
            (each copy keeps its own centre).
        embed_dim: width of each tower's head (the `DINOHead`'s input).
        modes: ``trainable`` (default), ``frozen`` or ``disabled`` per modality.
        weights: encoder weights file per modality (state dict or checkpoint).
        weights_prefix: key prefix to select and strip in that file, per modality.
        pair_weights: unused (every direction weighs the same); kept for `CrossModalSetup`'s interface.
        retrieval_k: the ``k`` of the evaluation recall@k metrics.
        teachers: student modality -> list of the modalities that teach it; default: every other modality.
        n_prototypes: ``K``, the head's output size.
        hidden_dim: hidden width of the head's MLP.
        bottleneck_dim: the head's bottleneck width.
        head_layers: linear layers of the head's MLP.
        norm_last_layer: fix the prototypes' norm to 1.
        teacher_momentum: EMA momentum at the first step (DINO: 0.996).
        final_teacher_momentum: EMA momentum at the last step (DINO: 1.0).
        freeze_last_layer_steps: the prototypes get no update for this many first steps.
        schema: filled in from the data at the start of training; leave unset.
        **kwargs: optimizer and learning-rate scheduler, see `unimodality.setup.Setup`.
    """

    def __init__(
        self,
        encoders: dict[str, Callable[[int], Encoder]] | None = None,
        loss: ContrastiveLoss | None = None,
        embed_dim: int = 256,
        modes: dict[str, Any] | None = None,
        weights: dict[str, str] | None = None,
        weights_prefix: dict[str, str] | None = None,
        pair_weights: dict[str, float] | None = None,
        retrieval_k: list[int] = [1, 5, 10],
        teachers: dict[str, list[str]] | None = None,
        n_prototypes: int = 1024,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        teacher_momentum: float = 0.996,
        final_teacher_momentum: float = 1.0,
        freeze_last_layer_steps: int = 0,
        schema: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        loss = loss if loss is not None else DINOLoss()  # stateful (centres): never a shared default object
        super().__init__(encoders=encoders, loss=loss, embed_dim=embed_dim, modes=modes, weights=weights,
                         weights_prefix=weights_prefix, pair_weights=pair_weights, retrieval_k=retrieval_k, **kwargs)
        _check_schedule("CrossModalDINOSetup", teacher_momentum, final_teacher_momentum, freeze_last_layer_steps)
        if not isinstance(self.loss, DINOLoss):
            raise ValueError(f"CrossModalDINOSetup needs model.loss DINOLoss, got {type(self.loss).__name__}")
        self.teachers = {student: list(names) for student, names in (teachers or {}).items()}
        self.head_settings = dict(out_dim=n_prototypes, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                                  n_layers=head_layers, norm_last_layer=norm_last_layer)
        self.teacher_momentum = teacher_momentum
        self.final_teacher_momentum = final_teacher_momentum
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.dino_heads = nn.ModuleDict()
        self.ema_teachers = nn.ModuleDict()
        self.dino_losses = nn.ModuleDict()
        self.directions: list[tuple[str, str]] = []
        if schema is not None:
            self.build(schema)

    def build(self, schema: dict[str, dict[str, Any]]) -> None:
        """Towers as `CrossModalSetup` builds them, a `DINOHead` on each, their EMA teachers, the directions."""
        named = set(self.teachers) | {t for names in self.teachers.values() for t in names}
        unknown = sorted(named - set(schema))
        if unknown:
            raise ValueError(f"model.teachers names modalities {unknown} that the data does not have; data "
                             f"modalities: {sorted(schema)}")
        if len(schema) < 2:
            raise ValueError("CrossModalDINOSetup needs two modalities or more; for one, use DINOSetup")
        teachers = self.teachers or {s: [t for t in schema if t != s] for s in schema}
        self.directions = [(t, s) for s, names in teachers.items() for t in names]
        if any(t == s for t, s in self.directions):
            raise ValueError("model.teachers: a modality cannot teach itself across modalities; use DINOSetup")
        super().build(schema)
        for name in schema:
            self.dino_heads[name] = DINOHead(self.embed_dim, **self.head_settings)
            student = nn.ModuleDict({"tower": self.towers[name], "head": self.dino_heads[name]})
            self.ema_teachers[name] = frozen_copy(student)
        for t, s in self.directions:
            self.dino_losses[f"{t}->{s}"] = copy.deepcopy(self.loss)
            self.dino_losses[f"{t}->{s}"].reset_center(self.head_settings["out_dim"])
        for name in [name for name in schema if name not in self.students()]:  # a fixed teacher: nothing trains it
            self.towers[name].requires_grad_(False)
            self.dino_heads[name].requires_grad_(False)

    def teacher_modules(self) -> nn.Module | None:
        return getattr(self, "ema_teachers", None)

    def students(self) -> list[str]:
        """The modalities some teacher teaches, in a fixed order (every process gathers in the same order)."""
        return list(dict.fromkeys(s for _, s in self.directions))

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(module, self.ema_teachers[name][part]) for name in self.students()
                for part, module in (("tower", self.towers[name]), ("head", self.dino_heads[name]))]

    # -- the model -------------------------------------------------------------------------------------
    def logits(self, name: str, x: Any) -> torch.Tensor:
        """The student prototype logits of modality ``name``."""
        return self.dino_heads[name](self.towers[name](x, normalize=False))

    def embed(self, batch: dict[str, torch.Tensor], normalize: bool = True) -> dict[str, torch.Tensor]:
        """The student's probabilities over the prototypes of every modality in the batch (L2-normalised;
        the raw prototype logits with ``normalize=False``)."""
        out = {}
        for name in self.towers:
            if name in batch:
                logits = self.logits(name, batch[name])
                probabilities = F.softmax(logits.float() / self.loss.student_temperature, dim=-1)
                out[name] = F.normalize(probabilities, dim=-1) if normalize else logits
        return out

    def _dino_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        student = {s: gather_with_grad(self.logits(s, batch[s])) for s in self.students()}
        with torch.no_grad():
            teacher = {t: gather(self.ema_teachers[t]["head"](self.ema_teachers[t]["tower"](batch[t], normalize=False)))
                       for t in dict.fromkeys(t for t, _ in self.directions)}
        group = gather(batch[GROUP])
        terms = {f"{t}->{s}": self.dino_losses[f"{t}->{s}"](student[s], teacher[t], group) for t, s in self.directions}
        if self.training:
            self.loss_terms = {key: value.detach() for key, value in terms.items()}
        return torch.stack(list(terms.values())).mean()

    # -- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._dino_loss(batch)
        if self.is_logging_step():
            batch_size = len(batch[GROUP])
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            self.log("train/teacher_momentum", self.current_momentum(), batch_size=batch_size)
            for key, value in (self.loss_terms or {}).items():
                self.log(f"train/loss/{key}", value, batch_size=batch_size)
            first = next(iter(self.dino_losses.values()))
            self.log("train/teacher_temperature", first.current_teacher_temperature(), batch_size=batch_size)
        return loss

    def _evaluation_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        group = batch[GROUP]
        loss = self._dino_loss(batch)  # the losses are in eval mode: no centre update
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(group))
        index = batch.get(INDEX)
        for name, embedding in self.embed(batch).items():
            self.retrieval[name].update(embedding, group, index)
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        present = [name for name in self.towers if name in batch]
        if len(present) != 1:
            raise ValueError(f"a prediction batch holds one modality of {list(self.towers)}, got {list(batch)}")
        return {INDEX: batch[INDEX], "embedding": self.embed({present[0]: batch[present[0]]})[present[0]]}
