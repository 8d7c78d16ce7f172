"""Render the README screenshot: the bundled sample, mito-2d probabilities and objects.

    xvfb-run -a -s "-screen 0 1400x1000x24" env QT_QPA_PLATFORM=xcb \\
        .venv/bin/python scripts/screenshot.py [OUT]

Opens napari with the bundled Lucchi++ crop, predicts it with the bundled
``mito-2d`` (the engine, as the Predict dock does), segments the
probabilities with the model's settings (as the Segment dock does) and shows
both over the EM with the docks open; writes ``docs/screenshot.png`` (or OUT).

The OpenGL canvas is rendered by vispy and pasted into a grab of the window
(a plain window grab leaves an OpenGL canvas black under Xvfb); the script
fails when the canvas region of the written picture is dark or uniform.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "screenshot.png"
SIZE = (1800, 940)  # window width, height in pixels
DOCK_WIDTH = 430


def canvas_is_rendered(pixels: np.ndarray) -> bool:
    """True when an RGB(A) canvas picture shows something (not black, not uniform)."""
    rgb = np.asarray(pixels)[..., :3].astype(np.float32)
    return bool(rgb.mean() > 20 and rgb.std() > 10 and
                len(np.unique(rgb.reshape(-1, 3), axis=0)) > 200)


def build_viewer(model_name: str = "mito-2d", size: tuple[int, int] = SIZE):
    """A shown napari viewer with the sample, probabilities, objects and the docks."""
    import napari
    from qtpy.QtCore import Qt

    from napari_emseg._sample_data import SAMPLE_SCALE, load_sample
    from napari_emseg._widgets.layers import THRESHOLD_KEY
    from napari_emseg._widgets.segment import SEGMENT_KEY
    from napari_emseg.models.zoo import load_model
    from napari_emseg.postprocess import segment, segment_defaults
    from napari_emseg.predict import predict_volume

    image, _mask = load_sample()
    model = load_model(model_name)
    prob = predict_volume(image, model)
    objects = segment(prob, segment_defaults(model.meta), spacing=SAMPLE_SCALE).labels

    viewer = napari.Viewer(show=True, title="napari-emseg")
    window = viewer.window._qt_window
    window.resize(*size)
    viewer.add_image(image, name="Lucchi++ EM", scale=SAMPLE_SCALE)
    viewer.add_image(prob, name="Lucchi++ EM probabilities", scale=SAMPLE_SCALE,
                     colormap="magma", blending="additive", opacity=0.45,
                     contrast_limits=(0, 1),
                     metadata={THRESHOLD_KEY: model.meta.get("threshold"),  # as Predict does
                               SEGMENT_KEY: model.meta.get("segment")})
    labels = viewer.add_labels(objects, name="Lucchi++ EM objects 3D", scale=SAMPLE_SCALE,
                               opacity=0.9)
    labels.contour = 2

    seg_dock, seg = viewer.window.add_plugin_dock_widget("napari-emseg", "Segment instances")
    _dock, predict = viewer.window.add_plugin_dock_widget("napari-emseg", "Predict",
                                                          tabify=True)
    for name in ("Train from annotations", "Save labels and model"):
        viewer.window.add_plugin_dock_widget("napari-emseg", name, tabify=True)
    predict.image.value = viewer.layers["Lucchi++ EM"]
    predict.model.value = model_name
    seg.probabilities.value = viewer.layers["Lucchi++ EM probabilities"]
    viewer.layers.selection.active = labels
    viewer.dims.set_point(0, (image.shape[0] // 2) * SAMPLE_SCALE[0])
    _settle()
    seg_dock.raise_()  # takes effect only once the tabs exist
    window.resizeDocks([seg_dock], [DOCK_WIDTH], Qt.Orientation.Horizontal)
    _settle()
    viewer.reset_view()
    return viewer


def _settle(rounds: int = 20) -> None:
    import time

    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    for _ in range(rounds):
        app.processEvents()
        time.sleep(0.05)


def render(viewer) -> np.ndarray:
    """RGB picture of the whole window with the OpenGL canvas rendered into it."""
    from qtpy.QtCore import QPoint

    _settle()
    window = viewer.window._qt_window
    shot = np.asarray(viewer.screenshot(canvas_only=False, flash=False))[..., :3].copy()
    canvas = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3]
    native = viewer.window._qt_viewer.canvas.native
    corner = native.mapTo(window, QPoint(0, 0))
    ratio = shot.shape[1] / max(window.width(), 1)  # device pixels per logical pixel
    y0, x0 = int(round(corner.y() * ratio)), int(round(corner.x() * ratio))
    h = min(canvas.shape[0], shot.shape[0] - y0)
    w = min(canvas.shape[1], shot.shape[1] - x0)
    shot[y0:y0 + h, x0:x0 + w] = canvas[:h, :w]
    return shot, (y0, x0, h, w)


def main(out: Path = DEFAULT_OUT) -> Path:
    from imageio.v3 import imwrite

    viewer = build_viewer()
    try:
        shot, (y0, x0, h, w) = render(viewer)
    finally:
        viewer.close()
    region = shot[y0:y0 + h, x0:x0 + w]
    if not canvas_is_rendered(region):
        raise SystemExit(f"canvas region is not rendered (mean {region.mean():.1f}, "
                         f"std {region.std():.1f}): nothing written")
    out.parent.mkdir(parents=True, exist_ok=True)
    imwrite(out, shot)
    print(f"{out}: {shot.shape[1]}×{shot.shape[0]} px, canvas {w}×{h} px at ({x0}, {y0}), "
          f"canvas mean {region.mean():.0f}, std {region.std():.0f}")
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
