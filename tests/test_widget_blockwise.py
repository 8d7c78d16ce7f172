"""Predict widget on a lazy (zarr / dask) layer: blockwise into a zarr, shown lazily."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from napari.layers import Image

from widget_helpers import (
    GUI,
    notes_fixture,  # noqa: F401  (the ``notes`` fixture)
    open_widget,
    tiny_checkpoint,
    wait_job,
)

pytestmark = GUI

BLOCK = (6, 48, 48)
N_BLOCKS = 2 * 2 * 2


@pytest.fixture
def volume(fixtures_dir) -> np.ndarray:
    return tifffile.imread(fixtures_dir / "lucchi_crop_image.tif")[:12, :96, :96]


@pytest.fixture
def em_zarr(tmp_path, volume):
    path = tmp_path / "em.zarr"
    arr = zarr.open_array(str(path), mode="w", shape=volume.shape, chunks=BLOCK,
                          dtype=volume.dtype)
    arr[:] = volume
    return path


@pytest.fixture
def tiny(tmp_path):
    return tiny_checkpoint(tmp_path / "tiny.pt")


@pytest.fixture
def calls(monkeypatch):
    """Counts predict_volume calls (one per block predicted)."""
    from napari_emseg.blockwise import predict

    real = predict.predict_volume  # the name blockwise prediction calls
    counter = {"n": 0, "after": None}

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        counter["n"] += 1
        if counter["after"] is not None:
            counter["after"](counter["n"])
        return out

    monkeypatch.setattr(predict, "predict_volume", counting)
    return counter


def _open_lazy(viewer, path):
    from napari_emseg._reader import get_reader

    assert get_reader(str(path)) is not None
    (layer,) = viewer.open(str(path), plugin="napari-emseg")
    assert isinstance(layer.data, da.Array)  # opened lazily, not loaded
    return layer


def _widget(viewer, tiny):
    from napari_emseg._widgets.registry import model_registry

    pw = open_widget(viewer, "Predict")
    model_registry(viewer).add(tiny)
    pw.advanced.value = True
    pw.block.value = ",".join(map(str, BLOCK))
    return pw


def _markers(target):
    folder = target / ".emseg_done"
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _chunk_times(target):
    return {str(p): p.stat().st_mtime_ns for p in target.rglob("*")
            if p.is_file() and ".emseg_done" not in p.parts}


def test_lazy_layer_predicts_blockwise_next_to_source_and_resumes(
        make_napari_viewer, qtbot, monkeypatch, volume, em_zarr, tiny, calls, notes):
    from napari_emseg._widgets import predict as widget_module
    from napari_emseg.predict import predict_volume

    viewer = make_napari_viewer()
    layer = _open_lazy(viewer, em_zarr)
    layer.scale = (2.0, 1.0, 1.0)
    layer.translate = (0.0, 5.0, 7.0)
    pw = _widget(viewer, tiny)
    assert pw.image.value is layer

    # the layer appears while the job runs and is refreshed as blocks finish
    monkeypatch.setattr(widget_module, "REFRESH_INTERVAL", 0.0)
    added_while_running, refreshes = [], []
    viewer.layers.events.inserted.connect(
        lambda e: added_while_running.append(not pw.job.done))
    real_refresh = Image.refresh

    def counting_refresh(self, *args, **kwargs):
        if self.name == "em probabilities":
            refreshes.append(self.data.compute().any(axis=(1, 2)).sum())
        return real_refresh(self, *args, **kwargs)

    monkeypatch.setattr(Image, "refresh", counting_refresh)
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None and not notes.errors
    assert added_while_running == [True]
    assert len(refreshes) >= 2 and refreshes[-1] == volume.shape[0]
    monkeypatch.setattr(Image, "refresh", real_refresh)
    target = em_zarr.parent / "em_probabilities.zarr"
    assert target.is_dir() and job.target == target
    assert calls["n"] == N_BLOCKS
    prob = viewer.layers["em probabilities"]
    assert isinstance(prob, Image) and isinstance(prob.data, da.Array)
    assert prob.data.shape == volume.shape and prob.data.dtype == np.float32
    assert prob.blending == "additive" and prob.colormap.name == "magma"
    assert tuple(prob.contrast_limits) == (0.0, 1.0)
    np.testing.assert_array_equal(prob.scale, [2.0, 1.0, 1.0])
    np.testing.assert_array_equal(prob.translate, [0.0, 5.0, 7.0])
    shown = prob.data.compute()
    np.testing.assert_array_equal(shown, zarr.open_array(str(target), mode="r")[:])
    # blockwise (with the model's halo) agrees with the in-memory prediction
    ref = predict_volume(volume, str(tiny))
    err = np.abs(shown - ref)
    assert err.mean() < 2e-3 and err.max() < 0.05
    assert not np.allclose(ref, ref.mean(), atol=1e-3)
    assert len(_markers(target)) == N_BLOCKS
    assert pw.status.value == "done"

    # a re-run resumes the finished target: nothing is predicted or rewritten
    markers, chunks = _markers(target), _chunk_times(target)
    calls["n"] = 0
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None and not notes.errors
    assert calls["n"] == 0
    assert _markers(target) == markers and _chunk_times(target) == chunks
    prob = viewer.layers["em probabilities"]
    assert isinstance(prob.data, da.Array)
    np.testing.assert_array_equal(prob.data.compute(), shown)
    assert [lyr.name for lyr in viewer.layers].count("em probabilities") == 1

    # "overwrite" starts over
    pw.overwrite.value = True
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None and calls["n"] == N_BLOCKS
    np.testing.assert_allclose(viewer.layers["em probabilities"].data.compute(), shown,
                               atol=1e-6)


def test_cancel_keeps_finished_blocks_and_rerun_completes(
        make_napari_viewer, qtbot, em_zarr, tiny, calls, notes):
    viewer = make_napari_viewer()
    _open_lazy(viewer, em_zarr)
    pw = _widget(viewer, tiny)
    target = em_zarr.parent / "em_probabilities.zarr"

    # press Cancel (thread-safe) once the third block is predicted
    calls["after"] = lambda n: pw.job.cancel() if n == 3 else None
    job = pw.run()
    wait_job(qtbot, job)
    calls["after"] = None
    assert job.cancelled and not notes.errors
    assert pw.status.value == "cancelled" and pw.run_button.enabled
    done = _markers(target)
    assert len(done) == 3 == calls["n"]
    prob = viewer.layers["em probabilities"]
    assert isinstance(prob.data, da.Array)
    partial = prob.data.compute()
    # finished blocks hold probabilities, the others zeros (zarr fill value)
    for iz in range(2):
        for iy in range(2):
            for ix in range(2):
                core = partial[iz * 6:(iz + 1) * 6, iy * 48:(iy + 1) * 48,
                               ix * 48:(ix + 1) * 48]
                assert (core.any()) == (f"{iz}_{iy}_{ix}" in done)

    # the re-run predicts only the missing blocks, the finished ones stay as they were
    calls["n"] = 0
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None and not notes.errors
    assert calls["n"] == N_BLOCKS - 3
    markers = _markers(target)
    assert len(markers) == N_BLOCKS and all(markers[k] == v for k, v in done.items())
    full = viewer.layers["em probabilities"].data.compute()
    assert (full != 0).mean() > 0.99  # every block written now
    keep = partial != 0
    np.testing.assert_array_equal(full[keep], partial[keep])


def test_output_path_and_errors_notify(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                       em_zarr, tiny, notes):
    from napari_emseg._widgets.predict import default_target

    viewer = make_napari_viewer()
    layer = _open_lazy(viewer, em_zarr)
    pw = _widget(viewer, tiny)

    # a target of another shape: an error notification, no exception, no layer
    bad = em_zarr.parent / "em_probabilities.zarr"
    zarr.open_array(str(bad), mode="w", shape=(2, 2, 2), dtype="float32")
    n_layers = len(viewer.layers)
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is not None and not job.cancelled
    assert notes.errors and "shape" in notes.errors[-1]
    assert len(viewer.layers) == n_layers and pw.status.value.startswith("failed")

    # the image's own zarr as output is refused before anything runs
    pw.output.value = str(em_zarr)
    pw.overwrite.value = True
    assert pw.run() is None and "own file" in notes.errors[-1]
    assert zarr.open_array(str(em_zarr), mode="r").shape == (12, 96, 96)

    # bad block text is refused
    pw.output.value = ""
    pw.block.value = "big"
    assert pw.run() is None and "block" in notes.errors[-1]

    # a chosen output path (".zarr" appended)
    pw.block.value = "12,96,96"
    pw.output.value = str(tmp_path / "chosen")
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None
    assert (tmp_path / "chosen.zarr").is_dir()
    assert zarr.open_array(str(tmp_path / "chosen.zarr"), mode="r").shape == (12, 96, 96)

    # a lazy layer without a source file goes to ~/.napari-emseg/predictions
    monkeypatch.setenv("HOME", str(tmp_path))
    other = viewer.add_image(da.from_array(np.zeros((4, 32, 32), np.uint8)), name="my em/x")
    assert default_target(other) == tmp_path / ".napari-emseg/predictions/my_em_x.zarr"
    assert default_target(layer) == em_zarr.parent / "em_probabilities.zarr"
