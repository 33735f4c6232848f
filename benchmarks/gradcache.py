"""Peak memory and time of one training step at a fixed effective batch: plain vs gradient-cached.

One ``CrossModalSetup`` (two MLP towers, ``ClipLoss`` by default) takes a whole optimizer step
(``training_step``, backward, AdamW step) on ``--rows`` rows, plainly and with ``grad_cache_chunk`` set to
each of ``--chunks``. All variants run in one child process (so glibc's mmap threshold can be pinned at
64 KiB and freed tensors leave the resident set): a warm-up step each (the optimizer state exists before
anything is measured; every variant starts from the same weights), then memory, the rise of the peak over
one step (CPU: the kernel's high-water mark is reset just before, ``/proc/self/clear_refs``, as
``benchmarks/losses.py`` does; GPU: ``torch.cuda.max_memory_allocated`` after a reset), then ``--repeats``
timing rounds, the variants interleaved and their order rotated each round. Times are medians with the
range over rounds; ratios to the plain step are medians of the per-round ratios. The losses of the
variants' first step are compared too (the same value up to float32 rounding; with ``--dropout`` the
chunks draw other masks than the whole batch, so they differ). Threads: 1 unless
``--threads``.

    python benchmarks/gradcache.py                              # CPU: 4096 rows, chunks 256/1024
    python benchmarks/gradcache.py --rows 16384 --chunks 1024 4096 --device cuda
    python benchmarks/gradcache.py --device cuda --output /tmp/gradcache.json

Writes ``benchmarks/results/grad_cache.json`` unless ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from losses import _reset_peak, _resident  # noqa: E402  (memory measured as the loss benchmark measures it)

RESULTS = Path(__file__).resolve().parent / "results" / "grad_cache.json"
#: defaults per device: (rows, chunks, input features, hidden sizes)
DEFAULTS = {"cpu": (4096, [256, 1024], 1000, [1024, 512]), "cuda": (16384, [1024, 4096], 2000, [4096, 2048])}


def measure(args: argparse.Namespace) -> dict:
    """Every variant's first-step loss, peak memory and step times (in the child process)."""
    from unimodality import registry
    from unimodality.batch import GROUP
    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.setups.cross_modal import CrossModalSetup

    device = torch.device(args.device)
    schema = {"a": {"features": [f"a{i}" for i in range(args.features)]},
              "b": {"features": [f"b{i}" for i in range(args.features // 2)]}}
    torch.manual_seed(0)
    base = CrossModalSetup(
        encoders={n: partial(MLPEncoder, hidden_sizes=args.hidden, dropout=args.dropout) for n in schema},
        loss=registry.registered("losses")[args.loss][0].cls(), embed_dim=args.embed_dim,
    )
    base.build(schema)
    base.is_logging_step = lambda: False  # no trainer: one step as Lightning would take it, without logging
    base.to(device).train()
    generator = torch.Generator().manual_seed(1)
    batch = {n: torch.randn(args.rows, len(e["features"]), generator=generator).to(device) for n, e in schema.items()}
    batch[GROUP] = torch.randint(0, args.rows // 4, (args.rows,), generator=generator).to(device)
    variants = {"plain": None} | {f"chunk {c}": c for c in args.chunks}
    models, optimizers = {}, {}
    for name, chunk in variants.items():
        models[name] = copy.deepcopy(base)
        models[name].grad_cache_chunk = chunk
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    del base

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(name: str, seed: int = 0) -> float:
        torch.manual_seed(seed)
        loss = models[name].training_step(batch, 0)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return float(loss.detach())

    values = {name: step(name) for name in variants}  # warm-up: the first step of each, from the same weights
    peaks, method = {}, None
    for name in variants:
        sync()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start, method = torch.cuda.memory_allocated(), "cuda.max_memory_allocated"
        elif _resident() is not None and _reset_peak():
            start, method = _resident()[1], "VmHWM rise after clear_refs"
        step(name)
        sync()
        if device.type == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated() - start
        else:
            peaks[name] = _resident()[0] - start if method else None
    times = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotate the order
            sync()
            begin = time.perf_counter()
            step(name)
            sync()
            times[name].append(time.perf_counter() - begin)
    return {"values": values, "peak_bytes": peaks, "times": times, "memory_method": method,
            "threads": torch.get_num_threads(), "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu"}


def summarize(args: argparse.Namespace, child: dict) -> dict:
    times, peaks, values = child["times"], child["peak_bytes"], child["values"]
    rows = []
    for name in times:
        ratios = [t / p for t, p in zip(times[name], times["plain"])]
        rows.append({
            "variant": name, "chunk": None if name == "plain" else int(name.split()[1]),
            "seconds": {"median": statistics.median(times[name]), "min": min(times[name]),
                        "max": max(times[name]), "rounds": len(times[name])},
            "time_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "peak_mib": None if peaks[name] is None else peaks[name] / 2**20,
            "memory_ratio": peaks[name] / peaks["plain"] if peaks[name] and peaks["plain"] else None,
            "loss": values[name],
            "agree": abs(values[name] - values["plain"]) <= 1e-4 * max(1.0, abs(values["plain"])),
        })
    settings = {key: getattr(args, key) for key in ("rows", "features", "hidden", "embed_dim", "dropout", "loss",
                                                     "repeats", "threads", "device")}
    return {"settings": settings, "memory_method": child["memory_method"], "device_name": child["device_name"],
            "results": rows}


def table(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"{s['rows']} rows, MLP {s['features']}->{s['hidden']}->{s['embed_dim']} x2 towers, {s['loss']}, "
             f"{summary['device_name']}, {s['threads']} thread(s); memory: {summary['memory_method']}",
             f"{'variant':<12} {'peak MiB':>9} {'x plain':>8} {'step s (min-max)':>22} {'x plain (min-max)':>20} "
             f"{'loss':>10}"]
    for r in summary["results"]:
        t, q = r["seconds"], r["time_ratio"]
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        ratio = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        lines.append(f"{r['variant']:<12} {peak:>9} {ratio:>8} "
                     f"{t['median']:>8.3f} ({t['min']:.3f}-{t['max']:.3f}) "
                     f"{q['median']:>7.2f} ({q['min']:.2f}-{q['max']:.2f}) {r['loss']:>10.5f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, help="effective batch (default: 4096 on CPU, 16384 on a GPU)")
    parser.add_argument("--chunks", type=int, nargs="+", help="grad_cache_chunk values (default per device)")
    parser.add_argument("--features", type=int, help="input width of tower a (tower b: half)")
    parser.add_argument("--hidden", type=int, nargs="+", help="the towers' hidden sizes")
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="the towers' dropout (default 0: the losses of the variants then agree)")
    parser.add_argument("--loss", default="ClipLoss")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows, chunk_sizes, features, hidden = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    args.rows, args.chunks = args.rows or rows, args.chunks or chunk_sizes
    args.features, args.hidden = args.features or features, args.hidden or hidden
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child"], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        sys.exit(f"benchmark child failed:\n{out.stderr[-4000:]}")
    summary = summarize(args, json.loads(out.stdout.strip().splitlines()[-1]))
    print(table(summary))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
