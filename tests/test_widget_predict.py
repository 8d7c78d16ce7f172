"""Predict widget: default model, adaptation to the volume, voxel size, progress."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from widget_helpers import (
    GUI,
    notes_fixture,  # noqa: F401  (the ``notes`` fixture)
    open_widget,
    tiny_checkpoint,
    wait_job,
)

pytestmark = GUI


@pytest.fixture
def crop(fixtures_dir) -> np.ndarray:
    return tifffile.imread(fixtures_dir / "lucchi_crop_image.tif")[:6]


def test_first_bundled_model_is_preselected(make_napari_viewer):
    from napari_emseg.models.zoo import list_models

    bundled = list_models()
    if not bundled:
        pytest.skip("no bundled models installed")
    viewer = make_napari_viewer()
    pw = open_widget(viewer, "Predict")
    assert pw.model.value == bundled[0]
    viewer.add_image(np.zeros((4, 32, 32), np.uint8), name="em")
    assert pw.run_button.enabled and not pw.reason.value
    for widget in (pw.image, pw.model, pw.browse, pw.extent, pw.voxel, pw.match_voxel,
                   pw.adapt, pw.tta, pw.device, pw.advanced, pw.patch, pw.overlap, pw.batch,
                   pw.amp, pw.output, pw.block, pw.overwrite, pw.run_button,
                   pw.cancel_button):
        assert widget.tooltip, widget.label


@pytest.mark.child_process
def test_adapt_checkbox_changes_the_prediction(make_napari_viewer, qtbot, tmp_path, crop,
                                               notes):
    from napari_emseg._widgets.registry import model_registry
    from napari_emseg.adapt import predict_adapted
    from napari_emseg.models import zoo
    from napari_emseg.predict import predict_volume

    tiny = tiny_checkpoint(tmp_path / "tiny.pt")
    viewer = make_napari_viewer()
    viewer.add_image(crop, name="em")
    pw = open_widget(viewer, "Predict")
    model_registry(viewer).add(tiny)
    assert pw.voxel.value == ""  # scale 1: unknown
    assert not pw.adapt.value and pw.match_voxel.value  # the defaults

    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None, notes.errors
    plain = viewer.layers["em probabilities"].data.copy()
    np.testing.assert_allclose(plain, predict_volume(crop, str(tiny)), atol=1e-6)
    # the dock's own progress bar reached its total, with counts
    assert pw.progress.bar.value == pw.progress.bar.max > 1
    total = pw.progress.bar.max
    assert pw.progress.text.value.startswith(f"{total}/{total} · done in")

    pw.adapt.value = True
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None, notes.errors
    adapted = viewer.layers["em probabilities"].data
    assert np.abs(adapted - plain).max() > 1e-3
    expected, info = predict_adapted(crop, zoo.load_model(tiny), adapt=True)
    assert info["adapted"]
    np.testing.assert_allclose(adapted, expected, atol=1e-5)
    assert "BatchNorm statistics re-estimated" in pw.status.value


def test_voxel_size_from_the_layer_and_resampling(make_napari_viewer, qtbot, tmp_path, crop,
                                                  notes):
    import torch

    from napari_emseg._widgets.registry import model_registry
    from napari_emseg.adapt import predict_adapted
    from napari_emseg.models import zoo
    from napari_emseg.predict import predict_volume

    torch.manual_seed(0)
    model = zoo.build_model(dict(dims=2, in_channels=1, out_channels=1, depth=2, width=4),
                            {"name": "tiny", "patch": [64, 64], "voxel_size_nm": [10, 10, 10]})
    ckpt = zoo.save_checkpoint(model, tmp_path / "tiny10nm.pt")
    viewer = make_napari_viewer()
    viewer.add_image(crop, name="em", scale=(10.0, 5.0, 5.0))
    pw = open_widget(viewer, "Predict")
    model_registry(viewer).add(ckpt)
    assert pw.voxel.value == "10,5,5"  # prefilled from the layer's scale

    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None, notes.errors
    prob = viewer.layers["em probabilities"].data
    assert prob.shape == crop.shape
    expected, info = predict_adapted(crop, zoo.load_model(ckpt), voxel_size=(10, 5, 5))
    assert info["resampled"] == [1.0, 0.5, 0.5]
    np.testing.assert_allclose(prob, expected, atol=1e-5)
    assert "resampled to the model's voxel size" in pw.status.value

    pw.match_voxel.value = False  # as it is: same as a plain prediction
    job = pw.run()
    wait_job(qtbot, job)
    np.testing.assert_allclose(viewer.layers["em probabilities"].data,
                               predict_volume(crop, str(ckpt)), atol=1e-6)
    assert pw.status.value == "done"

    pw.voxel.value = "5 nm"  # refused before anything runs
    assert pw.run() is None and "voxel size" in notes.errors[-1]
    viewer.add_image(crop, name="plain")
    pw.image.value = viewer.layers["plain"]
    assert pw.voxel.value == ""


def test_a_3d_model_on_thick_sections_is_flagged_before_it_runs(make_napari_viewer, qtbot,
                                                                tmp_path, crop, notes):
    import torch

    from napari_emseg._widgets.registry import model_registry
    from napari_emseg.models import zoo

    torch.manual_seed(0)
    cube = zoo.build_model(dict(dims=3, in_channels=1, out_channels=1, depth=2, width=4),
                           {"name": "cube", "patch": [8, 64, 64], "voxel_size_nm": [5, 5, 5]})
    ckpt = zoo.save_checkpoint(cube, tmp_path / "cube.pt")
    viewer = make_napari_viewer()
    viewer.add_image(crop[:3, :64, :64], name="em", scale=(25.0, 5.0, 5.0))
    pw = open_widget(viewer, "Predict")
    model_registry(viewer).add(ckpt)
    seen = []
    real = pw._noted
    pw._noted = lambda note: (seen.append((note, pw.job is None or not pw.job.done)),
                              real(note))
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None, notes.errors
    note, running = seen[0]
    assert note.startswith("warning: the sections are much thicker") and running
    assert notes.warnings and notes.warnings[-1] == f"Predict: {note}"
    assert pw.status.value == f"done: {note}"


def test_qt_free_helpers():
    from napari_emseg._widgets.jobs import budget_text, clock, progress_text
    from napari_emseg._widgets.predict import parse_voxel_size

    assert parse_voxel_size("") is None and parse_voxel_size("auto") is None
    assert parse_voxel_size("5") == (5.0, 5.0, 5.0)
    assert parse_voxel_size("40, 5, 5") == (40.0, 5.0, 5.0)
    assert parse_voxel_size("4x4") == (4.0, 4.0)
    for bad in ("0", "-1,2,2", "a", "1,2,3,4"):
        with pytest.raises(ValueError, match="voxel size"):
            parse_voxel_size(bad)
    assert clock(75) == "1:15" and clock(3725) == "1:02:05"
    assert progress_text(3, 12, 6.0, 18.0) == "3/12 · 0:06 elapsed · about 0:18 left"
    assert progress_text(3, 12, 6.0, None) == "3/12 · 0:06 elapsed"
    assert progress_text(12, 12, 24.0, 0.0) == "12/12 · done in 0:24"
    assert budget_text(40, 45.0, 120.0) == "step 40 · 0:45 elapsed · at most 1:15 left"


def test_extent_along_z_y_and_x_averages_the_three_sectionings(make_napari_viewer, qtbot,
                                                               tmp_path, crop, notes):
    from napari_emseg._widgets.registry import model_registry
    from napari_emseg.predict import predict_planes, predict_volume

    tiny = tiny_checkpoint(tmp_path / "tiny.pt")
    viewer = make_napari_viewer()
    viewer.add_image(crop, name="em")
    pw = open_widget(viewer, "Predict")
    model_registry(viewer).add(tiny)
    pw.extent.value = "planes"
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is None, notes.errors
    prob = viewer.layers["em probabilities"].data
    np.testing.assert_allclose(prob, predict_planes(crop, str(tiny)), atol=1e-5)
    assert np.abs(prob - predict_volume(crop, str(tiny))).max() > 1e-4  # not z alone
    assert "z, y and x" in pw.status.value

    pw.adapt.value = True  # not combinable: a clear message, the layer stays
    job = pw.run()
    wait_job(qtbot, job)
    assert job.exception is not None and "adapt to this volume" in notes.errors[-1]
    np.testing.assert_array_equal(viewer.layers["em probabilities"].data, prob)


def test_one_voxel_size_for_every_dock_even_from_napari_s_tiff_reader(make_napari_viewer,
                                                                     tmp_path, crop):
    import tifffile

    from napari_emseg._widgets.predict import TYPED_VOXEL, image_voxel_size

    path = tmp_path / "em_ij.tif"
    tifffile.imwrite(path, crop, imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"spacing": 0.05, "unit": "micron"})
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin="napari")  # napari's reader: scale stays 1
    assert tuple(layer.scale) == (1.0, 1.0, 1.0)
    pw = open_widget(viewer, "Predict")
    tw = open_widget(viewer, "Train from annotations")
    assert pw.voxel.value == "50,4,4"  # from the file's metadata
    assert TYPED_VOXEL not in layer.metadata  # nothing typed: the layer's own stays live
    assert tw.voxel_size() == pytest.approx((50.0, 4.0, 4.0))
    assert pw.adaptation()["voxel_size"] == pytest.approx((50.0, 4.0, 4.0))

    pw.voxel.value = "45, 4.6, 4.6"  # typed: the Train dock uses it too
    assert layer.metadata[TYPED_VOXEL] == "45, 4.6, 4.6"
    assert tw.voxel_size() == pytest.approx((45.0, 4.6, 4.6))
    pw.voxel.value = "4.6 nm"  # not valid: the last valid one stays
    assert tw.voxel_size() == pytest.approx((45.0, 4.6, 4.6))
    pw.voxel.value = ""  # cleared: unknown everywhere, not the file's again
    assert tw.voxel_size() is None and image_voxel_size(layer) is None
    assert image_voxel_size(viewer.add_image(crop, name="plain")) is None
