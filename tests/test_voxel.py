"""Voxel size from file metadata: reader scale, CLI 3D spacing."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_emseg.io import read_voxel_size

STACK = np.zeros((4, 16, 16), np.uint8)


def _imagej(path, z, yx, unit):
    tifffile.imwrite(path, STACK, imagej=True, resolution=(1 / yx, 1 / yx),
                     metadata={"spacing": z, "unit": unit, "axes": "ZYX"})
    return path


def test_imagej_tiff_in_nm_and_microns(tmp_path):
    assert read_voxel_size(_imagej(tmp_path / "a.tif", 30.0, 5.0, "nm")) == (30.0, 5.0, 5.0)
    um = _imagej(tmp_path / "b.tif", 0.04, 0.008, "micron")
    assert read_voxel_size(um) == pytest.approx((40.0, 8.0, 8.0))
    assert read_voxel_size(um, ndim=2) == pytest.approx((8.0, 8.0))


def test_tiff_without_physical_size_is_unknown(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", STACK)
    tifffile.imwrite(tmp_path / "dpi.tif", STACK[0], resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "px.tif", STACK, imagej=True, resolution=(1, 1),
                     metadata={"unit": "pixel", "axes": "ZYX"})
    for name in ("plain.tif", "dpi.tif", "px.tif"):
        assert read_voxel_size(tmp_path / name, ndim=2 if name == "dpi.tif" else 3) is None
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    assert read_voxel_size(tmp_path / "bad.tif") is None  # never raises
    assert read_voxel_size(tmp_path / "missing.mrc") is None


def test_mrc_voxel_size_in_angstrom(tmp_path):
    mrcfile = pytest.importorskip("mrcfile")
    with mrcfile.new(tmp_path / "a.mrc") as m:
        m.set_data(STACK)
        m.voxel_size = (50.0, 40.0, 300.0)  # x, y, z in Å
    with mrcfile.new(tmp_path / "zero.mrc") as m:
        m.set_data(STACK)
    assert read_voxel_size(tmp_path / "a.mrc") == pytest.approx((30.0, 4.0, 5.0))
    assert read_voxel_size(tmp_path / "zero.mrc") is None


def test_hdf5_attributes(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "cremi.h5", "w") as f:
        f.create_dataset("raw", data=STACK).attrs["resolution"] = [40, 4, 4]
    with h5py.File(tmp_path / "fiji.h5", "w") as f:
        f.create_dataset("raw", data=STACK).attrs["element_size_um"] = [0.03, 0.005, 0.005]
        f.create_dataset("seg", data=STACK)
    assert read_voxel_size(tmp_path / "cremi.h5") == (40.0, 4.0, 4.0)
    assert read_voxel_size(tmp_path / "fiji.h5", key="raw") == pytest.approx((30.0, 5.0, 5.0))
    assert read_voxel_size(tmp_path / "fiji.h5", key="seg") is None
    assert read_voxel_size(tmp_path / "fiji.h5") is None  # two datasets, no key


def test_ome_zarr_scale(tmp_path):
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    g.create_array("0", shape=STACK.shape, dtype=STACK.dtype)
    g.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [0.03, 0.006, 0.006]}]}]}]
    assert read_voxel_size(tmp_path / "ome.zarr") == pytest.approx((30.0, 6.0, 6.0))


def test_reader_sets_layer_scale_and_units(tmp_path):
    from napari_emseg._reader import read_em_volume

    path = _imagej(tmp_path / "em.tif", 30.0, 5.0, "nm")
    (data, meta, kind), = read_em_volume(str(path))
    assert meta["scale"] == (30.0, 5.0, 5.0) and meta["units"] == "nm"
    tifffile.imwrite(tmp_path / "plain.tif", STACK)
    (_, meta, _), = read_em_volume(str(tmp_path / "plain.tif"))
    assert "scale" not in meta


def test_cli_segment_uses_the_voxel_size_for_3d(tmp_path, capsys, monkeypatch):
    from napari_emseg import postprocess
    from napari_emseg.cli import main

    seen = []
    real = postprocess.segment

    def spy(prob, **kw):
        seen.append(kw.get("spacing"))
        return real(prob, **kw)

    monkeypatch.setattr(postprocess, "segment", spy)
    prob = np.zeros((4, 32, 32), np.float32)
    prob[1:3, 8:24, 8:24] = 0.9
    src = tmp_path / "prob.tif"
    tifffile.imwrite(src, prob, imagej=True, resolution=(1 / 5.0, 1 / 5.0),
                     metadata={"spacing": 30.0, "unit": "nm", "axes": "ZYX"})
    out = tmp_path / "labels.tif"
    assert main(["segment", str(src), str(out), "--dims", "3"]) == 0
    assert "z 30 × y 5 × x 5 nm" in capsys.readouterr().err
    assert main(["segment", str(src), str(out), "--dims", "3", "--spacing", "2", "1", "1",
                 "--overwrite"]) == 0  # fmt: skip
    assert main(["segment", str(src), str(out), "--dims", "2", "--quiet", "--overwrite"]) == 0
    assert seen == [(6.0, 1.0, 1.0), (2.0, 1.0, 1.0), None]
