"""Images as a modality: ImageSource (array files, image files), image augmentations, CNNEncoder, and the
command line from fit to predict on new images."""

from __future__ import annotations

import io
import re
import sys
import types
from contextlib import redirect_stdout
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from unimodality.augmentation import Compose
from unimodality.cli import main
from unimodality.datamodule import take_rows
from unimodality.example_data import IMAGE_CHANNELS, resolve_path
from unimodality.plugins.augmentations.images import (
    ImageNoise,
    IntensityJitter,
    RandomFlip,
    RandomResizedCrop,
    RandomRotation90,
)
from unimodality.plugins.augmentations.vectors import GaussianNoise
from unimodality.plugins.datamodules.single import SingleDataModule
from unimodality.plugins.encoders.cnn import CNNEncoder
from unimodality.plugins.sources.images import ImageSource, read_image_file
from unimodality.sources import DataError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHANNELS = ["DNA", "ER", "RNA"]


def write_table(folder: Path, n: int, name: str = "wells.parquet", **columns) -> Path:
    frame = pd.DataFrame({"well": [f"w{i}" for i in range(n)], "compound": [f"c{i // 2}" for i in range(n)],
                          **columns})
    path = folder / name
    frame.to_csv(path, index=False) if name.endswith(".csv") else frame.to_parquet(path, index=False)
    return path


def random_images(n: int = 10, channels: int = 3, size: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # channels on different scales, as stains are: normalisation must bring each to mean 0, std 1
    scale = np.array([10.0, 100.0, 1000.0, 5.0, 50.0])[:channels]
    return (rng.random((n, channels, size, size)) * scale[None, :, None, None]).astype(np.float32)


def npy_source(tmp_path: Path, images: np.ndarray | None = None, **kwargs) -> ImageSource:
    images = random_images() if images is None else images
    table = write_table(tmp_path, len(images))
    np.save(tmp_path / "wells_images.npy", images)
    return ImageSource(str(table), images="{stem}_images.npy", **kwargs)


# -- ImageSource ------------------------------------------------------------------------------------

def test_npy_source_reads_normalised_float32_batches(tmp_path):
    images = random_images(n=40)
    source = npy_source(tmp_path, images, channels=CHANNELS)
    assert source.feature_names() == CHANNELS and source.input_kind == "images"
    assert source.num_rows() == 40 and source.image_shape() == (3, 12, 12)
    assert list(source.read_metadata(["compound"])["compound"][:3]) == ["c0", "c0", "c1"]
    store = source.read_features()
    batch = take_rows(store, np.arange(40))
    assert batch.dtype == torch.float32 and batch.shape == (40, 3, 12, 12)
    torch.testing.assert_close(batch.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)
    mean, std = source.statistics()
    expected = (images - images.mean(axis=(0, 2, 3))[None, :, None, None]) / images.std(axis=(0, 2, 3))[
        None, :, None, None]
    torch.testing.assert_close(batch, torch.from_numpy(expected), atol=1e-4, rtol=1e-4)
    assert list(mean) == CHANNELS
    # a subset of rows, asked in any order: take() indexes the block read
    store = source.read_features(np.array([7, 3, 5]))
    torch.testing.assert_close(store.take(np.array([2, 0])), batch[[5, 7]])
    # the .npy is memory-mapped, not loaded
    assert isinstance(source.reader().array(), np.memmap)


def test_default_channel_names_and_unnormalised_reading(tmp_path):
    images = random_images(n=4, channels=2)
    source = npy_source(tmp_path, images, normalize=False)
    assert source.feature_names() == ["ch0", "ch1"]
    torch.testing.assert_close(source.read_features().take(np.arange(4)), torch.from_numpy(images))
    assert "mean" not in source.describe()["init_args"] or source.describe()["init_args"]["mean"] is None


def test_statistics_are_recorded_and_reused_on_another_file(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    source = npy_source(train, random_images(n=30), channels=CHANNELS, stats_sample=16)
    described = source.describe()
    assert described["class_path"] == "unimodality.plugins.sources.images.ImageSource"
    assert described["features"] == CHANNELS and described["input"] == "images"
    init_args = described["init_args"]
    assert "path" not in init_args and init_args["images"] == "{stem}_images.npy"
    assert set(init_args["mean"]) == set(CHANNELS) and init_args["std"]["RNA"] > init_args["std"]["DNA"]
    # statistics from an evenly spaced sample of 16 of the 30 images
    sample = np.unique(np.linspace(0, 29, 16).round().astype(int))
    raw = np.load(train / "wells_images.npy")[sample]
    assert init_args["mean"]["ER"] == pytest.approx(raw[:, 1].mean(), rel=1e-5)

    # a new table in another folder, with its own images beside it: read with the training statistics
    new = tmp_path / "new"
    new.mkdir()
    other = random_images(n=5, seed=1) * 3 + 7
    table = write_table(new, 5, name="plate2.csv")
    np.save(new / "plate2_images.npy", other)
    again = ImageSource(path=str(table), **init_args)
    assert again.statistics() == source.statistics()
    batch = again.read_features(align_to=CHANNELS).take(np.arange(5))
    mean = np.array([init_args["mean"][c] for c in CHANNELS])[None, :, None, None]
    std = np.array([init_args["std"][c] for c in CHANNELS])[None, :, None, None]
    torch.testing.assert_close(batch, torch.from_numpy(((other - mean) / std).astype(np.float32)))


def test_statistics_given_as_lists_or_by_name(tmp_path):
    source = npy_source(tmp_path, random_images(n=3, channels=2), channels=["a", "b"], mean=[1.0, 2.0],
                        std=[2.0, 4.0])
    assert source.statistics() == ({"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 4.0})
    named = npy_source(tmp_path, random_images(n=3, channels=2), channels=["a", "b"], mean={"b": 2.0, "a": 1.0},
                       std={"a": 2.0, "b": 4.0})
    torch.testing.assert_close(named.read_features().take(np.arange(3)), source.read_features().take(np.arange(3)))
    with pytest.raises(ValueError, match="no value for channel"):
        npy_source(tmp_path, random_images(n=3, channels=2), channels=["a", "b"], mean={"a": 1.0},
                   std=[1.0, 1.0]).statistics()
    with pytest.raises(ValueError, match="3 values for 2 channels"):
        npy_source(tmp_path, random_images(n=3, channels=2), mean=[1.0, 2.0, 3.0], std=[1.0, 1.0]).statistics()


def test_channels_are_aligned_by_name(tmp_path):
    source = npy_source(tmp_path, random_images(n=6), channels=CHANNELS)
    plain = source.read_features().take(np.arange(6))
    reordered = source.read_features(align_to=["RNA", "DNA", "ER"]).take(np.arange(6))
    torch.testing.assert_close(reordered, plain[:, [2, 0, 1]])
    subset = source.read_features(align_to=["ER"]).take(np.arange(6))
    torch.testing.assert_close(subset, plain[:, [1]])
    with pytest.raises(DataError, match=r"has no channel\(s\) \['Mito'\].*has channels \['DNA', 'ER', 'RNA'\]"):
        source.read_features(align_to=["DNA", "Mito"])


def test_hdf5_and_zarr_arrays(tmp_path):
    images = random_images(n=8)
    table = write_table(tmp_path, 8)
    with h5py.File(tmp_path / "wells.h5", "w") as f:
        f["meta"] = np.arange(3)  # not 4-D: the images are named by dataset, or found as "images"
        dataset = f.create_dataset("pixels", data=images)
        dataset.attrs["channels"] = ["DNA", "ER", "RNA"]  # channel names stored with the array
    with pytest.raises(DataError, match=r"no HDF5 dataset 'images'.*\['meta', 'pixels'\].*dataset: <name>"):
        ImageSource(str(table), images="wells.h5").feature_names()
    source = ImageSource(str(table), images="wells.h5", dataset="pixels")
    assert source.feature_names() == CHANNELS
    reference = npy_source(tmp_path, images, channels=CHANNELS)
    rows = np.array([5, 1, 1, 6])  # unsorted, repeated: HDF5 reads sorted unique rows and reorders
    torch.testing.assert_close(source.read_features(rows).take(np.arange(4)),
                               reference.read_features(rows).take(np.arange(4)))
    # channels last, and one channel without a channel axis
    with h5py.File(tmp_path / "last.h5", "w") as f:
        f["images"] = np.moveaxis(images, 1, -1)
    last = ImageSource(str(table), images="last.h5", channels_last=True, channels=CHANNELS)
    torch.testing.assert_close(last.read_features().take(np.arange(8)), reference.read_features().take(np.arange(8)))
    np.save(tmp_path / "grey.npy", images[:, 0])
    assert ImageSource(str(table), images="grey.npy").read_features().take(np.arange(8)).shape == (8, 1, 12, 12)

    zarr = pytest.importorskip("zarr")
    array = zarr.create_array(str(tmp_path / "wells.zarr"), shape=images.shape, dtype="float32",
                              chunks=(4, 3, 12, 12))
    array[:] = images
    array.attrs["channels"] = CHANNELS
    stored = ImageSource(str(table), images="wells.zarr")
    assert stored.feature_names() == CHANNELS
    torch.testing.assert_close(stored.read_features(rows).take(np.arange(4)),
                               reference.read_features(rows).take(np.arange(4)))


def test_example_images_are_aligned_to_the_phenomics_wells():
    table = pd.read_parquet(resolve_path("example://phenomics.parquet"))
    source = ImageSource("example://phenomics.parquet", images="{stem}_images.npy", channels=list(IMAGE_CHANNELS))
    assert source.num_rows() == len(table) and source.image_shape() == (5, 24, 24)
    assert source.images_file == resolve_path("example://phenomics_images.npy")
    assert np.load(source.images_file, mmap_mode="r").dtype == np.uint8
    # replicates of a perturbation look alike more than wells of different perturbations do
    batch = source.read_features().take(np.arange(len(table))).mean(dim=(2, 3)).numpy()
    groups = table.groupby(["smiles", "concentration"]).ngroup().to_numpy()
    between = np.var([batch[groups == g].mean(0) for g in np.unique(groups)], axis=0).sum()
    within = np.mean([batch[groups == g].var(0).sum() for g in np.unique(groups)])
    assert between > within


def write_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)


def test_folder_of_png_and_tiff_files(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 4000, (6, 4, 10, 10)).astype(np.uint16)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        tifffile.imwrite(folder / f"w{i}.tif", image, photometric="minisblack")  # four pages
        for c in range(4):
            write_png(folder / f"w{i}_c{c}.png", (image[c] // 16).astype(np.uint8))
    names = {f"c{c}": [f"w{i}_c{c}.png" for i in range(6)] for c in range(4)}
    table = write_table(tmp_path, 6, name="wells.csv", file=[f"w{i}.tif" for i in range(6)], **names)

    source = ImageSource(str(table), image_column="file", image_dir="images", normalize=False)
    assert source.feature_names() == ["ch0", "ch1", "ch2", "ch3"]
    torch.testing.assert_close(source.read_features().take(np.arange(6)), torch.from_numpy(images.astype(np.float32)))
    # without tifffile, PIL reads each page as a channel
    monkeypatch.setitem(sys.modules, "tifffile", None)
    assert np.array_equal(read_image_file(folder / "w2.tif"), images[2])
    monkeypatch.undo()

    # one single-channel PNG per channel: the columns name the channels
    per_channel = ImageSource(str(table), channel_columns=["c0", "c1", "c2", "c3"], image_dir=str(folder),
                              normalize=False)
    assert per_channel.feature_names() == ["c0", "c1", "c2", "c3"]
    torch.testing.assert_close(per_channel.read_features(np.array([4, 1])).take(np.array([1, 0])),
                               torch.from_numpy((images[[1, 4]] // 16).astype(np.float32)))
    # one page of four planar samples (tifffile's default for this shape) is four channels too
    tifffile.imwrite(folder / "planar.tif", images[3])
    assert np.array_equal(read_image_file(folder / "planar.tif"), images[3])
    # an RGB PNG is three channels; a channels-last TIFF (samples per pixel) is moved to channels first
    rgb = rng.integers(0, 255, (10, 12, 3)).astype(np.uint8)
    write_png(folder / "rgb.png", rgb)
    assert np.array_equal(read_image_file(folder / "rgb.png"), np.moveaxis(rgb, -1, 0))
    tifffile.imwrite(folder / "rgb.tif", rgb, photometric="rgb")
    assert np.array_equal(read_image_file(folder / "rgb.tif"), np.moveaxis(rgb, -1, 0))


# -- errors that name the file and what is wrong ----------------------------------------------------------

def test_errors_name_the_file_and_the_problem(tmp_path):
    images = random_images(n=6)
    source = npy_source(tmp_path, images)
    # row count mismatch between the array and the table
    write_table(tmp_path, 7, name="longer.parquet")
    np.save(tmp_path / "longer_images.npy", images)
    with pytest.raises(DataError, match=r"longer_images\.npy: holds 6 images but the table .*longer\.parquet has 7"):
        ImageSource(str(tmp_path / "longer.parquet"), images="{stem}_images.npy").num_rows()
    # channel count vs channel names
    with pytest.raises(DataError, match=r"wells_images\.npy: images have 3 channels .* but 5 channel names"):
        ImageSource(source.path, images="{stem}_images.npy", channels=list(IMAGE_CHANNELS)).feature_names()
    # wrong shape
    np.save(tmp_path / "flat.npy", images.reshape(6, -1))
    with pytest.raises(DataError, match=r"flat\.npy: expected an image array of shape \(rows, channels, height"):
        ImageSource(source.path, images="flat.npy").feature_names()
    # a missing array file
    with pytest.raises(DataError, match=r"image array file not found: .*nowhere\.npy"):
        ImageSource(source.path, images="nowhere.npy").feature_names()
    # non-finite pixels: the row and channel are named
    broken = images.copy()
    broken[4, 1, 2, 3] = np.nan
    np.save(tmp_path / "wells_images.npy", broken)
    bad = ImageSource(source.path, images="{stem}_images.npy", mean=[0, 0, 0], std=[1, 1, 1])
    store = bad.read_features()
    store.take(np.arange(4))  # the clean rows read fine
    with pytest.raises(DataError, match=r"wells_images\.npy: 1 NaN or infinite pixel values in 1 images \(e\.g\. "
                                        r"row 4 / ch1\)"):
        store.take(np.arange(6))
    # pixels must be numbers
    np.save(tmp_path / "text.npy", np.full((6, 1, 2, 2), "a"))
    with pytest.raises(DataError, match="must be real numbers"):
        ImageSource(source.path, images="text.npy").feature_names()
    with pytest.raises(ValueError, match="exactly one of images"):
        ImageSource(source.path)
    with pytest.raises(ValueError, match="exactly one of images"):
        ImageSource(source.path, images="a.npy", image_column="file")


def test_image_file_errors(tmp_path):
    folder = tmp_path
    write_png(folder / "a.png", np.zeros((8, 8), np.uint8))
    write_png(folder / "b.png", np.zeros((9, 8), np.uint8))
    write_png(folder / "rgb.png", np.zeros((8, 8, 3), np.uint8))
    (folder / "corrupt.png").write_bytes(b"not a png")

    def source(files: list[str], **kwargs) -> ImageSource:
        table = write_table(folder, len(files), name="t.parquet", file=files)
        return ImageSource(str(table), image_column="file", normalize=False, **kwargs)

    with pytest.raises(DataError, match=r"t\.parquet: 1 image files named in column 'file' do not exist "
                                        r"\(e\.g\. row 1: .*missing\.png\)"):
        source(["a.png", "missing.png"]).read_features()
    with pytest.raises(DataError, match=r"b\.png \(row 1\): image of shape .* \(1, 9, 8\), expected \(1, 8, 8\)"):
        source(["a.png", "b.png"]).read_features().take(np.arange(2))
    with pytest.raises(DataError, match=r"corrupt\.png \(row 1, column 'file'\): cannot read the image"):
        source(["a.png", "corrupt.png"]).read_features().take(np.arange(2))
    table = write_table(folder, 2, name="c.parquet", x=["a.png", "a.png"], y=["rgb.png", "a.png"])
    with pytest.raises(DataError, match=r"rgb\.png \(row 0, column 'y'\): has 3 channels; with channel_columns"):
        ImageSource(str(table), channel_columns=["x", "y"], normalize=False).feature_names()
    table = write_table(folder, 2, name="n.parquet", file=["a.png", None])
    with pytest.raises(DataError, match=r"column 'file' names no image file in rows \[1\]"):
        ImageSource(str(table), image_column="file").feature_names()


def test_single_datamodule_batches_images(tmp_path):
    images = random_images(n=24)
    table = write_table(tmp_path, 24)
    np.save(tmp_path / "wells_images.npy", images)
    dm = SingleDataModule(ImageSource(str(table), images="{stem}_images.npy"), modality="img", keys=["compound"],
                          val_fraction=0.25, test_fraction=0.0, batch_size=4)
    assert dm.schema["img"]["features"] == ["ch0", "ch1", "ch2"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["img"].shape == (4, 3, 12, 12) and batch["img"].dtype == torch.float32
    assert len(dm.datasets["val"]) == 6  # 3 of 12 compounds, 2 wells each


# -- augmentations ------------------------------------------------------------------------------------

def image_augmentations():
    return [RandomResizedCrop(), RandomFlip("horizontal", p=1.0), RandomFlip("vertical", p=1.0),
            RandomRotation90(), IntensityJitter(), ImageNoise()]


@pytest.mark.parametrize("augmentation", image_augmentations() + [Compose(image_augmentations())],
                         ids=lambda a: type(a).__name__ + getattr(a, "axis", ""))
def test_image_augmentations_keep_the_shape_and_are_identity_in_eval(augmentation):
    torch.manual_seed(0)
    x = torch.randn(16, 5, 12, 12)
    augmented = augmentation.augment(x)
    assert augmented.shape == x.shape and augmented.dtype == x.dtype
    assert not torch.equal(augmented, x)
    assert not torch.equal(augmentation.train()(x), x)
    assert torch.equal(augmentation.eval()(x), x)
    torch.manual_seed(3)
    first = augmentation.augment(x)
    torch.manual_seed(3)
    assert torch.equal(augmentation.augment(x), first)  # torch's generator: seeds reproduce
    assert augmentation.augment(x[:0]).shape == (0, 5, 12, 12)


@pytest.mark.parametrize("augmentation", image_augmentations(), ids=lambda a: type(a).__name__)
def test_image_augmentations_with_p_zero_or_vectors(augmentation):
    x = torch.randn(8, 3, 10, 10)
    augmentation.p = 0.0
    assert torch.equal(augmentation.augment(x), x)
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, channels, height, width\), got \(8, 3\)"):
        augmentation.augment(torch.randn(8, 3))


def test_vector_augmentations_still_refuse_images():
    with pytest.raises(ValueError, match=r"GaussianNoise expects input of shape \(batch, features\)"):
        GaussianNoise().augment(torch.randn(2, 3, 4, 4))


def test_rotation_moves_pixels_by_quarter_turns():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 7, 7)
    y = RandomRotation90().augment(x)
    seen = set()
    for a, b in zip(x, y):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)  # the same pixels
        turns = [k for k in range(4) if torch.equal(torch.rot90(a, k, dims=(-2, -1)), b)]
        assert len(turns) == 1
        seen.add(turns[0])
    assert seen == {0, 1, 2, 3}
    # non-square images turn by 0 or 180 degrees only
    wide = torch.randn(32, 2, 4, 6)
    turned = RandomRotation90().augment(wide)
    assert turned.shape == wide.shape
    assert all(torch.equal(b, a) or torch.equal(b, torch.rot90(a, 2, dims=(-2, -1))) for a, b in zip(wide, turned))
    half = RandomRotation90(p=0.5).augment(x)
    assert 0.2 < np.mean([torch.equal(a, b) for a, b in zip(x, half)]) < 0.8


def test_flips():
    torch.manual_seed(0)
    x = torch.randn(200, 2, 5, 6)
    torch.testing.assert_close(RandomFlip("horizontal", p=1.0).augment(x), x.flip(-1))
    torch.testing.assert_close(RandomFlip("vertical", p=1.0).augment(x), x.flip(-2))
    some = RandomFlip("horizontal", p=0.5).augment(x)
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(x, some)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(x, some)])
    assert (flipped | kept).all() and abs(flipped.float().mean().item() - 0.5) < 0.1
    with pytest.raises(ValueError, match="axis must be horizontal or vertical"):
        RandomFlip("diagonal")


def test_crop_zooms_in_and_keeps_the_shape():
    torch.manual_seed(0)
    x = torch.linspace(0, 1, 16)[None, None, None, :].expand(32, 1, 16, 16).contiguous()  # a left-right ramp
    y = RandomResizedCrop(scale=(0.25, 0.25), ratio=(1.0, 1.0)).augment(x)
    assert y.shape == x.shape
    span = y[:, 0, 0, -1] - y[:, 0, 0, 0]
    # half the width, resized to the full width: the ramp spans about half its range (interpolated)
    assert torch.allclose(span, torch.full_like(span, 0.5), atol=0.07)
    full = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0)).augment(x)
    torch.testing.assert_close(full, x)  # the whole image: nothing changes
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(scale=(0.5, 1.5))


def test_intensity_jitter_changes_each_channel_affinely():
    torch.manual_seed(0)
    x = torch.randn(50, 4, 8, 8)
    y = IntensityJitter(brightness=0.3, contrast=0.5).augment(x)
    centred_x = x - x.mean(dim=(-2, -1), keepdim=True)
    centred_y = y - y.mean(dim=(-2, -1), keepdim=True)
    factor = (centred_y * centred_x).sum(dim=(-2, -1)) / (centred_x**2).sum(dim=(-2, -1))
    torch.testing.assert_close(centred_y, centred_x * factor[..., None, None], atol=1e-5, rtol=1e-4)
    assert factor.min() >= 0.5 - 1e-5 and factor.max() <= 1.5 + 1e-5
    assert factor.std(dim=1).mean() > 0.05  # drawn per channel
    shift = (y - x).mean(dim=(-2, -1))
    assert shift.abs().max() <= 0.3 + 1e-5
    shared = IntensityJitter(brightness=0.3, contrast=0.0, per_channel=False).augment(x) - x
    assert torch.allclose(shared, shared[:, :1, :1, :1].expand_as(shared), atol=1e-6)


# -- CNNEncoder --------------------------------------------------------------------------------------

def test_cnn_encoder_shapes_and_input_checks():
    encoder = CNNEncoder(5, width=8, blocks=[1, 2, 1])
    assert encoder.out_features == 32
    encoder.eval()
    for size in [(8, 8), (17, 17), (32, 24), (3, 5)]:  # global average pooling: any image size
        assert encoder(torch.randn(2, 5, *size)).shape == (2, 32)
    with pytest.raises(ValueError, match=r"CNNEncoder expects images of shape \(batch, 5, height, width\), "
                                         r"got \(2, 3, 8, 8\)"):
        encoder(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"got \(2, 5\)"):
        encoder(torch.randn(2, 5))
    group = CNNEncoder(6, width=12, blocks=[1, 1], norm="group", groups=4, stem_stride=2)
    assert group.train()(torch.randn(1, 6, 16, 16)).shape == (1, 24)  # group norm: batches of one train too
    assert CNNEncoder(1, norm="none", blocks=[1])(torch.randn(3, 1, 9, 9)).shape == (3, 32)
    with pytest.raises(ValueError, match="blocks"):
        CNNEncoder(3, blocks=[])
    with pytest.raises(ValueError, match="backbone_weights needs a backbone"):
        CNNEncoder(3, backbone_weights="w.pt")


def test_cnn_encoder_learns_through_its_residual_blocks():
    torch.manual_seed(0)
    encoder = CNNEncoder(2, width=4, blocks=[1, 1])
    loss = encoder(torch.randn(4, 2, 8, 8)).pow(2).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


class _TinyBackbone(torch.nn.Module):
    """Stands in for a torchvision model: a first conv on RGB, a body, a classifier ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv1(x)).flatten(1))


def test_backbone_adapts_the_first_conv_and_reads_local_weights(tmp_path, monkeypatch):
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=lambda name, weights: _TinyBackbone())
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    pretrained = _TinyBackbone()
    torch.save(pretrained.state_dict(), tmp_path / "weights.pt")
    encoder = CNNEncoder(5, backbone="tiny", backbone_weights=str(tmp_path / "weights.pt"))
    assert encoder.out_features == 6 and isinstance(encoder.net.fc, torch.nn.Identity)
    kernel = encoder.net.conv1.weight
    assert kernel.shape == (6, 5, 3, 3)
    expected = pretrained.conv1.weight.mean(dim=1, keepdim=True).expand(-1, 5, -1, -1) * 3 / 5
    torch.testing.assert_close(kernel, expected)
    # a grey image repeated over the channels gets the RGB network's response to a grey RGB image
    grey = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(encoder(grey.expand(-1, 5, -1, -1)),
                                   pretrained.pool(pretrained.conv1(grey.expand(-1, 3, -1, -1))).flatten(1))


def test_backbone_without_torchvision_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="needs torchvision"):
        CNNEncoder(5, backbone="resnet18")


def test_torchvision_resnet18_backbone():
    pytest.importorskip("torchvision", reason="torchvision is not installable beside this torch build")
    encoder = CNNEncoder(5, backbone="resnet18")
    assert encoder.out_features == 512 and encoder(torch.randn(2, 5, 32, 32)).shape == (2, 512)


# -- the command line: fit on the example images, then embed new images ---------------------------------

def test_cli_fit_then_predict_new_images(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        main(["fit", "--config", str(CONFIGS / "simclr_cnn.yaml"), "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "3", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    run_dir = Path(re.search(r"Run directory: (\S+)", out.getvalue()).group(1))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["val/recall@1"].notna().any()
    last = run_dir / "checkpoints" / "last.ckpt"
    schema = torch.load(last, weights_only=True)["hyper_parameters"]["schema"]["img"]
    assert schema["features"] == list(IMAGE_CHANNELS) and set(schema["init_args"]["mean"]) == set(IMAGE_CHANNELS)

    # new wells: a table and its images beside it, named after the table
    new = tmp_path / "plate"
    new.mkdir()
    wells = pd.read_parquet(resolve_path("example://phenomics.parquet")).iloc[100:130].reset_index(drop=True)
    wells.drop(columns=[c for c in wells.columns if c.startswith("feat_")]).to_parquet(new / "new.parquet")
    images = np.load(resolve_path("example://phenomics_images.npy"))[100:130]
    np.save(new / "new_images.npy", images)
    output = tmp_path / "embedded.parquet"
    main(["predict", "--ckpt_path", str(last), "--trainer.enable_progress_bar", "false",
          "--data.path", str(new / "new.parquet"), "--data.modality", "img", "--data.output", str(output)])
    result = pd.read_parquet(output)
    columns = [c for c in result.columns if c.startswith("X_unimodality_")]
    assert len(result) == 30 and len(columns) == 64  # the encoder's representation (width 16 * 2**2)
    assert list(result["well"]) == list(wells["well"])

    # the same as the model applied to the images normalised with the training statistics
    from unimodality.plugins.setups.simclr import SimCLRSetup

    model = SimCLRSetup.load_from_checkpoint(last).eval()
    mean = torch.tensor([schema["init_args"]["mean"][c] for c in IMAGE_CHANNELS])[None, :, None, None]
    std = torch.tensor([schema["init_args"]["std"][c] for c in IMAGE_CHANNELS])[None, :, None, None]
    with torch.no_grad():
        expected = model((torch.from_numpy(images).float() - mean) / std)
    np.testing.assert_allclose(result[columns].to_numpy(), expected.numpy(), atol=1e-4)
