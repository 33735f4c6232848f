"""Cross-modal knowledge distillation on perturbation classes: KD (Hinton et al.), C2KD, SHAKE.

A teacher modality guides a student modality through class logits. The classes are the training split's
perturbations (the integer ``group`` ids of the pairing keys), so the two modalities share one label
space; its probabilities (L2-normalised) are the embedding that validation retrieval and ``predict``
use, for held-out perturbations too (a perturbation is then described by its similarity to the training
ones).

The teacher is trained in the same run with a stop-gradient (its class head learns from the labels; no
distillation gradient reaches it), rather than in a separate first run: one config, one checkpoint.
For a pretrained teacher encoder, set ``modes: {ph: frozen}`` and ``weights: {ph: file}``: only its heads
then learn. C2KD's teacher, as in its paper, is updated by the bidirectional terms too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unimodality.batch import GROUP, INDEX
from unimodality.distributed import gather, gather_with_grad
from unimodality.encoder import Encoder
from unimodality.loss import ContrastiveLoss, _at_least_fp32
from unimodality.plugins.losses.distillation import KDLoss, kendall_tau, non_target_kl, soft_kl
from unimodality.plugins.setups.cross_modal import CrossModalSetup


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rows with a class (``labels >= 0``); 0 (still in the graph) when none has one."""
    known = labels >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known], labels[known])


class ClassDistillationSetup(CrossModalSetup):
    """What the class-logit distillation setups share: the classes, class heads, the embedding, the steps.

    Subclasses define `distillation_terms` (the weighted terms of the loss) and may add heads in
    `build_heads`.

    Args:
        encoders: encoder per modality (the teacher's and the student's), as in `CrossModalSetup`.
        loss: `KDLoss` (default: `KDLoss()`), the teacher -> student term (its ``temperature`` softens every
            KL term).
        embed_dim: width of each tower's head, the input of the class heads.
        modes: ``trainable`` (default), ``frozen`` or ``disabled`` per modality.
        weights: encoder weights file per modality (e.g. a pretrained frozen teacher).
        weights_prefix: key prefix to select and strip in that file, per modality.
        pair_weights: unused (one teacher, one student); kept for `CrossModalSetup`'s interface.
        retrieval_k: the ``k`` of the evaluation recall@k metrics.
        teacher: the teacher modality.
        student: the student modality.
        classes: the training perturbations' group ids, filled in from the data; leave unset.
        schema: filled in from the data at the start of training; leave unset.
        **kwargs: optimizer and learning-rate scheduler, see `unimodality.setup.Setup`.
    """

    def __init__(
        self,
        encoders: dict[str, Callable[[int], Encoder]] | None = None,
        loss: ContrastiveLoss | None = None,
        embed_dim: int = 128,
        modes: dict[str, Any] | None = None,
        weights: dict[str, str] | None = None,
        weights_prefix: dict[str, str] | None = None,
        pair_weights: dict[str, float] | None = None,
        retrieval_k: list[int] = [1, 5, 10],
        teacher: str | None = None,
        student: str | None = None,
        classes: list[int] | None = None,
        schema: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        # a fresh loss per model: copies of a jsonargparse lazy default share their state on the first call
        loss = loss if loss is not None else KDLoss()
        super().__init__(encoders=encoders, loss=loss, embed_dim=embed_dim, modes=modes, weights=weights,
                         weights_prefix=weights_prefix, pair_weights=pair_weights, retrieval_k=retrieval_k, **kwargs)
        owner = type(self).__name__
        if not isinstance(self.loss, KDLoss):
            raise ValueError(f"{owner} needs model.loss KDLoss, got {type(self.loss).__name__}")
        if teacher is None or student is None or teacher == student:
            raise ValueError(f"{owner}: set model.teacher and model.student to two different modalities, got "
                             f"teacher={teacher!r}, student={student!r}")
        self.teacher, self.student = teacher, student
        self.classes = list(classes) if classes is not None else None
        self.classifiers = nn.ModuleDict()
        if schema is not None:
            self.build(schema)

    # -- classes from the data ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.schema is None and self.classes is None:
            datasets = getattr(getattr(self.trainer, "datamodule", None), "datasets", None) or {}
            train = datasets.get("train")
            if train is None or not hasattr(train, "groups"):
                raise RuntimeError(
                    f"{type(self).__name__} learns its classes (the training perturbations) from the training "
                    "split: train it with `fit` and a PairedDataModule, or load a trained checkpoint"
                )
            self.classes = [int(c) for c in np.unique(np.asarray(train.groups))]
            self.hparams["classes"] = self.classes
            self._hparams_initial["classes"] = self.classes
        super().setup(stage)

    def build(self, schema: dict[str, dict[str, Any]]) -> None:
        """Towers as `CrossModalSetup` builds them, a class head on each, and what subclasses add."""
        owner = type(self).__name__
        if {self.teacher, self.student} != set(schema):
            raise ValueError(f"{owner} distils model.teacher={self.teacher!r} into model.student={self.student!r}; "
                             f"the data's modalities are {sorted(schema)}")
        if not self.classes:
            raise ValueError(f"{owner} has no classes: train it with `fit` (the classes come from the training split)")
        super().build(schema)
        self.register_buffer("class_ids", torch.tensor(self.classes, dtype=torch.long), persistent=False)
        self.classifiers = nn.ModuleDict({name: nn.Linear(self.embed_dim, len(self.classes)) for name in schema})
        self.build_heads()

    def build_heads(self) -> None:
        """Extra heads of a method (proxies, a shadow head)."""

    def labels(self, group: torch.Tensor) -> torch.Tensor:
        """The class of each row: its group's position among the training perturbations, -1 for others."""
        ids = self.class_ids.to(group.device)
        position = torch.searchsorted(ids, group).clamp(max=len(ids) - 1)
        return torch.where(ids[position] == group, position, torch.full_like(position, -1))

    # -- the model -------------------------------------------------------------------------------------
    def features(self, name: str, x: Any) -> torch.Tensor:
        """The tower's head output (not normalised): the input of the class heads."""
        return self.towers[name](x, normalize=False)

    def embed(self, batch: dict[str, torch.Tensor], normalize: bool = True) -> dict[str, torch.Tensor]:
        """Class probabilities of every modality in the batch, L2-normalised (the logits with ``normalize=False``)."""
        out = {}
        for name in self.towers:
            if name in batch:
                logits = self.classifiers[name](self.features(name, batch[name]))
                out[name] = F.normalize(F.softmax(logits.float(), dim=-1), dim=-1) if normalize else logits
        return out

    def outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What `distillation_terms` takes, for this process's rows: ``{"<modality>": class logits}``
        (and the method's extra heads)."""
        return {name: self.classifiers[name](self.features(name, batch[name])) for name in (self.teacher, self.student)}

    def distillation_terms(self, outputs: dict[str, torch.Tensor], group: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted terms of the loss on the global batch (they are summed)."""
        raise NotImplementedError

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # the global batch: every process's rows, with gradients (each term is a mean over rows)
        outputs = {key: _at_least_fp32(gather_with_grad(value)) for key, value in self.outputs(batch).items()}
        group = gather(batch[GROUP])
        # the terms in fp32 whatever the towers run in, as `ContrastiveLoss` computes losses
        with torch.autocast(device_type=group.device.type, enabled=False):
            terms = self.distillation_terms(outputs, group)
        if self.training:
            self.loss_terms = {key: value.detach() for key, value in terms.items()}
        return torch.stack(list(terms.values())).sum()

    # -- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if self.is_logging_step():
            batch_size = len(batch[GROUP])
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            for key, value in {**(self.loss_terms or {}), **self.extra_logs()}.items():
                self.log(f"train/{key}", value, batch_size=batch_size)
        return loss

    def extra_logs(self) -> dict[str, torch.Tensor]:
        """Method-specific scalars of the last training step (e.g. C2KD's fraction of selected rows)."""
        return {}

    def _evaluation_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        group = batch[GROUP]
        loss = self._loss(batch)  # held-out perturbations have no class: the label terms are 0
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


class KDSetup(ClassDistillationSetup):
    """Classic knowledge distillation (Hinton et al. 2015) from a teacher modality to a student modality.

    ``L = w_t CE(z_t, y) + w_s CE(z_s, y) + w_kd T^2 KL(softmax(z_t / T) || softmax(z_s / T))``

    ``z_t``, ``z_s``: class logits of the teacher and student modality on paired rows; ``y``: the row's
    training perturbation. The KL term is `KDLoss` (the teacher side detached, so the teacher learns
    from the labels only); ``w_s CE`` is Hinton's "hard target" term.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.

    Args:
        loss: `KDLoss`, the KL term (temperature ``T``, replicate-aware targets).
        teacher_ce_weight: ``w_t``, the teacher's class head learning from the labels.
        student_ce_weight: ``w_s`` (0: distillation only).
        distill_weight: ``w_kd``.
        **kwargs: see `ClassDistillationSetup` (encoders, loss, teacher, student, ...).
    """

    def __init__(self, loss: ContrastiveLoss | None = None, teacher_ce_weight: float = 1.0,
                 student_ce_weight: float = 1.0, distill_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(loss=loss, **kwargs)
        self.term_weights = {"teacher_ce": teacher_ce_weight, "student_ce": student_ce_weight, "kd": distill_weight}

    def distillation_terms(self, outputs: dict[str, torch.Tensor], group: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = self.labels(group)
        teacher, student = outputs[self.teacher], outputs[self.student]
        terms = {"teacher_ce": labelled_cross_entropy(teacher, labels),
                 "student_ce": labelled_cross_entropy(student, labels),
                 "kd": self.loss(student, teacher, group)}
        return {key: self.term_weights[key] * value for key, value in terms.items()}


class C2KDSetup(ClassDistillationSetup):
    """C2KD (Huo et al., CVPR 2024): bidirectional distillation through proxy heads on selected samples.

    Teacher and student each have a class head ``z`` and a proxy head ``p`` (both linear on the tower's
    features); both sides learn. With ``KL(a -> b)`` the per-row ``T^2 KL(softmax(a / T) || softmax(b / T))``
    with ``a`` detached, averaged over rows:

    ``L = sum over sides {t, s} of  CE(z, y) + KL(z -> p) + KL(p -> z)``
    ``    + mean_n m_n [ ntKL(p_t -> p_s) + ntKL(p_s -> p_t) ]``

    ``ntKL`` is the KL with the row's target logit set to 0 on both sides (non-target classes), and
    ``m_n = [tau_n > krc_threshold]`` selects, on the fly, the rows whose teacher and student proxies rank
    the classes alike (Kendall's tau ``tau_n``); the mean runs over all rows, as in the reference.

    Transcribed from ``train_network_distill`` in huofushuo/C2KD ``utils/helper.py`` (its temperature is 1;
    here the loss's ``temperature`` softens every KL term, ``T^2`` scaling them). Adapted: the networks
    are towers of two paired modalities and the proxies are linear heads on their features (the
    reference's proxies act on intermediate backbone features), and the teacher is trained in the same run
    rather than pretrained first.

    Huo, Zhang, Chen, Zhang, Li, Wang, Li, "C2KD: Bridging the Modality Gap for Cross-Modal Knowledge
    Distillation", CVPR 2024.

    Args:
        loss: `KDLoss` (default: temperature 1, as C2KD's code); its temperature softens every KL term.
        krc_threshold: rows whose Kendall's tau between the proxies exceeds it are distilled (C2KD: 0).
        **kwargs: see `ClassDistillationSetup` (encoders, loss, teacher, student, ...).
    """

    def __init__(self, loss: ContrastiveLoss | None = None, krc_threshold: float = 0.0, **kwargs: Any) -> None:
        super().__init__(loss=loss if loss is not None else KDLoss(temperature=1.0), **kwargs)
        if not -1 <= krc_threshold <= 1:
            raise ValueError(f"C2KDSetup: krc_threshold must be in [-1, 1], got {krc_threshold}")
        self.krc_threshold = krc_threshold

    def build_heads(self) -> None:
        self.proxies = nn.ModuleDict({name: nn.Linear(self.embed_dim, len(self.classes)) for name in self.towers})

    def outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name in (self.teacher, self.student):
            features = self.features(name, batch[name])
            out[name], out[f"{name}/proxy"] = self.classifiers[name](features), self.proxies[name](features)
        return out

    def distillation_terms(self, outputs: dict[str, torch.Tensor], group: torch.Tensor) -> dict[str, torch.Tensor]:
        labels, temperature = self.labels(group), self.loss.temperature
        terms = {}
        for side, name in (("teacher", self.teacher), ("student", self.student)):
            logits, proxy = outputs[name], outputs[f"{name}/proxy"]
            terms[f"{side}_ce"] = labelled_cross_entropy(logits, labels)
            terms[f"{side}_to_proxy"] = soft_kl(proxy, logits, temperature).mean()
            terms[f"proxy_to_{side}"] = soft_kl(logits, proxy, temperature).mean()
        proxy_t, proxy_s = outputs[f"{self.teacher}/proxy"], outputs[f"{self.student}/proxy"]
        selected = (kendall_tau(proxy_t, proxy_s) > self.krc_threshold).to(proxy_s.dtype)
        terms["ofsd_teacher_to_student"] = (selected * non_target_kl(proxy_s, proxy_t, labels, temperature)).mean()
        terms["ofsd_student_to_teacher"] = (selected * non_target_kl(proxy_t, proxy_s, labels, temperature)).mean()
        self.selected_fraction = selected.mean().detach()
        return terms

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return {"selected": self.selected_fraction}


class SHAKESetup(ClassDistillationSetup):
    """SHAKE (Li & Jin, NeurIPS 2022): a shadow head on the teacher's features is the student's proxy teacher.

    The shadow head ``h`` (linear) reads the teacher tower's features without passing a gradient to them;
    it learns the labels, to stay close to the teacher's logits, and to shadow the student, which in turn
    learns from it as well as from the teacher:

    ``L = w_s CE(z_s, y) + w_kd KL(z_t -> z_s) + w_sh [ KL(h -> z_s) + KL(z_s -> h) + CE(h, y)``
    ``    + MSE(h, z_t) ] + w_t CE(z_t, y)``

    with ``KL(a -> b)`` the `KDLoss` form (``a`` detached, temperature ``T``, ``T^2``-scaled). The
    last term trains the teacher's class head from the labels (stop-gradient; the reference loads a
    pretrained teacher instead).

    Transcribed from the ``shake`` branch of ``train_distill`` in lliai/SHAKE ``helper/loops.py``
    (``gamma``, ``alpha``, ``beta`` are ``w_s``, ``w_kd``, ``w_sh``). Adapted: the shadow head reads the
    teacher modality's tower features (the reference's reads intermediate teacher features and reuses
    the teacher's classifier weights), and the reference's layer normalisation of logits is left out.
    Note the shadow head sits on the teacher's backbone, as in the paper, not on the student.

    Li, Jin, "Shadow Knowledge Distillation: Bridging Offline and Online Knowledge Transfer", NeurIPS 2022.

    Args:
        loss: `KDLoss`, the teacher -> student term; its temperature softens the shadow's KL terms too.
        teacher_ce_weight: ``w_t``.
        student_ce_weight: ``w_s`` (SHAKE's ``gamma``).
        distill_weight: ``w_kd`` (SHAKE's ``alpha``).
        shadow_weight: ``w_sh`` (SHAKE's ``beta``).
        **kwargs: see `ClassDistillationSetup` (encoders, loss, teacher, student, ...).
    """

    def __init__(self, loss: ContrastiveLoss | None = None, teacher_ce_weight: float = 1.0,
                 student_ce_weight: float = 1.0, distill_weight: float = 1.0, shadow_weight: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(loss=loss, **kwargs)
        self.term_weights = {"teacher_ce": teacher_ce_weight, "student_ce": student_ce_weight,
                             "kd": distill_weight, "shadow": shadow_weight}

    def build_heads(self) -> None:
        self.shadow = nn.Linear(self.embed_dim, len(self.classes))

    def outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        teacher_features = self.features(self.teacher, batch[self.teacher])
        return {self.teacher: self.classifiers[self.teacher](teacher_features),
                self.student: self.classifiers[self.student](self.features(self.student, batch[self.student])),
                "shadow": self.shadow(teacher_features.detach())}

    def distillation_terms(self, outputs: dict[str, torch.Tensor], group: torch.Tensor) -> dict[str, torch.Tensor]:
        labels, temperature = self.labels(group), self.loss.temperature
        teacher, student, shadow = outputs[self.teacher], outputs[self.student], outputs["shadow"]
        shadow_terms = (soft_kl(shadow, student, temperature).mean() + soft_kl(student, shadow, temperature).mean()
                        + labelled_cross_entropy(shadow, labels) + F.mse_loss(shadow, teacher.detach()))
        terms = {"teacher_ce": labelled_cross_entropy(teacher, labels),
                 "student_ce": labelled_cross_entropy(student, labels),
                 "kd": self.loss(student, teacher, group),
                 "shadow": shadow_terms}
        return {key: self.term_weights[key] * value for key, value in terms.items()}
