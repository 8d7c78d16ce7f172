"""Segment dock widget: probabilities → "<image> instances" / "<image> objects 3D".

One call of :func:`napari_emseg.postprocess.segment` with the
:class:`~napari_emseg.postprocess.SegmentSettings` the widgets show, as
``emseg segment`` makes it; the values start at the engine's defaults and take
the predicting model's settings (layer metadata written by Predict).  Only
float image layers are offered: the raw EM image and label layers are not
probabilities.  With a "from membranes" method the input is a membrane
(boundary) map and the output is ``"<image> neurites"``, from
:func:`napari_emseg.neurons.segment_neurons`.
"""

from __future__ import annotations

import weakref
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
from napari.layers import Image, Labels, Layer

from ..postprocess import SegmentSettings, segment_defaults
from . import jobs, layers
from .dock import ScrollingDock
from .jobs import CancellableJobOwner, Job
from .layers import base_name, layer_array, layer_picker

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
#: layer metadata key: the predicting model's ``meta["segment"]`` (Predict → Segment)
SEGMENT_KEY = "emseg_segment"
#: SegmentSettings fields shown by a widget of the same name
_SHOWN = ("zfilter", "zfilter_mode", "seed_method", "min_distance", "h", "min_size",
          "iou_threshold", "max_gap", "min_slices", "track")


def _neuron_defaults() -> dict:
    """The engine's defaults of :func:`segment_neurons` for the swapped widgets."""
    import inspect

    from ..neurons import segment_neurons

    params = inspect.signature(segment_neurons).parameters
    return {name: params[name].default for name in _SWAPPED}


def is_probability_layer(layer) -> bool:
    """Whether ``layer`` can hold probabilities: a float, single-channel Image layer."""
    return (isinstance(layer, Image) and not layer.rgb
            and np.issubdtype(layer_array(layer).dtype, np.floating))


def _probability_choices(viewer) -> Any:
    """Choices callable of the picker: the viewer's probability layers."""
    ref = weakref.ref(viewer)

    def choices(_widget=None) -> list[tuple[str, Layer]]:
        v = ref()
        return [] if v is None else [(lay.name, lay) for lay in v.layers
                                     if is_probability_layer(lay)]

    return choices


def model_meta(layer: Image | None) -> dict | None:
    """The predicting model's settings stored on ``layer`` by Predict, as model metadata."""
    if layer is None:
        return None
    meta = {"threshold": layer.metadata.get(layers.THRESHOLD_KEY),
            "segment": layer.metadata.get(SEGMENT_KEY)}
    return meta if any(v is not None for v in meta.values()) else None


def _check_probabilities(layer: Image | None) -> str | None:
    if layer is None:
        return ("no probabilities layer: run Predict first (Segment reads float "
                "probabilities in [0, 1], not the raw EM image or a Labels layer)")
    data = layer_array(layer)
    if layer.rgb or data.ndim not in (2, 3):
        return (f"layer {layer.name!r} has shape {tuple(data.shape)}; segmentation needs "
                "one probability map (Y, X) or (Z, Y, X)")
    return None


class SegmentWidget(ScrollingDock, CancellableJobOwner, Container):
    """Dock widget: threshold, z-filter, watershed / components, tracking, size filter.

    Writes Labels ``"<image> instances"`` (and ``"<image> objects 3D"`` with
    tracking on, ids consistent across z); a "from membranes" method reads a
    membrane map and writes ``"<image> neurites"`` (tracked inside the engine).
    "Preview slice" shows the 2D instances of the slice shown (before tracking
    and the 3D size filter) in ``"<image> preview"``.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True, scrollable=True)
        self._viewer = napari_viewer
        self.job: Job | None = None
        self._preview_z: int | None = None
        d = SegmentSettings()
        self._base = d  # settings without a widget (opening, closing, ...) come from here

        self.reason = layers.reason_label()
        self.probabilities = layer_picker(napari_viewer, Image, "probabilities",
                                          "Output of Predict (float values in [0, 1])")
        self.probabilities.choices = _probability_choices(napari_viewer)
        self.threshold = FloatSpinBox(label="threshold", value=float(d.threshold), min=0.0,
                                      max=1.0, step=0.05)
        self.otsu = CheckBox(text="Otsu threshold instead", value=False)
        self.zfilter = SpinBox(label="z-filter (0 = off)", value=d.zfilter, min=0, max=15,
                               step=1, tooltip="Median filter window along z before thresholding")
        self.zfilter_mode = ComboBox(label="z-filter along", choices=["z", "yz"],
                                     value=d.zfilter_mode)
        self.method = ComboBox(label="method", choices=list(METHODS), value=(d.method, d.dims))
        self.seed_method = ComboBox(label="seeds", choices=list(SEED_METHODS),
                                    value=d.seed_method)
        self.min_distance = SpinBox(label="seed min distance", value=d.min_distance, min=1,
                                    max=100)
        self.h = FloatSpinBox(label="seed h", value=d.h, min=0.0, max=50.0, step=0.5)
        self.track = CheckBox(text="track slices into 3D objects", value=True)
        self.iou_threshold = FloatSpinBox(label="tracking IoU", value=d.iou_threshold, min=0.0,
                                          max=1.0, step=0.05)
        self.max_gap = SpinBox(label="max gap (slices)", value=d.max_gap, min=0, max=10)
        self.min_slices = SpinBox(label="min slices", value=d.min_slices, min=1, max=1000)
        self.min_size = SpinBox(label="min size (voxels)", value=d.min_size, min=0, max=10**9,
                                step=100, tooltip="Objects with fewer voxels are removed, "
                                "measured on the 3D objects (2D instances without tracking)")
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
        self._adopted: tuple[int, str] | None = None
        self._other_values = _neuron_defaults()  # of the pipeline not shown
        self._membranes = False
        self.method.changed.connect(self._swap_values)
        self.probabilities.changed.connect(self._adopt_model_settings)
        layers.watch_layers(napari_viewer, self._layers_changed)
        self._select_probabilities()
        self._update_state()
        self._adopt_model_settings()
        self.fit_narrow()

    # -- state
    def _layers_changed(self) -> None:
        self.probabilities.reset_choices()
        self._select_probabilities()
        self._update_state()

    def _adopt_model_settings(self, _value=None) -> None:
        """Take the settings of the model that predicted the layer, once per new prediction.

        Predict stores them in the layer's metadata; values typed here stay until
        a different layer or a model with other settings comes along.
        """
        layer = self.probabilities.value
        if layer is not self._watched:
            if self._watched is not None:
                self._watched.events.data.disconnect(self._adopt_model_settings)
            if layer is not None:
                layer.events.data.connect(self._adopt_model_settings)
            self._watched = layer
        meta = model_meta(layer)
        if meta is None or self._adopted == (id(layer), repr(meta)):
            return
        self._adopted = (id(layer), repr(meta))
        tuned = segment_defaults(meta)
        named = set(meta["segment"] or {})
        if meta["threshold"] is not None:
            named.add("threshold")
        self._base = tuned
        self.show_settings(tuned, named)

    def show_settings(self, settings: SegmentSettings, names: set[str]) -> None:
        """Show the fields ``names`` of ``settings`` in the widgets (membranes values aside)."""
        for name in names & {"threshold", *_SHOWN}:
            value = getattr(settings, name)
            if name == "threshold":
                self.otsu.value = value == "otsu"
                if value == "otsu":
                    continue
                value = round(float(value), 2)
            if self._membranes and name in _SWAPPED:  # they belong to the instances pipeline
                self._other_values[name] = value
            else:
                widget = getattr(self, name)
                widget.value = type(widget.value)(value)
        if names & {"method", "dims"} and not self._membranes:
            self.method.value = (settings.method, settings.dims)

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

    def parameters(self) -> SegmentSettings:
        """The settings shown, for :func:`napari_emseg.postprocess.segment`."""
        method, dims = self.method.value
        return self._base.updated(
            method=method, dims=dims,
            threshold="otsu" if self.otsu.value else float(self.threshold.value),
            zfilter=int(self.zfilter.value), zfilter_mode=self.zfilter_mode.value,
            seed_method=self.seed_method.value, min_distance=int(self.min_distance.value),
            h=float(self.h.value), min_size=int(self.min_size.value),
            track=dims == 2 and bool(self.track.value),
            iou_threshold=float(self.iou_threshold.value), max_gap=int(self.max_gap.value),
            min_slices=int(self.min_slices.value),
        )

    def _typed_section_settings(self) -> list[str]:
        """The z-filter and minimum size when changed from the values the dock started with."""
        return [name for name in ("zfilter", "min_size")
                if getattr(self, name).value != getattr(self._base, name)]

    def neuron_parameters(self) -> dict:
        """Keyword arguments for :func:`napari_emseg.neurons.segment_neurons`."""
        return {"dims": self.method.value[1], "threshold": float(self.threshold.value),
                "min_distance": float(self.min_distance.value), "h": float(self.h.value),
                "min_size": int(self.min_size.value), "track": bool(self.track.value),
                "iou": float(self.iou_threshold.value), "max_gap": int(self.max_gap.value),
                "min_slices": int(self.min_slices.value)}

    # -- actions
    def _chosen_probabilities(self) -> tuple[Image, Any] | None:
        """The chosen probabilities layer and its data; None (and an error) if unusable."""
        layer = self.probabilities.value
        problem = _check_probabilities(layer)
        if problem:
            jobs.error(f"Segment: {problem}")
            return None
        return layer, layer_array(layer)

    def _start(self, work, show, description: str) -> Job | None:
        if self._busy():
            jobs.info("Segment: a segmentation is already running")
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
        settings = self.parameters()
        if prob.ndim != 3:
            settings = settings.updated(track=False)
        spacing = _spacing(layer, prob) if settings.dims == 3 else None
        name = base_name(layer.name)
        viewer = self._viewer
        voxel, keep = _anisotropic_scale(layer), self._typed_section_settings()
        fitted = {"note": ""}

        def work(progress, cancel, _log):
            from .. import postprocess

            used, fitted["note"] = postprocess.fit_to_data(settings, prob, voxel, keep)
            fitted["settings"] = used
            return postprocess.segment(prob, used, spacing=spacing, progress=progress,
                                       cancel=cancel)

        def show(result) -> None:
            if fitted["note"]:
                self.show_settings(fitted["settings"], {"zfilter", "min_size"})
                jobs.info(f"Segment: {fitted['note']} (type other values to choose them)")
            layers.set_layer(viewer, f"{name} instances", result.instances, "labels",
                              source=layer)
            if result.objects is not None:
                layers.set_layer(viewer, f"{name} objects 3D", result.objects, "labels",
                                  source=layer)
            self.status.value = result.summary(fitted["settings"].min_size)
            if fitted["note"]:
                self.status.value += f"; {fitted['note']}"
            if result.dropped and not result.labels.any():
                jobs.warning(f"Segment: {self.status.value}: lower the minimum size to "
                             "keep them")

        return self._start(work, show, f"Segment {layer.name!r}")

    def _run_neurons(self, layer: Image, prob) -> Job | None:
        """Neurites from the membrane map: one call of the engine, into ``"<image> neurites"``."""
        params = self.neuron_parameters()
        if params["dims"] == 3:
            params["spacing"] = _spacing(layer, prob)
        name = f"{base_name(layer.name)} neurites"
        viewer = self._viewer

        def work(progress, cancel, _log):
            from ..neurons import segment_neurons

            return segment_neurons(prob, **params, progress=progress, cancel=cancel)

        def show(labels: np.ndarray) -> None:
            layers.set_layer(viewer, name, labels, "labels", source=layer)
            self.status.value = f"{int(labels.max())} neurites"

        return self._start(work, show, f"Neurons from {layer.name!r}")

    def preview(self, _value=None) -> Job | None:
        """Segment only the slice shown (2D), into the ``"<image> preview"`` layer."""
        chosen = self._chosen_probabilities()
        if chosen is None:
            return None
        layer, prob = chosen
        z = layers.current_index(self._viewer, layer) if prob.ndim == 3 else None
        membranes = self.method.value[0] == "membranes"
        if membranes:
            neuron_params = {**self.neuron_parameters(), "dims": 2}
        else:  # the 2D instances, before tracking and the 3D size filter
            settings = self.parameters().updated(dims=2, track=False, min_size=0,
                                                 min_volume=None)
        name = f"{base_name(layer.name)} preview"
        viewer = self._viewer
        voxel, keep = _anisotropic_scale(layer), self._typed_section_settings()

        def work(progress, cancel, _log):
            from .. import postprocess
            from ..neurons import segment_neurons

            if membranes:
                plane = np.asarray(prob[z] if z is not None else prob)
                return segment_neurons(plane, **neuron_params, progress=progress, cancel=cancel)
            used, _note = postprocess.fit_to_data(settings, prob, voxel, keep)
            slab, k = _slab(prob, z, used.zfilter)
            labels = postprocess.segment(slab, used, progress=progress,
                                         cancel=cancel).instances
            return labels if k is None else postprocess.relabel_sequential(labels[k])

        def show(labels: np.ndarray) -> None:
            if z is None:
                layers.set_layer(viewer, name, labels, "labels", source=layer)
            else:
                existing = layers.find_layer(viewer, name, Labels)
                if existing is not None and tuple(existing.data.shape) == tuple(prob.shape) \
                        and isinstance(existing.data, np.ndarray):
                    if self._preview_z is not None and self._preview_z < prob.shape[0]:
                        existing.data[self._preview_z] = 0
                    existing.data[z] = labels
                    existing.refresh()
                else:
                    volume = np.zeros(prob.shape, np.uint32)
                    volume[z] = labels
                    layers.set_layer(viewer, name, volume, "labels", source=layer)
                self._preview_z = z
            where = f" on slice {z}" if z is not None else ""
            before = "" if membranes else " (before tracking and the size filter)"
            self.status.value = f"preview: {int(labels.max())} instances{where}{before}"

        where = f" slice {z}" if z is not None else ""
        return self._start(work, show, f"Preview {layer.name!r}{where}")


def _anisotropic_scale(layer: Image) -> tuple[float, ...] | None:
    """The layer's (z, y, x) scale when it says the sections are thicker or thinner, else None.

    None (unknown) also for a scale of all ones: napari's default, not a measurement.
    """
    scale = tuple(float(v) for v in layer.scale[-3:])
    return scale if layer.ndim >= 3 and len(set(scale)) > 1 else None


def _spacing(layer: Image, prob) -> tuple[float, ...] | None:
    """The layer's voxel size relative to its finest axis, when anisotropic (else None)."""
    from ..io.voxel import relative_spacing

    scale = _anisotropic_scale(layer)
    return None if scale is None or prob.ndim != 3 else relative_spacing(scale)


def _slab(prob, z: int | None, zfilter: int) -> tuple[np.ndarray, int | None]:
    """The slices a z-filter of window ``zfilter`` needs around ``z``, and z's index in them.

    The filter's result on slice ``z`` of the slab equals its result on the volume.
    """
    if z is None:
        return np.asarray(prob), None
    r = max(int(zfilter), 1) // 2
    lo, hi = max(z - r, 0), min(z + r + 1, prob.shape[0])
    return np.asarray(prob[lo:hi]), z - lo
