"""The Train dock's loss / IoU chart, drawn with QPainter.

A matplotlib canvas took 50–250 ms of the GUI thread per redraw (tight layout,
text layout); this widget draws two polylines and a few labels in well under
a millisecond, so adding a point never stalls the viewer.
"""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

LOSS_COLOR, IOU_COLOR = "#ff9f40", "#50c8ff"
AXIS_COLOR, TEXT_COLOR = "#808080", "#d0d0d0"
MARGIN = (34, 8, 30, 18)  # left, top, right, bottom (px)


class LossPlot(QWidget):
    """Loss (left axis, autoscaled) and validation IoU (right axis, 0–1) against step."""

    def __init__(self) -> None:
        super().__init__()
        self.setMinimumHeight(150)
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.iou: list[float] = []

    def clear(self) -> None:
        """Forget every point."""
        self.steps, self.loss, self.iou = [], [], []
        self.update()

    def add(self, record: dict) -> None:
        """Add one validation record (``step``, ``loss``, ``val_iou``)."""
        self.steps.append(int(record.get("step", len(self.steps) + 1)))
        self.loss.append(float(record.get("loss", math.nan)))
        self.iou.append(float(record.get("val_iou", math.nan)))
        self.update()

    def paintEvent(self, _event) -> None:  # noqa: N802 (Qt name)
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        left, top, right, bottom = MARGIN
        w, h = self.width() - left - right, self.height() - top - bottom
        p.setPen(QPen(QColor(AXIS_COLOR)))
        p.drawRect(left, top, w, h)
        font = p.font()
        font.setPointSize(7)
        p.setFont(font)
        loss = [v for v in self.loss if math.isfinite(v)]
        lo, hi = (min(loss), max(loss)) if loss else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        p.setPen(QColor(LOSS_COLOR))
        p.drawText(2, top + 8, f"{hi:.2f}")
        p.drawText(2, top + h, f"{lo:.2f}")
        p.setPen(QColor(IOU_COLOR))
        p.drawText(left + w + 3, top + 8, "1")
        p.drawText(left + w + 3, top + h, "0")
        p.setPen(QColor(TEXT_COLOR))
        last = self.steps[-1] if self.steps else 0
        p.drawText(left, top + h + 13, "step 0")
        p.drawText(left + w - 60, top + h + 13, 60, 14, Qt.AlignRight, f"{last}")
        if self.steps:
            x_max = max(self.steps[-1], 1)
            for values, (vlo, vhi), color in ((self.loss, (lo, hi), LOSS_COLOR),
                                               (self.iou, (0.0, 1.0), IOU_COLOR)):
                points = [QPointF(left + w * s / x_max, top + h * (1 - (v - vlo) / (vhi - vlo)))
                          for s, v in zip(self.steps, values, strict=True) if math.isfinite(v)]
                p.setPen(QPen(QColor(color), 1.5))
                p.drawPolyline(QPolygonF(points))
                for point in points:
                    p.drawEllipse(point, 1.5, 1.5)
        p.end()
