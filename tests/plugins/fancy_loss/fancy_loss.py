"""A third-party unimodality loss plugin (test fixture): symmetric InfoNCE at a fixed temperature."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from unimodality.loss import ContrastiveLoss

#: when this environment variable names a file, the loss appends a line to it at construction and at its
#: first forward call, so a test can tell that this class (not another loss) was really used
EVIDENCE_ENV = "FANCY_LOSS_EVIDENCE"


class FancyLoss(ContrastiveLoss):
    """Symmetric InfoNCE with a fixed (not learned) temperature.

    ``loss = (CE(a @ b.T / t, T) + CE(b @ a.T / t, T)) / 2`` with ``T`` the row-normalised matrix of
    positive pairs (the diagonal, or same-perturbation pairs with ``use_groups``).

    Args:
        temperature: softmax temperature ``t`` (> 0).
        use_groups: treat samples of the same perturbation as positives.
    """

    def __init__(self, temperature: float = 0.1, use_groups: bool = True) -> None:
        super().__init__(use_groups=use_groups)
        if temperature <= 0:
            raise ValueError(f"FancyLoss: temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self._calls = 0
        self._evidence(f"init temperature={temperature}")

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        logits = a @ b.T / self.temperature
        targets = self.positives(group, a.shape[0], a.device).to(logits.dtype)
        targets = targets / targets.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        if self._calls == 0:
            self._evidence(f"forward temperature={self.temperature} batch={a.shape[0]}")
        self._calls += 1
        return loss

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"temperature": torch.tensor(self.temperature)}

    @staticmethod
    def _evidence(line: str) -> None:
        path = os.environ.get(EVIDENCE_ENV)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")
