"""Knowledge distillation on class logits (Hinton et al. 2015), and the divergences cross-modal KD builds on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unimodality.loss import ContrastiveLoss


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row ``T^2 KL(softmax(teacher / T) || softmax(student / T))``; the teacher side gets no gradient.

    Summed over classes, not reduced over rows (``KLDivLoss(reduction="batchmean")`` is its mean).
    """
    log_student = F.log_softmax(student / temperature, dim=-1)
    target = F.softmax(teacher.detach() / temperature, dim=-1)
    return F.kl_div(log_student, target, reduction="none").sum(dim=-1) * temperature**2


def non_target_kl(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """C2KD's per-row KL over the non-target classes: the target class's logit is set to 0 on both sides.

    As ``ntkl`` in huofushuo/C2KD ``utils/helper.py`` (the logit is zeroed, not removed). Rows with
    ``target < 0`` (no class) keep every logit.
    """
    known = target >= 0
    one_hot = torch.zeros_like(student, dtype=torch.bool)
    one_hot[known] = F.one_hot(target[known], student.shape[-1]).bool()
    return soft_kl(student.masked_fill(one_hot, 0.0), teacher.masked_fill(one_hot, 0.0), temperature)


def kendall_tau(a: torch.Tensor, b: torch.Tensor, chunk_elements: int = 2**24) -> torch.Tensor:
    """Kendall's tau-b between row ``i`` of ``a`` and row ``i`` of ``b`` (``(n, k)`` each): one value per row.

    ``(concordant - discordant) / sqrt((pairs - ties_a) (pairs - ties_b))`` over the ``k (k - 1) / 2``
    pairs of columns, as ``scipy.stats.kendalltau``; ``nan`` where a row is constant. Computed on all pairs
    at once, ``chunk_elements`` bounding the ``rows x k (k - 1) / 2`` block.
    """
    a, b = a.detach(), b.detach()
    n, k = a.shape
    first, second = torch.triu_indices(k, k, offset=1, device=a.device)  # every pair of columns once
    rows = max(1, chunk_elements // max(len(first), 1))
    values = []
    for start in range(0, n, rows):
        block_a, block_b = a[start:start + rows], b[start:start + rows]
        sa = torch.sign(block_a[:, first] - block_a[:, second])
        sb = torch.sign(block_b[:, first] - block_b[:, second])
        numerator = (sa * sb).sum(dim=1)
        denominator = ((sa != 0).sum(dim=1) * (sb != 0).sum(dim=1)).to(a.dtype).sqrt()
        values.append(numerator.to(a.dtype) / denominator)
    return torch.cat(values) if values else a.new_zeros(0)


class KDLoss(ContrastiveLoss):
    """Hinton et al.'s distillation term: the student's softened class distribution matches the teacher's.

    ``forward(student, teacher, group)`` takes class logits (rows paired, the global batch):

    ``L = T^2 * mean_n KL( softmax(t_n / T) || softmax(s_n / T) )``

    with the teacher side detached (a frozen or stop-gradient teacher). ``T^2`` keeps the gradient's size
    independent of ``T``. With ``use_groups`` the target of row ``n`` is the mean teacher distribution
    over the rows of its perturbation (replicates share one soft target). The supervised term of KD, the
    cross-entropy on labels, is added by the setup (it knows the classes).

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS Deep Learning Workshop
    2015. The temperature is fixed, as there.

    Args:
        temperature: softening temperature ``T`` (Hinton: 1 to 20; 4 is common).
        use_groups: replicates of a perturbation share the mean teacher distribution as target.
    """

    normalized_inputs = False

    def __init__(self, temperature: float = 4.0, use_groups: bool = True) -> None:
        super().__init__(use_groups=use_groups)
        if not temperature > 0:
            raise ValueError(f"KDLoss: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        temperature = self.temperature
        target = F.softmax(teacher.detach() / temperature, dim=-1)
        if self.use_groups and group is not None:
            same = self.positives(group, len(group), teacher.device).to(target.dtype)
            target = (same / same.sum(dim=1, keepdim=True)) @ target
        log_student = F.log_softmax(student / temperature, dim=-1)
        return F.kl_div(log_student, target, reduction="none").sum(dim=-1).mean() * temperature**2

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"temperature": torch.tensor(self.temperature)}
