"""The Python API: load a checkpoint and embed in-memory data or files (``load``), train from a config
(``fit``), both through the code the command line runs.

    model = unimodality.load("runs/clip/version_0/checkpoints/best.ckpt")
    adata.obsm["X_unimodality"] = model.embed(adata, modality="tx")
    run = unimodality.fit("configs/clip.yaml", **{"trainer.max_epochs": 2})

``Model.embed`` is ``unimodality predict`` without the output file: the same reading (features aligned by
name, the checkpoint's transform, filters and metadata features), the same warnings and errors, the same
numbers. An in-memory AnnData or DataFrame is written to a temporary file holding only what the tower reads
(never the whole object), and read from there as ``predict`` would read it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unimodality.errors import CheckpointError, DataError

#: what the temporary file of an in-memory object is called in warnings and errors
IN_MEMORY = {"anndata": "the AnnData given to embed", "table": "the DataFrame given to embed"}


class Model:
    """A trained model read from a checkpoint, ready to embed data (see ``load``).

    Args:
        module: the trained setup (a ``LightningModule``, in eval mode).
        checkpoint: the file it was read from.
    """

    def __init__(self, module: Any, checkpoint: Path) -> None:
        self.module = module
        self.checkpoint = checkpoint

    @property
    def schema(self) -> dict[str, dict[str, Any]]:
        """Per modality: the source class and settings its training files were read with, and the names of
        the features its tower reads (``{"class_path", "init_args", "features"}``)."""
        return self.module.schema

    @property
    def modalities(self) -> list[str]:
        """The towers, by modality name."""
        return list(self.schema)

    def __repr__(self) -> str:
        towers = ", ".join(
            f"{name}: {entry['class_path'].rsplit('.', 1)[-1]}{_element(entry)} -> {len(entry['features'])} features"
            for name, entry in self.schema.items()
        )
        return f"<unimodality {type(self.module).__name__} from {self.checkpoint} ({towers})>"

    def embed(
        self,
        data: Any,
        modality: str | None = None,
        *,
        batch_size: int = 512,
        source_options: Mapping[str, Any] | None = None,
        return_rows: bool = False,
        accelerator: str = "auto",
        num_workers: int = 0,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Embed ``data`` with one tower, exactly as ``unimodality predict`` embeds a file.

        Args:
            data: an ``AnnData`` (its ``X``, or the ``layers``/``obsm`` entry the tower was trained on), a
                ``pandas.DataFrame`` (feature columns named as in training; metadata columns for filters),
                or a path (anything ``predict --data.path`` reads: ``.h5ad``, a table, several ``.h5ad``).
            modality: which tower embeds it; by default the only one whose training files had this type.
            batch_size: rows per forward pass (predict's ``--data.batch_size``).
            source_options: settings replacing those recorded in the checkpoint for this tower, e.g.
                ``{"exclude": None}`` to embed control rows that training left out, or ``{"obsm": "X_scVI"}``
                for an AnnData holding the embedding under another key.
            return_rows: also return the row numbers embedded (rows the recorded ``include``/``exclude``
                filters or an invalid input leave out get no embedding, as in predict's output).
            accelerator: Lightning's accelerator (``auto``: a GPU when there is one, as predict).
            num_workers: DataLoader worker processes.

        Returns:
            ``(n_rows, embed_dim)`` float32 embeddings, one per embedded row in input order (every row unless
            filters leave some out); with ``return_rows``, ``(rows, embeddings)``.
        """
        from unimodality.plugins.datamodules.embed import InMemoryEmbedDataModule

        with _as_file(data, self.schema, modality, source_options) as (path, label):
            datamodule = InMemoryEmbedDataModule(path, modality=modality, source_options=dict(source_options or {}),
                                                 batch_size=batch_size, num_workers=num_workers)
            with _renamed(path, label):
                _predict(self.module, datamodule, accelerator)
        if datamodule.embedding is None:
            raise DataError(f"{label or path}: no row was embedded")
        return (datamodule.rows, datamodule.embedding) if return_rows else datamodule.embedding


def load(path: str | Path, *, trust_checkpoint: bool = False) -> Model:
    """Read a trained model from a checkpoint (or a run directory: its ``checkpoints/best.ckpt``, else
    ``last.ckpt``) the way ``predict`` does.

    Args:
        path: a ``.ckpt`` file written by ``unimodality fit``, or its run directory.
        trust_checkpoint: unpickle any object the file holds, which can run code (``--trust_checkpoint``):
            only for files of a known origin. By default a checkpoint holding anything but tensors and plain
            containers, or naming a class unimodality would not build, is refused (docs/reliability.md).
    """
    from lightning.pytorch.cli import instantiate_module

    from unimodality import trust
    from unimodality.checkpoint import read_checkpoint

    file = _checkpoint_file(Path(path))
    checkpoint = read_checkpoint(file, trust=trust_checkpoint)  # tensors only, known classes: before building
    hparams = trust.upgrade_class_paths(checkpoint.get("hyper_parameters") or {})
    saved = hparams.get("_class_path")
    if not saved:
        raise CheckpointError(f"{file}: holds no model config (hyper_parameters._class_path); is it a unimodality "
                              "checkpoint?")
    setup = trust.check_class(saved, "setup", str(file), "hyper_parameters._class_path", imports=False)
    checkpoint["hyper_parameters"] = hparams
    # the model as the command line builds it (jsonargparse, from the recorded config), then the weights
    module = instantiate_module(setup, {k: v for k, v in hparams.items() if k != "_instantiator"})
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    if not getattr(module, "schema", None):
        raise CheckpointError(f"{file}: the model has no data schema; load a checkpoint of a trained model")
    return Model(module.eval(), file)


def fit(config: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
        **options: Any) -> Path | None:
    """Train as ``unimodality fit --config CONFIG --KEY VALUE ...`` does: the same parser, checks, run
    directory, checkpoints and ``config.yaml``.

    Args:
        config: a YAML config file, or the same as a dict.
        overrides: options by their dotted command-line names, e.g. ``{"trainer.max_epochs": 2,
            "data.init_args.batch_size": 32}``; values are given as Python values (lists, dicts, None).
        options: more overrides, as keywords: ``fit(path, **{"trainer.max_epochs": 2})``.

    Returns:
        The run directory (``config.yaml``, ``metrics.csv``, ``checkpoints/``); ``None`` for a run that keeps
        none (``trainer.fast_dev_run``).

    Raises:
        ValueError: an option or config the parser refuses (its message is printed above, as on the
            command line).
    """
    from unimodality import cli, trust

    if not isinstance(config, str | Path):
        # what the command line checks of a config file before jsonargparse imports or calls anything
        trust.check_config(dict(config), "the config given to unimodality.fit")
    args = ["fit", "--config", str(config) if isinstance(config, str | Path) else json.dumps(dict(config))]
    for key, value in {**dict(overrides or {}), **options}.items():
        args.append(f"--{key.removeprefix('--')}={value if isinstance(value, str) else json.dumps(value)}")
    argv = sys.argv
    try:
        # a notebook kernel's own arguments (-f kernel.json) are not this run's: LightningCLI would warn of them
        sys.argv = argv[:1]
        run = cli._main(args)
    except SystemExit as stop:  # jsonargparse ends a bad command line with exit status 2
        if stop.code in (0, None):
            return None
        raise ValueError(f"unimodality.fit: the config or an option was refused (exit status {stop.code}; the "
                         "message is printed above)") from None
    finally:
        sys.argv = argv
    trainer = getattr(run, "trainer", None)
    log_dir = getattr(trainer, "log_dir", None) if trainer is not None and not trainer.fast_dev_run else None
    return Path(log_dir) if log_dir is not None else None


# -- helpers ---------------------------------------------------------------------------------------------------
def _checkpoint_file(path: Path) -> Path:
    if not path.is_dir() or (path / "latest").exists():  # a DeepSpeed checkpoint directory: the reader says so
        return path
    for name in ("best.ckpt", "last.ckpt"):
        if (path / "checkpoints" / name).is_file():
            return path / "checkpoints" / name
    raise CheckpointError(f"{path}: a folder with no checkpoints/best.ckpt or checkpoints/last.ckpt; give a .ckpt file")


def _element(entry: dict[str, Any]) -> str:
    """Where an AnnData tower's matrix is (`` [obsm scVI]``), for the repr."""
    args = entry.get("init_args", {})
    return f" [obsm {args['obsm']}]" if args.get("obsm") else f" [layer {args['layer']}]" if args.get("layer") else ""


def _predict(module: Any, datamodule: Any, accelerator: str) -> None:
    """``trainer.predict`` with predict's writer callback (into memory here), quietly, on one device."""
    from lightning.pytorch import Trainer

    from unimodality.outputs import EmbeddingWriter

    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # "GPU available: ..." on every call would bury a notebook's output
    try:
        with warnings.catch_warnings():
            # the rows are read into memory at setup: Lightning's advice to add DataLoader workers is moot
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            trainer = Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, callbacks=[EmbeddingWriter()])
            trainer.predict(module, datamodule=datamodule, return_predictions=False)
    finally:
        quiet.setLevel(level)
        module.cpu()


@contextlib.contextmanager
def _as_file(data: Any, schema: dict[str, dict[str, Any]], modality: str | None,
             source_options: Mapping[str, Any] | None) -> Iterator[tuple[str | list[str], str | None]]:
    """A path ``predict`` reads for ``data``, and how to name it in messages (``None``: its own path)."""
    if isinstance(data, str | Path):
        yield str(data), None
        return
    if isinstance(data, list | tuple) and all(isinstance(p, str | Path) for p in data):
        yield [str(p) for p in data], None
        return
    kind = _kind(data)
    if kind == "anndata" and data.isbacked and data.filename is not None and not data.is_view:
        yield str(data.filename), None  # already a file: read in place
        return
    folder = Path(tempfile.mkdtemp(prefix="unimodality-embed-"))
    try:
        settings = _settings(schema, modality, kind, source_options)
        if kind == "anndata":
            path = folder / "data.h5ad"
            _write_anndata(data, settings, path)
        else:
            path = folder / "data.parquet"
            _write_table(data, settings, schema, modality, path)
        yield str(path), IN_MEMORY[kind]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _kind(data: Any) -> str:
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return "table"
    try:
        import anndata as ad
    except ImportError:  # pragma: no cover - anndata is a dependency
        ad = None
    if ad is not None and isinstance(data, ad.AnnData):
        return "anndata"
    raise TypeError(f"embed reads an AnnData, a pandas DataFrame or a path, not a {type(data).__name__}")


def _settings(schema: dict[str, dict[str, Any]], modality: str | None, kind: str,
              source_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings of the tower that will read ``data`` (recorded, then ``source_options``): which matrix and
    which metadata columns to write. ``{}`` when the tower is not known yet (predict chooses it, or errs)."""
    if modality is None:
        wanted = "AnnDataSource" if kind == "anndata" else "TableSource"
        matches = [n for n, e in schema.items() if e["class_path"].endswith(wanted)]
        modality = next(iter(schema)) if len(schema) == 1 else matches[0] if len(matches) == 1 else None
    if modality not in schema:
        return {}
    return {**schema[modality]["init_args"], **dict(source_options or {})}


def _metadata_columns(settings: dict[str, Any]) -> list[str]:
    """The metadata columns reading needs: row filters and metadata features (predict writes no metadata
    here, so nothing else is copied)."""
    return list(dict.fromkeys([*(settings.get("include") or {}), *(settings.get("exclude") or {}),
                               *(settings.get("metadata_features") or {})]))


def _write_anndata(adata: Any, settings: dict[str, Any], path: Path) -> None:
    import anndata as ad
    import pandas as pd

    columns = [c for c in _metadata_columns(settings) if c in adata.obs.columns]
    obs = adata.obs[columns].copy() if columns else pd.DataFrame(index=adata.obs_names.copy())
    obs.index = obs.index.astype(str)
    var = pd.DataFrame(index=adata.var_names.astype(str))
    layer, obsm = settings.get("layer"), settings.get("obsm")
    if obsm is not None:
        if obsm not in adata.obsm:
            raise DataError(f"{IN_MEMORY['anndata']}: has no obsm[{obsm!r}], which the tower reads (obsm keys: "
                            f"{sorted(adata.obsm) or 'none'}); pass source_options={{'obsm': KEY}} for another key")
        out = ad.AnnData(obs=obs, obsm={obsm: np.asarray(adata.obsm[obsm])})
    elif layer is not None:
        if layer not in adata.layers:
            raise DataError(f"{IN_MEMORY['anndata']}: has no layers[{layer!r}], which the tower reads (layers: "
                            f"{sorted(adata.layers) or 'none'})")
        out = ad.AnnData(obs=obs, var=var, layers={layer: adata.layers[layer]})
    else:
        if adata.X is None:
            raise DataError(f"{IN_MEMORY['anndata']}: has no X (layers: {sorted(adata.layers) or 'none'}); pass "
                            "source_options={'layer': NAME} to read a layer")
        out = ad.AnnData(X=adata.X, obs=obs, var=var)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on names it made unique or strings it converted
        out.write_h5ad(path)


def _write_table(frame: Any, settings: dict[str, Any], schema: dict[str, dict[str, Any]], modality: str | None,
                 path: Path) -> None:
    """The DataFrame's columns a tower may read (its features by name, list columns of ``col[i]`` features, and
    the metadata columns filters need) as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unimodality.sources import VECTOR_FEATURE

    frame = frame.rename(columns=str)
    names = {name for entry in ([schema[modality]] if modality in schema else schema.values())
             for name in entry["features"]}
    wanted = names | {m["column"] for m in map(VECTOR_FEATURE.match, names) if m} | set(_metadata_columns(settings))
    columns = [c for c in frame.columns if c in wanted]
    if not columns:
        example = sorted(names)[:3]
        raise DataError(f"{IN_MEMORY['table']}: none of its {frame.shape[1]} columns is a feature the model was "
                        f"trained on (e.g. {example}; the DataFrame has e.g. {list(frame.columns[:3])})")
    pq.write_table(pa.Table.from_pandas(frame[columns], preserve_index=False), path)


@contextlib.contextmanager
def _renamed(path: str | list[str], label: str | None) -> Iterator[None]:
    """Warnings and errors that name the temporary file name the in-memory object instead."""
    if label is None:
        yield
        return
    names = sorted({str(path), str(Path(path).resolve())}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(n) for n in names))

    def rename(text: str) -> str:
        return pattern.sub(label, text)

    try:
        with warnings.catch_warnings(record=True) as caught:
            try:
                yield
            except DataError as error:
                raise type(error)(rename(str(error))) from None
    finally:
        for w in caught:  # re-emitted once recording has stopped
            warnings.warn_explicit(rename(str(w.message)), w.category, w.filename, w.lineno)
