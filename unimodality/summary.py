"""The few lines ``fit`` ends with: how good the model is (validation loss, perturbation-level recall and MRR
beside their chance levels) and which epoch ``best.ckpt`` holds, chosen by what."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

#: shown with their chance level (``val/pert/chance@k``, ``val/pert/chance_mrr``) where the setup logs them
QUALITY = ("val/pert/recall@1", "val/pert/recall@10", "val/pert/mrr")


class ValidationHistory(Callback):
    """Keeps every validation's metrics (``val/*``, by epoch) of a fit, for `fit_summary`."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.epochs[trainer.current_epoch] = {
            key: float(value) for key, value in trainer.callback_metrics.items()
            if key.startswith("val/") and getattr(value, "numel", lambda: 1)() == 1
        }


def _chance(metrics: dict[str, float], name: str) -> float:
    tail = name.rsplit("/", 1)[-1]
    key = "val/pert/chance_mrr" if tail == "mrr" else f"val/pert/chance@{tail.split('@')[-1]}"
    return metrics.get(key, math.nan)


def _value(metrics: dict[str, float], name: str) -> str:
    value = metrics.get(name, math.nan)
    chance = _chance(metrics, name) if name in QUALITY else math.nan
    shown = f"{value:.4g}" if not math.isnan(value) else "-"
    return shown + (f" (chance {chance:.3g})" if not math.isnan(chance) else "")


def fit_summary(history: ValidationHistory, best: Any | None, validated: bool = True) -> list[str]:
    """Lines summarising a fit: the validation loss (best and last) and the perturbation-level retrieval of
    the last epoch and of the epoch ``best.ckpt`` holds.

    Args:
        history: the fit's validation metrics.
        best: the ``BestCheckpoint`` of the fit (``None`` without one).
        validated: whether the fit had a validation loop.
    """
    if not validated:
        return ["  no validation split: trained without validation; checkpoints/last.ckpt is the model "
                "(add a val split, e.g. data.init_args.val_fraction, to select a best epoch)"]
    if not history.epochs:
        return []
    epochs = sorted(history.epochs)
    last_epoch = epochs[-1]
    last = history.epochs[last_epoch]
    lines = []
    losses = {e: m["val/loss"] for e, m in history.epochs.items() if "val/loss" in m}
    if losses:
        low = min(losses, key=losses.get)
        lowest = f"lowest {losses[low]:.4g} (epoch {low})"
        lines.append(f"  val/loss: last {losses[last_epoch]:.4g} (epoch {last_epoch}), {lowest}" if last_epoch in losses
                     else f"  val/loss: {lowest}")
    shown = [name for name in QUALITY if name in last]
    if shown:
        lines.append(f"  last epoch ({last_epoch}): " + ", ".join(f"{n.removeprefix('val/')} {_value(last, n)}"
                                                                 for n in shown))
    if best is not None and getattr(best, "best_model_path", "") and best.monitor:
        at = next((e for e in epochs if history.epochs[e].get(best.monitor) == _score(best)), None)
        where = f"epoch {at}" if at is not None else "its best epoch"
        lines.append(f"  best.ckpt: {where}, chosen by {best.monitor} ({best.mode}) = {_score(best):.4g}"
                     + (" (change it with --checkpoint.monitor / --checkpoint.mode)" if at is not None else ""))
        if at is not None and at != last_epoch:
            chosen = history.epochs[at]
            shown = [name for name in QUALITY if name in chosen]
            if shown:
                lines.append(f"  best epoch ({at}): " + ", ".join(f"{n.removeprefix('val/')} {_value(chosen, n)}"
                                                                 for n in shown))
    return lines


def _score(best: Any) -> float:
    score = best.best_model_score
    return float(score) if score is not None else math.nan
