"""npe2 writer for Labels layers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_emseg import io
from napari_emseg._writer import write_labels


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
