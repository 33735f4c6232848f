"""Startup cost of the ``unimodality`` command: ``--help`` and an argument error, against the floor every
command pays, ``python -c "import torch, lightning"``, measured in the same run.

Each case is a fresh interpreter; the cases are interleaved round by round (``--repeats`` rounds) so that
a change in the machine's load hits them alike. Reported per case: median wall time and CPU time (user +
system of the child) with their spread (min-max), and the ratio of the median wall time over the floor's.
``eager --help`` imports what ``import unimodality`` and the command imported before issue 16 (every public
class, the evaluation stack and every plugin) and then prints the help: the "before" of the lazy imports.

    OMP_NUM_THREADS=1 python benchmarks/startup.py --repeats 5

Writes ``benchmarks/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"
EAGER = ("import unimodality.augmentation, unimodality.datamodule, unimodality.encoder, unimodality.evaluation, "
         "unimodality.loss, unimodality.setup, unimodality.sources, unimodality.tower; "
         "from unimodality import registry; registry.load_plugins(); from unimodality.cli import main; ")
CASES = {
    "import torch, lightning": ["-c", "import torch, lightning"],
    "unimodality --help": ["-m", "unimodality", "--help"],
    "unimodality fit --help": ["-m", "unimodality", "fit", "--help"],
    "argument error": ["-m", "unimodality", "fit", "--trainer.max_epochz", "3"],
    "eager --help (before)": ["-c", EAGER + "main(['--help'])"],
}


def run_once(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh interpreter running ``args``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in CASES}
    run_once(CASES["import torch, lightning"][:])  # warm the file cache: the first interpreter reads from disk
    for _ in range(options.repeats):
        for name, args in CASES.items():
            times[name].append(run_once(args))
    floor = statistics.median(w for w, _ in times["import torch, lightning"])
    results = {}
    print(f"{'case':28s} {'wall s (min-max)':>22s} {'cpu s (min-max)':>22s} {'x floor':>8s}")
    for name, rounds in times.items():
        walls, cpus = [w for w, _ in rounds], [c for _, c in rounds]
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        results[name] = {"wall_s": wall, "cpu_s": cpu, "wall_min": min(walls), "wall_max": max(walls),
                         "cpu_min": min(cpus), "cpu_max": max(cpus), "ratio_to_floor": wall / floor}
        print(f"{name:28s} {wall:8.2f} ({min(walls):.2f}-{max(walls):.2f}) {cpu:9.2f} ({min(cpus):.2f}-{max(cpus):.2f})"
              f" {wall / floor:8.2f}")
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps({
        "repeats": options.repeats, "python": sys.version.split()[0], "machine": platform.platform(),
        "cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    print(f"written to {options.output}")


if __name__ == "__main__":
    main()
