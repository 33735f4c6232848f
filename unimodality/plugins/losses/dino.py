"""DINO's self-distillation loss (Caron et al. 2021): a student matches a centred, sharpened EMA teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unimodality.loss import ContrastiveLoss


class DINOLoss(ContrastiveLoss):
    """Cross-entropy between the teacher's centred, sharpened distribution and the student's, over prototypes.

    ``forward(student, teacher, group)`` takes the heads' raw outputs (prototype logits) of the global
    batch: ``student`` holds ``V_s`` views of the ``N = len(group)`` rows stacked view after view, ``teacher``
    ``V_t`` views the same way. With ``P_t = softmax((t - c) / tau_t)`` (teacher, no gradient) and
    ``log P_s = log_softmax(s / tau_s)``:

    ``L = mean over pairs (i, v), i != v of  mean_n  -sum_k P_t[i, n, k] log P_s[v, n, k]``

    (the pair ``(0, 0)`` when both hold a single view: in the cross-modal setups the two sides see different
    modalities, so the pair is not trivial). After each training call the centre is updated with the
    mean of the teacher outputs, ``c <- m c + (1 - m) mean(t)``; the setups gather the global batch first,
    so this is the mean over every process's rows, as DINO's all-reduce computes it. The teacher
    temperature warms up linearly from ``warmup_teacher_temperature`` to ``teacher_temperature`` over the
    first ``warmup_teacher_temperature_steps`` training calls (DINO counts epochs; here a call is an
    optimizer step), like ``np.linspace`` in the reference.

    With ``use_groups``, the target of row ``n`` is the mean teacher distribution over the rows of its
    perturbation (of the paired teacher view): replicates share one target. Cross-entropy is linear in
    the target, so this is the mean of the loss against each same-perturbation teacher row.

    Transcribed from ``DINOLoss`` in facebookresearch/dino ``main_dino.py`` (Caron, Touvron, Misra, Jégou,
    Mairal, Bojanowski, Joulin, "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021),
    with the epoch-indexed temperature schedule counted in steps. Temperatures are fixed, as in DINO.

    Args:
        student_temperature: ``tau_s`` (DINO: 0.1).
        teacher_temperature: ``tau_t`` after the warm-up (DINO: 0.04 to 0.07).
        warmup_teacher_temperature: ``tau_t`` at the first step (DINO: 0.04).
        warmup_teacher_temperature_steps: steps of the linear warm-up (0: none).
        center_momentum: ``m`` of the centre's moving average (DINO: 0.9).
        use_groups: replicates of a perturbation share the mean teacher distribution as target.
    """

    normalized_inputs = False

    def __init__(
        self,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        warmup_teacher_temperature_steps: int = 0,
        center_momentum: float = 0.9,
        use_groups: bool = True,
    ) -> None:
        super().__init__(use_groups=use_groups)
        for name, value in (("student_temperature", student_temperature), ("teacher_temperature",
                            teacher_temperature), ("warmup_teacher_temperature", warmup_teacher_temperature)):
            if not value > 0:
                raise ValueError(f"DINOLoss: {name} must be > 0, got {value}")
        if not 0 <= center_momentum < 1:
            raise ValueError(f"DINOLoss: center_momentum must be in [0, 1), got {center_momentum}")
        if warmup_teacher_temperature_steps < 0:
            raise ValueError(f"DINOLoss: warmup_teacher_temperature_steps must be >= 0, got "
                             f"{warmup_teacher_temperature_steps}")
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.warmup_teacher_temperature_steps = warmup_teacher_temperature_steps
        self.center_momentum = center_momentum
        # sized on first use, or by a setup's ``reset_center(out_dim)`` before a checkpoint is loaded
        self.register_buffer("center", torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def reset_center(self, out_dim: int) -> None:
        """Give the centre its size (the number of prototypes), as zeros."""
        self.center = torch.zeros(1, out_dim, device=self.center.device, dtype=self.center.dtype)

    def current_teacher_temperature(self) -> float:
        """``tau_t`` at the current step of the warm-up schedule."""
        step, warmup = int(self.steps), self.warmup_teacher_temperature_steps
        if step >= warmup:
            return self.teacher_temperature
        if warmup == 1:
            return self.warmup_teacher_temperature
        start, end = self.warmup_teacher_temperature, self.teacher_temperature
        return start + (end - start) * step / (warmup - 1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        n = len(group) if group is not None else teacher.shape[0]
        if n == 0 or student.shape[0] % n or teacher.shape[0] % n:
            raise ValueError(f"DINOLoss: student ({student.shape[0]} rows) and teacher ({teacher.shape[0]} rows) "
                             f"must stack whole views of the {n} rows of the batch")
        if self.center.numel() == 0:
            self.reset_center(teacher.shape[1])
        teacher = teacher.detach()
        temperature = self.current_teacher_temperature()
        targets = F.softmax((teacher - self.center) / temperature, dim=-1).chunk(teacher.shape[0] // n)
        if self.use_groups and group is not None:
            same = self.positives(group, n, teacher.device).to(teacher.dtype)
            weights = same / same.sum(dim=1, keepdim=True)
            targets = [weights @ target for target in targets]
        log_student = F.log_softmax(student / self.student_temperature, dim=-1).chunk(student.shape[0] // n)
        several = len(log_student) > 1 or len(targets) > 1
        terms = [(-target * log_student[v]).sum(dim=-1).mean()
                 for i, target in enumerate(targets) for v in range(len(log_student)) if not (several and v == i)]
        if not terms:
            raise ValueError("DINOLoss: with one student view and several teacher views no pair is left")
        loss = torch.stack(terms).mean()
        if self.training:
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(teacher)`` over the rows given (the global batch), one warm-up step on."""
        batch_center = teacher.sum(dim=0, keepdim=True) / len(teacher)
        momentum = self.center_momentum
        self.center = self.center * momentum + batch_center.to(self.center.dtype) * (1 - momentum)
        self.steps += 1

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"teacher_temperature": torch.tensor(self.current_teacher_temperature())}
