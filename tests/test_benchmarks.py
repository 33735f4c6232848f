"""The benchmarks run: each is a script people run by hand, so a renamed internal must not break one unseen."""

from __future__ import annotations

import importlib.util
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # about 15 s on a quiet machine: four training loops
def test_train_overhead_breakdown_runs_every_variant_on_the_same_work(example_data_dir, tmp_path):
    out = tmp_path / "overhead.json"
    with redirect_stdout(io.StringIO()) as printed:
        load("train_overhead").main(["--breakdown", "--epochs", "1", "--warmup", "0", "--repeats", "1",
                                     "--hidden", "32", "--out", str(out)])
    written = json.loads(out.read_text())
    summary = written["summary"] if "summary" in written else written
    variants = [v for v in summary if "ratio_vs_plain" in summary[v]]
    assert len(variants) == 3, summary.keys()  # Lightning, and the two breakdown variants
    assert "did not do the same work" not in printed.getvalue()
