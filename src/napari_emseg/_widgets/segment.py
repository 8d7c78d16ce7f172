"""Segment dock widget: probabilities → "<image> instances" / "<image> objects 3D".

With a "from membranes" method the input is a membrane (boundary) map and the
output is ``"<image> neurites"``, from :func:`napari_emseg.neurons.segment_neurons`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels

from . import _common
from ._common import CancellableJobOwner, Job, base_name, layer_array, layer_picker

if TYPE_CHECKING:
    import napari

METHODS = (
    ("seeded watershed 2D (per slice)", ("watershed", 2)),
    ("seeded watershed 3D", ("watershed", 3)),
    ("connected components 2D (per slice)", ("components", 2)),
    ("connected components 3D", ("components", 3)),
    ("from membranes 2D: neurons traced through z", ("membranes", 2)),
    ("from membranes 3D: neurons (FIB-SEM)", ("membranes", 3)),
)
SEED_METHODS = ("hmaxima", "peaks", "distance")
#: the widgets whose values differ between the two pipelines (swapped on a method change)
_SWAPPED = ("threshold", "h", "min_distance", "min_size")


def _neuron_defaults() -> dict:
    """The engine's defaults of :func:`segment_neurons` for the swapped widgets."""
    import inspect

    from ..neurons import segment_neurons

    params = inspect.signature(segment_neurons).parameters
    return {name: params[name].default for name in _SWAPPED}


def _check_probabilities(layer: Image | None) -> str | None:
    if layer is None:
        return "no probabilities layer: run Predict first (or add an Image layer in [0, 1])"
    data = layer_array(layer)
    if layer.rgb or data.ndim not in (2, 3):
        return (f"layer {layer.name!r} has shape {tuple(data.shape)}; segmentation needs "
                "one probability map (Y, X) or (Z, Y, X)")
    return None


class SegmentWidget(CancellableJobOwner, Container):
    """Dock widget: threshold, z-filter, watershed / components, tracking, size filter.

    Writes Labels ``"<image> instances"`` (and ``"<image> objects 3D"`` with
    tracking on, ids consistent across z); a "from membranes" method reads a
    membrane map and writes ``"<image> neurites"`` (tracked inside the engine).
    "Preview slice" runs on the slice shown and writes ``"<image> preview"``.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.job: Job | None = None
        self._preview_z: int | None = None

        self.reason = _common.reason_label()
        self.probabilities = layer_picker(napari_viewer, Image, "probabilities",
                                          "Output of Predict (values in [0, 1])")
        self.threshold = FloatSpinBox(label="threshold", value=0.5, min=0.0, max=1.0, step=0.05)
        self.otsu = CheckBox(text="Otsu threshold instead", value=False)
        self.zfilter = SpinBox(label="z-filter (0 = off)", value=0, min=0, max=15, step=1,
                               tooltip="Median filter window along z before thresholding")
        self.zfilter_mode = ComboBox(label="z-filter along", choices=["z", "yz"], value="z")
        self.method = ComboBox(label="method", choices=list(METHODS), value=("watershed", 2))
        self.seed_method = ComboBox(label="seeds", choices=list(SEED_METHODS), value="hmaxima")
        self.min_distance = SpinBox(label="seed min distance", value=5, min=1, max=100)
        self.h = FloatSpinBox(label="seed h", value=2.0, min=0.0, max=50.0, step=0.5)
        self.track = CheckBox(text="track slices into 3D objects", value=True)
        self.iou_threshold = FloatSpinBox(label="tracking IoU", value=0.3, min=0.0, max=1.0,
                                          step=0.05)
        self.max_gap = SpinBox(label="max gap (slices)", value=1, min=1, max=10)
        self.min_slices = SpinBox(label="min slices", value=1, min=1, max=1000)
        self.min_size = SpinBox(label="min size (voxels)", value=0, min=0, max=10**9, step=10)
        self.run_button = PushButton(text="Segment")
        self.preview_button = PushButton(text="Preview slice")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        buttons = Container(widgets=[self.run_button, self.preview_button, self.cancel_button],
                            layout="horizontal", labels=False)
        self._tracking = [self.iou_threshold, self.max_gap, self.min_slices]
        self._seeds = [self.seed_method, self.min_distance, self.h]
        self.extend([self.reason, self.probabilities, self.threshold, self.otsu, self.zfilter,
                     self.zfilter_mode, self.method, *self._seeds, self.track, *self._tracking,
                     self.min_size, buttons, self.status])

        self.run_button.clicked.connect(self.run)
        self.preview_button.clicked.connect(self.preview)
        self.cancel_button.clicked.connect(self.cancel)
        for widget in (self.probabilities, self.method, self.track, self.otsu):
            widget.changed.connect(self._update_state)
        self._watched = None  # the probabilities layer whose data events we follow
        self._adopted: tuple[int, float] | None = None
        self._other_values = _neuron_defaults()  # of the pipeline not shown
        self._membranes = False
        self.method.changed.connect(self._swap_values)
        self.probabilities.changed.connect(self._adopt_threshold)
        _common.watch_layers(napari_viewer, self._layers_changed)
        self._select_probabilities()
        self._update_state()
        self._adopt_threshold()

    # -- state
    def _layers_changed(self) -> None:
        self.probabilities.reset_choices()
        self._select_probabilities()
        self._update_state()

    def _adopt_threshold(self, _value=None) -> None:
        """Take the threshold the predicting model was tuned to, once per new prediction.

        Predict stores it in the layer's metadata; a value typed here stays until
        a different layer or a model with another threshold comes along.
        """
        layer = self.probabilities.value
        if layer is not self._watched:
            if self._watched is not None:
                self._watched.events.data.disconnect(self._adopt_threshold)
            if layer is not None:
                layer.events.data.connect(self._adopt_threshold)
            self._watched = layer
        tuned = None if layer is None else layer.metadata.get(_common.THRESHOLD_KEY)
        if tuned is not None and self._adopted != (id(layer), tuned):
            self._adopted = (id(layer), tuned)
            if self._membranes:  # a pixel threshold: it belongs to the instances pipeline
                self._other_values["threshold"] = round(float(tuned), 2)
            else:
                self.threshold.value = round(float(tuned), 2)

    def _select_probabilities(self) -> None:
        """Prefer a layer named "... probabilities" when the choice is not one."""
        current = self.probabilities.value
        if current is not None and current.name.endswith(" probabilities"):
            return
        for layer in reversed(self.probabilities.choices):
            if layer.name.endswith(" probabilities"):
                self.probabilities.value = layer
                return

    def _swap_values(self, _value=None) -> None:
        """Entering or leaving "from membranes": swap threshold, h, distance and size values."""
        membranes = self.method.value[0] == "membranes"
        if membranes == self._membranes:
            return
        shown = {name: getattr(self, name).value for name in _SWAPPED}
        for name, value in self._other_values.items():
            widget = getattr(self, name)
            widget.value = type(widget.value)(value)  # SpinBox values are int
        self._other_values, self._membranes = shown, membranes

    def _update_state(self, _value=None) -> None:
        method, dims = self.method.value
        membranes = method == "membranes"
        self.seed_method.enabled = method == "watershed"
        self.min_distance.enabled = self.h.enabled = method != "components"
        for widget in (self.zfilter, self.zfilter_mode, self.otsu):
            widget.enabled = not membranes
        self.track.enabled = dims == 2
        for widget in self._tracking:
            widget.enabled = dims == 2 and bool(self.track.value)
        self.threshold.enabled = membranes or not self.otsu.value
        problem = _check_probabilities(self.probabilities.value)
        self.reason.value = problem or ""
        self.reason.visible = bool(problem)
        ready = problem is None and not self._busy()
        self.run_button.enabled = ready
        self.preview_button.enabled = ready

    def parameters(self) -> dict:
        """Keyword arguments for :func:`napari_emseg.postprocess.segment` (no tracking)."""
        method, dims = self.method.value
        params = {
            "method": method,
            "dims": dims,
            "threshold": "otsu" if self.otsu.value else float(self.threshold.value),
            "zfilter": int(self.zfilter.value),
            "zfilter_mode": self.zfilter_mode.value,
            "min_size": int(self.min_size.value),
        }
        if method == "watershed":
            params.update(seed_method=self.seed_method.value,
                          min_distance=int(self.min_distance.value), h=float(self.h.value))
        return params

    def neuron_parameters(self) -> dict:
        """Keyword arguments for :func:`napari_emseg.neurons.segment_neurons`."""
        return {"dims": self.method.value[1], "threshold": float(self.threshold.value),
                "min_distance": float(self.min_distance.value), "h": float(self.h.value),
                "min_size": int(self.min_size.value), "track": bool(self.track.value),
                "iou": float(self.iou_threshold.value), "max_gap": int(self.max_gap.value),
                "min_slices": int(self.min_slices.value)}

    def tracking_parameters(self) -> dict | None:
        """Keyword arguments for ``track_slices``, or None when tracking is off."""
        if self.method.value[1] != 2 or not self.track.value:
            return None
        return {"iou_threshold": float(self.iou_threshold.value),
                "max_gap": int(self.max_gap.value), "min_slices": int(self.min_slices.value)}

    # -- actions
    def _chosen_probabilities(self) -> tuple[Image, Any] | None:
        """The chosen probabilities layer and its data; None (and an error) if unusable."""
        layer = self.probabilities.value
        problem = _check_probabilities(layer)
        if problem:
            _common.error(f"Segment: {problem}")
            return None
        return layer, layer_array(layer)

    def _start(self, work, show, description: str) -> Job | None:
        if self._busy():
            _common.info("Segment: a segmentation is already running")
            return None
        self.job = Job(work, description=description, on_returned=show,
                       on_finished=self._finished)
        if not self.job.done:
            self.status.value = "running…"
            self.run_button.enabled = self.preview_button.enabled = False
            self.cancel_button.enabled = True
        return self.job

    def run(self, _value=None) -> Job | None:
        """Segment the whole probabilities layer (returns the job)."""
        chosen = self._chosen_probabilities()
        if chosen is None:
            return None
        layer, prob = chosen
        if self.method.value[0] == "membranes":
            return self._run_neurons(layer, prob)
        params = self.parameters()
        if params["dims"] == 3 and prob.ndim == 3 and len(set(layer.scale[-3:])) > 1:
            from .._voxel import relative_spacing

            params["spacing"] = relative_spacing(layer.scale[-3:])  # anisotropic voxels
        tracking = self.tracking_parameters() if prob.ndim == 3 else None
        name = base_name(layer.name)
        viewer = self._viewer

        def work(progress, cancel, _log):
            from ..postprocess import segment
            from ..tracking import track_slices

            stage = (lambda d, t: progress(d * 7 // 10, t)) if tracking else progress
            labels = segment(prob, **params, progress=stage, cancel=cancel)
            objects = None
            if tracking:
                objects = track_slices(
                    labels, **tracking, cancel=cancel,
                    progress=lambda d, t: progress(700 + 300 * d // max(t, 1), 1000))
            return labels, objects

        def show(result) -> None:
            labels, objects = result
            _common.set_layer(viewer, f"{name} instances", labels, "labels", source=layer)
            if objects is not None:
                _common.set_layer(viewer, f"{name} objects 3D", objects, "labels",
                                  source=layer)
            n = int(labels.max())
            msg = f"{n} instances"
            if objects is not None:
                msg += f", {int(objects.max())} 3D objects"
            self.status.value = msg

        return self._start(work, show, f"Segment {layer.name!r}")

    def _run_neurons(self, layer: Image, prob) -> Job | None:
        """Neurites from the membrane map: one call of the engine, into ``"<image> neurites"``."""
        params = self.neuron_parameters()
        if params["dims"] == 3 and prob.ndim == 3 and len(set(layer.scale[-3:])) > 1:
            from .._voxel import relative_spacing

            params["spacing"] = relative_spacing(layer.scale[-3:])  # anisotropic voxels
        name = f"{base_name(layer.name)} neurites"
        viewer = self._viewer

        def work(progress, cancel, _log):
            from ..neurons import segment_neurons

            return segment_neurons(prob, **params, progress=progress, cancel=cancel)

        def show(labels: np.ndarray) -> None:
            _common.set_layer(viewer, name, labels, "labels", source=layer)
            self.status.value = f"{int(labels.max())} neurites"

        return self._start(work, show, f"Neurons from {layer.name!r}")

    def preview(self, _value=None) -> Job | None:
        """Segment only the slice shown (2D), into the ``"<image> preview"`` layer."""
        chosen = self._chosen_probabilities()
        if chosen is None:
            return None
        layer, prob = chosen
        z = _common.current_index(self._viewer, layer) if prob.ndim == 3 else None
        membranes = self.method.value[0] == "membranes"
        params = {**(self.neuron_parameters() if membranes else self.parameters()), "dims": 2}
        name = f"{base_name(layer.name)} preview"
        viewer = self._viewer

        def work(progress, cancel, _log):
            from ..neurons import segment_neurons
            from ..postprocess import segment

            plane = np.asarray(prob[z] if z is not None else prob)
            run = segment_neurons if membranes else segment
            return run(plane, **params, progress=progress, cancel=cancel)

        def show(labels: np.ndarray) -> None:
            if z is None:
                _common.set_layer(viewer, name, labels, "labels", source=layer)
            else:
                existing = _common.find_layer(viewer, name, Labels)
                if existing is not None and tuple(existing.data.shape) == tuple(prob.shape) \
                        and isinstance(existing.data, np.ndarray):
                    if self._preview_z is not None and self._preview_z < prob.shape[0]:
                        existing.data[self._preview_z] = 0
                    existing.data[z] = labels
                    existing.refresh()
                else:
                    volume = np.zeros(prob.shape, np.uint32)
                    volume[z] = labels
                    _common.set_layer(viewer, name, volume, "labels", source=layer)
                self._preview_z = z
            self.status.value = f"preview: {int(labels.max())} instances" + (
                f" on slice {z}" if z is not None else "")

        where = f" slice {z}" if z is not None else ""
        return self._start(work, show, f"Preview {layer.name!r}{where}")
