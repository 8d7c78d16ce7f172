"""Dock widgets: Predict, Segment, Save (open from the manifest, run threaded).

The Segment widget's own tests are in test_widget_segment.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from napari.layers import Image, Labels

from widget_helpers import (
    GUI,
    WIDGETS,
    notes_fixture,  # noqa: F401  (the ``notes`` fixture)
    open_widget,
    tiny_checkpoint,
    wait_job,
)

pytestmark = GUI


@pytest.fixture
def crop(fixtures_dir) -> np.ndarray:
    return tifffile.imread(fixtures_dir / "lucchi_crop_image.tif")[:8]


@pytest.fixture
def tiny(tmp_path):
    return tiny_checkpoint(tmp_path / "tiny.pt")


def test_widgets_open_from_manifest_and_say_why_disabled(make_napari_viewer):
    viewer = make_napari_viewer()
    from napari_emseg._widgets import predict, save, segment, train

    modules = {"Predict": predict, "Segment instances": segment,
               "Train from annotations": train, "Save labels and model": save}
    for display_name, cls_name in WIDGETS.items():
        widget = open_widget(viewer, display_name)
        assert type(widget) is getattr(modules[display_name], cls_name)
    dock = viewer.window.dock_widgets
    assert set(WIDGETS) <= {name.split(" (")[0] for name in dock}
    pw = open_widget(viewer, "Predict")
    # no image layer: the run button is disabled and a label says why
    assert not pw.run_button.enabled
    assert "no image layer" in pw.reason.value
    viewer.add_image(np.zeros((4, 32, 32), np.uint8), name="em")
    assert pw.image.value is viewer.layers["em"]  # picker refreshed with the layer list
    assert "no image layer" not in pw.reason.value


def test_widget_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, napari_emseg._widgets.predict, napari_emseg._widgets.segment, "
            "napari_emseg._widgets.train, napari_emseg._widgets.save; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_predict_layer_equals_engine_and_updates_in_place(make_napari_viewer, qtbot, crop,
                                                          tiny, notes):
    from napari_emseg._widgets.registry import model_registry
    from napari_emseg.predict import predict_slice, predict_volume

    viewer = make_napari_viewer()
    viewer.add_image(crop, name="em", scale=(2.0, 1.0, 1.0), translate=(0.0, 5.0, 7.0))
    pw = open_widget(viewer, "Predict")
    model_registry(viewer).add(tiny)  # what "Browse…" or Train do
    assert pw.model.value == str(tiny.resolve())
    assert pw.run_button.enabled

    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None and not notes.errors
    prob = viewer.layers["em probabilities"]
    expected = predict_volume(crop, str(tiny))
    assert isinstance(prob, Image) and prob.data.shape == crop.shape
    assert prob.data.dtype == np.float32
    np.testing.assert_allclose(prob.data, expected, atol=1e-6)
    assert prob.blending == "additive"
    assert tuple(prob.contrast_limits) == (0.0, 1.0)
    np.testing.assert_array_equal(prob.scale, [2.0, 1.0, 1.0])
    np.testing.assert_array_equal(prob.translate, [0.0, 5.0, 7.0])

    # a re-run with "current slice" updates the same layer in place
    n_layers = len(viewer.layers)
    prob.data[:] = 0.0
    viewer.dims.set_point(0, 3 * 2.0)  # world z of data slice 3
    pw.extent.value = "slice"
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None
    assert len(viewer.layers) == n_layers and viewer.layers["em probabilities"] is prob
    np.testing.assert_allclose(prob.data[3], predict_slice(crop, str(tiny), 3), atol=1e-6)
    assert not prob.data[:3].any() and not prob.data[4:].any()


def test_predict_cancel_mid_run_leaves_layers(make_napari_viewer, qtbot, crop, tiny, notes,
                                              monkeypatch):
    from napari_emseg._widgets import jobs, registry

    viewer = make_napari_viewer()
    viewer.add_image(crop, name="em")
    before = np.full(crop.shape, 0.25, np.float32)
    viewer.add_image(before.copy(), name="em probabilities")
    pw = open_widget(viewer, "Predict")
    registry.model_registry(viewer).add(tiny)
    pw.advanced.value = True
    pw.batch.value = 1  # many small batches: the cancel check runs between them

    # press Cancel right after the first batch is done (from the worker's callback)
    calls = []
    real = jobs.Job._progress

    def progress_then_cancel(self, done, total):
        calls.append((done, total))
        real(self, done, total)
        self.cancel()

    monkeypatch.setattr(jobs.Job, "_progress", progress_then_cancel)
    names = [layer.name for layer in viewer.layers]
    job = pw.run()
    assert pw.cancel_button.enabled and not pw.run_button.enabled
    wait_job(qtbot, job)
    assert job.cancelled and calls
    done, total = calls[-1]
    assert done < total  # stopped part-way, after the first batch
    assert [layer.name for layer in viewer.layers] == names
    np.testing.assert_array_equal(viewer.layers["em probabilities"].data, before)
    assert not notes.errors and any("cancelled" in m for m in notes.infos)
    assert pw.run_button.enabled and not pw.cancel_button.enabled
    assert pw.status.value == "cancelled"


def _docks(viewer, tiny):
    """Predict, Segment, Train and Save docks with the tiny model registered."""
    from napari_emseg._widgets import registry

    docks = [open_widget(viewer, name) for name in
             ("Predict", "Segment instances", "Train from annotations", "Save labels and model")]
    registry.model_registry(viewer).add(tiny)
    return docks


# bad states, one test each: a failure in one does not hide the others
def test_no_layers_notify_without_exceptions(make_napari_viewer, tiny, notes):
    pw, sw, tw, vw = _docks(make_napari_viewer(), tiny)
    assert pw.run() is None and sw.run() is None and sw.preview() is None
    assert tw.train() is None and tw.new_annotation_layer() is None
    assert tw.predict_again() is None and vw.save_labels() is None
    assert len(notes.errors) == 7
    assert "no image layer" in notes.errors[0] and "probabilities" in notes.errors[1]


def test_missing_empty_or_wrong_sized_annotations_notify(make_napari_viewer, crop, tiny,
                                                         notes):
    viewer = make_napari_viewer()
    _pw, _sw, tw, _vw = _docks(viewer, tiny)
    viewer.add_image(crop, name="em")
    assert tw.train() is None and "no annotation layer" in notes.errors[-1]
    layer = tw.new_annotation_layer()
    assert isinstance(layer, Labels) and layer.name == "em annotations"
    assert layer.data.shape == crop.shape and not layer.data.any()
    assert tw.train() is None and "empty" in notes.errors[-1]
    viewer.add_labels(np.ones((2, 16, 16), np.uint8), name="small")
    tw.annotations.value = viewer.layers["small"]
    assert "shape" in tw.reason.value and not tw.train_button.enabled
    assert tw.train() is None and "shape" in notes.errors[-1]
    negative = np.zeros(crop.shape, np.int32)
    negative[1, 3, 3], negative[1, 4, 4] = -1, 2
    viewer.add_labels(negative, name="negative")
    tw.annotations.value = viewer.layers["negative"]
    assert tw.train() is None and "non-negative" in notes.errors[-1]


def test_rgb_images_are_refused_with_what_to_do(make_napari_viewer, crop, tiny, notes):
    viewer = make_napari_viewer()
    pw, _sw, tw, _vw = _docks(viewer, tiny)
    grey = np.repeat(crop[0][..., None], 3, axis=-1)
    viewer.add_image(grey, name="png", rgb=True)
    pw.image.value = tw.image.value = viewer.layers["png"]
    assert pw.run() is None and "Split RGB" in notes.errors[-1]
    assert "Split RGB" in tw.reason.value
    colour = grey.copy()
    colour[..., 0] = 255 - colour[..., 0]
    viewer.add_image(colour, name="photo", rgb=True)
    pw.image.value = viewer.layers["photo"]
    assert pw.run() is None and "colour; convert it to greyscale" in notes.errors[-1]


@pytest.mark.child_process
def test_3d_model_on_a_2d_image_notifies_and_adds_no_layer(make_napari_viewer, qtbot,
                                                           tmp_path, crop, tiny, notes):
    from napari_emseg._widgets import registry

    viewer = make_napari_viewer()
    pw, _sw, _tw, _vw = _docks(viewer, tiny)
    viewer.add_image(crop[0], name="slice")
    pw.image.value = viewer.layers["slice"]
    model3d = tiny_checkpoint(tmp_path / "tiny3d.pt", dims=3)
    registry.model_registry(viewer).add(model3d)
    assert pw.model.value == str(model3d.resolve())
    n_layers = len(viewer.layers)
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is not None and not job.cancelled
    assert "3D model" in notes.errors[-1] and "2D" in notes.errors[-1]
    assert len(viewer.layers) == n_layers
    assert pw.status.value.startswith("failed")


def test_bad_save_path_and_bad_patch_are_refused_before_running(make_napari_viewer, tmp_path,
                                                                crop, tiny, notes):
    viewer = make_napari_viewer()
    pw, _sw, tw, vw = _docks(viewer, tiny)
    viewer.add_image(crop, name="em")
    tw.new_annotation_layer()
    vw.labels_layer.value = viewer.layers["em annotations"]
    vw.labels_path.value = str(tmp_path / "labels.png")
    assert vw.save_labels() is None and ".tif" in notes.errors[-1]
    pw.image.value = viewer.layers["em"]
    pw.patch.value = "big"
    assert pw.run() is None and "patch" in notes.errors[-1]


def test_save_labels_and_model(make_napari_viewer, qtbot, tmp_path, tiny, notes):
    import torch

    from napari_emseg._widgets import registry
    from napari_emseg.io import read_volume
    from napari_emseg.models import zoo

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 300, size=(3, 20, 24)).astype(np.uint32)
    viewer.add_labels(labels, name="cells instances")
    vw = open_widget(viewer, "Save labels and model")
    assert vw.labels_layer.value is viewer.layers["cells instances"]
    for name in ("out.tif", "out.zarr"):
        vw.labels_path.value = str(tmp_path / name)
        job = vw.save_labels()
        wait_job(qtbot, job)
        assert job.exception is None, notes.errors
        np.testing.assert_array_equal(np.asarray(read_volume(tmp_path / name)), labels)

    assert not vw.save_checkpoint_button.enabled  # no model yet
    registry.model_registry(viewer).add(tiny)
    assert vw.save_checkpoint_button.enabled
    vw.checkpoint_path.value = str(tmp_path / "copy.pt")
    job = vw.save_checkpoint()
    wait_job(qtbot, job)
    assert job.exception is None, notes.errors
    original, copy = zoo.load_model(tiny), zoo.load_model(tmp_path / "copy.pt")
    for key, value in original.state_dict().items():
        torch.testing.assert_close(copy.state_dict()[key], value)

    vw.torchscript_path.value = str(tmp_path / "scripted.pt")
    job = vw.export_torchscript()
    wait_job(qtbot, job)
    assert job.exception is None, notes.errors
    scripted = torch.jit.load(str(tmp_path / "scripted.pt"))
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), original(x))


def test_save_suggests_a_free_name_and_never_replaces_a_layer_file(make_napari_viewer, qtbot,
                                                                   tmp_path, notes):
    from napari_emseg.io import read_volume, write_volume

    em = tmp_path / "em.tif"
    write_volume(em, np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8))
    viewer = make_napari_viewer()
    viewer.open(str(em), plugin="napari")
    (tmp_path / "em_instances.tif").write_bytes(b"older work")
    viewer.add_labels(np.ones((2, 8, 8), np.uint32), name="em instances")
    vw = open_widget(viewer, "Save labels and model")
    assert vw.labels_path.value == tmp_path / "em_instances_2.tif"  # beside the image, free
    wait_job(qtbot, vw.save_labels())
    assert (tmp_path / "em_instances.tif").read_bytes() == b"older work"
    np.testing.assert_array_equal(np.asarray(read_volume(tmp_path / "em_instances_2.tif")), 1)

    before = em.read_bytes()
    vw.labels_path.value = str(em)  # the image's own file: refused, even with replace ticked
    vw.replace.value = True
    assert vw.save_labels() is None and "read from" in notes.errors[-1]
    vw.replace.value = False
    vw.labels_path.value = str(tmp_path / "em_instances.tif")
    assert vw.save_labels() is None and "tick 'replace" in notes.errors[-1]
    vw.replace.value = True
    wait_job(qtbot, vw.save_labels())
    assert em.read_bytes() == before
    np.testing.assert_array_equal(np.asarray(read_volume(tmp_path / "em_instances.tif")), 1)
