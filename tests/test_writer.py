"""npe2 writer for Labels layers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_emseg import io
from napari_emseg._writer import write_labels
from widget_helpers import needs_display


@pytest.mark.parametrize("ext", [".tif", ".tiff", ".zarr"])
def test_writer_roundtrip(tmp_path, ext):
    labels = np.zeros((3, 12, 14), np.int32)
    labels[0, 1:4, 1:4] = 1
    labels[2, 5:9, 6:12] = 70000  # needs uint32
    target = tmp_path / f"out{ext}"
    written = write_labels(str(target), labels, {"name": "instances"})
    assert written == [str(target)]
    back = io.read_volume(target)
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)


def test_writer_multiscale_saves_level0(tmp_path):
    full = np.zeros((2, 8, 8), np.uint8)
    full[:, :4, :4] = 2
    written = write_labels(str(tmp_path / "m.tif"), [full, full[:, ::2, ::2]],
                           {"multiscale": True})
    np.testing.assert_array_equal(tifffile.imread(written[0]), full)


def test_writer_replaces_atomically(tmp_path, monkeypatch):
    target = tmp_path / "l.tif"
    write_labels(str(target), np.full((2, 6, 6), 3, np.uint16), {})

    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="no space"):
        write_labels(str(target), np.full((2, 6, 6), 8, np.uint16), {})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["l.tif"]
    np.testing.assert_array_equal(tifffile.imread(target), np.full((2, 6, 6), 3))


@pytest.mark.parametrize("name", ["saved.tif", "saved.zarr"])
def test_writer_keeps_scale_and_labels_marker(tmp_path, name):
    from napari_emseg._reader import get_reader

    labels = np.zeros((3, 10, 12), np.uint16)
    labels[1, 2:5, 3:7] = 9
    meta = {"scale": [40.0, 6.0, 6.0], "units": ["nanometer"] * 3}
    written = write_labels(str(tmp_path / name), labels, meta)
    assert io.is_labels_file(written[0])
    assert io.read_voxel_size(written[0]) == (40.0, 6.0, 6.0)
    data, layer_meta, kind = get_reader(written[0])(written[0])[0]
    assert kind == "labels" and tuple(layer_meta["scale"]) == (40.0, 6.0, 6.0)
    np.testing.assert_array_equal(np.asarray(data), labels)


@needs_display
def test_save_widget_writes_the_layer_scale(make_napari_viewer, qtbot, tmp_path):
    from widget_helpers import open_widget, wait_job

    viewer = make_napari_viewer()
    labels = np.zeros((2, 8, 8), np.uint32)
    labels[0, 1:4, 1:4] = 3
    viewer.add_labels(labels, name="cells", scale=(30.0, 4.0, 4.0), units="nm")
    widget = open_widget(viewer, "Save labels and model")
    for name in ("a.tif", "a.zarr"):
        widget.labels_path.value = str(tmp_path / name)
        job = widget.save_labels()
        wait_job(qtbot, job)
        assert job.exception is None
        assert io.read_voxel_size(tmp_path / name) == (30.0, 4.0, 4.0)
        assert io.is_labels_file(tmp_path / name)
