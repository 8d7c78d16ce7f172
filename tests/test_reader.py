"""npe2 reader: returns None for what it cannot read, never raises into napari."""

from __future__ import annotations

import os
import warnings

import dask.array as da
import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_emseg import io
from napari_emseg._reader import get_reader, layer_type_for


@pytest.fixture
def vol() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (4, 16, 20), dtype=np.uint8)


def _read(path):
    reader = get_reader(str(path))
    assert callable(reader)
    layers = reader(str(path))
    assert isinstance(layers, list) and len(layers) == 1
    return layers[0]


def test_reads_fixture_as_image_and_mask_as_labels(fixtures_dir):
    data, meta, kind = _read(fixtures_dir / "lucchi_crop_image.tif")
    assert kind == "image" and meta["name"] == "lucchi_crop_image"
    np.testing.assert_array_equal(data, tifffile.imread(fixtures_dir / "lucchi_crop_image.tif"))
    data, meta, kind = _read(fixtures_dir / "lucchi_crop_mask.tif")
    assert kind == "labels" and data.shape == (16, 128, 128)
    assert set(np.unique(data)) == {0, 1}
    data, meta, kind = _read(fixtures_dir / "lucchi_crop_instances.tif")
    assert kind == "labels" and int(data.max()) == 6


def test_reads_every_format(tmp_path, vol):
    tifffile.imwrite(tmp_path / "v.tif", vol)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = vol
    io.write_volume(tmp_path / "v.zarr", vol)
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(vol.shape[0]):
        iio.imwrite(folder / f"s{z * 5}.png", vol[z])  # s0, s5, s10, s15
    for path in ("v.tif", "v.h5", "slices", "v.zarr"):
        data, meta, kind = _read(tmp_path / path)
        assert kind == "image"
        np.testing.assert_array_equal(np.asarray(data), vol)
    data, meta, _ = _read(tmp_path / "v.zarr")
    assert isinstance(data, da.Array) and meta["multiscale"] is False  # zarr opens lazily
    assert meta["name"] == "v"
    # a list with one path is accepted
    assert get_reader([str(tmp_path / "v.tif")]) is not None


def test_labels_written_by_writer_open_as_labels(tmp_path):
    labels = np.zeros((3, 10, 10), np.uint32)
    labels[1, 2:5, 2:5] = 4
    io.write_labels(tmp_path / "cells_labels.zarr", labels)
    data, meta, kind = _read(tmp_path / "cells_labels.zarr")
    assert kind == "labels" and meta["name"] == "cells_labels"
    np.testing.assert_array_equal(np.asarray(data), labels)


def test_container_with_several_arrays_gives_one_layer_each(tmp_path, vol):
    labels = (vol > 128).astype(np.uint16)
    with h5py.File(tmp_path / "cremi.h5", "w") as f:
        f["volumes/raw"] = vol
        f["volumes/labels/mito"] = labels
        f["volumes/junk"] = np.arange(5)  # 1D: skipped with a warning
    with pytest.warns(UserWarning, match="skipped 1"):
        layers = _read_all(tmp_path / "cremi.h5")
    by_name = {meta["name"]: (data, kind) for data, meta, kind in layers}
    assert set(by_name) == {"cremi/volumes/raw", "cremi/volumes/labels/mito"}
    np.testing.assert_array_equal(by_name["cremi/volumes/raw"][0], vol)
    assert by_name["cremi/volumes/raw"][1] == "image"
    np.testing.assert_array_equal(by_name["cremi/volumes/labels/mito"][0], labels)
    assert by_name["cremi/volumes/labels/mito"][1] == "labels"


def _read_all(path):
    reader = get_reader(str(path))
    assert callable(reader)
    return reader(str(path))


def test_layer_type_heuristic(tmp_path):
    p = tmp_path
    assert layer_type_for(p / "mito_mask.tif", np.uint8) == "labels"
    assert layer_type_for(p / "instances.zarr", np.uint32) == "labels"
    assert layer_type_for(p / "seg-v2.h5", np.uint16) == "labels"
    assert layer_type_for(p / "mito_mask.tif", np.float32) == "image"
    assert layer_type_for(p / "emseg_raw.tif", np.uint8) == "image"
    assert layer_type_for(p / "volume.tif", np.uint8) == "image"


@pytest.mark.parametrize(
    "name, content",
    [
        ("table.csv", b"a,b\n1,2\n"),
        ("broken.tif", b"II*\x00" + bytes(range(200))),
        ("text.tif", b"hello world"),
        ("noise.h5", os.urandom(2000)),
        ("noise.mrc", os.urandom(2000)),
        ("noise.png", os.urandom(500)),
        ("noext", b"data"),
    ],
)
def test_returns_none_for_unreadable_files(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    assert get_reader(str(tmp_path / name)) is None


def test_returns_none_for_folders_and_odd_paths(tmp_path, vol):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "a.tif", vol)
    tifffile.imwrite(tmp_path / "b.tif", vol)
    for path in ("empty", "docs", "missing.tif", "rgb.tif"):
        assert get_reader(str(tmp_path / path)) is None
    assert get_reader([str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]) is None
    assert get_reader(None) is None  # type: ignore[arg-type]


def test_reader_function_warns_instead_of_raising(tmp_path, vol):
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, vol, compression="zlib")
    reader = get_reader(str(path))
    assert reader is not None
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 3 // 4])  # file broke after the probe
    with pytest.warns(UserWarning, match="could not read"):
        assert reader(str(path)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert reader(str(tmp_path / "gone.tif")) is None
