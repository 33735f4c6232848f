"""Third-party plugins: a package installed elsewhere registers a loss by entry point and the CLI uses it;
a plugin that fails to import is skipped with a warning instead of breaking the CLI.

The two packages under ``tests/plugins/`` are installed with pip into a temporary folder (never into the
environment). Training with the third-party loss runs the ``unimodality`` command in a new process with that
folder on ``PYTHONPATH``; the other cases put it on this process's ``sys.path`` (what ``PYTHONPATH`` does) and
run the command in-process, the registry loaded afresh as in a new process (a new process costs ~10 s of
imports).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from unimodality import registry
from unimodality.cli import main
from unimodality.loss import ContrastiveLoss

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"
CLIP_CONFIG = ROOT / "configs" / "clip.yaml"


def _pip_install(package: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install ``tests/plugins/<package>`` into a fresh folder; return that folder (a PYTHONPATH entry)."""
    root = tmp_path_factory.mktemp(package)
    source = root / "src"
    # build from a copy: setuptools leaves build/ and *.egg-info next to the sources it builds
    shutil.copytree(PLUGINS / package, source)
    site = root / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input",
         "--disable-pip-version-check", "--target", str(site), str(source)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"pip install of {package} failed:\n{result.stdout}\n{result.stderr}"
    return site


@pytest.fixture(scope="module")
def fancy_site(tmp_path_factory) -> Path:
    return _pip_install("fancy_loss", tmp_path_factory)


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    return _pip_install("broken_plugin", tmp_path_factory)


def _unimodality(args: list[str], sites: list[Path], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run the ``unimodality`` command with ``sites`` on PYTHONPATH (the example data dir is inherited)."""
    environment = dict(os.environ, PYTHONWARNINGS="default", **env)  # the plugin warning must be shown
    paths = [str(s) for s in sites] + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else [])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run(
        [sys.executable, "-m", "unimodality", *args],
        cwd=cwd, env=environment, check=False, capture_output=True, text=True, timeout=180,
    )


def _fancy_args(*extra: str) -> list[str]:
    return ["fit", "--config", str(CLIP_CONFIG), "--model.loss", "FancyLoss", "--model.loss.temperature", "0.2",
            *extra]


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.fixture
def on_sys_path(monkeypatch):
    """``on_sys_path(*sites)``: the sites on this process's ``sys.path`` (as ``PYTHONPATH`` puts them on a new
    one's), the registry unloaded so the next command loads the plugins afresh, as a new process's first
    command does. Afterwards: the path and modules as before, the registry reloaded without the sites."""
    path, modules = list(sys.path), set(sys.modules)

    def install(*sites: Path) -> None:
        sys.path[:0] = [str(s) for s in sites]
        importlib.invalidate_caches()
        monkeypatch.setattr(registry, "_loaded", None)

    try:
        yield install
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if name.split(".")[0] in ("fancy_loss", "broken_plugin"):
                del sys.modules[name]
        importlib.invalidate_caches()
        registry.load_plugins(reload=True)


def _print_config(args: list[str], capsys) -> str:
    """``unimodality <args>`` (ending in --print_config) in-process; what it printed on stdout."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    printed = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"exit {exit_info.value.code}\nstderr:\n{printed.err}"
    return printed.out


# -- an installed third-party loss --------------------------------------------------------------------
def test_plugins_command_lists_the_third_party_loss(fancy_site, on_sys_path, capsys):
    on_sys_path(fancy_site)
    with warnings.catch_warnings():
        warnings.simplefilter("error", registry.PluginLoadWarning)  # none may be issued
        main(["plugins"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["FancyLoss", "fancy_loss.FancyLoss", "(unimodality-fancy-loss)"] in lines, lines
    assert ["ClipLoss", "unimodality.plugins.losses.clip.ClipLoss", "(unimodality)"] in lines


def test_fit_trains_with_the_third_party_loss(fancy_site, on_sys_path, tmp_path, capsys):
    on_sys_path(fancy_site)
    loss = yaml.safe_load(_print_config(_fancy_args("--print_config"), capsys))["model"]["init_args"]["loss"]
    assert loss == {"class_path": "fancy_loss.FancyLoss", "init_args": {"temperature": 0.2, "use_groups": True}}

    # the real thing: a new `unimodality` process finds the plugin through PYTHONPATH and trains with it
    evidence = tmp_path / "evidence.txt"
    trained = _unimodality(
        _fancy_args("--trainer.fast_dev_run", "2"), [fancy_site], tmp_path, FANCY_LOSS_EVIDENCE=str(evidence)
    )
    _check(trained)
    # the plugin itself records that it was built with the configured temperature and computed a loss
    lines = evidence.read_text().splitlines()
    assert lines[0] == "init temperature=0.2"
    assert any(line.startswith("forward temperature=0.2 batch=64") for line in lines), lines


# -- a plugin that cannot be imported -----------------------------------------------------------------
def _assert_broken_warning(caught) -> None:
    messages = [str(w.message) for w in caught if issubclass(w.category, registry.PluginLoadWarning)]
    assert messages, [str(w.message) for w in caught]
    warning = messages[0]
    for part in ("'BrokenLoss'", "broken_plugin:BrokenLoss", "'unimodality.losses'", "'unimodality-broken-plugin'",
                 "ImportError"):
        assert part in warning, warning


def test_broken_plugin_is_skipped_with_a_warning(fancy_site, broken_site, on_sys_path, capsys):
    on_sys_path(fancy_site, broken_site)
    with pytest.warns(registry.PluginLoadWarning) as caught:
        main(["plugins"])
    _assert_broken_warning(caught)
    printed = capsys.readouterr().out
    assert "BrokenLoss" not in printed
    assert "fancy_loss.FancyLoss" in printed  # the healthy plugins still load


def test_broken_plugin_does_not_break_config_parsing(fancy_site, broken_site, on_sys_path, capsys):
    on_sys_path(fancy_site, broken_site)
    with pytest.warns(registry.PluginLoadWarning) as caught:
        printed = _print_config(_fancy_args("--print_config"), capsys)
    _assert_broken_warning(caught)
    assert "class_path: fancy_loss.FancyLoss" in printed


# -- the registry, in process ---------------------------------------------------------------------
class OtherClipLoss(ContrastiveLoss):
    """A second loss exported under the name ``ClipLoss`` by another (fake) package."""


class FakeEntryPoint(importlib.metadata.EntryPoint):
    """A real entry point (its ``load`` imports ``value``) that claims to come from ``dist_name``."""

    def __init__(self, name: str, value: str, group: str, dist_name: str) -> None:
        super().__init__(name, value, group)
        vars(self).update(dist=SimpleNamespace(name=dist_name))


@pytest.fixture
def fake_entry_points():
    """Add a failing entry point and a second ``ClipLoss`` (from another package) to the losses group."""
    real = importlib.metadata.entry_points
    group = "unimodality.losses"
    extra = [
        FakeEntryPoint("GhostLoss", "unimodality_no_such_module:GhostLoss", group, "ghost-pkg"),
        FakeEntryPoint("ClipLoss", f"{__name__}:OtherClipLoss", group, "other-pkg"),
    ]

    class Every:  # what entry_points() returns: selectable by group
        @staticmethod
        def select(**selection):
            found = list(real().select(**selection))
            return found + extra if selection.get("group") == group else found

    def entry_points(**selection):
        return Every.select(**selection) if selection else Every()

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(registry.importlib.metadata, "entry_points", entry_points)
            yield
    finally:
        registry.load_plugins(reload=True)  # don't leave the fake plugins for other tests


def test_registry_skips_failing_entry_points_and_reports_ambiguity(fake_entry_points):
    with pytest.warns(registry.PluginLoadWarning) as caught:
        loaded = registry.load_plugins(reload=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    for part in ("'GhostLoss'", "unimodality_no_such_module:GhostLoss", "'ghost-pkg'", "ModuleNotFoundError"):
        assert part in messages[0]

    losses = loaded["unimodality.losses"]
    assert "GhostLoss" not in losses
    assert [(p.class_path, p.dist) for p in losses["ClipLoss"]] == [
        ("unimodality.plugins.losses.clip.ClipLoss", "unimodality"),
        (f"{__name__}.OtherClipLoss", "other-pkg"),
    ]
    assert registry.load_plugins() is loaded  # cached until reload

    ambiguous = registry.unknown_name_hint("ClipLoss")
    assert (
        "'ClipLoss' is exported by several plugins "
        f"(unimodality.plugins.losses.clip.ClipLoss, {__name__}.OtherClipLoss): use the full class path."
    ) in ambiguous
    losses_line = next(line for line in ambiguous.splitlines() if line.strip().startswith("losses:"))
    assert "ClipLoss" in losses_line.split(":", 1)[1].replace(",", " ").split() and "GhostLoss" not in ambiguous

    assert registry.unknown_name_hint("CrossModalSetp").startswith("Did you mean 'CrossModalSetup'?")
    assert registry.unknown_name_hint("some.module.MLPEncodr").startswith("Did you mean 'MLPEncoder'?")
    assert "Did you mean" not in registry.unknown_name_hint("Zzzzzz")


def test_registry_is_clean_again_after_the_fake_entry_points():
    with warnings.catch_warnings():
        warnings.simplefilter("error", registry.PluginLoadWarning)
        losses = registry.registered("losses")
    assert [p.class_path for p in losses["ClipLoss"]] == ["unimodality.plugins.losses.clip.ClipLoss"]
