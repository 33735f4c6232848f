"""Momentum contrast with a queue (`CrossModalSetup`'s ``queue_size``): the losses against a transcription of
ALBEF's, same-group exclusion, the FIFO, the momentum towers, gradient caching, 2-process DDP, the CLI, and
that training does not collapse."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from tests.helpers import quiet_trainer
from tests.test_grad_cache import ROWS, SCHEMA, Batches, _free_port, batch
from unimodality import loss as loss_module
from unimodality.api import load
from unimodality.batch import GROUP
from unimodality.cli import main
from unimodality.loss import Keys
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.plugins.losses.hopfield import HopfieldLoss
from unimodality.plugins.losses.siglip import SigLipLoss
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.queue import EmbeddingQueue

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip_queue.yaml"


def unit_rows(n: int, d: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)


GROUP_IDS = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5])
#: past rows: groups the batch shares (0, 2, 5: left out of those rows' sums) and groups it does not
QUEUE_GROUPS = torch.tensor([0, 7, 2, 8, 9, 5, 0, 11, 12, 2])


def inputs(k: int = len(QUEUE_GROUPS)):
    """Online rows ``a``, ``b`` and `Keys`: momentum rows of the same 8 samples, then ``k`` queued ones."""
    a, b = unit_rows(8, seed=1).requires_grad_(), unit_rows(8, seed=2).requires_grad_()
    keys = Keys(torch.cat([unit_rows(8, seed=5), unit_rows(10, seed=3)[:k]]),
                torch.cat([unit_rows(8, seed=6), unit_rows(10, seed=4)[:k]]), torch.cat([GROUP_IDS, QUEUE_GROUPS[:k]]))
    return a, b, keys


# -- references: plain torch over the concatenated columns --------------------------------------------------
def reference_clip(a, b, scale, group, keys, use_groups):
    """ALBEF's ``loss_ita`` (salesforce/ALBEF ``models/model_pretrain.py``, ``alpha = 0``): ``sim_i2t = image_feat
    @ text_feat_all / temp`` with ``text_feat_all`` the momentum features of the batch then the queue,
    ``-sum(log_softmax(sim_i2t) * sim_targets).mean()``, both directions averaged; our groups spread the target
    over a row's positives and leave its group's queue entries out."""
    n = len(a)
    positive = group[:, None] == group[None, :] if use_groups else torch.eye(n, dtype=torch.bool)
    target = positive / positive.sum(1, keepdim=True)
    left_out = torch.cat([torch.zeros(n, n, dtype=torch.bool), group[:, None] == keys.group[None, n:]], 1)

    def direction(x, columns):
        sim = (scale * x @ columns.T).masked_fill(left_out, float("-inf"))
        return -(torch.log_softmax(sim, dim=1)[:, :n] * target).sum(1).mean()

    return (direction(a, keys.b) + direction(b, keys.a)) / 2


def reference_siglip(a, b, scale, bias, group, keys, use_groups):
    n = len(a)
    positive = group[:, None] == group[None, :] if use_groups else torch.eye(n, dtype=torch.bool)
    total = 0.0
    for x, columns in ((a, keys.b), (b, keys.a)):
        for i in range(n):
            for j in range(len(columns)):
                if j < n:
                    sign = 1.0 if positive[i, j] else -1.0
                elif group[i] == keys.group[j]:
                    continue
                else:
                    sign = -1.0
                total = total - F.logsigmoid(sign * (scale * x[i] @ columns[j] + bias))
    return total / (2 * n)


def value_and_grads(fn, a, b, loss):
    value = fn()
    grads = torch.autograd.grad(value, [a, b, loss.log_scale])
    return value.detach(), grads


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_groups", [True, False])
@pytest.mark.parametrize("k", [10, 3, 0])  # a full queue, a partly filled one (rows with no entry left), none
@pytest.mark.parametrize("blocks", [False, True])
def test_clip_with_keys_matches_albef(use_groups, k, blocks, monkeypatch):
    if blocks:  # several row blocks in the queue's forward and backward
        monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", 4)
        monkeypatch.setattr(loss_module, "MIN_BLOCK_ROWS", 3)
    loss = ClipLoss(init_scale=5.0, use_groups=use_groups).double()
    a, b, keys = inputs(k)
    got = value_and_grads(lambda: loss(a, b, GROUP_IDS, keys), a, b, loss)
    want = value_and_grads(lambda: reference_clip(a, b, loss.scale, GROUP_IDS, keys, use_groups), a, b, loss)
    assert_same(got, want)
    if k:  # the queue counts
        assert not torch.allclose(got[0], loss(a, b, GROUP_IDS, Keys(keys.a[:8], keys.b[:8], GROUP_IDS)))


@pytest.mark.parametrize("loss", [ClipLoss(init_scale=5.0), SigLipLoss(init_scale=3.0, init_bias=-2.0)],
                         ids=["clip", "siglip"])
def test_keys_equal_to_the_online_rows_and_no_queue_are_the_plain_loss(loss):
    """At the first step the momentum towers are the towers and the queue is empty: the plain loss's value."""
    loss = loss.double()
    a, b, _ = inputs()
    torch.testing.assert_close(loss(a, b, GROUP_IDS, Keys(a.detach(), b.detach(), GROUP_IDS)),
                               loss(a, b, GROUP_IDS), atol=1e-12, rtol=0)


@pytest.mark.parametrize("use_groups", [True, False])
def test_siglip_with_keys_matches_the_reference(use_groups):
    loss = SigLipLoss(init_scale=3.0, init_bias=-2.0, use_groups=use_groups).double()
    a, b, keys = inputs()
    got = value_and_grads(lambda: loss(a, b, GROUP_IDS, keys), a, b, loss)
    want = value_and_grads(lambda: reference_siglip(a, b, loss.scale, loss.bias, GROUP_IDS, keys, use_groups),
                           a, b, loss)
    assert_same(got, want)


@pytest.mark.parametrize("use_groups", [True, False])
@pytest.mark.parametrize("loss", [ClipLoss(init_scale=5.0), SigLipLoss()], ids=["clip", "siglip"])
def test_same_group_entries_are_neither_positive_nor_negative(loss, use_groups):
    loss = loss.double()
    loss.use_groups = use_groups
    a, b, keys = inputs()
    batch_a, batch_b = keys.a[:8], keys.b[:8]
    queue_a, queue_b = keys.a[8:], keys.b[8:]

    def with_queue(qa, qb, qgroup, group=GROUP_IDS):
        return Keys(torch.cat([batch_a, qa]), torch.cat([batch_b, qb]), torch.cat([group, qgroup]))

    # a batch of one group and a queue of that group only (an epoch's earlier embeddings of these very
    # samples): the loss without a queue; the same rows as another group's are negatives and count
    one = torch.zeros(8, dtype=torch.long)
    plain = loss(a, b, one, Keys(batch_a, batch_b, one))
    torch.testing.assert_close(loss(a, b, one, with_queue(queue_a, queue_b, torch.zeros(10, dtype=torch.long), one)),
                               plain, atol=1e-12, rtol=0)
    assert loss(a, b, one, with_queue(queue_a, queue_b, torch.full((10,), 99), one)) > plain + 1e-3
    # mixed groups: moving the queued b rows of group 0 leaves the gradient of a's group-0 rows as it is (their
    # terms leave those entries out), not that of the other rows
    moved = queue_b.clone()
    moved[QUEUE_GROUPS == 0] = unit_rows(2, seed=9)

    def grad_a(qb):
        return torch.autograd.grad(loss(a, b, GROUP_IDS, with_queue(queue_a, qb, QUEUE_GROUPS)), a)[0]

    before, after = grad_a(queue_b), grad_a(moved)
    own = GROUP_IDS == 0
    torch.testing.assert_close(after[own], before[own], atol=1e-12, rtol=0)
    assert not torch.allclose(after[~own], before[~own], atol=1e-6)


def test_the_keys_are_constants_and_only_supporting_losses_take_them():
    a, b, keys = inputs()
    with pytest.raises(ValueError, match="keys \\(past embeddings\\) must be constants"):
        loss_module.queue_logsumexp(a, b, torch.tensor(1.0))
    with pytest.raises(ValueError, match="ClipLoss: the keys \\(momentum embeddings\\) must be constants"):
        ClipLoss().double()(a, b, GROUP_IDS, Keys(a, b, GROUP_IDS))
    with pytest.raises(ValueError, match="HopfieldLoss takes no momentum keys nor queue"):
        HopfieldLoss().double()(a, b, GROUP_IDS, keys)
    with pytest.raises(ValueError, match=r"model.init_args.queue_size: HopfieldLoss takes no queue of past "
                                         r"embeddings; use a loss that does \(ClipLoss, SigLipLoss\)"):
        CrossModalSetup(loss=HopfieldLoss(), queue_size=8)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="queue_size .* must be an integer >= 1 or null"):
            CrossModalSetup(queue_size=bad)
    for bad in (1.0, -0.1, "high", True):
        with pytest.raises(ValueError, match="queue_momentum must be a number in \\[0, 1\\)"):
            CrossModalSetup(queue_size=8, queue_momentum=bad)


def test_bf16_embeddings_meet_fp32_keys():
    loss = ClipLoss()
    a, b, keys = inputs()
    value = loss(a.detach().bfloat16(), b.detach().bfloat16(), GROUP_IDS, Keys(keys.a.float(), keys.b.float(),
                                                                              keys.group))
    assert value.dtype == torch.float32 and value.isfinite()


# -- the FIFO ----------------------------------------------------------------------------------------------
def tagged(start: int, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows whose values are their running number, and groups equal to it."""
    ids = torch.arange(start, start + n)
    return {"tx": ids[:, None].float().expand(n, 2), "ph": -ids[:, None].float().expand(n, 2)}, ids


def test_the_queue_keeps_the_last_rows_oldest_first():
    queue = EmbeddingQueue(["tx", "ph"], size=5, dim=2)
    now, now_group = tagged(100, 2)
    empty = queue.keys(now, now_group, "ph", "tx")  # empty: the batch's own keys only
    assert empty.group.tolist() == [100, 101] and empty.a[:, 1].tolist() == [-100, -101]
    expected = []
    for start, n in ((0, 3), (3, 3), (6, 3), (9, 7), (16, 1)):  # wraps round; one batch longer than the queue
        queue.push(*tagged(start, n))
        expected = (expected + list(range(start, start + n)))[-5:]
        rows, group = queue.ordered()
        assert group.tolist() == expected
        assert rows["tx"][:, 0].tolist() == expected and rows["ph"][:, 1].tolist() == [-i for i in expected]
        assert queue.filled == len(expected)
        keys = queue.keys(now, now_group, "ph", "tx")  # the batch's rows first, then the queue's
        assert keys.group[:2].tolist() == [100, 101] and sorted(keys.group[2:].tolist()) == sorted(expected)
        assert keys.b[:, 0].tolist() == keys.group.tolist() and keys.a[:, 1].tolist() == (-keys.group).tolist()
    # a checkpoint holds the queue: a resumed run continues with the same rows and the same next position
    restored = EmbeddingQueue(["tx", "ph"], size=5, dim=2)
    restored.load_state_dict(queue.state_dict())
    for q in (queue, restored):
        q.push(*tagged(17, 2))
    for (got, want) in zip(restored.ordered(), queue.ordered()):
        torch.testing.assert_close(got, want)
    assert restored.ordered()[1].tolist() == [14, 15, 16, 17, 18]


def test_every_pair_of_three_modalities_shares_each_modalitys_keys():
    """With three modalities, each modality's batch rows are joined with its queue once, not once per pair."""
    queue = EmbeddingQueue(["tx", "ph", "mol"], size=4, dim=2)
    for start in (0, 3):
        rows, group = tagged(start, 3)
        queue.push({**rows, "mol": 2 * rows["tx"]}, group)
    now, now_group = tagged(100, 2)
    now["mol"] = 2 * now["tx"]
    pairs = [("tx", "ph"), ("tx", "mol"), ("ph", "mol")]
    shared = queue.keys_of_pairs(now, now_group, pairs)
    for (a, b), keys in zip(pairs, shared):
        one = queue.keys(now, now_group, a, b)
        for got, want in zip(keys, one):
            assert torch.equal(got, want)
    assert shared[0].a is shared[1].a and shared[0].b is shared[2].a and shared[1].b is shared[2].b
    assert shared[0].group is shared[2].group and len(shared[0].group) == 2 + 4


def setup_with_queue(size: int = 20, loss=None, **kwargs) -> CrossModalSetup:
    torch.manual_seed(0)
    setup = CrossModalSetup(encoders={n: partial(MLPEncoder, hidden_sizes=[12], dropout=0.0) for n in SCHEMA},
                            loss=loss or ClipLoss(), embed_dim=6, queue_size=size, **kwargs)
    setup.build(SCHEMA)
    setup.is_logging_step = lambda: False  # no trainer to log to
    return setup.double()


def test_training_steps_queue_the_batch_after_its_loss_and_evaluation_does_not():
    setup = setup_with_queue(size=20)
    setup.train()
    first, second = batch(13, seed=1), batch(13, seed=2)
    loss_1 = setup.training_step(first, 0)
    # the momentum towers start as the towers, and the queue is empty: the plain loss
    torch.testing.assert_close(loss_1, setup.loss(*setup.embed(first).values(), first[GROUP]))
    loss_2 = setup.training_step(second, 1)
    past = {n: e.detach() for n, e in setup.embed(first).items()}  # no optimizer step: the same weights
    now = {n: e.detach() for n, e in setup.embed(second).items()}
    keys = Keys(torch.cat([now["tx"], past["tx"]]), torch.cat([now["ph"], past["ph"]]),
                torch.cat([second[GROUP], first[GROUP]]))
    torch.testing.assert_close(loss_2, setup.loss(*setup.embed(second).values(), second[GROUP], keys))
    loss_2.backward()  # queueing after the loss left what backward needs intact
    assert all(p.grad is None for p in setup.key_towers.parameters())  # constants
    rows, group = setup.queue.ordered()
    assert group.tolist() == first[GROUP][6:].tolist() + second[GROUP].tolist()  # the last 20 of 26 rows
    for name in SCHEMA:
        torch.testing.assert_close(rows[name], torch.cat([past[name][6:], now[name]]))
    setup.eval()
    with torch.no_grad():
        setup.validation_step = setup._evaluation_step  # the step without the retrieval logging's trainer
        setup.log = lambda *args, **kwargs: None
        evaluation = setup._evaluation_step(batch(13, seed=3), "val")
    torch.testing.assert_close(setup.queue.ordered()[1], group)  # evaluation queues nothing
    torch.testing.assert_close(evaluation, setup._loss(setup.embed(batch(13, seed=3)), batch(13, seed=3)[GROUP]))
    state = setup.state_dict()
    assert "queue.embeddings" in state and "queue.group" in state and any(k.startswith("key_towers.") for k in state)


def test_the_momentum_towers_follow_the_towers_by_ema(monkeypatch):
    from lightning.pytorch import LightningModule

    setup = setup_with_queue(size=20, queue_momentum=0.9)
    before = {k: v.clone() for k, v in setup.key_towers.state_dict().items()}
    with torch.no_grad():
        for p in setup.towers.parameters():
            p.add_(1.0)  # what an optimizer step did
    online = setup.towers.state_dict()
    monkeypatch.setattr(LightningModule, "optimizer_step", lambda self, *args, **kwargs: None)  # no optimizer
    setup.optimizer_step(0, 0, None)
    for key, value in setup.key_towers.state_dict().items():
        torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * online[key], msg=key)
    setup.train()
    assert not setup.key_towers["tx"].training and setup.towers["tx"].training  # keys without dropout


def test_a_frozen_tower_keys_its_own_representation():
    """A frozen encoder's momentum copy would be the same function: the keys use the online representation,
    through the cache when ``cache_frozen`` is on."""
    setup = setup_with_queue(size=20, modes={"ph": "frozen"}, cache_frozen=True)
    setup.train()
    first = batch(13, seed=1)
    first["rows/ph"] = torch.arange(13)
    setup.training_step(first, 0)
    assert setup.towers["ph"].cache.computed == 13  # one encoder pass for the online and the momentum side
    assert not any("encoder" in key for key in setup.key_towers["ph"].state_dict())  # its head's average only


# -- in Lightning: gradient caching, one process and two -----------------------------------------------------
class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def fit(chunk: int | None = None, steps: int = 5, queue_size: int | None = 20, loss: str = "ClipLoss",
        **trainer) -> tuple[CrossModalSetup, list[float]]:
    torch.manual_seed(0)
    losses_ = {"ClipLoss": ClipLoss, "SigLipLoss": SigLipLoss}
    setup = CrossModalSetup(encoders={n: partial(MLPEncoder, hidden_sizes=[12], dropout=0.0) for n in SCHEMA},
                            loss=losses_[loss](), embed_dim=6, grad_cache_chunk=chunk, queue_size=queue_size,
                            optimizer=partial(torch.optim.AdamW, lr=1e-2))
    setup.build(SCHEMA)
    recorder = Losses()
    loader = DataLoader(Batches(steps), batch_size=None, shuffle=False)
    quiet_trainer(max_steps=steps, num_sanity_val_steps=0, log_every_n_steps=1, use_distributed_sampler=False,
                  callbacks=[recorder], **trainer).fit(setup, train_dataloaders=loader)
    return setup, recorder.values


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)
        else:  # the queue's fill level
            assert got[name] == value, name


@pytest.mark.parametrize("loss", ["ClipLoss", "SigLipLoss"])
def test_gradient_caching_with_a_queue_matches_the_plain_run(loss):
    cached, cached_losses = fit(chunk=4, loss=loss)
    plain, plain_losses = fit(loss=loss)
    assert cached.queue.filled == 20
    assert_same_state(cached.state_dict(), plain.state_dict())
    assert cached_losses == pytest.approx(plain_losses, rel=1e-5)
    _, without = fit(queue_size=None, loss=loss)
    assert plain_losses[0] == pytest.approx(without[0], rel=1e-6)  # step 1: the queue is still empty
    assert abs(plain_losses[1] - without[1]) > 1e-3  # then it counts (little for SigLIP: its bias starts at -10)


def _ddp_fit_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    setup, losses = fit(strategy="ddp", devices=world)
    # DDP was told to leave the queue alone (every process writes the same rows): it never broadcast it
    assert {"queue.embeddings", "queue.group"} <= set(setup._ddp_params_and_buffers_to_ignore)
    torch.save((setup.state_dict(), losses, dist.is_initialized()), Path(out) / f"fit{rank}.pt")


@pytest.mark.slow  # two forked Lightning DDP processes (gloo): ~15 s on 2 shared cores
def test_two_processes_hold_the_queue_and_loss_of_one_on_the_global_batch(tmp_path):
    """lightly's memory bank queued each process's own rows (lightly issue #1018): from step 2 on, a
    2-process run then contrasts with other negatives than one process would. Here each process queues the
    gathered batch (6 + 7 rows), so the queues, the losses and the weights are those of one process."""
    mp.start_processes(_ddp_fit_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    want, want_losses = fit()
    assert want.queue.filled == 20 and want.queue.position == (5 * sum(ROWS)) % 20  # it wrapped round
    for rank in range(2):
        state, losses, distributed = torch.load(tmp_path / f"fit{rank}.pt", weights_only=False)
        assert distributed
        assert_same_state(state, want.state_dict())  # weights and the queue's rows, groups and fill level
        assert losses == pytest.approx(want_losses, rel=1e-5)


# -- from the command line ----------------------------------------------------------------------------------
def test_the_config_trains_with_a_filling_queue(tmp_path):
    main(["fit", "--config", str(CONFIG), "--trainer.max_steps", "3", "--trainer.max_epochs", "1",
          "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    metrics = (tmp_path / "clip_queue" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    fills = [row.split(",")[header.index("train/queue_fill")] for row in metrics[1:]]
    assert [float(f) for f in fills if f] == [0.25, 0.5, 0.75]  # 64-row batches into 256 rows
    checkpoint = next((tmp_path / "clip_queue" / "version_0" / "checkpoints").glob("*.ckpt"))
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert state["queue.embeddings"].shape == (2, 256, 128) and state["queue._extra_state"]["filled"] == 192
    # the checkpoint loads (strictly) into the model its config builds, queue included, and embeds new rows
    model = load(checkpoint)
    assert model.module.queue.filled == 192
    torch.testing.assert_close(model.module.queue.embeddings, state["queue.embeddings"])
    tx = torch.randn(4, len(model.schema["tx"]["features"]))
    assert model.module.predict_step({"tx": tx, "index": torch.arange(4)}, 0)["embedding"].shape == (4, 128)


def test_a_loss_without_a_queue_is_one_line_from_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIG), "--model.init_args.loss", "HopfieldLoss",
              "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert "model.init_args.queue_size: HopfieldLoss takes no queue" in capsys.readouterr().err
