"""What the command builds before it can answer: an option error imports no plugin and builds the options of
its own subcommand only; a short class name imports the plugins when jsonargparse first looks it up; the
command's help shows every subcommand though none of their options is built (benchmarks/startup.py times it)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from unimodality import registry
from unimodality.cli import main


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as a new process has it: no plugin loaded yet (the modules may be imported already)."""
    monkeypatch.setattr(registry, "_loaded", None)


@pytest.fixture
def built(monkeypatch) -> list[str]:
    """The subcommands whose options the next command builds (Lightning's subcommand parser, in full)."""
    seen: list[str] = []
    original = LightningCLI._prepare_subcommand_parser

    def record(self, klass, subcommand, **kwargs):
        seen.append(subcommand)
        return original(self, klass, subcommand, **kwargs)

    monkeypatch.setattr(LightningCLI, "_prepare_subcommand_parser", record)
    return seen


def _error(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip()


def test_an_option_error_loads_no_plugin_and_builds_one_subcommand(fresh_registry, built, capsys):
    err = _error(["fit", "--trainer.max_epochz", "3"], capsys)
    assert err == "unimodality fit: error: unknown option 'trainer.max_epochz'; did you mean 'trainer.max_epochs'?"
    assert registry._loaded is None
    assert built == ["fit"]


def test_a_short_class_name_loads_the_plugins_when_looked_up(fresh_registry, built, capsys):
    err = _error(["validate", "--model", "CrossModalSetup", "--model.loss", "ClipLos"], capsys)
    assert err.startswith("unimodality validate: error: option 'model.init_args.loss': unknown loss 'ClipLos'. "
                          "Did you mean 'ClipLoss'?"), err
    assert registry._loaded is not None and "CrossModalSetup" in registry._loaded["unimodality.setups"]
    assert built == ["validate"]


def test_the_command_help_lists_every_subcommand_without_building_them(fresh_registry, built, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for subcommand, description in [("fit", "Runs the full optimization routine."),
                                    ("validate", "Perform one evaluation epoch over the validation set."),
                                    ("test", "Perform one evaluation epoch over the test set."),
                                    ("predict", "Run inference on your data.")]:
        assert any(line.split()[:1] == [subcommand] and description in line for line in printed.splitlines()), (
            subcommand, printed)
    assert built == [] and registry._loaded is None


def test_subcommand_help_shows_its_own_options(built, capsys):
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    printed = capsys.readouterr().out
    assert "--trainer.max_epochs" in printed and "--ckpt_path" in printed
    assert built == ["test"]


@pytest.mark.slow  # a fresh interpreter (~10 s of imports)
def test_an_option_error_in_a_new_process_imports_no_plugin_module():
    code = ("import sys\nfrom unimodality.cli import main\ntry:\n    main(['fit', '--trainer.max_epochz', '3'])\n"
            "except SystemExit as stop:\n    assert stop.code == 2, stop.code\n"
            "print(sorted(m for m in sys.modules if m.startswith('unimodality.plugins') or m == 'pandas'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_lazy_default_is_what_jsonargparse_lazy_instance_builds():
    """The plugins' default objects (``lazy_default``, which skips lazy_instance's inspect.stack()) are the
    same lazy objects: the same class path and arguments in a config, a class of the caller's module, the
    real object on first use."""
    from jsonargparse import lazy_instance
    from jsonargparse.typing import _LazyInitBaseClass

    from unimodality.config import lazy_default
    from unimodality.plugins.losses.clip import ClipLoss

    ours, theirs = lazy_default(ClipLoss, init_scale=5.0), lazy_instance(ClipLoss, init_scale=5.0)
    assert isinstance(ours, _LazyInitBaseClass) and isinstance(ours, ClipLoss)
    assert ours.lazy_get_init_data() == theirs.lazy_get_init_data()
    assert type(ours).__module__ == __name__ and type(ours).__name__ == type(theirs).__name__
    assert type(lazy_default(ClipLoss)) is type(ours)  # one class per caller module, as jsonargparse's
    logits = torch.randn(4, 8)
    assert torch.equal(ours(logits, logits), ClipLoss(init_scale=5.0)(logits, logits))
