"""Round trips and error handling of napari_emseg.io."""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import h5py
import imageio.v3 as iio
import mrcfile
import numpy as np
import pytest
import tifffile
import zarr

from napari_emseg import io
from napari_emseg.io import read as io_read
from napari_emseg.io import write as io_write

ZARR3 = int(zarr.__version__.split(".")[0]) >= 3
ZARR_FORMATS = [2, 3] if ZARR3 else [2]


@pytest.fixture
def vol() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 24, 36), dtype=np.uint8)


def _check(path: Path, expected: np.ndarray, **kw) -> None:
    eager = io.read_volume(path, **kw)
    assert isinstance(eager, np.ndarray)
    assert eager.shape == expected.shape and eager.dtype == expected.dtype
    np.testing.assert_array_equal(eager, expected)
    lazy = io.read_volume(path, lazy=True, **kw)
    assert isinstance(lazy, da.Array)
    assert lazy.shape == expected.shape and lazy.dtype == expected.dtype
    np.testing.assert_array_equal(lazy.compute(), expected)


# --------------------------------------------------------------------------- #
# reading: every format
# --------------------------------------------------------------------------- #
def test_multipage_tiff(tmp_path, vol):
    tifffile.imwrite(tmp_path / "v.tif", vol, compression="zlib")
    _check(tmp_path / "v.tif", vol)
    u16 = vol.astype(np.uint16) * 200
    tifffile.imwrite(tmp_path / "v16.tiff", u16)
    _check(tmp_path / "v16.tiff", u16)


def test_real_fixture(fixtures_dir):
    path = fixtures_dir / "lucchi_crop_image.tif"
    arr = io.read_volume(path)
    assert arr.shape == (16, 128, 128) and arr.dtype == np.uint8
    # pages read one by one with tifffile give the same stack
    pages = np.stack([tifffile.imread(path, key=i) for i in range(16)])
    np.testing.assert_array_equal(arr, pages)
    # a 4-slice stack stored by tifffile as one planar 4-sample page: still ZYX, not RGB
    isbi = io.read_volume(fixtures_dir / "isbi_crop_image.tif")
    assert isbi.shape == (4, 128, 128)
    np.testing.assert_array_equal(isbi, tifffile.imread(fixtures_dir / "isbi_crop_image.tif"))


def test_three_slice_stack_is_not_rgb(tmp_path, vol):
    # tifffile stores (3|4, Y, X) as one planar RGB(A) page unless told otherwise
    tifffile.imwrite(tmp_path / "three.tif", vol[:3])
    tifffile.imwrite(tmp_path / "four.tif", vol[:4])
    _check(tmp_path / "three.tif", vol[:3])
    _check(tmp_path / "four.tif", vol[:4])


def test_single_2d_images_stay_yx(tmp_path, vol):
    iio.imwrite(tmp_path / "one.png", vol[0])
    tifffile.imwrite(tmp_path / "one.tif", vol[1])
    _check(tmp_path / "one.png", vol[0])
    _check(tmp_path / "one.tif", vol[1])
    iio.imwrite(tmp_path / "one.jpg", vol[0], quality=95)
    jpg = io.read_volume(tmp_path / "one.jpg")
    assert jpg.shape == vol[0].shape and jpg.dtype == np.uint8
    assert np.abs(jpg.astype(int) - vol[0]).mean() < 20  # lossy


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_slice_folder_natural_order(tmp_path, vol, ext):
    folder = tmp_path / "slices"
    folder.mkdir()
    numbers = [1, 2, 10, 11, 100]  # as text: 1, 10, 100, 11, 2
    for z, n in enumerate(numbers):
        if ext == ".png":
            iio.imwrite(folder / f"z{n}{ext}", vol[z])
        else:
            tifffile.imwrite(folder / f"z{n}{ext}", vol[z])
    (folder / "notes.txt").write_text("ignored")
    (folder / ".hidden.png").write_bytes(b"not an image")
    assert sorted(p.name for p in folder.glob(f"z*{ext}"))[1] == f"z10{ext}"  # text order is wrong
    _check(folder, vol)


def test_natural_key():
    names = ["z10.png", "z2.png", "Z1.png", "z02b.png", "a.png"]
    assert sorted(names, key=io.natural_key) == ["a.png", "Z1.png", "z2.png", "z02b.png", "z10.png"]


def test_slice_folder_shape_mismatch(tmp_path, vol):
    folder = tmp_path / "s"
    folder.mkdir()
    iio.imwrite(folder / "0.png", vol[0])
    iio.imwrite(folder / "1.png", vol[1, :10])
    with pytest.raises(ValueError, match="1.png"):
        io.read_volume(folder)


@pytest.mark.parametrize("fmt", ZARR_FORMATS)
def test_zarr_array_and_group(tmp_path, vol, fmt):
    kw = {"zarr_format": fmt} if ZARR3 else {}
    arr = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=vol.shape,
                          chunks=(2, 16, 16), dtype=vol.dtype, **kw)
    arr[...] = vol
    _check(tmp_path / "a.zarr", vol)

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", **kw)
    create = group.create_array if ZARR3 else group.create_dataset
    create("raw", shape=vol.shape, dtype=vol.dtype, chunks=(1, 24, 36))[...] = vol
    _check(tmp_path / "g.zarr", vol)  # the only array is chosen
    create("labels", shape=vol.shape, dtype=np.uint32, chunks=(1, 24, 36))[...] = 7
    with pytest.raises(ValueError, match="labels.*raw|raw.*labels"):
        io.read_volume(tmp_path / "g.zarr")
    _check(tmp_path / "g.zarr", np.full(vol.shape, 7, np.uint32), key="labels")
    with pytest.raises(ValueError, match="nope"):
        io.read_volume(tmp_path / "g.zarr", key="nope")
    assert io.list_keys(tmp_path / "g.zarr") == ["labels", "raw"]
    assert io.list_keys(tmp_path / "a.zarr") == []


@pytest.mark.parametrize("fmt", ZARR_FORMATS)
def test_ome_zarr_multiscale_level0(tmp_path, vol, fmt):
    kw = {"zarr_format": fmt} if ZARR3 else {}
    group = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w", **kw)
    create = group.create_array if ZARR3 else group.create_dataset
    # TCZYX with singleton T and C, plus a 2x downsampled level
    create("s0", shape=(1, 1, *vol.shape), dtype=vol.dtype)[...] = vol[None, None]
    small = vol[:, ::2, ::2]
    create("s1", shape=(1, 1, *small.shape), dtype=vol.dtype)[...] = small[None, None]
    multiscales = [{"version": "0.4", "datasets": [{"path": "s0"}, {"path": "s1"}],
                    "axes": [{"name": a} for a in "tczyx"]}]
    if fmt == 3:
        group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = multiscales
    _check(tmp_path / "ome.zarr", vol)
    assert io.list_keys(tmp_path / "ome.zarr") == []


def test_hdf5_one_and_several_datasets(tmp_path, vol):
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f.create_dataset("volumes/raw", data=vol, chunks=(1, 24, 36))
    _check(tmp_path / "one.h5", vol)
    with h5py.File(tmp_path / "two.hdf5", "w") as f:
        f["raw"] = vol
        f["seg"] = vol.astype(np.uint16) + 1
    with pytest.raises(ValueError, match="raw, seg"):
        io.read_volume(tmp_path / "two.hdf5")
    _check(tmp_path / "two.hdf5", vol.astype(np.uint16) + 1, key="seg")
    with pytest.raises(ValueError, match="missing"):
        io.read_volume(tmp_path / "two.hdf5", key="missing")
    assert io.list_keys(tmp_path / "two.hdf5") == ["raw", "seg"]
    assert io.list_keys(tmp_path / "one.h5") == ["volumes/raw"]


def test_key_rejected_for_single_array_formats(tmp_path, vol):
    tifffile.imwrite(tmp_path / "v.tif", vol)
    with pytest.raises(ValueError, match="key="):
        io.read_volume(tmp_path / "v.tif", key="raw")
    assert io.list_keys(tmp_path / "v.tif") == []


def test_mrc(tmp_path, vol):
    data = vol.astype(np.int16) - 100
    with mrcfile.new(tmp_path / "t.mrc") as m:
        m.set_data(data)
    _check(tmp_path / "t.mrc", data)
    with mrcfile.new(tmp_path / "t.rec") as m:
        m.set_data(vol.astype(np.float32) / 255)
    _check(tmp_path / "t.rec", vol.astype(np.float32) / 255)


def test_auto_lazy_for_large_volumes(tmp_path, vol, monkeypatch):
    tifffile.imwrite(tmp_path / "v.tif", vol)
    monkeypatch.setattr(io_read, "LAZY_BYTES", vol.nbytes - 1)
    assert isinstance(io.read_volume(tmp_path / "v.tif"), da.Array)
    monkeypatch.setattr(io_read, "LAZY_BYTES", vol.nbytes)
    assert isinstance(io.read_volume(tmp_path / "v.tif"), np.ndarray)


# --------------------------------------------------------------------------- #
# reading: bad input
# --------------------------------------------------------------------------- #
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        io.read_volume(tmp_path / "nothere.tif")


def test_unknown_extension(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        io.read_volume(tmp_path / "table.csv")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="no 2D image slices"):
        io.read_volume(tmp_path / "empty")


def test_corrupt_tiff(tmp_path, vol):
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + os.urandom(200))
    with pytest.raises(ValueError, match="cannot read TIFF"):
        io.read_volume(tmp_path / "junk.tif")
    tifffile.imwrite(tmp_path / "ok.tif", vol, compression="zlib")
    raw = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) * 3 // 4])
    with pytest.raises(ValueError, match="cannot read TIFF"):
        io.read_volume(tmp_path / "cut.tif")
    (tmp_path / "text.tif").write_text("hello")
    with pytest.raises(ValueError, match="cannot read TIFF"):
        io.read_volume(tmp_path / "text.tif")


@pytest.mark.parametrize("name", ["junk.h5", "junk.mrc", "junk.png"])
def test_corrupt_other_formats(tmp_path, name):
    (tmp_path / name).write_bytes(os.urandom(3000))
    with pytest.raises(ValueError, match="cannot"):
        io.read_volume(tmp_path / name)


def test_rgb_stack_rejected(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with pytest.raises(ValueError, match="RGB"):
        io.read_volume(tmp_path / "rgb.tif")
    with pytest.raises(ValueError, match="RGB"):
        io.read_volume(tmp_path / "rgb.tif", lazy=True)
    folder = tmp_path / "rgbslices"
    folder.mkdir()
    for z in range(3):
        iio.imwrite(folder / f"{z}.png", rgb[z])
    with pytest.raises(ValueError, match="RGB"):
        io.read_volume(folder)


def test_grey_saved_as_rgb_is_accepted(tmp_path, vol):
    rgb = np.repeat(vol[..., None], 3, axis=-1)
    tifffile.imwrite(tmp_path / "grey_rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(io.read_volume(tmp_path / "grey_rgb.tif"), vol)
    iio.imwrite(tmp_path / "grey_rgb.png", rgb[0])
    np.testing.assert_array_equal(io.read_volume(tmp_path / "grey_rgb.png"), vol[0])


def test_4d_ambiguous(tmp_path, vol):
    four = np.stack([vol, vol], axis=1)  # (5, 2, 24, 36) ZCYX
    tifffile.imwrite(tmp_path / "4d.tif", four, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(ValueError, match="4D"):
        io.read_volume(tmp_path / "4d.tif")
    with h5py.File(tmp_path / "4d.h5", "w") as f:
        f["x"] = four
        f["y"] = vol[:, None]  # a singleton axis is dropped
    with pytest.raises(ValueError, match="ambiguous"):
        io.read_volume(tmp_path / "4d.h5", key="x")
    np.testing.assert_array_equal(io.read_volume(tmp_path / "4d.h5", key="y"), vol)


# --------------------------------------------------------------------------- #
# writing
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("ext", [".tif", ".tiff", ".zarr"])
def test_write_labels_roundtrip_uint16(tmp_path, ext):
    labels = np.zeros((4, 20, 30), np.uint32)
    labels[1:3, 5:9, 5:12] = 3
    labels[0, :4, :4] = 65535
    out = io.write_labels(tmp_path / f"l{ext}", labels)
    assert out == tmp_path / f"l{ext}"
    back = io.read_volume(out)
    assert back.dtype == np.uint16  # ids fit
    np.testing.assert_array_equal(back, labels)
    assert labels.dtype == np.uint32 and labels[0, 0, 0] == 65535  # input untouched


@pytest.mark.parametrize("ext", [".tif", ".zarr"])
def test_write_labels_uint32_when_needed(tmp_path, ext):
    labels = np.arange(2 * 8 * 8, dtype=np.int64).reshape(2, 8, 8) * 1000
    back = io.read_volume(io.write_labels(tmp_path / f"l{ext}", labels))
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("fmt", ZARR_FORMATS)
def test_write_labels_zarr_formats(tmp_path, fmt):
    labels = np.arange(3 * 10 * 10, dtype=np.uint32).reshape(3, 10, 10)
    io.write_labels(tmp_path / "l.zarr", labels, zarr_format=fmt)
    # an OME-NGFF label image: a group holding the array "0"
    group, array = (".zgroup", ".zarray") if fmt == 2 else ("zarr.json", "zarr.json")
    assert (tmp_path / "l.zarr" / group).exists()
    assert (tmp_path / "l.zarr" / "0" / array).exists()
    np.testing.assert_array_equal(io.read_volume(tmp_path / "l.zarr"), labels)
    assert io.is_labels_file(tmp_path / "l.zarr")


def test_write_labels_dask_and_2d(tmp_path):
    labels = np.random.default_rng(2).integers(0, 5, (6, 16, 16)).astype(np.uint32)
    lazy = da.from_array(labels, chunks=(2, 8, 8))
    for ext in (".tif", ".zarr"):
        np.testing.assert_array_equal(
            io.read_volume(io.write_labels(tmp_path / f"d{ext}", lazy)), labels
        )
    np.testing.assert_array_equal(
        io.read_volume(io.write_labels(tmp_path / "two_d.tif", labels[0])), labels[0]
    )


def test_write_labels_bad_input(tmp_path):
    with pytest.raises(ValueError, match="integer"):
        io.write_labels(tmp_path / "f.tif", np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        io.write_labels(tmp_path / "n.tif", -np.ones((2, 4, 4), np.int32))
    with pytest.raises(ValueError, match=r"\.tif"):
        io.write_labels(tmp_path / "x.png", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        io.write_labels(tmp_path / "x.tif", np.zeros(4, np.uint8))
    io.write_labels(tmp_path / "e.tif", np.ones((2, 4, 4), np.uint8))
    with pytest.raises(FileExistsError):
        io.write_labels(tmp_path / "e.tif", np.ones((2, 4, 4), np.uint8), overwrite=False)
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


@pytest.mark.parametrize("ext", [".tif", ".zarr"])
def test_write_labels_atomic(tmp_path, monkeypatch, ext):
    path = tmp_path / f"labels{ext}"
    old = np.full((4, 8, 8), 9, np.uint32)
    io.write_labels(path, old)
    new = np.full((4, 8, 8), 5, np.uint32)

    # fail after two of four slices were written
    real_pages = io_write._iter_pages

    def failing_pages(data, dtype):
        for i, page in enumerate(real_pages(data, dtype)):
            if i == 2:
                raise RuntimeError("disk full")
            yield page

    if ext == ".tif":
        monkeypatch.setattr(io_write, "_iter_pages", failing_pages)
    else:
        real_create = io_write._create_zarr

        def create_then_fail(*args, **kwargs):
            arr = real_create(*args, **kwargs)
            arr[:2] = 5  # part of the data reaches the temporary store
            raise RuntimeError("disk full")

        monkeypatch.setattr(io_write, "_create_zarr", create_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        io.write_labels(path, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial file
    np.testing.assert_array_equal(io.read_volume(path), old)  # old file intact

    # a failed first write leaves nothing at all
    fresh = tmp_path / f"fresh{ext}"
    with pytest.raises(RuntimeError):
        io.write_labels(fresh, new)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_write_volume(tmp_path, vol):
    probs = vol.astype(np.float64) / 255
    for ext in (".tif", ".zarr"):
        back = io.read_volume(io.write_volume(tmp_path / f"p{ext}", probs))
        assert back.dtype == np.float32
        np.testing.assert_allclose(back, probs.astype(np.float32))
        back8 = io.read_volume(io.write_volume(tmp_path / f"u{ext}", vol))
        assert back8.dtype == np.uint8
        np.testing.assert_array_equal(back8, vol)
    multi = np.stack([probs, 1 - probs]).astype(np.float32)  # CZYX
    back = tifffile.imread(io.write_volume(tmp_path / "m.tif", multi))
    np.testing.assert_array_equal(back, multi)


def test_open_zarr_output(tmp_path):
    path = tmp_path / "out.zarr"
    arr = io.open_zarr_output(path, (4, 20, 20), np.float32, chunks=(1, 10, 10))
    assert arr.shape == (4, 20, 20) and arr.dtype == np.float32
    assert arr.chunks == (1, 10, 10)
    arr[1:3, :10] = 0.5
    again = io.open_zarr_output(path, (4, 20, 20), np.float32)  # resume
    assert float(again[1, 0, 0]) == 0.5 and float(again[0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="exists with shape"):
        io.open_zarr_output(path, (4, 20, 21), np.float32)
    with pytest.raises(ValueError, match="dtype"):
        io.open_zarr_output(path, (4, 20, 20), np.uint8)
    fresh = io.open_zarr_output(path, (2, 5, 5), np.uint8, overwrite=True)
    assert fresh.shape == (2, 5, 5) and int(fresh[...].max()) == 0
    expected = np.zeros((2, 5, 5), np.uint8)
    expected[0] = 3
    fresh[0] = 3
    np.testing.assert_array_equal(io.read_volume(path), expected)
