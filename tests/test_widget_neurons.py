"""Segment widget, "from membranes": the same labels as the engine, in one Labels layer."""

from __future__ import annotations

import numpy as np
from napari.layers import Labels

from test_neurons import cell_stack, core_pairs
from widget_helpers import (
    GUI,
    notes_fixture,  # noqa: F401  (the ``notes`` fixture)
    open_widget,
    wait_job,
)

pytestmark = GUI

MEMBRANES_2D = ("membranes", 2)


def test_from_membranes_equals_engine_and_traces_cells(make_napari_viewer, qtbot, notes):
    from napari_emseg.neurons import segment_neurons

    truth, prob = cell_stack()
    viewer = make_napari_viewer()
    viewer.add_image(prob, name="em probabilities", scale=(50.0, 4.0, 4.0))
    sw = open_widget(viewer, "Segment instances")
    mito = (sw.threshold.value, sw.h.value, sw.min_distance.value, sw.min_size.value)
    sw.method.value = MEMBRANES_2D
    # the engine's own defaults are shown; the z-filter and Otsu do not apply
    assert (sw.threshold.value, sw.h.value, sw.min_distance.value, sw.min_size.value) == (
        0.6, 6.0, 4, 50)
    assert not sw.zfilter.enabled and not sw.otsu.enabled and not sw.seed_method.enabled
    assert sw.h.enabled and sw.track.enabled

    job = sw.run()
    wait_job(qtbot, job)
    assert job.exception is None and not notes.errors
    layer = viewer.layers["em neurites"]
    assert isinstance(layer, Labels)
    expected = segment_neurons(prob, **sw.neuron_parameters())
    np.testing.assert_array_equal(layer.data, expected)
    np.testing.assert_array_equal(layer.data, segment_neurons(prob))  # defaults = engine's
    assert len(core_pairs(truth, layer.data, prob)) == 9  # one id per cell through z
    np.testing.assert_array_equal(layer.scale, [50.0, 4.0, 4.0])
    assert "em instances" not in [lyr.name for lyr in viewer.layers]
    assert sw.status.value == "9 neurites"

    # changed values reach the engine; a re-run updates the same layer
    sw.track.value = False
    sw.h.value = 4.0
    job = sw.run()
    wait_job(qtbot, job)
    assert viewer.layers["em neurites"] is layer
    np.testing.assert_array_equal(layer.data, segment_neurons(prob, track=False, h=4.0))

    # back to the instances pipeline: its values come back
    sw.method.value = ("watershed", 2)
    assert (sw.threshold.value, sw.h.value, sw.min_distance.value, sw.min_size.value) == mito
    assert sw.zfilter.enabled


def test_from_membranes_preview_and_3d_spacing(make_napari_viewer, qtbot, notes, monkeypatch):
    from napari_emseg import neurons

    truth, prob = cell_stack(nz=4)
    viewer = make_napari_viewer()
    viewer.add_image(prob, name="em probabilities", scale=(3.0, 1.0, 1.0))
    sw = open_widget(viewer, "Segment instances")
    sw.method.value = MEMBRANES_2D
    viewer.dims.set_point(0, 2 * 3.0)  # world z of section 2
    job = sw.preview()
    wait_job(qtbot, job)
    assert job.exception is None and not notes.errors
    preview = viewer.layers["em preview"].data
    np.testing.assert_array_equal(preview[2], neurons.segment_neurons(prob[2]))
    assert not np.delete(preview, 2, axis=0).any()

    seen = []
    real = neurons.segment_neurons
    monkeypatch.setattr(neurons, "segment_neurons",
                        lambda p, **kw: seen.append(kw) or real(p, **kw))
    sw.method.value = ("membranes", 3)
    assert not sw.track.enabled
    job = sw.run()
    wait_job(qtbot, job)
    assert job.exception is None and not notes.errors
    assert seen[-1]["dims"] == 3 and seen[-1]["spacing"] == (3.0, 1.0, 1.0)
    np.testing.assert_array_equal(
        viewer.layers["em neurites"].data,
        real(prob, dims=3, spacing=(3.0, 1.0, 1.0)))
