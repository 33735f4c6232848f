"""Forward+backward time and peak memory of every built-in loss, next to a naive reference.

The naive reference computes the same loss the way a direct transcription of the formula does: one
Python iteration per anchor, each vectorised over the candidates (VICReg: per anchor for the invariance
term, per feature for the variance and covariance terms; DCCA: the paper's inverse square roots by
eigen-decomposition, per-anchor group means; Sinkhorn: autograd through every unrolled iteration,
as differentiating POT's solver does, instead of the envelope gradient). Both are run in the same
invocation, on the same inputs, and must agree (the script checks it). Each measurement runs in a fresh
process: memory is the rise of the process's peak resident set (CPU) or of
``torch.cuda.max_memory_allocated`` (GPU) over one forward+backward, measured before any warm-up; time is
the median of ``--repeats`` runs. ``vs clip`` is each loss's time over ``ClipLoss``'s at the same batch
and dimension, measured in the same run (when ``ClipLoss`` is among ``--losses``).

VICReg and DCCA get un-normalised inputs (``normalized_inputs = False``), the others L2-normalised ones.
The unrolled Sinkhorn reference keeps every iteration's ``n x n`` tensors for backward: it is skipped
above ``--max-naive-sinkhorn`` rows.

    python benchmarks/losses.py                         # batch 256/1024/4096 x dim 256/512
    python benchmarks/losses.py --batch 256 1024 --dim 256 --repeats 3
    python benchmarks/losses.py --losses ClipLoss VICRegLoss DCCALoss --batch 256 1024
    python benchmarks/losses.py --device cuda

Writes ``benchmarks/results/losses.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "losses.json"
LOSSES = ("ClipLoss", "SigLipLoss", "HopfieldLoss", "NTXentLoss", "VICRegLoss", "DCCALoss", "S2LLoss", "CWCLLoss",
          "SinkhornLoss")


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


NAIVE = {"ClipLoss": naive_clip, "SigLipLoss": naive_siglip, "HopfieldLoss": naive_hopfield,
         "NTXentLoss": naive_ntxent, "VICRegLoss": naive_vicreg, "DCCALoss": naive_dcca, "S2LLoss": naive_s2l,
         "CWCLLoss": naive_cwcl, "SinkhornLoss": naive_sinkhorn}


# -- one measurement (in a child process) -----------------------------------------------------------
def measure(name: str, impl: str, batch: int, dim: int, repeats: int, device: str) -> dict:
    from unimodality import registry

    torch.manual_seed(0)
    loss = registry.registered("losses")[name][0].cls().to(device)
    group = torch.randint(0, batch // 4, (batch,), device=device)  # about four replicates per perturbation
    a0, b0 = torch.randn(batch, dim, device=device), torch.randn(batch, dim, device=device)
    if loss.normalized_inputs:  # VICReg and DCCA take the heads' raw outputs
        a0, b0 = F.normalize(a0, dim=1), F.normalize(b0, dim=1)
    else:
        b0 = 0.5 * a0 + b0  # correlated, as paired outputs are
    compute = (lambda a, b: loss(a, b, group)) if impl == "unimodality" else (
        lambda a, b: NAIVE[name](loss, a, b, group))

    def step() -> float:
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        value = compute(a, b)
        value.backward()
        return float(value)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    value = step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"loss": name, "impl": impl, "batch": batch, "dim": dim, "value": value,
            "seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


def run_child(name, impl, batch, dim, repeats, device) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, impl, str(batch), str(dim), str(repeats), device],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--max-naive-sinkhorn", type=int, default=1024,
                        help="largest batch for the unrolled Sinkhorn reference (memory: iterations x n^2)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, impl, batch, dim, repeats, device = args.child
        print(json.dumps(measure(name, impl, int(batch), int(dim), int(repeats), device)))
        return

    rows = []
    header = f"{'loss':13s} {'batch':>5s} {'dim':>4s} {'ms':>9s} {'vs clip':>8s} {'naive ms':>9s} {'speedup':>8s} " \
             f"{'MiB':>8s} {'naive MiB':>9s} {'mem ratio':>9s}  agree"
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}\n{header}")
    clip_seconds: dict[tuple[int, int], float] = {}
    names = sorted(args.losses, key=lambda n: n != "ClipLoss")  # the baseline first
    for name in names:
        for batch in args.batch:
            for dim in args.dim:
                ours = run_child(name, "unimodality", batch, dim, args.repeats, args.device)
                if name == "ClipLoss":
                    clip_seconds[batch, dim] = ours["seconds"]
                if name == "SinkhornLoss" and batch > args.max_naive_sinkhorn:
                    naive = None
                else:  # the naive loop is slow at large batches: fewer repeats keep the run short
                    naive = run_child(name, "naive", batch, dim, max(1, args.repeats // 2), args.device)
                agree = None if naive is None else (
                    abs(ours["value"] - naive["value"]) <= 1e-4 * max(1.0, abs(naive["value"])))
                vs_clip = ours["seconds"] / clip_seconds[batch, dim] if (batch, dim) in clip_seconds else None
                row = {
                    **{k: ours[k] for k in ("loss", "batch", "dim")},
                    "seconds": ours["seconds"], "vs_clip": vs_clip,
                    "naive_seconds": naive["seconds"] if naive else None,
                    "speedup": naive["seconds"] / ours["seconds"] if naive else None,
                    "peak_mib": ours["peak_bytes"] / 2**20,
                    "naive_peak_mib": naive["peak_bytes"] / 2**20 if naive else None,
                    "memory_ratio": (ours["peak_bytes"] / naive["peak_bytes"])
                    if naive and naive["peak_bytes"] else None,
                    "value": ours["value"], "naive_value": naive["value"] if naive else None, "agree": agree,
                }
                rows.append(row)

                def show(value, form, none="n/a"):
                    return none if value is None else format(value, form)

                print(f"{name:13s} {batch:5d} {dim:4d} {1e3 * row['seconds']:9.2f} {show(vs_clip, '7.2f'):>7s}x "
                      f"{show(naive and 1e3 * row['naive_seconds'], '9.1f'):>9s} {show(row['speedup'], '7.1f'):>7s}x "
                      f"{row['peak_mib']:8.1f} {show(row['naive_peak_mib'], '9.1f'):>9s} "
                      f"{show(row['memory_ratio'], '.2f'):>9s}  "
                      f"{'skipped' if agree is None else 'yes' if agree else 'NO'}", flush=True)
    print("\nspeedup = naive time / unimodality time (forward+backward); mem ratio = unimodality / naive "
          "peak memory rise; vs clip = time / ClipLoss time at the same batch and dim")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "processor": platform.processor(), "rows": rows,
    }, indent=2))
    print(f"wrote {args.output}")
    if not all(r["agree"] is not False for r in rows):
        sys.exit("some losses disagree with their naive reference")


if __name__ == "__main__":
    main()
