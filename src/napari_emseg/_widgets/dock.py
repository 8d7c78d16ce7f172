"""Docks that fit small screens: the content scrolls instead of growing the window."""

from __future__ import annotations


class ScrollingDock:
    """Mixin for a magicgui ``Container`` built with ``scrollable=True``.

    napari docks ``widget.native``; magicgui's ``native`` of a scrollable
    container is the inner widget, so the scroll area would be lost. Here
    ``native`` is the scroll area and :attr:`content` the widget holding the
    layout. Four docks stacked then fit a 1366×768 screen.
    """

    @property
    def native(self):
        return self._widget._qwidget  # the QScrollArea around the content

    @property
    def content(self):
        """The inner widget (its ``layout()`` holds the dock's fields)."""
        return self._widget._mgui_get_native_widget()

    def fit_narrow(self) -> None:
        """Let the dock shrink to a narrow window: drop-downs no longer widen to their
        longest entry (a checkpoint path), so no field is cut off at the right."""
        from qtpy.QtWidgets import QComboBox

        for box in self.content.findChildren(QComboBox):
            box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            box.setMinimumContentsLength(12)
