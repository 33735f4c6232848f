"""The benchmarks run: each is a script people run by hand, so a renamed internal must not break one unseen."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from tests.helpers import BENCHMARKS, load_benchmark


@pytest.mark.slow  # about 20 s on a quiet machine: five training loops
def test_train_overhead_breakdown_runs_every_variant_on_the_same_work(example_data_dir, tmp_path):
    out = tmp_path / "overhead.json"
    with redirect_stdout(io.StringIO()) as printed:
        load_benchmark("train_overhead").main(["--breakdown", "--epochs", "1", "--warmup", "0", "--repeats", "1",
                                               "--hidden", "32", "--out", str(out)])
    written = json.loads(out.read_text())
    summary = written["summary"] if "summary" in written else written
    variants = [v for v in summary if "ratio_vs_plain" in summary[v]]
    assert len(variants) == 5, summary.keys()  # the fused plain loop, Lightning, the three breakdown variants
    assert all("ratio_vs_plain_fused" in summary[v] for v in variants if v != "plain, fused AdamW")
    assert "did not do the same work" not in printed.getvalue()


def test_methods_merge_refuses_other_folds(tmp_path):
    methods = load_benchmark("methods")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"folds": 3, "seed": 0, "per_fold": {"KD": []}, "seconds": {"KD": 1.0}}))
    args = methods.argparse.Namespace(merge=[earlier], folds=5, seed=0)
    with pytest.raises(SystemExit, match="the folds differ"):
        methods.merged(args, {}, {})
    args.folds = 3
    per_fold, seconds = {"ridge": [{"fold": 0}]}, {"ridge": 0.5}
    methods.merged(args, per_fold, seconds)
    assert set(per_fold) == {"ridge", "KD"} and seconds["KD"] == 1.0


@pytest.mark.slow  # about 30 s: two folds, one epoch, two setups
def test_methods_trains_setups_on_the_citefuse_folds(shared_data, tmp_path):
    out = tmp_path / "methods.json"
    with redirect_stdout(io.StringIO()):
        load_benchmark("methods").main(["--data", str(shared_data / "citefuse_eccite_pbmc"), "--folds", "2",
                                        "--settings", '{"max_epochs": 1}', "--methods", "ridge", "KD", "SemiClipped",
                                        "--output", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"ridge", "KD", "SemiClipped"}
    for method in ("KD", "SemiClipped"):
        assert 0 < summary[method]["mrr"]["mean"] <= 1 and len(summary[method]["mrr"]["per_fold"]) == 2
        assert summary[method]["mrr_minus_ridge"]["baseline"] == "ridge"


@pytest.mark.slow  # about 40 s: the baselines and two one-epoch runs of a config
def test_methods_example_half_runs_configs_next_to_baselines(tmp_path):
    out = tmp_path / "example.json"
    with redirect_stdout(io.StringIO()):
        load_benchmark("methods").main(["--example", "--epochs", "1", "--seeds", "0", "1", "--methods", "KD",
                                        "--output", str(out)])
    written = json.loads(out.read_text())
    assert set(written["summary"]) == {"ridge", "CCA", "KD"}
    # the example's tx -> ph map is close to linear: ridge is far above chance; one epoch of KD is not
    chance = written["per_seed"]["KD"][0]["chance_mrr"]
    assert written["summary"]["ridge"]["mrr"]["mean"] > 3 * chance
    assert [r["epochs"] for r in written["per_seed"]["KD"]] == [1, 1]


@pytest.mark.slow  # about 15 s: two child processes
def test_losses_benchmark_checks_dino_and_kd_against_their_references(tmp_path):
    out = tmp_path / "losses.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "losses.py"), "--losses", "DINOLoss", "KDLoss", "--batch", "32",
                    "--dim", "16", "--repeats", "1", "--output", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert {r["loss"] for r in rows} == {"DINOLoss", "KDLoss"}
    assert all(r["agree"] is True and r["value"] > 0 for r in rows)


@pytest.mark.slow  # about 90 s: two short fits (one with 2 gloo processes), the gradient-cache and loss benchmarks
def test_gpu_check_dry_run_on_cpu_passes_every_step(tmp_path):
    # the GPU check runs rarely, on a machine lent for minutes: its CPU dry run keeps it from breaking unseen
    env = {**os.environ, "GPU_CHECK_ACCELERATOR": "cpu",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), str(tmp_path)], env=env, check=True,
                   capture_output=True, timeout=900)
    steps = {s["step"]: s["status"] for s in json.loads((tmp_path / "summary.json").read_text())}
    assert set(steps) == {"env", "bf16_fit", "ddp_fit", "zero2", "zero3", "gradcache", "losses"}, steps
    assert all(status == "ok" or status.startswith("skipped") for status in steps.values()), steps
    rows = json.loads((tmp_path / "losses.json").read_text())["rows"]
    assert rows and all(r["anchor"]["agree"] for r in rows)
