"""Screenshot for the README: sample data, probabilities, instances, docked widgets.

Renders with real OpenGL under Xvfb and writes ``docs/screenshot.png``. Uses
the bundled ``mito-2d`` model (or ``$EMSEG_SCREENSHOT_MODEL``); without one a
tiny untrained model stands in, so the picture only shows the layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from widget_helpers import GUI, open_widget, tiny_checkpoint, wait_job

pytestmark = GUI

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "screenshot.png"


def _model(tmp_path: Path) -> str:
    from napari_emseg.models.zoo import list_models

    chosen = os.environ.get("EMSEG_SCREENSHOT_MODEL")
    if chosen:
        return chosen
    if "mito-2d" in list_models():
        return "mito-2d"
    return str(tiny_checkpoint(tmp_path / "untrained.pt"))


def test_screenshot(make_napari_viewer, qtbot, tmp_path):
    from imageio.v3 import imread

    from napari_emseg._widgets._common import model_registry

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1280, 900)
    viewer.open_sample("napari-emseg", "lucchi")
    image = viewer.layers["Lucchi++ EM"]
    viewer.layers["Lucchi++ mitochondria (ground truth)"].visible = False

    predict = open_widget(viewer, "Predict")
    segment_dock, segment = viewer.window.add_plugin_dock_widget(
        "napari-emseg", "Segment instances")
    for name in ("Train from annotations", "Save labels and model"):
        viewer.window.add_plugin_dock_widget("napari-emseg", name, tabify=True)

    model = _model(tmp_path)
    if Path(model).suffix == ".pt":
        model_registry(viewer).add(model)
    predict.image.value = image
    predict.model.value = model
    job = predict.run()
    wait_job(qtbot, job, timeout=300_000)
    assert job.exception is None, job.exception
    prob = viewer.layers["Lucchi++ EM probabilities"]
    prob.opacity = 0.55

    segment.probabilities.value = prob
    segment.method.value = ("watershed", 2)
    segment.track.value = True
    segment.min_size.value = 50
    job = segment.run()
    wait_job(qtbot, job, timeout=120_000)
    assert job.exception is None, job.exception
    viewer.layers["Lucchi++ EM instances"].visible = False
    objects = viewer.layers["Lucchi++ EM objects 3D"]
    objects.contour = 2
    viewer.layers.selection.active = objects

    from qtpy.QtCore import Qt

    window = viewer.window._qt_window
    segment_dock.raise_()
    window.resizeDocks([segment_dock], [430], Qt.Orientation.Horizontal)
    viewer.dims.set_point(0, viewer.dims.range[0].stop / 2)
    viewer.reset_view()
    qtbot.wait(300)
    OUT.parent.mkdir(exist_ok=True)
    viewer.screenshot(path=str(OUT), canvas_only=False, flash=False)

    assert OUT.is_file() and OUT.stat().st_size > 50_000
    pixels = np.asarray(imread(OUT))
    assert pixels.ndim == 3 and pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 10  # not a uniform picture
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 500
