"""Segment widget (instances): the engine's labels, the same as ``emseg segment``."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from napari.layers import Labels
from scipy import ndimage

from widget_helpers import (
    GUI,
    notes_fixture,  # noqa: F401  (the ``notes`` fixture)
    open_widget,
    same_partition,
    tiny_checkpoint,
    wait_job,
)

pytestmark = GUI


@pytest.fixture
def crop(fixtures_dir) -> np.ndarray:
    return tifffile.imread(fixtures_dir / "lucchi_crop_image.tif")[:8]


@pytest.fixture
def crop_mask(fixtures_dir) -> np.ndarray:
    return tifffile.imread(fixtures_dir / "lucchi_crop_mask.tif")[:8]


def blurred(mask: np.ndarray) -> np.ndarray:
    prob = ndimage.gaussian_filter(mask.astype(np.float32), sigma=(0, 2, 2))
    return np.clip(prob, 0, 1).astype(np.float32)


def run(qtbot, sw, notes):
    job = sw.run()
    wait_job(qtbot, job)
    assert job.exception is None and not notes.errors, notes.errors
    return job


def test_defaults_are_the_engine_defaults_and_only_probabilities_are_offered(
        make_napari_viewer, qtbot, crop, crop_mask, notes):
    from napari_emseg.postprocess import SegmentSettings, segment

    viewer = make_napari_viewer()
    viewer.add_image(crop, name="em")  # raw EM: not offered
    viewer.add_labels(crop_mask.astype(np.uint32), name="truth")  # labels: not offered
    sw = open_widget(viewer, "Segment instances")
    assert sw.probabilities.value is None and not sw.run_button.enabled
    assert "run Predict first" in sw.reason.value and "raw EM" in sw.reason.value
    assert sw.run() is None and "raw EM" in notes.errors[-1]
    notes.errors.clear()

    prob = blurred(crop_mask)
    viewer.add_image(prob, name="em probabilities")
    assert [name for name, _ in sw.probabilities._default_choices(sw.probabilities)] == [
        "em probabilities"]
    assert sw.probabilities.value is viewer.layers["em probabilities"]
    assert sw.parameters() == SegmentSettings()
    run(qtbot, sw, notes)
    expected = segment(prob)
    np.testing.assert_array_equal(viewer.layers["em instances"].data, expected.labels)
    assert "em objects 3D" not in [layer.name for layer in viewer.layers]  # 3D: no tracking


def test_tracking_gives_2d_instances_and_3d_objects_of_the_engine(
        make_napari_viewer, qtbot, crop_mask, notes):
    from napari_emseg.postprocess import segment

    prob = blurred(crop_mask)
    viewer = make_napari_viewer()
    viewer.add_image(prob, name="em probabilities", scale=(3.0, 1.0, 1.0))
    sw = open_widget(viewer, "Segment instances")
    sw.method.value = ("watershed", 2)
    sw.track.value = True
    sw.min_size.value = 200
    sw.zfilter.value = 3
    run(qtbot, sw, notes)
    inst, objects = viewer.layers["em instances"], viewer.layers["em objects 3D"]
    assert isinstance(inst, Labels) and isinstance(objects, Labels)
    expected = segment(prob, dims=2, track=True, min_size=200, zfilter=3)
    np.testing.assert_array_equal(inst.data, expected.instances)
    np.testing.assert_array_equal(objects.data, expected.objects)
    np.testing.assert_array_equal(objects.scale, [3.0, 1.0, 1.0])
    # 2D instances: ids differ between slices; tracked ids run through z
    ids_per_slice = [set(np.unique(s)) - {0} for s in objects.data]
    shared = set.intersection(*[ids for ids in ids_per_slice[:4] if ids])
    assert shared, "tracking should give ids present on consecutive slices"
    np.testing.assert_array_equal(objects.data > 0, inst.data > 0)
    assert not (set(np.unique(inst.data[0])) - {0}) & (set(np.unique(inst.data[1])) - {0})
    assert sw.status.value.startswith(f"{inst.data.max()} instances, "
                                      f"{objects.data.max()} 3D objects")
    assert expected.dropped > 0 and sw.status.value == expected.summary(200)
    assert f"({expected.dropped} smaller than 200 voxels removed" in sw.status.value
    sw.min_size.value = 10**7  # nothing left: a warning says what to change
    run(qtbot, sw, notes)
    assert not viewer.layers["em objects 3D"].data.any()
    assert notes.warnings and "lower the minimum size" in notes.warnings[-1]
    sw.min_size.value = 200

    # 3D components, tracking ignored: the same objects as scipy's 3D labelling
    sw.method.value = ("components", 3)
    sw.min_size.value = 0
    sw.zfilter.value = 0
    assert not sw.track.enabled
    run(qtbot, sw, notes)
    assert viewer.layers["em instances"] is inst  # updated in place
    reference, _n = ndimage.label(prob > 0.5)
    assert same_partition(inst.data, reference)


@pytest.mark.parametrize(("method", "track"), [(("watershed", 2), True),
                                               (("watershed", 3), False)])
def test_widget_and_cli_give_identical_labels(make_napari_viewer, qtbot, tmp_path, crop_mask,
                                              notes, method, track):
    from napari_emseg.cli import main
    from napari_emseg.io import read_volume, write_volume

    prob = blurred(crop_mask)
    voxel = (30.0, 5.0, 5.0)
    src, out = tmp_path / "probs.tif", tmp_path / "instances.tif"
    write_volume(src, prob, voxel_size=voxel)
    viewer = make_napari_viewer()
    viewer.add_image(prob, name="em probabilities", scale=voxel)
    sw = open_widget(viewer, "Segment instances")
    sw.method.value = method
    sw.track.value = track
    sw.zfilter.value, sw.h.value, sw.min_size.value, sw.threshold.value = 3, 3.0, 300, 0.4
    run(qtbot, sw, notes)
    layer = viewer.layers["em objects 3D" if track else "em instances"]
    flags = ["--dims", str(method[1]), "--zfilter", "3", "--h", "3", "--min-size", "300",
             "--threshold", "0.4", "--quiet"] + (["--track"] if track else [])
    assert main(["segment", str(src), str(out), *flags]) == 0
    cli = np.asarray(read_volume(out))
    np.testing.assert_array_equal(layer.data, cli)
    assert cli.max() > 1

    # the defaults agree too
    viewer2 = make_napari_viewer()
    viewer2.add_image(prob, name="em probabilities", scale=voxel)
    run(qtbot, open_widget(viewer2, "Segment instances"), notes)
    assert main(["segment", str(src), str(out), "--quiet", "--overwrite"]) == 0
    np.testing.assert_array_equal(viewer2.layers["em instances"].data,
                                  np.asarray(read_volume(out)))


def test_segment_3d_uses_the_layer_voxel_size(make_napari_viewer, qtbot, crop_mask, notes,
                                              monkeypatch):
    from napari_emseg import postprocess

    seen = []
    real = postprocess.segment
    monkeypatch.setattr(postprocess, "segment",
                        lambda prob, s, **kw: seen.append(kw.get("spacing")) or real(prob, s, **kw))
    prob = blurred(crop_mask)[:6]
    viewer = make_napari_viewer()
    viewer.add_image(prob, name="em probabilities", scale=(30.0, 5.0, 5.0))
    sw = open_widget(viewer, "Segment instances")
    sw.method.value = ("components", 3)
    run(qtbot, sw, notes)
    assert seen == [(6.0, 1.0, 1.0)]  # relative to the finest axis: h stays in voxels
    np.testing.assert_array_equal(viewer.layers["em instances"].scale, [30.0, 5.0, 5.0])


def test_preview_shows_the_2d_instances_of_the_current_slice(make_napari_viewer, qtbot,
                                                             crop_mask, notes):
    from napari_emseg.postprocess import relabel_sequential, segment

    prob = blurred(crop_mask)
    viewer = make_napari_viewer()
    viewer.add_image(prob, name="em probabilities")
    sw = open_widget(viewer, "Segment instances")
    sw.method.value = ("watershed", 2)
    sw.zfilter.value = 3
    for z in (5, 2):
        viewer.dims.set_point(0, z)
        job = sw.preview()
        wait_job(qtbot, job)
        assert job.exception is None
    preview = viewer.layers["em preview"]
    # the full run's 2D instances on slice 2, z-filtered with its neighbours, before
    # tracking and the 3D size filter
    full = segment(prob, sw.parameters(), track=False, min_size=0).instances
    np.testing.assert_array_equal(preview.data[2], relabel_sequential(full[2]))
    others = np.delete(preview.data, 2, axis=0)
    assert full[2].max() > 0 and not others.any()  # slice 5's preview was cleared
    assert "em instances" not in [layer.name for layer in viewer.layers]
    assert "before tracking" in sw.status.value


def _checkpoint_with(path, seed: int, **meta):
    from napari_emseg.models import zoo

    model = zoo.load_model(tiny_checkpoint(path, seed=seed))
    return zoo.save_checkpoint(model, path, {**model.meta, **meta})


def test_segment_takes_the_threshold_the_model_was_tuned_to(make_napari_viewer, qtbot, crop,
                                                            tmp_path, notes):
    from napari_emseg._widgets.registry import model_registry

    tuned = _checkpoint_with(tmp_path / "a.pt", 0, threshold=0.7)
    other = _checkpoint_with(tmp_path / "b.pt", 1, threshold=0.3)
    viewer = make_napari_viewer()
    viewer.add_image(crop, name="em")
    pw = open_widget(viewer, "Predict")
    sw = open_widget(viewer, "Segment instances")
    assert sw.threshold.value == 0.5
    model_registry(viewer).add(tuned)
    wait_job(qtbot, pw.run())
    assert viewer.layers["em probabilities"].metadata["emseg_threshold"] == 0.7
    assert sw.probabilities.value is viewer.layers["em probabilities"]
    assert sw.threshold.value == 0.7
    sw.threshold.value = 0.45  # the user's choice survives a re-run of the same model
    wait_job(qtbot, pw.run())
    assert sw.threshold.value == 0.45
    model_registry(viewer).add(other)  # a model tuned differently: its threshold applies
    assert pw.model.value == str(other.resolve())
    wait_job(qtbot, pw.run())
    assert sw.threshold.value == 0.3 and not notes.errors


def test_segment_takes_the_model_segment_settings_from_the_layer(make_napari_viewer, qtbot,
                                                                 crop_mask, notes):
    from napari_emseg._widgets.segment import SEGMENT_KEY
    from napari_emseg.postprocess import segment, segment_defaults

    meta = {"threshold": 0.6, "segment": {"dims": 2, "track": True, "zfilter": 3,
                                          "min_size": 150, "closing": 1}}
    prob = blurred(crop_mask)
    viewer = make_napari_viewer()
    sw = open_widget(viewer, "Segment instances")
    viewer.add_image(prob, name="em probabilities",
                     metadata={"emseg_threshold": 0.6, SEGMENT_KEY: meta["segment"]})
    assert sw.method.value == ("watershed", 2) and sw.track.value
    assert (sw.threshold.value, sw.zfilter.value, sw.min_size.value) == (0.6, 3, 150)
    assert sw.parameters() == segment_defaults(meta)  # closing too, which has no widget
    run(qtbot, sw, notes)
    np.testing.assert_array_equal(viewer.layers["em objects 3D"].data,
                                  segment(prob, segment_defaults(meta)).objects)


def test_segment_fits_the_defaults_to_thick_sections(make_napari_viewer, qtbot, notes):
    from test_postprocess import short_objects

    viewer = make_napari_viewer()
    viewer.add_image(short_objects(), name="em probabilities", scale=(50.0, 4.0, 4.0))
    sw = open_widget(viewer, "Segment instances")
    run(qtbot, sw, notes)
    assert viewer.layers["em instances"].data.max() == 2
    assert (sw.zfilter.value, sw.min_size.value) == (0, 160)  # shown as used
    assert "z-filter 5 → off" in sw.status.value and "thicker" in notes.infos[-1]
    sw.min_size.value = 5000  # typed: kept
    run(qtbot, sw, notes)
    assert viewer.layers["em instances"].data.max() == 0
    assert "thicker" not in sw.status.value
