"""scripts/screenshot.py renders a real picture (into tmp_path, never into docs/).

The README's docs/screenshot.png is written by running the script by hand; this
test only checks that the script still works and that its OpenGL canvas is not
black (the canvas region of the picture shows EM, not a uniform fill).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from widget_helpers import GUI

pytestmark = GUI

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("screenshot", REPO / "scripts" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_canvas_check_tells_black_from_em():
    check = _script().canvas_is_rendered
    rng = np.random.default_rng(0)
    assert not check(np.zeros((100, 100, 3), np.uint8))
    assert not check(np.full((100, 100, 3), 128, np.uint8))
    assert check(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8))


def test_screenshot_script_renders_the_canvas(tmp_path, qapp):
    from imageio.v3 import imread

    from napari_emseg.models.zoo import list_models

    if "mito-2d" not in list_models():
        pytest.skip("bundled mito-2d not installed")
    before = (REPO / "docs" / "screenshot.png").stat().st_mtime_ns \
        if (REPO / "docs" / "screenshot.png").exists() else None
    out = _script().main(tmp_path / "shot.png")
    pixels = np.asarray(imread(out))[..., :3]
    assert pixels.shape[0] > 600 and pixels.shape[1] > 1000
    # the middle of the canvas (left of centre, where the EM is) is not black
    h, w = pixels.shape[:2]
    middle = pixels[h // 3: 2 * h // 3, int(w * 0.22): int(w * 0.45)]
    assert middle.mean() > 40 and middle.std() > 15
    after = (REPO / "docs" / "screenshot.png").stat().st_mtime_ns \
        if (REPO / "docs" / "screenshot.png").exists() else None
    assert before == after  # the tracked picture is not rewritten
