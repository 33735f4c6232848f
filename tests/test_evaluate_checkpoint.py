"""``unimodality evaluate`` with a checkpoint embedding honours the trust model of ``predict``: a checkpoint
holding anything but tensors is refused unless trusted, a hostile one runs no code, and the classes a
checkpoint names are checked even when it is trusted."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers import example_datamodule, quiet_trainer
from tests.test_evaluate_callback import FILES, small_clip
from unimodality.cli import main
from unimodality.errors import CheckpointError, DataError
from unimodality.evaluation import evaluate

OPTIONS = dict(perturbation=["smiles", "concentration"], evaluators=["CrossModalRetrieval"], baselines=[],
               source_options={"include": {"split": ["test"]}})


class Hostile:
    """Unpickling it runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, example_data_dir) -> Path:
    """A checkpoint of a CLIP model trained for a few steps on the example data."""
    model = small_clip()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=example_datamodule())
    path = tmp_path_factory.mktemp("trust") / "clip.ckpt"
    trainer.save_checkpoint(path)
    return path


def altered(trained: Path, folder: Path, name: str, change) -> Path:
    content = torch.load(trained, weights_only=True)
    change(content)
    path = folder / name
    torch.save(content, path)
    return path


def test_a_hostile_checkpoint_is_refused_and_runs_nothing(trained, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    hostile = altered(trained, tmp_path, "hostile.ckpt", lambda c: c.__setitem__("payload", Hostile(marker)))
    with pytest.raises(CheckpointError, match="hostile.ckpt: holds objects .* refused .* --trust_checkpoint true"):
        evaluate(FILES, embedding=str(hostile), **OPTIONS)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--inputs", FILES[1], "--embedding", str(hostile), "--perturbation", "smiles",
              "--evaluators", "[KNNClassification]", "--labels", "smiles", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("unimodality evaluate: error:") and "hostile.ckpt" in message and "\n" not in message
    assert not marker.exists()  # refused before unpickling anything
    assert not (tmp_path / "out").exists()


def test_weights_only_false_needs_trust_checkpoint(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--inputs", FILES[1], "--embedding", str(trained), "--weights_only", "false",
              "--perturbation", "smiles", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert "--weights_only false unpickles" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_trusted_checkpoint_is_unpickled_with_a_warning_and_embeds_alike(trained, tmp_path):
    # a date is not a tensor or a plain container: refused by default, read when trusted
    dated = altered(trained, tmp_path, "dated.ckpt", lambda c: c.__setitem__("saved", datetime.date(2024, 1, 1)))
    with pytest.raises(CheckpointError, match="--trust_checkpoint true"):
        evaluate(FILES, embedding=str(dated), **OPTIONS)
    plain = evaluate(FILES, embedding=str(trained), **OPTIONS)
    with pytest.warns(UserWarning, match="weights_only=False"):
        trusted = evaluate(FILES, embedding=str(dated), trust_checkpoint=True, **OPTIONS)
    assert len(plain) == 8 and plain["n"].eq(40).all()
    pd.testing.assert_frame_equal(plain, trusted)
    # the same from the command line, with predict's option
    out = tmp_path / "cli"
    main(["evaluate", "--inputs", f"[{FILES[0]}, {FILES[1]}]", "--embedding", str(dated), "--trust_checkpoint",
          "true", "--weights_only", "false", "--perturbation", "[smiles, concentration]", "--evaluators",
          "[CrossModalRetrieval]", "--baselines", "[]", "--source_options", "{include: {split: [test]}}",
          "--output", str(out)])
    written = pd.read_csv(out / "evaluation.csv")
    assert written["value"].tolist() == pytest.approx(plain["value"].tolist(), abs=1e-6)


def test_a_trusted_checkpoint_may_still_name_only_allowed_classes(trained, tmp_path):
    def popen(content):
        content["hyper_parameters"]["_class_path"] = "subprocess.Popen"
        content["saved"] = datetime.date(2024, 1, 1)

    bad = altered(trained, tmp_path, "popen.ckpt", popen)
    with pytest.raises(DataError, match="subprocess.Popen"):
        evaluate(FILES, embedding=str(bad), trust_checkpoint=True, **OPTIONS)
