"""Predict against a plain PyTorch loop: time and peak memory embedding a large CSR ``.h5ad`` with a trained tower.

Trains CLIP for one epoch on the example data (a checkpoint with a 500-gene transcriptomics tower), writes a CSR
``.h5ad`` of ``--cells`` cells (the example cells repeated, default 201,800), then embeds it, each run in a
fresh process (so its peak resident memory, VmHWM, is its own, and its modules compiled as an installed package
has them) and timed after the imports:

  ours      ``unimodality predict`` in memory, and with ``--data.streaming true``, writing a parquet output
  plain     the same tower by hand: ``anndata.read_h5ad``, ``normalize_log1p`` per batch, the tower's forward
            under ``torch.no_grad`` in slices of 512 rows, metadata + embedding columns written with pyarrow

Runs alternate (plain, ours, streaming, then the reverse) over ``--repeats``; prints medians with their range,
the time and memory ratios ours / plain (goal: <= 1.05 in time, <= 1.2 in memory), checks that the embeddings
agree, and writes ``benchmarks/results/predict.json``.

    OMP_NUM_THREADS=1 python benchmarks/predict.py [--cells 201800] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "predict.json"
ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
import numpy as np, torch, anndata, pandas, pyarrow, lightning
"""

OURS = PRELUDE + """
from unimodality.cli import main
ckpt, path, out, streaming = sys.argv[1:5]
base, t = hwm(), time.perf_counter()
main(["predict", "--ckpt_path", ckpt, "--data.path", path, "--data.output", out, "--data.overwrite", "true",
      "--data.streaming", streaming, "--data.batch_size", "512", "--trainer.enable_progress_bar", "false"])
print(json.dumps({"seconds": time.perf_counter() - t, "base": base, "peak": hwm()}))
"""

PLAIN = PRELUDE + """
import pyarrow.parquet as pq
tower_file, path, out = sys.argv[1:4]
base, t = hwm(), time.perf_counter()
tower = torch.load(tower_file, weights_only=False).eval()  # the trained tower, saved by this benchmark
adata = anndata.read_h5ad(path)
X = adata.X
chunks = []
with torch.no_grad():
    for start in range(0, X.shape[0], 512):
        block = X[start:start + 512].toarray().astype(np.float32)
        block *= 1e4 / np.maximum(block.sum(1, keepdims=True), 1e-12)
        chunks.append(tower(torch.from_numpy(np.log1p(block))).numpy())
embedding = np.concatenate(chunks)
table = adata.obs.reset_index(names="obs_names")
for j in range(embedding.shape[1]):
    table[f"X_unimodality_{j}"] = embedding[:, j]
pq.write_table(pyarrow.Table.from_pandas(table, preserve_index=False), out)
print(json.dumps({"seconds": time.perf_counter() - t, "base": base, "peak": hwm()}))
"""


def save_tower(ckpt: Path, out: Path) -> Path:
    """The checkpoint's transcriptomics tower as a whole module, for the plain loop to load."""
    import torch

    from unimodality.plugins.setups.cross_modal import CrossModalSetup

    torch.save(CrossModalSetup.load_from_checkpoint(ckpt, map_location="cpu").towers["tx"], out)
    return out


def checkpoint(folder: Path) -> Path:
    from unimodality.cli import main

    found = sorted(folder.rglob("last.ckpt"))
    if found:
        return found[0]
    with redirect_stdout(io.StringIO()):
        main(["fit", "--config", str(ROOT / "configs" / "clip.yaml"), "--trainer.max_epochs", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(folder)])
    return sorted(folder.rglob("last.ckpt"))[0]


def big_file(path: Path, cells: int) -> Path:
    import anndata as ad
    import scipy.sparse as sp

    from unimodality.paths import resolve_path

    if path.exists():
        return path
    example = ad.read_h5ad(resolve_path("example://transcriptomics.h5ad"))
    repeats = -(-cells // example.n_obs)
    X = sp.vstack([sp.csr_matrix(example.X)] * repeats, format="csr")[:cells]
    obs = example.obs.iloc[np.arange(cells) % example.n_obs].reset_index(drop=True)
    obs.index = [f"cell{i}" for i in range(cells)]
    big = ad.AnnData(X=X.astype(np.float32), obs=obs, var=example.var)
    big.write_h5ad(path)
    return path


def bytecode_env(folder: Path) -> dict[str, str]:
    """The environment of the timed runs: unimodality's modules compiled once into ``folder``, as an installed
    package has them (pip compiles at install), even where PYTHONDONTWRITEBYTECODE is set (this machine
    sets it: every run would otherwise compile the package again, 0.2-0.5 s that users never pay)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONWARNINGS="ignore", PYTHONPYCACHEPREFIX=str(folder))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "unimodality")], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return env


def run(script: str, *args: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/unimodality-predict")
    parser.add_argument("--cells", type=int, default=201_800)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(folder / "run")
    data = big_file(folder / f"cells_{args.cells}.h5ad", args.cells)
    tower = save_tower(ckpt, folder / "tx_tower.pt")
    outputs = {name: folder / f"{name}.parquet" for name in ("plain", "ours", "streaming")}
    env = bytecode_env(folder / "pycache")
    times: dict[str, list[dict]] = {name: [] for name in outputs}
    for repeat in range(args.repeats):
        order = list(outputs) if repeat % 2 == 0 else list(outputs)[::-1]
        for name in order:
            if name == "plain":
                result = run(PLAIN, tower, data, outputs[name], env=env)
            else:
                result = run(OURS, ckpt, data, outputs[name], "true" if name == "streaming" else "false", env=env)
            times[name].append(result)
            print(f"  repeat {repeat + 1} {name:9s} {result['seconds']:7.2f} s, peak over baseline "
                  f"{(result['peak'] - result['base']) / 1e6:8.1f} MB", flush=True)

    import pandas as pd

    embeddings = {name: pd.read_parquet(path).filter(like="X_unimodality_").to_numpy()
                  for name, path in outputs.items()}
    agreement = {name: float(np.abs(embeddings[name] - embeddings["plain"]).max()) for name in ("ours", "streaming")}
    summary = {}
    for name, results in times.items():
        seconds = [r["seconds"] for r in results]
        memory = [(r["peak"] - r["base"]) / 1e6 for r in results]
        summary[name] = {"median_s": statistics.median(seconds), "range_s": [min(seconds), max(seconds)],
                         "median_peak_mb": statistics.median(memory), "range_peak_mb": [min(memory), max(memory)]}
    for name in ("ours", "streaming"):
        summary[name]["time_vs_plain"] = summary[name]["median_s"] / summary["plain"]["median_s"]
        summary[name]["memory_vs_plain"] = summary[name]["median_peak_mb"] / summary["plain"]["median_peak_mb"]
        summary[name]["max_abs_difference_to_plain"] = agreement[name]
    print(f"\n{args.cells:,} cells x 500 genes (CSR), medians of {args.repeats}:")
    for name, s in summary.items():
        ratios = (f"  time {s['time_vs_plain']:.2f}x plain, memory {s['memory_vs_plain']:.2f}x plain, "
                  f"max |difference| {s['max_abs_difference_to_plain']:.1e}" if name != "plain" else "")
        print(f"  {name:9s} {s['median_s']:7.2f} s ({s['range_s'][0]:.2f}-{s['range_s'][1]:.2f}), peak "
              f"{s['median_peak_mb']:7.1f} MB{ratios}")
    print("goal: time <= 1.05x and memory <= 1.2x plain")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"options": vars(args), "summary": summary, "runs": times,
                                   "machine": platform.platform()}, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
