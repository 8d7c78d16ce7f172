"""Train widget: paint strokes → fine-tune → predict again; live preview; no traps."""

from __future__ import annotations

from pathlib import Path

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


def _quick(tw, tmp_path: Path, steps: int = 4) -> None:
    """A short run by steps (no time budget) with small patches."""
    tw.minutes.value = 0
    tw.steps.value, tw.batch.value, tw.patch.value, tw.val_every.value = steps, 2, "64", 2
    tw.folder.value = tmp_path / "models"


@pytest.mark.slow
@pytest.mark.child_process
def test_paint_finetune_predict_again(make_napari_viewer, qtbot, tmp_path, crop, notes):
    """The whole loop, training in the dock's real child process."""
    from napari_emseg._widgets.registry import model_registry
    from napari_emseg.adapt import adapt_batchnorm
    from napari_emseg.child import shared_child
    from napari_emseg.models import zoo
    from napari_emseg.predict import predict_slice, predict_volume

    image, mask = crop
    tiny = tiny_checkpoint(tmp_path / "tiny.pt")
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em", scale=(2.0, 1.0, 1.0), translate=(0.0, 3.0, 0.0))
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

    _quick(tw, tmp_path)
    tw.lr.value = 0.01
    assert tw.estimate.value == "4 steps, no time limit"
    viewer.dims.set_point(0, 2 * 2.0)  # the user looks at data slice 2
    job = tw.train()
    assert tw.cancel_button.enabled and not tw.train_button.enabled
    wait_job(qtbot, job, timeout=120_000)
    assert job.exception is None, notes.errors
    result = job.result
    assert result.steps == 4 and not result.cancelled
    assert result.model is None and shared_child().alive()  # trained in the child process
    ckpt = tw.last_checkpoint
    assert ckpt.parent == tmp_path / "models" and ckpt.is_file()
    assert tw.plot.steps == [2, 4]  # one plot point per validation
    np.testing.assert_array_equal(layer.data, painted)  # annotations untouched

    # the live preview: one slice, the one shown, predicted by the model at the start
    # (an untrained model: recipe "far", BatchNorm statistics re-estimated first)
    preview = viewer.layers["em live preview"]
    assert preview.data.shape == (1, *image.shape[1:])
    np.testing.assert_allclose(preview.translate, [4.0, 3.0, 0.0])
    np.testing.assert_allclose(preview.scale, [2.0, 1.0, 1.0])
    start = adapt_batchnorm(zoo.load_model(tiny), image)
    np.testing.assert_allclose(preview.data[0], predict_slice(image, start, 2), atol=1e-4)
    assert "recipe far" in tw.recipe.value
    # the dock's own progress bar reached its total
    assert tw.progress.bar.value == tw.progress.bar.max == 4
    assert tw.progress.text.value.startswith("4/4 · done in")

    # the new checkpoint loads, is offered to Predict / Save and is the current model
    model = zoo.load_model(ckpt)
    assert model.meta["training"]["painted_voxels"] == int((painted > 0).sum())
    assert model.meta["threshold"] == result.model_meta()["threshold"]
    assert f"threshold {model.meta['threshold']:.2f} from painted voxels" in tw.status.value
    assert tw.status.value.startswith("IoU on painted voxels")
    assert pw.model.value == str(ckpt.resolve()) == tw.start_from.value
    assert tw.predict_again_button.enabled and tw.revert_button.enabled

    viewer.layers.selection.active = layer  # the user goes on painting
    job = tw.predict_again()
    assert tw.progress.budget is None  # a prediction: no training time budget shown
    wait_job(qtbot, job)
    assert job.exception is None, notes.errors
    after = viewer.layers["em probabilities"].data
    assert np.abs(after - before).max() > 1e-3  # the fine-tuned model predicts differently
    np.testing.assert_allclose(after, predict_volume(image, str(ckpt)), atol=1e-6)
    # the previous result is kept for comparison, and said so
    np.testing.assert_array_equal(viewer.layers["em probabilities (previous)"].data, before)
    # the new result lies under the strokes, the strokes stay selected, and the one-slice
    # live preview is gone (the whole image is predicted now)
    qtbot.waitUntil(lambda: "em live preview" not in [lay.name for lay in viewer.layers])
    names = [lay.name for lay in viewer.layers]
    assert names.index("em") + 1 == names.index("em probabilities")
    assert names.index("em probabilities") < names.index("em annotations")
    assert viewer.layers.selection.active.name == "em annotations"  # (layer is a proxy)
    assert len(viewer.layers.selection) == 1
    assert tw.status.value.endswith("the previous result is '… probabilities (previous)'")

    # revert: the model current before training is current again, Predict follows
    tw.revert()
    assert model_registry(viewer).current == str(tiny.resolve()) == pw.model.value


def test_live_preview_refreshes_and_follows_the_shown_slice(make_napari_viewer, qtbot,
                                                            tmp_path, crop, notes,
                                                            monkeypatch):
    from napari_emseg._widgets import train as train_widget
    from napari_emseg._widgets.registry import model_registry

    image, mask = crop
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em")
    tw = open_widget(viewer, "Train from annotations")
    model_registry(viewer).add(tiny_checkpoint(tmp_path / "tiny.pt"))
    _paint_strokes(tw.new_annotation_layer(), mask)
    _quick(tw, tmp_path, steps=3)
    viewer.dims.set_point(0, 1)
    assert tw._preview_z == 1  # tracked on the GUI thread as the user moves
    viewer.dims.set_point(0, 3)
    assert tw._preview_z == 3

    monkeypatch.setattr(train_widget, "PREVIEW_EVERY", 0.0)  # a preview before every step
    records = []
    real = tw._logged
    tw._logged = lambda record: (records.append(record), real(record))
    annotations = tw.annotations.value
    assert viewer.layers.selection.active is annotations
    job = tw.train()
    # added at the click, empty, between the image and the strokes; the user keeps
    # painting in the annotation layer
    names = [lay.name for lay in viewer.layers]
    assert names == ["em", "em live preview", "em annotations"]
    assert not viewer.layers["em live preview"].data.any()
    assert viewer.layers.selection.active is annotations
    assert list(viewer.layers.selection) == [annotations]
    wait_job(qtbot, job, timeout=120_000)
    assert job.exception is None, notes.errors
    assert viewer.layers.selection.active is annotations
    previews = [r for r in records if "preview" in r]
    assert len(previews) >= 3
    assert all(r["z"] == 3 and r["preview"].shape == image.shape[1:] for r in previews)
    assert [r["seconds"] for r in previews] == sorted(r["seconds"] for r in previews)
    layer = viewer.layers["em live preview"]
    assert layer.data.shape == (1, *image.shape[1:]) and layer.translate[0] == 3
    np.testing.assert_array_equal(layer.data[0], previews[-1]["preview"])
    assert sum(1 for lay in viewer.layers if lay.name == "em live preview") == 1

    # switched off: no preview at all
    viewer.layers.remove(layer)
    tw.live_preview.value = False
    job = tw.train()
    wait_job(qtbot, job, timeout=120_000)
    assert "em live preview" not in [lay.name for lay in viewer.layers]


@pytest.mark.slow
@pytest.mark.child_process
def test_strokes_painted_while_training_join_the_run(make_napari_viewer, qtbot, tmp_path,
                                                    crop, notes):
    from napari_emseg._widgets.registry import model_registry

    image, mask = crop
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em")
    tw = open_widget(viewer, "Train from annotations")
    model_registry(viewer).add(tiny_checkpoint(tmp_path / "tiny.pt"))
    layer = tw.new_annotation_layer()
    _paint_strokes(layer, mask)
    _quick(tw, tmp_path, steps=5000)
    records = []
    real = tw._logged
    tw._logged = lambda record: (records.append(record), real(record))
    job = tw.train()
    qtbot.waitUntil(lambda: any("step" in r for r in records), timeout=120_000)
    before = int((np.asarray(layer.data) > 0).sum())
    layer.brush_size = 5
    for y, x in np.argwhere(ndimage_erode(mask[3]))[::40]:
        layer.paint((3, int(y), int(x)), 2, refresh=False)  # the user goes on painting
    layer.refresh()
    added = int((np.asarray(layer.data) > 0).sum()) - before
    # the feed may read the slice while the loop above still paints (a loaded machine):
    # the rest then joins in a later update; wait for the one that has every stroke
    qtbot.waitUntil(lambda: any(r.get("strokes") == before + added for r in records),
                    timeout=60_000)
    assert "slice 3" in tw.status.value
    tw.cancel()
    wait_job(qtbot, job, timeout=120_000)
    assert job.exception is None, notes.errors
    updates = [r for r in records if "strokes" in r]
    assert all(r["slices"] == [3] for r in updates)
    update = updates[-1]
    assert update["slices"] == [3] and update["strokes"] == before + added
    assert update["dropped"] == 0 and not notes.warnings
    assert tw.result.model_meta()["training"]["painted_while_training"] == added
    assert f"with {added} voxels painted while it ran" in tw.status.value
    # the run is over: painting no longer feeds a training
    layer.paint((1, 5, 5), 1)
    assert tw._strokes.changes() is None
    # a label the model does not have is named, not silently ignored
    tw._logged({"strokes": 9, "slices": [1], "dropped": 4, "classes": 2})
    assert "4 voxels" in notes.warnings[-1] and "1..2" in notes.warnings[-1]


def test_train_from_scratch_and_cancel(make_napari_viewer, qtbot, tmp_path, crop, notes,
                                       monkeypatch):
    from napari_emseg._widgets import jobs
    from napari_emseg._widgets.train import SCRATCH
    from napari_emseg.models import zoo

    image, mask = crop
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em")
    tw = open_widget(viewer, "Train from annotations")
    assert SCRATCH in tw.start_from.choices
    tw.start_from.value = SCRATCH
    assert not tw.new_depth.native.isHidden() and not tw.new_width.native.isHidden()
    assert tw.lr.value == 0  # auto: the rate follows the model (checked below)
    layer = tw.new_annotation_layer()
    _paint_strokes(layer, mask)
    tw.new_depth.value, tw.new_width.value = 2, 4
    _quick(tw, tmp_path, steps=2)
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
    real = jobs.Job._progress

    def progress_then_cancel(self, done, total):
        real(self, done, total)
        self.cancel()

    monkeypatch.setattr(jobs.Job, "_progress", progress_then_cancel)
    tw.steps.value = 50
    job = tw.train()
    wait_job(qtbot, job, timeout=120_000)
    assert job.exception is None and not notes.errors
    assert job.result.cancelled and job.result.steps < 50
    assert tw.last_checkpoint != first and tw.last_checkpoint.is_file()
    assert tw.status.value.startswith("stopped early")
    assert "cancelled after" in tw.progress.text.value


@pytest.mark.parametrize("dims", [2, 3])
def test_auto_settings_come_from_the_recipe(make_napari_viewer, qtbot, tmp_path, crop, notes,
                                            dims):
    from napari_emseg._widgets.registry import model_registry
    from napari_emseg.models import zoo
    from napari_emseg.train import fine_tune_defaults

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
    fields = tw.config_fields()
    assert fields["lr"] is None and fields["batch_size"] is None  # the engine decides
    _paint_strokes(tw.new_annotation_layer(), mask)
    tw.minutes.value, tw.steps.value, tw.val_every.value = 0, 1, 1
    tw.folder.value = tmp_path / "out"
    tw.patch.value = "64" if dims == 2 else "4,64,64"
    job = tw.train()
    wait_job(qtbot, job, timeout=120_000)
    assert job.exception is None, notes.errors
    meta = zoo.load_model(tw.last_checkpoint).meta["training"]
    expected = fine_tune_defaults(trained, meta["recipe"])
    assert meta["config"]["dims"] == dims
    assert meta["config"]["batch_size"] == expected.batch_size
    assert meta["config"]["lr"] == expected.lr


def test_time_budget_is_the_default(make_napari_viewer):
    from napari_emseg.train import FINE_TUNE_EARLY_STOP, FINE_TUNE_MINUTES

    viewer = make_napari_viewer()
    tw = open_widget(viewer, "Train from annotations")
    assert tw.minutes.value == FINE_TUNE_MINUTES and not tw.steps.enabled
    assert tw.estimate.value.startswith("at most 2 min: stops earlier when the loss on "
                                        "the painted voxels stops improving, or after 60 "
                                        "steps")
    fields = tw.config_fields()
    assert fields["minutes"] == FINE_TUNE_MINUTES
    assert fields["early_stop"] == FINE_TUNE_EARLY_STOP
    assert fields["lr"] is None and fields["batch_size"] is None
    tw.minutes.value = 0
    assert tw.steps.enabled and tw.config_fields()["early_stop"] == 0
    for widget in (tw.image, tw.annotations, tw.start_from, tw.minutes, tw.steps, tw.lr,
                   tw.batch, tw.val_every, tw.patch, tw.device, tw.folder, tw.live_preview,
                   tw.train_button, tw.cancel_button, tw.predict_again_button,
                   tw.revert_button, tw.use_new_button, tw.new_layer_button):
        assert widget.tooltip, widget.label


@pytest.mark.slow
def test_ground_truth_mask_is_never_the_default_annotation(make_napari_viewer, qtbot,
                                                           tmp_path, crop, notes):
    """Issue: the sample's ground truth (1 = mitochondrion) was used as annotations."""
    from napari_emseg._sample_data import lucchi_sample
    from napari_emseg._widgets.registry import model_registry
    from napari_emseg.models.zoo import list_models

    viewer = make_napari_viewer()
    for data, kwargs, kind in lucchi_sample():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    tw = open_widget(viewer, "Train from annotations")
    truth = viewer.layers["Lucchi++ mitochondria (ground truth)"]
    assert tw.annotations.value is None
    assert "New annotation layer" in tw.reason.value and not tw.train_button.enabled
    bundled = list_models()
    if bundled:
        assert tw.start_from.value == bundled[0]  # fine-tune, not from scratch

    # chosen by hand: a warning before anything trains; a second click trains anyway
    tw.annotations.value = truth
    tiny = tiny_checkpoint(tmp_path / "tiny.pt")
    model_registry(viewer).add(tiny)
    _quick(tw, tmp_path, steps=1)
    tw.patch.value, tw.batch.value = "32", 1
    assert tw.train() is None
    assert notes.warnings and "only background (1)" in notes.warnings[-1]
    assert "Click Train again" in tw.status.value
    job = tw.train()
    assert job is not None
    wait_job(qtbot, job, timeout=120_000)

    # a layer with both classes painted is a fine default; New annotation layer too
    viewer.layers.remove(truth)
    assert tw.annotations.value is None
    both = np.zeros(truth.data.shape, np.uint8)
    both[0, :5, :5], both[0, -5:, -5:] = 1, 2
    viewer.add_labels(both, name="my strokes")
    assert tw.annotations.value is viewer.layers["my strokes"]
    made = tw.new_annotation_layer()
    assert tw.annotations.value == made
    viewer.layers.remove(made)
    viewer.layers.remove(viewer.layers["my strokes"])
    assert tw.annotations.value is None
    viewer.layers.remove(viewer.layers["Lucchi++ EM"])
    viewer.add_image(crop[0], name="em")
    assert tw.new_annotation_layer().metadata.get("emseg_annotations")


def _fake_fine_tune(best: float, before: float | None):
    """A stand-in for ``train.fine_tune`` that writes a checkpoint with these scores."""
    def fake(model, image, painted, config, *, checkpoint, progress, cancel, on_log,
             preview, **_):
        from napari_emseg.models import zoo
        from napari_emseg.train import TrainResult

        meta = {"training": {"recipe": "near", "painted_iou_before": before}}
        zoo.save_checkpoint(model, checkpoint, meta)
        progress(1, 1)
        on_log({"step": 1, "loss": 0.5, "val_iou": best})
        model.meta = {**model.meta, **meta}
        return TrainResult(model=model, checkpoint=Path(checkpoint), best_iou=best,
                           history=[], steps=1, seconds=1.0)

    return fake


def test_worse_run_is_not_made_current(make_napari_viewer, qtbot, tmp_path, crop, notes,
                                       monkeypatch):
    import napari_emseg.train
    from napari_emseg._widgets.registry import model_registry

    image, mask = crop
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em")
    pw = open_widget(viewer, "Predict")
    tw = open_widget(viewer, "Train from annotations")
    tiny = str(tiny_checkpoint(tmp_path / "tiny.pt").resolve())
    model_registry(viewer).add(tiny)
    _paint_strokes(tw.new_annotation_layer(), mask)
    _quick(tw, tmp_path)

    monkeypatch.setattr(napari_emseg.train, "fine_tune", _fake_fine_tune(0.1, 0.8))
    job = tw.train()
    wait_job(qtbot, job)
    assert job.exception is None, notes.errors
    new = str(tw.last_checkpoint.resolve())
    assert model_registry(viewer).current == tiny == pw.model.value  # not replaced
    assert new in pw.model.choices  # but offered
    assert notes.warnings and "worse" in notes.warnings[-1] and "0.800" in notes.warnings[-1]
    assert "IoU on painted voxels 0.100 (before training 0.800)" in tw.status.value
    assert "recipe near" in tw.recipe.value and "0.800" in tw.recipe.value
    assert tw.use_new_button.enabled and not tw.revert_button.enabled
    # Predict again shows it without making it current
    job = tw.predict_again()
    wait_job(qtbot, job)
    assert model_registry(viewer).current == tiny
    # the user chooses it anyway
    tw.use_new_model()
    assert model_registry(viewer).current == new == pw.model.value
    assert not tw.use_new_button.enabled

    # a better run becomes current; "revert to previous model" undoes it
    monkeypatch.setattr(napari_emseg.train, "fine_tune", _fake_fine_tune(0.9, 0.8))
    job = tw.train()
    wait_job(qtbot, job)
    better = str(tw.last_checkpoint.resolve())
    assert model_registry(viewer).current == better == pw.model.value
    assert tw.revert_button.enabled
    tw.revert()
    assert model_registry(viewer).current == new == pw.model.value
    assert not tw.revert_button.enabled


def test_qt_free_helpers():
    from napari_emseg._widgets.train import (
        ended_worse,
        estimate_text,
        painted_slices,
        recipe_text,
    )

    assert ended_worse(0.8, 0.7) and not ended_worse(0.8, 0.8) and not ended_worse(None, 0.0)
    vol = np.zeros((4, 3, 3), np.uint8)
    vol[1, 0, 0], vol[3, 2, 2] = 1, 2
    np.testing.assert_array_equal(painted_slices(vol), [1, 3])
    np.testing.assert_array_equal(painted_slices(vol[1]), [0])
    assert painted_slices(vol[0]).size == 0 and painted_slices(vol[:0]).size == 0
    assert estimate_text(0, 30) == "30 steps, no time limit"
    assert estimate_text(1.5, 30).startswith("at most 1.5 min")
    assert recipe_text({"recipe": "far", "painted_iou_before": 0.25}).startswith("recipe far")
    assert "0.250" in recipe_text({"recipe": "far", "painted_iou_before": 0.25})
    assert recipe_text({}) == ""
    assert recipe_text({"recipe": "near", "painted_iou_before": 0.5,
                        "adaptation": "sections thicker …"}).endswith("0.500; sections thicker …")
    swapped = recipe_text({"recipe": "near", "painted_iou_before": 0.6, "start": "b",
                           "start_scores": {"a": 0.1, "b": 0.6}})
    assert swapped == ("started from b instead of a: it fits your strokes better (IoU on "
                       "the painted voxels 0.60; a 0.10); recipe near (gentle fine-tuning)")
    kept = recipe_text({"recipe": "far", "painted_iou_before": 0.3, "start": "a",
                        "start_scores": {"a": 0.31, "b": 0.33}})
    assert kept.startswith("kept a: IoU on the painted voxels 0.31 (b 0.33); recipe far")
