"""All four docks open at once fit a 1366×768 screen: their content scrolls."""

from __future__ import annotations

import pytest
from qtpy.QtWidgets import QScrollArea

from widget_helpers import open_widget

pytestmark = pytest.mark.gui

DOCKS = ("Predict", "Segment instances", "Train from annotations", "Save labels and model")


def test_four_docks_fit_a_small_screen(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widgets = [open_widget(viewer, name) for name in DOCKS]
    for widget in widgets:
        assert isinstance(widget.native, QScrollArea)  # what napari docks
        assert widget.native.widget() is widget.content
        assert widget.native.minimumSizeHint().height() < 300
    window = viewer.window._qt_window
    window.resize(1366, 768)
    qtbot.wait(50)
    assert window.minimumSizeHint().height() <= 768
    assert window.height() <= 768
