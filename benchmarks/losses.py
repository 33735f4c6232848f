"""Forward+backward time and peak memory of every built-in loss, next to a naive reference and the field's code.

The naive reference computes the same loss the way a direct transcription of the formula does: one
Python iteration per anchor, each vectorised over the candidates (VICReg: per anchor for the invariance
term, per feature for the variance and covariance terms; DCCA: the paper's inverse square roots by
eigen-decomposition, per-anchor group means; Sinkhorn: autograd through every unrolled iteration,
as differentiating POT's solver does, instead of the envelope gradient; DINO and KD: the cross-entropy or
KL per anchor against the mean target of its replicates). Both run on the same inputs
and must agree (the script checks it).

``ClipLoss``, ``SigLipLoss``, ``HopfieldLoss`` and ``NTXentLoss`` are also timed against the implementations
the field uses, transcribed below with their source named (``ANCHORS``): open_clip's ``ClipLoss`` and
``SigLipLoss``, CLOOB's loss (``HopfieldLoss``) and lightly's ``NTXentLoss``, single process, without
replicate groups (they have none). The comparison runs ours with ``use_groups=False`` (``textbook``: the same
loss, the values must agree) and ours with groups (the multi-positive loss) against the anchor's textbook loss.

One child process per loss, batch and dimension measures every implementation: a warm-up step each;
then memory, the rise of the process's peak resident set over one forward+backward (CPU: the kernel's
high-water mark is reset just before, ``/proc/self/clear_refs``, and glibc's mmap threshold is pinned
at 64 KiB so freed tensors leave the resident set; GPU: ``torch.cuda.max_memory_allocated`` after a
reset); then ``--repeats`` timing rounds, the implementations interleaved and their order rotated each
round. Times are medians with the range over rounds; the ratios to the anchor are medians of the
per-round ratios. ``vs clip`` is each loss's time over ``ClipLoss``'s at the same batch and dimension
(when ``ClipLoss`` is among ``--losses``). Threads: 1 unless ``--threads``.

VICReg, DCCA, DINO and KD get un-normalised inputs (``normalized_inputs = False``; DINO and KD: prototype or
class logits, ``dim`` of them, student first), the others L2-normalised ones. DINO's reference computes its
centre update too, on its own copy of the loss (the centre is state).
The unrolled Sinkhorn reference keeps every iteration's ``n x n`` tensors for backward: it is skipped
above ``--max-naive-sinkhorn`` rows.

    python benchmarks/losses.py                         # batch 256/1024/4096 x dim 256/512
    python benchmarks/losses.py --losses ClipLoss NTXentLoss --dim 512 --no-naive
    python benchmarks/losses.py --batch 256 1024 --dim 256 --repeats 3
    python benchmarks/losses.py --device cuda

Writes ``benchmarks/results/losses.json``, rewritten after every measurement (``"complete": false`` until the
last), so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "losses.json"
LOSSES = ("ClipLoss", "SigLipLoss", "HopfieldLoss", "NTXentLoss", "VICRegLoss", "DCCALoss", "S2LLoss", "CWCLLoss",
          "SinkhornLoss", "DINOLoss", "KDLoss")


# -- naive references: one anchor at a time --------------------------------------------------------
def _positives(group: torch.Tensor, i: int) -> torch.Tensor:
    return (group == group[i]).to(torch.get_default_dtype())


def naive_clip(loss, a, b, group):
    scale = loss.scale
    total = 0.0
    for q, c in ((a, b), (b, a)):
        for i in range(len(q)):
            target = _positives(group, i).to(q.dtype)
            total = total - (target / target.sum() * F.log_softmax(scale * (c @ q[i]), dim=0)).sum()
    return total / (2 * len(a))


def naive_siglip(loss, a, b, group):
    total = 0.0
    for i in range(len(a)):
        sign = 2 * _positives(group, i).to(a.dtype) - 1
        total = total - F.logsigmoid(sign * (loss.scale * (b @ a[i]) + loss.bias)).sum()
    return total / len(a)


def _retrieve(state, stored, beta):
    rows = [stored.T @ torch.softmax(beta * (stored @ state[i]), dim=0) for i in range(len(state))]
    return F.normalize(torch.stack(rows), dim=1)


def _info_loob(x, y, group, inv_tau):
    total = 0.0
    for i in range(len(x)):
        positive = _positives(group, i).bool()
        k = inv_tau * (y @ x[i])
        negatives = k[~positive]
        lse = torch.logsumexp(negatives, dim=0) if negatives.numel() else k.new_zeros(())
        total = total + (-k[positive].mean() + lse) / inv_tau
    return total / len(x)


def naive_hopfield(loss, a, b, group):
    beta, inv_tau = loss.scale_hopfield, loss.inv_tau
    u_xx, u_xy = _retrieve(a, a, beta), _retrieve(b, a, beta)
    u_yy, u_yx = _retrieve(b, b, beta), _retrieve(a, b, beta)
    return _info_loob(u_xx, u_xy, group, inv_tau) + _info_loob(u_yy, u_yx, group, inv_tau)


def naive_ntxent(loss, a, b, group):
    z = torch.cat([a, b])
    views = torch.cat([group, group])
    total = 0.0
    for i in range(len(z)):
        logits = z @ z[i] / loss.temperature
        logits = logits.masked_fill(torch.arange(len(z)) == i, float("-inf"))
        positive = (views == views[i]) & (torch.arange(len(z)) != i)
        total = total - F.log_softmax(logits, dim=0)[positive].mean()
    return total / len(z)


def naive_vicreg(loss, a, b, group):
    n, d = a.shape
    invariance = 0.0
    for i in range(n):
        positive = _positives(group, i).bool()
        invariance = invariance + (a[i] - b[positive]).pow(2).sum(dim=1).mean()
    invariance = invariance / (n * d)

    def variance(x):
        total = 0.0
        for k in range(d):
            total = total + F.relu(loss.std_target - torch.sqrt(x[:, k].var() + loss.eps))
        return total / d

    def covariance(x):
        x = x - x.mean(dim=0)
        total = 0.0
        for k in range(d):
            row = x.T @ x[:, k] / (n - 1)
            total = total + row.pow(2).sum() - row[k].pow(2)
        return total / d

    return (loss.sim_coeff * invariance + loss.std_coeff * (variance(a) + variance(b)) / 2
            + loss.cov_coeff * (covariance(a) + covariance(b)))


def naive_dcca(loss, a, b, group):
    n, d = a.shape
    a, b = a - a.mean(dim=0), b - b.mean(dim=0)
    b_paired = torch.stack([b[_positives(group, i).bool()].mean(dim=0) for i in range(n)])
    eye = torch.eye(d, dtype=a.dtype, device=a.device)

    def inverse_sqrt(m):
        values, vectors = torch.linalg.eigh(m)
        return vectors @ torch.diag(values.rsqrt()) @ vectors.T

    s_aa = a.T @ a / (n - 1) + loss.ridge * eye
    s_bb = b.T @ b / (n - 1) + loss.ridge * eye
    t = inverse_sqrt(s_aa) @ (a.T @ b_paired / (n - 1)) @ inverse_sqrt(s_bb)
    return -torch.linalg.svdvals(t)[: loss.top_k or d].sum()


def naive_s2l(loss, a, b, group):
    teacher = (b if loss.teacher == "b" else a).detach()
    total = 0.0
    for i in range(len(a)):
        s = 1 - torch.atan((teacher - teacher[i]).pow(2).sum(dim=1) / loss.distance_scale) * (4 / math.pi)
        s = torch.where(s < loss.threshold, torch.zeros_like(s), s)
        s = torch.where(_positives(group, i).bool(), torch.ones_like(s), s)
        logits = loss.scale * (b @ a[i]) + loss.bias
        total = total - (s * F.logsigmoid(logits) + (loss.gamma - loss.delta * s) * F.logsigmoid(-logits)).sum()
    return total / len(a)


def naive_cwcl(loss, a, b, group):
    scale = loss.scale
    total = 0.0
    for q, c, weighted in ((a, b, loss.teacher in ("a", "both")), (b, a, loss.teacher in ("b", "both"))):
        teacher = q.detach()
        for i in range(len(q)):
            positive = _positives(group, i).bool()
            similarity = (1 + teacher @ teacher[i]) / 2
            w = torch.where(positive, torch.ones_like(similarity), similarity) if weighted else positive.to(q.dtype)
            total = total - (w / w.sum() * F.log_softmax(scale * (c @ q[i]), dim=0)).sum()
    return total / (2 * len(a))


def naive_sinkhorn(loss, a, b, group):
    """Log-domain Sinkhorn with autograd through every iteration (the same iterations and stopping rule)."""
    from unimodality.plugins.losses.sinkhorn import CHECK_EVERY

    n = len(a)
    logits = loss.scale * a @ b.T
    u, v = logits.new_zeros(n), logits.new_zeros(n)
    for iteration in range(loss.max_iter):
        u_next = -math.log(n) - torch.logsumexp(logits + v[None, :], dim=1)
        change = (u_next - u).abs().max().item() if (iteration + 1) % CHECK_EVERY == 0 else None
        u = u_next
        v = -math.log(n) - torch.logsumexp(logits + u[:, None], dim=0)
        if change is not None and change < loss.tol:
            break
    log_plan = u[:, None] + v[None, :] + logits
    total = 0.0
    for i in range(n):
        target = _positives(group, i)
        total = total - (target / target.sum() * (log_plan[i] + math.log(n))).sum()
    return total / n


def naive_dino(loss, a, b, group):
    """DINO's cross-entropy per anchor (``a`` the student's prototype logits, ``b`` the teacher's), then the
    centre's update, as facebookresearch/dino's ``DINOLoss.forward`` and ``update_center`` (one view each)."""
    teacher = b.detach()
    if loss.center.numel() == 0:
        loss.reset_center(teacher.shape[1])
    probabilities = F.softmax((teacher - loss.center) / loss.current_teacher_temperature(), dim=1)
    total = 0.0
    for i in range(len(a)):
        weights = _positives(group, i).to(a.dtype)
        target = weights @ probabilities / weights.sum()  # the mean over the anchor's replicates
        total = total - (target * F.log_softmax(a[i] / loss.student_temperature, dim=0)).sum()
    with torch.no_grad():
        momentum = loss.center_momentum
        loss.center = loss.center * momentum + teacher.mean(dim=0, keepdim=True) * (1 - momentum)
        loss.steps += 1
    return total / len(a)


def naive_kd(loss, a, b, group):
    """Hinton's ``T^2 KL(softmax(t / T) || softmax(s / T))`` per anchor (``a`` student, ``b`` teacher logits), the
    target the mean teacher distribution over the anchor's replicates."""
    temperature = loss.temperature
    teacher = F.softmax(b.detach() / temperature, dim=1)
    total = 0.0
    for i in range(len(a)):
        weights = _positives(group, i).to(a.dtype)
        target = weights @ teacher / weights.sum()
        total = total + (target * (target.log() - F.log_softmax(a[i] / temperature, dim=0))).sum()
    return total / len(a) * temperature**2


NAIVE = {"ClipLoss": naive_clip, "SigLipLoss": naive_siglip, "HopfieldLoss": naive_hopfield,
         "NTXentLoss": naive_ntxent, "VICRegLoss": naive_vicreg, "DCCALoss": naive_dcca, "S2LLoss": naive_s2l,
         "CWCLLoss": naive_cwcl, "SinkhornLoss": naive_sinkhorn, "DINOLoss": naive_dino, "KDLoss": naive_kd}


# -- anchors: the field's implementations, transcribed (single process, no memory bank) -------------------
def open_clip_loss(loss, a, b, group):
    """open_clip's ``ClipLoss.forward`` with ``world_size == 1`` (mlfoundations/open_clip, src/open_clip/loss.py)."""
    logit_scale = loss.scale
    logits_per_image = logit_scale * a @ b.T
    logits_per_text = logit_scale * b @ a.T
    labels = torch.arange(logits_per_image.shape[0], device=a.device, dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def open_clip_siglip(loss, a, b, group):
    """open_clip's ``SigLipLoss._loss`` (``negative_only=False``) with ``world_size == 1``
    (mlfoundations/open_clip, src/open_clip/loss.py: ``get_ground_truth`` and ``_loss``)."""
    logits = loss.scale * a @ b.T + loss.bias
    n = a.shape[0]
    labels = 2 * torch.eye(n, device=a.device, dtype=a.dtype) + -torch.ones((n, n), device=a.device, dtype=a.dtype)
    return -F.logsigmoid(labels * logits).sum() / n


def lightly_ntxent(loss, a, b, group):
    """lightly's ``NTXentLoss.forward``, no memory bank, one process.

    Source: lightly-ai/lightly, lightly/loss/ntx_ent_loss.py.
    """
    temperature = loss.temperature
    batch_size = a.shape[0]
    out0, out1 = F.normalize(a, dim=1), F.normalize(b, dim=1)
    diag_mask = torch.eye(batch_size, device=a.device, dtype=torch.bool)
    logits_00 = torch.einsum("nc,mc->nm", out0, out0) / temperature
    logits_01 = torch.einsum("nc,mc->nm", out0, out1) / temperature
    logits_10 = torch.einsum("nc,mc->nm", out1, out0) / temperature
    logits_11 = torch.einsum("nc,mc->nm", out1, out1) / temperature
    logits_00 = logits_00[~diag_mask].view(batch_size, -1)
    logits_11 = logits_11[~diag_mask].view(batch_size, -1)
    logits_0100 = torch.cat([logits_01, logits_00], dim=1)
    logits_1011 = torch.cat([logits_10, logits_11], dim=1)
    logits = torch.cat([logits_0100, logits_1011], dim=0)
    labels = torch.arange(batch_size, device=a.device, dtype=torch.long).repeat(2)
    return F.cross_entropy(logits, labels)


def cloob_loss(loss, a, b, group):
    """CLOOB's ``cloob`` and ``infoLOOB_loss`` (ml-jku/cloob, src/training/methods.py; its ``hopfield`` is
    hflayers' ``Hopfield`` without projections, written out as the repository first published it:
    ``stored.T @ softmax(beta * stored @ state.T, dim=0)``, columns normalised)."""
    inv_tau, beta = loss.inv_tau, loss.scale_hopfield

    def hopfield(state_patterns, stored_patterns):
        retrieved = stored_patterns.T @ torch.softmax(beta * stored_patterns @ state_patterns.T, dim=0)
        return (retrieved / retrieved.norm(dim=0, keepdim=True)).T

    def info_loob(x, y, i):
        tau = 1 / inv_tau
        k = x @ y.T / tau
        positives = -torch.mean(torch.sum(k * i, dim=1))
        arg_lse = k * torch.logical_not(i) + i * -1000.0
        negatives = torch.mean(torch.logsumexp(arg_lse, dim=1))
        return tau * (positives + negatives)

    p_xx, p_yy, p_xy, p_yx = hopfield(a, a), hopfield(b, b), hopfield(b, a), hopfield(a, b)
    i = torch.eye(a.shape[0], device=a.device) > 0.5
    return info_loob(p_xx, p_xy, i) + info_loob(p_yy, p_yx, i)


#: loss -> (anchor's name, its formula)
ANCHORS = {"ClipLoss": ("open_clip", open_clip_loss), "SigLipLoss": ("open_clip", open_clip_siglip),
           "HopfieldLoss": ("CLOOB", cloob_loss), "NTXentLoss": ("lightly", lightly_ntxent)}


# -- one measurement (in a child process) -----------------------------------------------------------
def _resident() -> tuple[int, int] | None:
    """(peak, current) resident set in bytes, or None where /proc is not there."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure(name: str, batch: int, dim: int, repeats: int, device: str, naive: bool) -> dict:
    from unimodality import registry

    torch.manual_seed(0)
    cls = registry.registered("losses")[name][0].cls
    loss = cls().to(device)
    group = torch.randint(0, batch // 4, (batch,), device=device)  # about four replicates per perturbation
    a0, b0 = torch.randn(batch, dim, device=device), torch.randn(batch, dim, device=device)
    if loss.normalized_inputs:  # VICReg and DCCA take the heads' raw outputs
        a0, b0 = F.normalize(a0, dim=1), F.normalize(b0, dim=1)
    else:
        b0 = 0.5 * a0 + b0  # correlated, as paired outputs are
    impls = {"unimodality": lambda a, b: loss(a, b, group)}
    if name in ANCHORS:
        torch.manual_seed(0)
        textbook = cls(use_groups=False).to(device)
        anchor = ANCHORS[name][1]
        impls["textbook"] = lambda a, b: textbook(a, b, group)
        impls["anchor"] = lambda a, b: anchor(textbook, a, b, group)
    if naive:
        # its own copy: a stateful loss (DINO's centre) then starts the reference from the same state
        reference = copy.deepcopy(loss)
        impls["naive"] = lambda a, b: NAIVE[name](reference, a, b, group)

    def step(compute) -> float:
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        value = compute(a, b)
        value.backward()
        return float(value.detach())

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    values = {impl: step(compute) for impl, compute in impls.items()}  # warm-up
    peaks, method = {}, None
    for impl, compute in impls.items():
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base, method = torch.cuda.memory_allocated(), "cuda.max_memory_allocated"
        elif _resident() is not None and _reset_peak():
            base, method = _resident()[1], "VmHWM rise after clear_refs"
        step(compute)
        sync()
        if device == "cuda":
            peaks[impl] = torch.cuda.max_memory_allocated() - base
        elif method:
            peaks[impl] = _resident()[0] - base
        else:  # no /proc: not measured
            peaks[impl] = None
    times = {impl: [] for impl in impls}
    names = list(impls)
    for round_ in range(repeats):
        for impl in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotate the order
            if impl == "naive" and round_ >= max(1, repeats // 2):
                continue  # the naive loop is slow at large batches: fewer rounds keep the run short
            sync()
            start = time.perf_counter()
            step(impls[impl])
            sync()
            times[impl].append(time.perf_counter() - start)
    return {"loss": name, "batch": batch, "dim": dim, "values": values, "times": times, "peak_bytes": peaks,
            "memory_method": method, "threads": torch.get_num_threads()}


def run_child(name, batch, dim, repeats, device, naive, threads) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, str(batch), str(dim), str(repeats), device, str(int(naive)),
         str(threads)],
        capture_output=True, text=True, check=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _agree(x: float | None, y: float | None) -> bool | None:
    return None if x is None or y is None else abs(x - y) <= 1e-4 * max(1.0, abs(y))


def _ratio(times: dict, impl: str, baseline: str) -> dict | None:
    """Median (and range) of the per-round time ratios of two interleaved implementations."""
    pairs = [x / y for x, y in zip(times[impl], times[baseline])]
    return {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)} if pairs else None


def summarize(child: dict) -> dict:
    times, peaks, values = child["times"], child["peak_bytes"], child["values"]

    def timing(impl):
        if impl not in times or not times[impl]:
            return None
        return {"median": statistics.median(times[impl]), "min": min(times[impl]), "max": max(times[impl]),
                "rounds": len(times[impl])}

    def mib(impl):
        return None if peaks.get(impl) is None else peaks[impl] / 2**20

    def mem_ratio(impl, baseline):
        return peaks[impl] / peaks[baseline] if peaks.get(impl) and peaks.get(baseline) else None

    row = {
        "loss": child["loss"], "batch": child["batch"], "dim": child["dim"],
        "seconds": timing("unimodality"), "peak_mib": mib("unimodality"), "value": values["unimodality"],
        "naive_seconds": timing("naive"), "naive_peak_mib": mib("naive"), "naive_value": values.get("naive"),
        "speedup": (statistics.median(times["naive"]) / statistics.median(times["unimodality"]))
        if times.get("naive") else None,
        "memory_ratio": mem_ratio("unimodality", "naive"),
        "agree": _agree(values["unimodality"], values.get("naive")),
        "memory_method": child["memory_method"], "threads": child["threads"],
    }
    if "anchor" in times:
        row["anchor"] = {
            "name": ANCHORS[child["loss"]][0],
            "seconds": timing("anchor"), "peak_mib": mib("anchor"), "value": values["anchor"],
            "textbook_seconds": timing("textbook"), "textbook_peak_mib": mib("textbook"),
            "textbook_value": values["textbook"], "agree": _agree(values["textbook"], values["anchor"]),
            "time_ratio_textbook": _ratio(times, "textbook", "anchor"),
            "time_ratio_groups": _ratio(times, "unimodality", "anchor"),
            "memory_ratio_textbook": mem_ratio("textbook", "anchor"),
            "memory_ratio_groups": mem_ratio("unimodality", "anchor"),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each measurement (default 1)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive references (anchors only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--max-naive-sinkhorn", type=int, default=1024,
                        help="largest batch for the unrolled Sinkhorn reference (memory: iterations x n^2)")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, batch, dim, repeats, device, naive, threads = args.child
        torch.set_num_threads(int(threads))
        print(json.dumps(measure(name, int(batch), int(dim), int(repeats), device, naive == "1")))
        return

    def show(value, form, none="n/a"):
        return none if value is None else format(value, form)

    def spread(t):
        return "n/a" if t is None else f"{1e3 * t['median']:.1f} [{1e3 * t['min']:.0f}-{1e3 * t['max']:.0f}]"

    rows = []

    def write(rows: list[dict], complete: bool) -> None:
        # after every measurement, whole or not at all: a run stopped by a time limit keeps what it measured
        from unimodality.files import atomic_write

        args.output.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({
            "device": args.device, "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
            "machine": platform.platform(), "processor": platform.processor(), "complete": complete,
            "rows": rows}, indent=2)
        atomic_write(args.output, lambda tmp: tmp.write_text(text), suffix=".json")

    print(f"device {args.device}, torch {torch.__version__}, threads {args.threads}, repeats {args.repeats}")
    print(f"{'loss':13s} {'batch':>5s} {'dim':>4s} {'ms [range]':>20s} {'vs clip':>8s} {'naive ms':>9s} "
          f"{'speedup':>8s} {'MiB':>8s} {'naive MiB':>9s} {'mem ratio':>9s}  agree")
    clip_seconds: dict[tuple[int, int], float] = {}
    names = sorted(args.losses, key=lambda n: n != "ClipLoss")  # the baseline first
    for name in names:
        for batch in args.batch:
            for dim in args.dim:
                naive = not args.no_naive and not (name == "SinkhornLoss" and batch > args.max_naive_sinkhorn)
                row = summarize(run_child(name, batch, dim, args.repeats, args.device, naive, args.threads))
                rows.append(row)
                if name == "ClipLoss":
                    clip_seconds[batch, dim] = row["seconds"]["median"]
                vs_clip = row["seconds"]["median"] / clip_seconds[batch, dim] if (batch, dim) in clip_seconds \
                    else None
                row["vs_clip"] = vs_clip
                naive_ms = row["naive_seconds"] and 1e3 * row["naive_seconds"]["median"]
                agree = row["agree"]
                print(f"{name:13s} {batch:5d} {dim:4d} {spread(row['seconds']):>20s} {show(vs_clip, '7.2f'):>7s}x "
                      f"{show(naive_ms, '9.1f'):>9s} {show(row['speedup'], '7.1f'):>7s}x "
                      f"{show(row['peak_mib'], '8.1f'):>8s} {show(row['naive_peak_mib'], '9.1f'):>9s} "
                      f"{show(row['memory_ratio'], '.2f'):>9s}  "
                      f"{'skipped' if agree is None else 'yes' if agree else 'NO'}", flush=True)
                write(rows, complete=False)
    anchored = [r for r in rows if "anchor" in r]
    if anchored:
        print(f"\nagainst the field's implementations (ratio = ours / anchor; time: median [range] of per-round "
              f"ratios)\n{'loss':13s} {'anchor':>9s} {'batch':>5s} {'dim':>4s} {'anchor ms':>20s} "
              f"{'textbook ms':>20s} {'time textbook':>20s} {'time groups':>20s} {'anchor MiB':>10s} "
              f"{'textbook MiB':>12s} {'groups MiB':>10s} {'mem textbook':>12s} {'mem groups':>10s}  agree")
        for r in anchored:
            x = r["anchor"]

            def ratio(t):
                return "n/a" if t is None else f"{t['median']:.2f} [{t['min']:.2f}-{t['max']:.2f}]"

            print(f"{r['loss']:13s} {x['name']:>9s} {r['batch']:5d} {r['dim']:4d} {spread(x['seconds']):>20s} "
                  f"{spread(x['textbook_seconds']):>20s} {ratio(x['time_ratio_textbook']):>20s} "
                  f"{ratio(x['time_ratio_groups']):>20s} {show(x['peak_mib'], '10.1f'):>10s} "
                  f"{show(x['textbook_peak_mib'], '12.1f'):>12s} {show(r['peak_mib'], '10.1f'):>10s} "
                  f"{show(x['memory_ratio_textbook'], '12.2f'):>12s} {show(x['memory_ratio_groups'], '10.2f'):>10s}  "
                  f"{'yes' if x['agree'] else 'NO'}")
    print("\nspeedup = naive time / unimodality time (forward+backward); mem ratio = unimodality / naive "
          "peak memory rise; vs clip = time / ClipLoss time at the same batch and dim; textbook = ours with "
          "use_groups=False, groups = ours with replicate groups (about 4 per perturbation)")
    write(rows, complete=True)
    print(f"wrote {args.output}")
    disagree = [r for r in rows if r["agree"] is False or ("anchor" in r and not r["anchor"]["agree"])]
    if disagree:
        sys.exit("some losses disagree with their reference: "
                 + ", ".join(f"{r['loss']} {r['batch']}x{r['dim']}" for r in disagree))


if __name__ == "__main__":
    main()
