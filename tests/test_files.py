"""Files written whole: the umask's mode, recognisable temporary names cleaned up after dead writers, and a
full disk reported as such with the previous file left as it was."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from unimodality import files
from unimodality.checkpoint import AtomicCheckpointIO, read_checkpoint
from unimodality.files import TEMP_MARK, atomic_write, remove_stale_temps, temp_path
from unimodality.outputs import _atomic_write, write_embeddings, write_shard
from unimodality.plugins.sources.table import TableSource
from unimodality.sources import DataError
from unimodality.streaming import table_cache


def digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"*{TEMP_MARK}*"))


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after it)."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.fixture
def table(tmp_path) -> Path:
    frame = pd.DataFrame(np.random.default_rng(0).random((50, 4)), columns=[f"feat_{j}" for j in range(4)])
    frame.insert(0, "key", [f"k{i}" for i in range(50)])
    path = tmp_path / "input" / "table.parquet"
    path.parent.mkdir()
    frame.to_parquet(path)
    return path


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, table, umask, mask, mode):
    umask(mask)
    out = tmp_path / "out"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, out / "last.ckpt")
    metadata, rows = pd.DataFrame({"well": ["a", "b"]}), np.arange(2)
    write_embeddings(table, metadata, rows, np.zeros((2, 4), np.float32), out / "emb.parquet")
    write_embeddings(table, metadata, rows, np.zeros((2, 4), np.float32), out / "emb.h5ad")
    write_shard(out, 0, rows, np.zeros((2, 4), np.float32))
    _atomic_write(out / "test_results.csv", lambda tmp: pd.DataFrame({"a": [1]}).to_csv(tmp))
    cache = table_cache(TableSource(str(table), feature_prefix="feat_"), out / "cache")
    written = [out / n for n in ("last.ckpt", "emb.parquet", "emb.h5ad", "rank00000.npz", "test_results.csv")]
    written += [cache, cache.with_suffix(".json")]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(mode) for p in written}
    assert temps(out) == []


def test_temporary_names_say_which_file_host_and_process(tmp_path):
    name = temp_path(tmp_path / "last.ckpt").name
    assert name == f".last.ckpt.{socket.gethostname()}-{os.getpid()}{TEMP_MARK}"
    assert temp_path(tmp_path / "rank00000.npz", ".npz").name.endswith(f"{TEMP_MARK}.npz")  # np.savez needs it


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_temporary_files_of_dead_processes_of_this_host_are_removed(tmp_path):
    host, target = socket.gethostname(), tmp_path / "last.ckpt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".last.ckpt.{host}-{dead_pid()}{TEMP_MARK}",
            "dead, suffixed": f".last.ckpt.{host}-{dead_pid()}{TEMP_MARK}.ckpt",
            "live": f".last.ckpt.{host}-{live.pid}{TEMP_MARK}",
            "other host": f".last.ckpt.{host}x-{dead_pid()}{TEMP_MARK}",
            "other target": f".last.ckpt.old.{host}-{dead_pid()}{TEMP_MARK}",
            "not ours": f".last.ckpt.{host}-{dead_pid()}.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"last.ckpt"} | {names[k] for k in ("live", "other host", "other target", "not ours")}
        assert read_checkpoint(target)["state_dict"]["w"].tolist() == [1.0, 1.0]
    finally:
        live.kill()
        live.wait()


def test_a_leftover_of_a_dead_process_that_had_our_pid_is_removed(tmp_path):
    leftover = temp_path(tmp_path / "x.json")
    leftover.write_text("partial")  # pid recycled: not a write of this process, which is not writing x.json
    assert remove_stale_temps(tmp_path / "x.json") == [leftover]


def write_then(error: BaseException):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise error
    return write


@pytest.mark.parametrize("error, said", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
], ids=["ENOSPC", "EDQUOT"])
def test_a_full_disk_is_reported_and_the_previous_file_kept(tmp_path, error, said):
    target = tmp_path / "emb.parquet"
    target.write_bytes(b"previous")
    with pytest.raises(DataError, match=rf"emb\.parquet: {said} while writing it; free space or choose another "
                                        r"folder \(the previous emb\.parquet, if any, is unchanged\)$"):
        atomic_write(target, write_then(error), suffix=".parquet")
    assert target.read_bytes() == b"previous" and temps(tmp_path) == []


def test_a_write_error_without_errno_is_no_space_only_on_a_full_filesystem(tmp_path, monkeypatch):
    """torch reports a full disk as "unexpected pos ..." (a RuntimeError): the free space decides."""
    target = tmp_path / "last.ckpt"
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: not a full disk
        atomic_write(target, write_then(error))
    monkeypatch.setattr(files, "_free", lambda folder: 0)
    with pytest.raises(DataError, match=r"last\.ckpt: no space left on device"):
        atomic_write(target, write_then(error))
    assert not target.exists() and temps(tmp_path) == []


def test_other_errors_pass_through_and_leave_no_temporary_file(tmp_path):
    with pytest.raises(ValueError, match="bad content"):
        atomic_write(tmp_path / "x.csv", write_then(ValueError("bad content")))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (needs the right to mount, as root in a container)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {result.stderr.strip() or result.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_disk_is_reported_for_a_checkpoint_an_output_and_a_cache(tiny_disk, table):
    checkpoint, output = tiny_disk / "last.ckpt", tiny_disk / "emb.parquet"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, checkpoint)
    rows = np.arange(2)
    write_embeddings(table, pd.DataFrame({"well": ["a", "b"]}), rows, np.zeros((2, 4), np.float32), output)
    before = {p: digest(p) for p in (checkpoint, output)}
    with pytest.raises(DataError, match=r"last\.ckpt: no space left on device while writing it"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(200_000)}, "epoch": 2}, checkpoint)
    rows = np.arange(20_000)
    with pytest.raises(DataError, match=r"emb\.parquet: no space left on device while writing it"):
        embedding = np.random.default_rng(0).random((len(rows), 16), dtype=np.float32)  # 1.3 MB, incompressible
        write_embeddings(table, pd.DataFrame({"well": rows}), rows, embedding, output)
    big = table.parent / "big.parquet"
    pd.DataFrame(np.random.default_rng(0).random((20_000, 8)), columns=[f"feat_{j}" for j in range(8)]).to_parquet(big)
    with pytest.raises(DataError, match=r"big-\w+\.npy: no space left on device while writing it"):
        table_cache(TableSource(str(big), feature_prefix="feat_"), tiny_disk / "cache")
    assert {p: digest(p) for p in (checkpoint, output)} == before
    assert read_checkpoint(checkpoint)["epoch"] == 1
    assert temps(tiny_disk) == [] and list((tiny_disk / "cache").iterdir()) == []
