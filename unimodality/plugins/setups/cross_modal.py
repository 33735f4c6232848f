"""Cross-modal contrastive alignment (CLIP-style): one tower per modality, a loss over modality pairs."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unimodality import diagnostics
from unimodality.batch import GROUP, INDEX, ROWS, rows_key
from unimodality.config import lazy_default
from unimodality.distributed import gather, gather_with_grad
from unimodality.ema import ema_update, frozen_copy
from unimodality.encoder import Encoder
from unimodality.grad_cache import cached_gradients, take_rows
from unimodality.loss import ContrastiveLoss
from unimodality.metrics import EmbeddingCollector, cross_recall, perturbation_retrieval, replicate_map, unique_rows
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.queue import EmbeddingQueue
from unimodality.setup import Setup
from unimodality.tower import HeadKind, Tower, TowerMode


class CrossModalSetup(Setup):
    """Align two or more modalities with a contrastive loss; every pair of modalities contributes.

    Towers are built from the data's schema (input sizes, feature names), which is then stored in the
    checkpoint: a trained model embeds new files with no config.

    Args:
        encoders: encoder per modality name; the input size is filled in from the data.
        loss: the contrastive loss applied to each pair of modalities.
        embed_dim: size of the shared embedding space every tower projects into.
        modes: ``trainable`` (default), ``frozen`` or ``disabled`` per modality.
        heads: projection head per modality: ``linear`` (default), ``orthogonal`` (a learned linear map
            starting as an isometry, so the embedding starts with the representation's geometry) or
            ``identity`` (none: the representation is the embedding; needs its width to be ``embed_dim``).
            A ``disabled`` tower with an ``identity`` head uses an input embedding exactly as it is.
        weights: encoder weights file per modality (state dict or checkpoint), e.g. for a frozen tower.
        weights_prefix: key prefix to select and strip in that file, per modality.
        pair_weights: weight of each modality pair's loss, keyed ``"a-b"`` (e.g. ``{"tx-mol": 2.0}``);
            unnamed pairs weigh 1. The loss is the weighted mean over pairs.
        retrieval_k: the ``k`` of the evaluation recall@k metrics (row and perturbation level).
        grad_cache_chunk: gradient caching (GradCache, Gao et al. 2021) with chunks of this many rows per
            process; ``None`` (default): off. The towers embed the batch chunk by chunk without graphs, the
            loss and its gradient with respect to the embeddings are computed on the whole (global) batch,
            then each chunk is re-run with the same dropout masks and back-propagates its rows' cached
            gradient. The gradient is the whole batch's, with one chunk's activations in memory, for a
            second forward pass of the towers. Towers must not use batch normalisation in training mode
            (its statistics would be per chunk).
        cache_frozen: compute each ``frozen`` tower's representation (its encoder's output) once per source
            row and train its head on the cached values: a frozen encoder in eval mode is a fixed function of
            a row's input, so the results are those of the uncached run, without its encoder's forward
            passes after a row's first sight (validation rows are cached too). Needs batches carrying their
            source rows: `PairedDataModule` with the data in memory (not a ``data.streaming`` training split,
            nor a source drawing among alternative representations in training). The cache lives on the
            towers' device (rows x representation width values), per process, outside checkpoints; it is
            emptied at the start of each fit, of a validate outside fit and of each test, and whenever
            weights or standardisation statistics load. A
            ``disabled`` tower has nothing to cache (its representation is its input).
        queue_size: momentum contrast with a queue (MoCo, He et al. 2020; across modalities as in ALBEF, Li
            et al. 2021): each modality's rows are contrasted with the other modality's *momentum*
            embeddings, by an EMA copy of its tower (``queue_momentum``), of the batch and of the last
            ``queue_size`` training rows, instead of with its online embeddings; queue entries of a row's own
            perturbation are neither positives nor negatives. The queue is filled with each step's *global*
            batch after its loss, so every process holds the same queue under DDP; until full, the rows queued
            so far count. Evaluation and ``predict`` use the online towers, without the queue. The momentum
            towers and the queue (``queue_size x embed_dim`` values per modality) are part of checkpoints,
            so a resumed run continues with them. Needs a loss with ``supports_queue`` (``ClipLoss``,
            ``SigLipLoss``); ``None`` (default): off.
        queue_momentum: EMA momentum of the towers that embed the keys (MoCo 0.999, ALBEF 0.995), updated
            after each optimizer step; with ``queue_size``. 0 is not a momentum encoder: the loss sees only
            constant columns of the current towers, and training collapses (MoCo's ablation; measured here
            too, see the user guide).
        schema: filled in from the data at the start of training; leave unset.
        **kwargs: optimizer, learning-rate scheduler, ``tower_optim`` and ``preservation`` (towers are named
            by modality), see `unimodality.setup.Setup`.
    """

    def __init__(
        self,
        encoders: dict[str, Callable[[int], Encoder]] | None = None,
        loss: ContrastiveLoss = lazy_default(ClipLoss),
        embed_dim: int = 128,
        modes: dict[str, TowerMode] | None = None,
        heads: dict[str, HeadKind] | None = None,
        weights: dict[str, str] | None = None,
        weights_prefix: dict[str, str] | None = None,
        pair_weights: dict[str, float] | None = None,
        retrieval_k: list[int] = [1, 5, 10],
        grad_cache_chunk: int | None = None,
        queue_size: int | None = None,
        queue_momentum: float = 0.995,
        cache_frozen: bool = False,
        schema: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not isinstance(cache_frozen, bool):
            raise ValueError(f"CrossModalSetup: cache_frozen must be true or false, got {cache_frozen!r}")
        if cache_frozen and type(self).embed is not CrossModalSetup.embed:
            raise ValueError(f"model.init_args.cache_frozen: {type(self).__name__} runs its towers its own way (its "
                             "own embed); leave it unset")
        self.cache_frozen = cache_frozen
        if embed_dim < 1:
            raise ValueError(f"CrossModalSetup: embed_dim must be at least 1, got {embed_dim}")
        if grad_cache_chunk is not None and (
                isinstance(grad_cache_chunk, bool) or not isinstance(grad_cache_chunk, int) or grad_cache_chunk < 1):
            raise ValueError(f"CrossModalSetup: grad_cache_chunk (rows per chunk) must be an integer >= 1 or null "
                             f"(off), got {grad_cache_chunk!r}")
        if grad_cache_chunk is not None and type(self).training_step is not CrossModalSetup.training_step:
            raise ValueError(f"{type(self).__name__}: grad_cache_chunk is not supported (its training step is its "
                             "own); leave it unset")
        self.grad_cache_chunk = grad_cache_chunk
        self.queue_size = self._checked_queue_size(queue_size, loss)
        if isinstance(queue_momentum, bool) or not isinstance(queue_momentum, int | float) or not (
                0 <= queue_momentum < 1):
            raise ValueError(f"CrossModalSetup: queue_momentum must be a number in [0, 1), got {queue_momentum!r}")
        self.queue_momentum = float(queue_momentum)
        self.queue: EmbeddingQueue | None = None  # built with the towers
        self.key_towers: nn.ModuleDict | None = None  # the momentum towers of the queue's keys
        self.encoders = dict(encoders or {})
        self.loss = self.own_default("loss", loss)
        self.embed_dim = embed_dim
        self.modes = dict(modes or {})
        self.heads = dict(heads or {})
        self.weights = dict(weights or {})
        self.weights_prefix = dict(weights_prefix or {})
        self.pair_weights = dict(pair_weights or {})
        self.retrieval_k = tuple(retrieval_k)
        self.towers = nn.ModuleDict()
        self.retrieval = nn.ModuleDict()
        #: rows of the last evaluation epoch, for plots: ``{"stage": ..., "embeddings": {modality: (emb, group)}}``
        self.last_evaluation: dict[str, Any] | None = None
        self.pairs: list[tuple[str, str]] = []
        if schema is not None:
            self.build(schema)

    # -- building from the data's schema -------------------------------------------------------------
    def build(self, schema: dict[str, dict[str, Any]]) -> None:
        """Create one tower per modality of ``schema``."""
        named = set(self.encoders) | set(self.modes) | set(self.heads) | set(self.weights) | set(self.preservation)
        unknown = sorted((named | set(self.tower_optim)) - set(schema))
        if unknown:
            raise ValueError(
                f"model settings name modalities {unknown} that the data does not have; "
                f"data modalities: {sorted(schema)}"
            )
        for name, entry in schema.items():
            mode = self.modes.get(name, "trainable")
            if mode != "disabled" and name not in self.encoders:
                raise ValueError(
                    f"modality {name!r} has no encoder: add model.encoders.{name} or set "
                    f"model.modes.{name}: disabled"
                )
            kind = entry.get("input", "vectors")
            if mode == "disabled" and kind != "vectors":
                raise ValueError(
                    f"modality {name!r} has {kind} as input: a disabled tower passes feature vectors straight to "
                    "its projection head, so it needs an encoder (trainable or frozen)"
                )
            if name in self.preservation and kind not in ("vectors", "images"):
                raise ValueError(
                    f"model.preservation.{name}: the CKA preservation term compares a tower's input rows with its "
                    f"embedding, so it needs vectors or images; modality {name!r} has {kind}"
                )
            n_features = len(entry["features"])
            encoder = self.encoders[name](n_features) if mode != "disabled" else None
            self.towers[name] = Tower(
                n_features, self.embed_dim, encoder, mode, self.weights.get(name), self.weights_prefix.get(name),
                self.heads.get(name, "linear"),
            )
        if self.cache_frozen:
            frozen = [name for name, tower in self.towers.items() if tower.mode == "frozen"]
            if not frozen:
                raise ValueError("model.init_args.cache_frozen: no tower is frozen (model.modes), so there is nothing "
                                 "to cache (a disabled tower's representation is its input); leave it unset")
            for name in frozen:
                self.towers[name].cache_representations()
        self.pairs = list(itertools.combinations(schema, 2))
        names = {f"{a}-{b}": (a, b) for a, b in self.pairs} | {f"{b}-{a}": (a, b) for a, b in self.pairs}
        unknown_pairs = sorted(set(self.pair_weights) - set(names))
        if unknown_pairs:
            raise ValueError(
                f"model.pair_weights names {unknown_pairs}, not pairs of the data's modalities; "
                f"pairs: {[f'{a}-{b}' for a, b in self.pairs]}"
            )
        weights = {names[key]: float(w) for key, w in self.pair_weights.items()}
        self.register_buffer("_pair_weights", torch.tensor([weights.get(p, 1.0) for p in self.pairs]),
                             persistent=False)
        # one collector per modality: every metric is computed from the gathered rows at the epoch's end
        self.retrieval = nn.ModuleDict({name: EmbeddingCollector() for name in schema})
        if self.queue_size is not None:
            self.queue = EmbeddingQueue(list(schema), self.queue_size, self.embed_dim)
            self.key_towers = nn.ModuleDict({name: frozen_copy(self._momentum_source(name)) for name in self.towers})
            # every process queues the same (gathered) rows and averages the same weights, so the queues and
            # momentum towers agree without DDP broadcasting their buffers from rank 0 before each step
            self._ddp_params_and_buffers_to_ignore = sorted(
                {*getattr(self, "_ddp_params_and_buffers_to_ignore", []),
                 *(f"queue.{name}" for name, _ in self.queue.named_buffers()),
                 *(f"key_towers.{name}" for name, _ in self.key_towers.named_buffers())})
        self.remember_schema(schema)

    # -- steps -------------------------------------------------------------------------------------------
    def embed(self, batch: dict[str, torch.Tensor], normalize: bool = True) -> dict[str, torch.Tensor]:
        """L2-normalised embeddings of every modality present in the batch (the heads' raw outputs with
        ``normalize=False``)."""
        return {name: tower(batch[name], normalize, self._cached_rows(name, tower, batch))
                for name, tower in self.towers.items() if name in batch}

    def _cached_rows(self, name: str, tower: Tower, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The source rows by which ``tower`` looks its representations up (`cache_frozen`), or None: uncached."""
        if tower.cache is None:
            return None
        rows = batch.get(rows_key(name))
        if rows is None and self.training:  # elsewhere (e.g. a batch built by hand) the uncached path is exact
            raise ValueError(
                f"model.init_args.cache_frozen: the training batches carry no source rows of modality {name!r} "
                f"({rows_key(name)!r}), by which its frozen tower's representations are cached; PairedDataModule "
                "gives them for data in memory, not with data.streaming nor for a source drawing among alternative "
                "representations: leave cache_frozen unset"
            )
        return rows

    def _forget_cached(self) -> None:
        for tower in self.towers.values():
            if tower.cache is not None:
                tower.cache.clear()

    def on_fit_start(self) -> None:
        # a new fit may follow weight changes the cache cannot see (e.g. an encoder's load_state_dict)
        self._forget_cached()

    def on_validation_start(self) -> None:
        # a validate outside fit may read other files, whose row numbers are other inputs
        if self.trainer.state.fn != "fit":
            self._forget_cached()

    def on_test_start(self) -> None:
        self._forget_cached()

    def loss_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the loss takes: L2-normalised embeddings, or the heads' raw outputs for a loss that sets
        ``normalized_inputs = False`` (e.g. VICReg, DCCA)."""
        return self.embed(batch, normalize=self.loss.normalized_inputs)

    def normalized(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``outputs`` of :meth:`loss_inputs` as L2-normalised embeddings (for metrics and diagnostics)."""
        if self.loss.normalized_inputs:
            return outputs
        return {name: F.normalize(e, dim=-1) for name, e in outputs.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.embed(batch)

    def _loss(self, embeddings: dict[str, torch.Tensor], group: torch.Tensor,
              keys: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The weighted loss over every pair; with ``keys`` (the batch's momentum embeddings, `queue_size`),
        each pair's rows are contrasted with those and the queue's."""
        queued = [None] * len(self.pairs) if keys is None else self.queue.keys_of_pairs(keys, group, self.pairs)
        losses = torch.stack([
            self.loss(embeddings[a], embeddings[b], group, *(() if pair_keys is None else (pair_keys,)))
            for (a, b), pair_keys in zip(self.pairs, queued)
        ])
        if self.training:
            self.loss_terms = {f"{a}-{b}": value.detach() for (a, b), value in zip(self.pairs, losses)}
        return (losses * self._pair_weights).sum() / self._pair_weights.sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch_size = len(batch[GROUP])
        if self.grad_cache_chunk is not None:  # always when set: every process must gather in the same order
            return self._cached_training_step(batch, batch_size)
        return self._training_loss(self.loss_inputs(batch), batch, batch_size)

    def _training_loss(self, local: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                       batch_size: int) -> torch.Tensor:
        """The training loss (plus preservation terms) of this process's embeddings; logs on logging steps.

        Args:
            local: what the loss takes (`loss_inputs`) of this process's rows, per modality.
            batch: the training batch (its groups, and the inputs of the preservation terms).
            batch_size: rows on this process, for the logger.
        """
        # the loss sees the global batch: every process's embeddings, with gradients
        embeddings = {name: gather_with_grad(e) for name, e in local.items()}
        group = gather(batch[GROUP])
        keys = self._momentum_embeddings(batch) if self.queue is not None else None
        loss = self._loss(embeddings, group, keys)
        if keys is not None:
            self._enqueue(keys, group)
        if self.preservation:
            preserved = self.normalized({name: embeddings[name] for name in self.preservation})
            extra = self.preservation_loss({name: batch[name] for name in self.preservation}, preserved, batch_size)
            if extra is not None:
                loss = loss + extra
        if self.is_logging_step():
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            for key, value in self.loss.extra_metrics().items():
                self.log(f"train/{key}", value, batch_size=batch_size)
            self._log_diagnostics(embeddings, batch_size)
        return loss

    def _cached_training_step(self, batch: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """`training_step` by gradient caching (see `unimodality.grad_cache`): returns a tensor whose value
        is the loss and whose backward gives every parameter the plain step's gradient.

        Args:
            batch: the training batch.
            batch_size: rows on this process.
        """
        self._check_grad_cache()
        names = [name for name in self.towers if name in batch]
        names += [rows_key(name) for name in names if rows_key(name) in batch]  # for cache_frozen

        def embed(rows: slice) -> dict[str, torch.Tensor]:
            return self.loss_inputs({name: take_rows(batch[name], rows) for name in names})

        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None) if self._trainer else None
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        params = [p for p in self.parameters() if p.requires_grad]
        _, surrogate = cached_gradients(batch_size, self.grad_cache_chunk, embed,
                                        lambda local: self._training_loss(local, batch, batch_size), params,
                                        self.device, scale)
        return surrogate

    @staticmethod
    def _checked_queue_size(size: int | None, loss: ContrastiveLoss) -> int | None:
        """``queue_size``, or one line naming the option when it is not a positive integer or the loss takes
        no queue."""
        if size is None:
            return None
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"CrossModalSetup: queue_size (past embeddings kept per modality) must be an integer "
                             f">= 1 or null (off), got {size!r}")
        if not getattr(loss, "supports_queue", False):
            from unimodality import registry

            able = sorted(name for name, plugins in registry.registered("losses").items()
                          if getattr(plugins[0].cls, "supports_queue", False))
            raise ValueError(f"model.init_args.queue_size: {type(loss).__name__} takes no queue of past embeddings; "
                             f"use a loss that does ({', '.join(able)}) or leave queue_size unset")
        return size

    def _momentum_source(self, name: str) -> nn.Module:
        """What tower ``name``'s momentum copy averages: the whole tower if its encoder trains, else its head (a
        frozen or disabled tower's representation is the same function online and averaged: its keys use the
        online one, cached with ``cache_frozen``, and no copy of a frozen encoder is held)."""
        tower = self.towers[name]
        return tower if tower.mode == "trainable" else tower.head

    @torch.no_grad()
    def _momentum_embeddings(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global batch's L2-normalised embeddings by the momentum towers (a ``grad_cache_chunk`` of rows
        at a time when set), without gradients."""
        n = len(batch[GROUP])
        step = self.grad_cache_chunk or n
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.key_towers if name in batch}
        for start in range(0, n, step):
            rows = slice(start, start + step)
            chunk = {key: take_rows(value, rows) if step < n else value for key, value in batch.items()
                     if key in parts or key.startswith(ROWS)}
            for name in parts:
                tower, key = self.towers[name], self.key_towers[name]
                if tower.mode == "trainable":
                    projected = key.head(key.represent(chunk[name]))
                else:
                    projected = key(tower.represent(chunk[name], self._cached_rows(name, tower, chunk)))
                parts[name].append(F.normalize(projected, dim=-1))
        return {name: gather(torch.cat(p)) for name, p in parts.items()}

    def _enqueue(self, keys: dict[str, torch.Tensor], group: torch.Tensor) -> None:
        """Queue the global batch's momentum embeddings (after its loss: a batch is not its own queue)."""
        self.queue.push(keys, group)
        if self.is_logging_step():
            self.log("train/queue_fill", self.queue.filled / self.queue.size, batch_size=len(group))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.key_towers is not None:  # after each optimizer step, as MoCo's momentum update
            for name, key in self.key_towers.items():
                ema_update(self._momentum_source(name), key, self.queue_momentum)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.key_towers is not None:  # standardisation statistics, fitted just now, reach the momentum towers
            for name, key in self.key_towers.items():
                for source, target in zip(self._momentum_source(name).buffers(), key.buffers(), strict=True):
                    target.copy_(source)

    def train(self, mode: bool = True) -> CrossModalSetup:
        super().train(mode)
        if self.key_towers is not None:  # no dropout in the keys; batch norm with the online statistics
            self.key_towers.eval()
        return self

    def _check_grad_cache(self) -> None:
        """One line naming the option when a tower normalises over the batch (per chunk, under caching)."""
        for name, tower in self.towers.items():
            norms = [m for m in tower.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
            if norms:
                raise ValueError(
                    f"model.init_args.grad_cache_chunk: tower {name!r} uses batch normalisation "
                    f"({type(norms[0]).__name__}), whose statistics would be those of each chunk rather than the "
                    "batch: use norm: layer (or group) in its encoder, freeze it, or turn gradient caching off"
                )

    @torch.no_grad()
    def _log_diagnostics(self, embeddings: dict[str, torch.Tensor], batch_size: int) -> None:
        embeddings = self.normalized(embeddings)  # the diagnostics are defined on the sphere
        for name, e in embeddings.items():
            self.log(f"train/uniformity/{name}", diagnostics.uniformity(e.float()), batch_size=batch_size)
        for a, b in self.pairs:
            ea, eb = embeddings[a].float(), embeddings[b].float()
            self.log(f"train/alignment/{a}-{b}", diagnostics.alignment(ea, eb), batch_size=batch_size)
            self.log(f"train/modality_gap/{a}-{b}", diagnostics.modality_gap(ea, eb), batch_size=batch_size)

    def _evaluation_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        outputs = self.loss_inputs(batch)
        group = batch[GROUP]
        loss = self._loss(outputs, group)
        embeddings = self.normalized(outputs)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(group))
        index = batch.get(INDEX)  # lets the collectors drop the distributed sampler's padding repeats
        for name, embedding in embeddings.items():
            self.retrieval[name].update(embedding, group, index)
        return loss

    def evaluation_metrics(self) -> dict[str, torch.Tensor]:
        """Every retrieval metric of the evaluation rows collected so far (names without the stage prefix).

        ``recall@k/{a}->{b}`` and their mean ``recall@k`` (row level: every evaluation pair's embedding
        queries all of the other modality); ``pert/recall@k/{a}->{b}``, ``pert/mrr/{a}->{b}``, their means
        ``pert/recall@k`` and ``pert/mrr``, and the chance levels ``pert/chance@k``, ``pert/chance_mrr``
        with the number of perturbations ``pert/count`` (perturbation level: replicates averaged);
        ``map/{modality}`` and ``map/chance/{modality}`` (replicate retrieval within a modality, when some
        perturbation has two distinct replicates).
        """
        rows = {name: metric.compute() for name, metric in self.retrieval.items()}
        distinct = {name: unique_rows(e, g) for name, (e, g) in rows.items() if len(g)}
        self.last_evaluation = {"embeddings": {n: (e.cpu(), g.cpu()) for n, (e, g) in distinct.items()}}
        out: dict[str, torch.Tensor] = {}
        row_values: dict[int, list[torch.Tensor]] = {k: [] for k in self.retrieval_k}
        pert_values: dict[str, list[torch.Tensor]] = {}
        for a, b in self.pairs:
            if a not in distinct or b not in distinct:
                continue
            (ea, ga), (eb, gb) = rows[a], rows[b]
            forward, backward = cross_recall(ea, eb, ga, gb, self.retrieval_k)  # one similarity matrix
            for i, k in enumerate(self.retrieval_k):
                out[f"recall@{k}/{a}->{b}"], out[f"recall@{k}/{b}->{a}"] = forward[i], backward[i]
                row_values[k] += [forward[i], backward[i]]
            pert = perturbation_retrieval(*distinct[a], *distinct[b], self.retrieval_k)
            for name in [f"recall@{k}" for k in self.retrieval_k] + ["mrr"]:
                if f"{name}/forward" in pert:
                    out[f"pert/{name}/{a}->{b}"] = pert[f"{name}/forward"]
                    out[f"pert/{name}/{b}->{a}"] = pert[f"{name}/backward"]
                    pert_values.setdefault(name, []).extend([pert[f"{name}/forward"], pert[f"{name}/backward"]])
            # every pair evaluates the perturbations present in all modalities: one chance level for all
            out |= {f"pert/{key}": value for key, value in pert.items() if key.startswith(("chance", "count"))}
        for k, values in row_values.items():
            if values:
                out[f"recall@{k}"] = torch.stack(values).mean()
        for name, values in pert_values.items():
            out[f"pert/{name}"] = torch.stack(values).mean()
        for name, (e, g) in distinct.items():
            average_precision = replicate_map(e, g)
            if average_precision:
                out[f"map/{name}"] = average_precision["map"]
                out[f"map/chance/{name}"] = average_precision["chance"]
        return out

    def _log_retrieval(self, stage: str) -> None:
        metrics = self.evaluation_metrics()
        for metric in self.retrieval.values():
            metric.reset()
        if self.last_evaluation is not None:
            self.last_evaluation["stage"] = stage
        for name, value in metrics.items():
            # every process computed the same values from the gathered rows: no further reduction
            self.log(f"{stage}/{name}", value.float(), prog_bar=name in ("recall@1", "pert/mrr"))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        present = [name for name in self.towers if name in batch]
        if len(present) != 1:
            raise ValueError(f"a prediction batch holds one modality of {list(self.towers)}, got {list(batch)}")
        return {INDEX: batch[INDEX], "embedding": self.towers[present[0]](batch[present[0]])}
