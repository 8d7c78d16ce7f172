"""Train widget: paint strokes → fine-tune a few steps → predict again."""

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
def crop(fixtures_dir):
    image = tifffile.imread(fixtures_dir / "lucchi_crop_image.tif")[:4]
    mask = tifffile.imread(fixtures_dir / "lucchi_crop_mask.tif")[:4]
    return image, mask


def _paint_strokes(layer, mask: np.ndarray) -> None:
    """Paint a few brush dabs: 2 inside mitochondria, 1 outside, on two slices."""
    layer.brush_size = 5
    rng = np.random.default_rng(1)
    for z in (0, 2):
        inside = np.argwhere(ndimage_erode(mask[z]))
        outside = np.argwhere(ndimage_erode(mask[z] == 0))
        for label, points in ((2, inside), (1, outside)):
            for y, x in points[rng.choice(len(points), 6, replace=False)]:
                layer.paint((z, int(y), int(x)), label, refresh=False)
    layer.refresh()


def ndimage_erode(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask > 0, iterations=3)


def test_paint_finetune_predict_again(make_napari_viewer, qtbot, tmp_path, crop, notes):
    from napari_emseg._widgets._common import model_registry
    from napari_emseg.models import zoo
    from napari_emseg.predict import predict_volume

    image, mask = crop
    tiny = tiny_checkpoint(tmp_path / "tiny.pt")
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em")
    pw = open_widget(viewer, "Predict")
    tw = open_widget(viewer, "Train from annotations")
    model_registry(viewer).add(tiny)
    assert tw.start_from.value == str(tiny.resolve())  # "current model"

    job = pw.run()
    wait_job(qtbot, job)
    before = viewer.layers["em probabilities"].data.copy()

    layer = tw.new_annotation_layer()
    assert layer.name == "em annotations" and tw.annotations.value == layer
    assert "1" in tw.help.value and "2" in tw.help.value and "0" in tw.help.value
    _paint_strokes(layer, mask)
    painted = layer.data.copy()
    assert set(np.unique(painted)) == {0, 1, 2}
    assert ((painted == 2) & (mask == 0)).sum() == 0  # strokes sit inside the objects

    tw.steps.value, tw.batch.value, tw.patch.value = 4, 2, "64"
    tw.val_every.value = 2
    tw.lr.value = 0.01
    tw.folder.value = tmp_path / "models"
    job = tw.train()
    assert tw.cancel_button.enabled and not tw.train_button.enabled
    wait_job(qtbot, job, timeout=120_000)
    assert job.exception is None, notes.errors
    result = job.result
    assert result.steps == 4 and not result.cancelled
    ckpt = tw.last_checkpoint
    assert ckpt.parent == tmp_path / "models" and ckpt.is_file()
    assert tw.plot.steps == [2, 4]  # one plot point per validation
    np.testing.assert_array_equal(layer.data, painted)  # annotations untouched

    # the new checkpoint loads, is offered to Predict / Save and is the current model
    model = zoo.load_model(ckpt)
    assert model.meta["training"]["painted_voxels"] == int((painted > 0).sum())
    # the threshold was chosen on the strokes and is stored and reported
    assert model.meta["threshold"] == result.model.meta["threshold"]
    assert f"threshold {model.meta['threshold']:.2f} from painted voxels" in tw.status.value
    assert pw.model.value == str(ckpt.resolve()) == tw.start_from.value
    assert tw.predict_again_button.enabled

    job = tw.predict_again()
    wait_job(qtbot, job)
    assert job.exception is None, notes.errors
    after = viewer.layers["em probabilities"].data
    assert np.abs(after - before).max() > 1e-3  # the fine-tuned model predicts differently
    np.testing.assert_allclose(after, predict_volume(image, str(ckpt)), atol=1e-6)


def test_train_from_scratch_and_cancel(make_napari_viewer, qtbot, tmp_path, crop, notes,
                                       monkeypatch):
    from napari_emseg._widgets import _common
    from napari_emseg._widgets.train import SCRATCH
    from napari_emseg.models import zoo

    image, mask = crop
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em")
    tw = open_widget(viewer, "Train from annotations")
    assert tw.start_from.value == SCRATCH or SCRATCH in tw.start_from.choices
    tw.start_from.value = SCRATCH
    assert not tw.new_depth.native.isHidden() and not tw.new_width.native.isHidden()
    assert tw.lr.value == 0  # auto: the rate follows the model (checked below)
    layer = tw.new_annotation_layer()
    _paint_strokes(layer, mask)
    tw.new_depth.value, tw.new_width.value = 2, 4
    tw.steps.value, tw.batch.value, tw.patch.value, tw.val_every.value = 2, 2, "64", 2
    tw.folder.value = tmp_path
    job = tw.train()
    wait_job(qtbot, job, timeout=120_000)
    assert job.exception is None, notes.errors
    model = zoo.load_model(tw.last_checkpoint)
    assert model.config["depth"] == 2 and model.config["width"] == 4
    assert model.config["dims"] == 2 and model.config["out_channels"] == 1
    from napari_emseg.train import SCRATCH_LR

    assert model.meta["training"]["config"]["lr"] == SCRATCH_LR  # auto, new model

    # Cancel during training: stops early, keeps the best model so far, no error
    first = tw.last_checkpoint
    real = _common.Job._progress

    def progress_then_cancel(self, done, total):
        real(self, done, total)
        self.cancel()

    monkeypatch.setattr(_common.Job, "_progress", progress_then_cancel)
    tw.steps.value = 50
    job = tw.train()
    wait_job(qtbot, job, timeout=120_000)
    assert job.exception is None and not notes.errors
    assert job.result.cancelled and job.result.steps < 50
    assert tw.last_checkpoint != first and tw.last_checkpoint.is_file()
    assert tw.status.value.startswith("stopped early")


@pytest.mark.parametrize("dims", [2, 3])
def test_auto_batch_and_lr_follow_model_dims(make_napari_viewer, qtbot, tmp_path, crop, notes,
                                             dims):
    from napari_emseg._widgets._common import model_registry
    from napari_emseg.models import zoo
    from napari_emseg.train import FINE_TUNE_LR, FINE_TUNE_LR_3D

    image, mask = crop
    trained = zoo.build_model(dict(dims=dims, depth=2, width=4),
                              {"name": "tiny", "training": {"steps": 10},
                               "patch": [64, 64] if dims == 2 else [8, 64, 64]})
    ckpt = zoo.save_checkpoint(trained, tmp_path / f"tiny{dims}d.pt")
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em")
    tw = open_widget(viewer, "Train from annotations")
    model_registry(viewer).add(ckpt)
    assert tw.batch.value == 0 and tw.lr.value == 0  # auto until the user sets them
    _paint_strokes(tw.new_annotation_layer(), mask)
    tw.steps.value, tw.val_every.value, tw.folder.value = 1, 1, tmp_path / "out"
    tw.patch.value = "64" if dims == 2 else "4,64,64"
    job = tw.train()
    wait_job(qtbot, job, timeout=120_000)
    assert job.exception is None, notes.errors
    config = zoo.load_model(tw.last_checkpoint).meta["training"]["config"]
    assert config["dims"] == dims
    assert config["batch_size"] == (4 if dims == 2 else 2)
    assert config["lr"] == (FINE_TUNE_LR if dims == 2 else FINE_TUNE_LR_3D)
