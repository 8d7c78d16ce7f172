"""Helpers shared by the dock-widget tests (not a test module)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

WIDGETS = {
    "Predict": "PredictWidget",
    "Segment instances": "SegmentWidget",
    "Train from annotations": "TrainWidget",
    "Save labels and model": "SaveWidget",
}

# add_image / add_labels need an OpenGL context: a real or virtual X display
needs_display = pytest.mark.skipif(
    sys.platform.startswith("linux") and not os.environ.get("DISPLAY"),
    reason="GUI test: needs an X display with OpenGL (run under xvfb-run)",
)

#: ``pytestmark`` of the GUI test modules
GUI = [pytest.mark.gui, needs_display]


def tiny_checkpoint(path: Path, dims: int = 2, seed: int = 0) -> Path:
    """A randomly initialised, very small U-Net saved as a napari-emseg checkpoint."""
    import torch

    from napari_emseg.models import zoo

    torch.manual_seed(seed)
    model = zoo.build_model(
        dict(dims=dims, in_channels=1, out_channels=1, depth=2, width=4, norm="batch"),
        {"name": "tiny", "patch": [64, 64] if dims == 2 else [8, 64, 64]},
    )
    return zoo.save_checkpoint(model, path)


def open_widget(viewer, display_name: str):
    """Dock a widget from the manifest and return the widget object."""
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-emseg", display_name)
    return widget


def wait_job(qtbot, job, timeout: int = 60_000) -> None:
    """Process Qt events until ``job`` finished (returned, failed or cancelled)."""
    assert job is not None
    qtbot.waitUntil(lambda: job.done, timeout=timeout)


class Notes:
    """Captured napari notifications (errors and infos)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.infos: list[str] = []
        self.warnings: list[str] = []


def capture_notes(monkeypatch) -> Notes:
    """Replace the widgets' error/info/warning notifications by lists (use in a fixture)."""
    from napari_emseg._widgets import jobs

    captured = Notes()
    monkeypatch.setattr(jobs, "show_error", captured.errors.append)
    monkeypatch.setattr(jobs, "show_info", captured.infos.append)
    monkeypatch.setattr(jobs, "show_warning", captured.warnings.append)
    return captured


@pytest.fixture(name="notes")
def notes_fixture(monkeypatch) -> Notes:
    """Fixture ``notes``: the notifications shown during the test (import it)."""
    return capture_notes(monkeypatch)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images have the same objects (ids may differ)."""
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))
