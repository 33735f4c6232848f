from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def example_data_dir(tmp_path_factory) -> Path:
    """Generate the example data once per session into a temporary cache (never the user's)."""
    root = tmp_path_factory.mktemp("unimodality-data")
    os.environ["UNIMODALITY_DATA_DIR"] = str(root)
    from unimodality.example_data import FILES, VERSION, resolve_path

    for name in FILES:
        resolve_path(f"example://{name}")
    return root / f"example-{VERSION}"


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    """Tests run as if not inside a Slurm job (even when the suite is): runs get their usual directories.
    The tests that submit real jobs set what their jobs need themselves."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def shared_data() -> Path:
    """The workplace's small real datasets (../shared/data); tests using them skip elsewhere."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def example_tables(example_data_dir):
    """The example transcriptomics (AnnData) and phenomics (DataFrame), read once; copy before changing."""
    import anndata as ad
    import pandas as pd

    return ad.read_h5ad(example_data_dir / "transcriptomics.h5ad"), pd.read_parquet(
        example_data_dir / "phenomics.parquet")


@pytest.fixture(scope="session")
def clip_run_dir(tmp_path_factory, example_data_dir) -> Path:
    """The run directory of one 1-epoch CLI fit of configs/clip.yaml, trained once per session for the tests
    that only need a trained CLIP checkpoint. Tests use a copy (``tests.helpers.copy_of_clip_run``)."""
    from unimodality.cli import main

    root = tmp_path_factory.mktemp("clip-run")
    main(["fit", "--config", str(ROOT / "configs" / "clip.yaml"), "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.logger.init_args.save_dir", str(root / "runs")])
    run_dir = root / "runs" / "clip" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir
