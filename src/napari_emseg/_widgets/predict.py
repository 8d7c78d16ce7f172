"""Predict dock widget: image layer + model → "<image> probabilities" layer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from napari.layers import Image

from . import _common
from ._common import (
    CancellableJobOwner,
    Job,
    ModelChoices,
    base_name,
    layer_array,
    layer_picker,
    model_registry,
)

if TYPE_CHECKING:
    import napari

PROB_DISPLAY = {"colormap": "magma", "blending": "additive", "contrast_limits": (0.0, 1.0)}
DEVICES = ("auto", "cpu", "cuda", "mps")
EXTENTS = (("whole volume (3D)", "volume"), ("current slice (2D)", "slice"))


def probabilities_name(image_name: str) -> str:
    """Name of the probabilities layer of an image layer."""
    return f"{base_name(image_name)} probabilities"


def parse_patch(text: str) -> tuple[int, ...] | None:
    """``"auto"``/``""`` → None; ``"256"`` → (256,); ``"32, 128, 128"`` → (32, 128, 128)."""
    text = text.strip().lower()
    if text in ("", "auto", "none"):
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").replace(" ", ",").split(",") if v)
    except ValueError:
        raise ValueError(f"patch must be 'auto' or integers like '256' or '32,128,128'; "
                         f"got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"patch sizes must be positive integers; got {text!r}")
    return values


def _check_image(layer: Image | None) -> str | None:
    """Why ``layer`` cannot be predicted on, or None when it can."""
    if layer is None:
        return "no image layer: open an EM stack or add an Image layer first"
    if layer.rgb:
        return f"image layer {layer.name!r} is RGB; convert it to greyscale first"
    ndim = layer_array(layer).ndim
    if ndim not in (2, 3):
        return (f"image layer {layer.name!r} has {ndim} dimensions; "
                "predict needs a 2D (Y, X) or 3D (Z, Y, X) image")
    return None


def predict_job(
    viewer: napari.viewer.Viewer,
    layer: Image,
    model: Any,
    *,
    z: int | None = None,
    options: dict | None = None,
    on_finished: Callable[[Job], None] | None = None,
    synchronous: bool | None = None,
) -> Job | None:
    """Predict ``layer`` with ``model`` in a worker; the result updates the viewer.

    Parameters
    ----------
    viewer : napari.Viewer
    layer : napari.layers.Image
        2D (Y, X) or 3D (Z, Y, X) grey values.
    model : str or UNet
        Bundled model name, checkpoint path or a loaded model.
    z : int, optional
        Predict only this slice (written into the probabilities layer).
    options : dict
        ``predict_volume`` keywords (patch, overlap, batch_size, device, amp, tta).

    Returns
    -------
    Job or None
        None (and an error notification) when the inputs are unusable.
    """
    problem = _check_image(layer)
    if problem:
        _common.error(f"Predict: {problem}")
        return None
    if model is None or model == "":
        _common.error("Predict: no model chosen (pick a bundled model or browse to a "
                      "checkpoint file)")
        return None
    data = layer_array(layer)
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if opts.get("device") == "auto":
        opts.pop("device")
    registry = model_registry(viewer)
    key = model if isinstance(model, (str, Path)) else None
    name = _common.model_label(str(key)) if key else "model"
    layer_name = probabilities_name(layer.name)

    def work(progress, cancel, _log) -> np.ndarray:
        from .. import predict as engine
        from ..models import zoo

        net = zoo.load_model(model) if key is not None else model
        dims = int(net.meta.get("dims", net.config["dims"]))
        if dims == 3 and data.ndim == 2:
            raise ValueError(f"{name} is a 3D model but image layer {layer.name!r} is 2D "
                             "(Y, X); choose a 2D model")
        if dims == 3 and data.shape[0] < 2:
            raise ValueError(f"{name} is a 3D model but image layer {layer.name!r} has "
                             f"only {data.shape[0]} slice")
        if z is not None and data.ndim == 3:
            return engine.predict_slice(data, net, z, progress=progress, cancel=cancel, **opts)
        return engine.predict_volume(data, net, progress=progress, cancel=cancel, **opts)

    def show(prob: np.ndarray) -> None:
        prob = np.asarray(prob, dtype=np.float32)
        if z is not None and data.ndim == 3:
            extra = prob.shape[:-2]  # class axis of a multi-class model
            full = (*extra, *data.shape)
            existing = _common.find_layer(viewer, layer_name, Image)
            if existing is not None and tuple(existing.data.shape) == full and \
                    existing.data.dtype == np.float32 and isinstance(existing.data, np.ndarray):
                existing.data[..., z, :, :] = prob
                existing.refresh()
                return
            volume = np.zeros(full, np.float32)
            volume[..., z, :, :] = prob
            prob = volume
        _common.set_layer(viewer, layer_name, prob, "image", source=layer, **PROB_DISPLAY)
        if key is not None:
            registry.set_current(str(key))

    where = f" (slice {z})" if z is not None and data.ndim == 3 else ""
    return Job(work, description=f"Predict {layer.name!r} with {name}{where}",
               on_returned=show, on_finished=on_finished, synchronous=synchronous,
               preload=("torch",))


class PredictWidget(ModelChoices, CancellableJobOwner, Container):
    """Dock widget: run a model on an image layer.

    The output is an Image layer ``"<image> probabilities"`` (magma, additive,
    contrast 0–1) that a re-run updates in place.
    """

    done_status = "done"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._registry = model_registry(napari_viewer)
        self.job: Job | None = None

        self.reason = _common.reason_label()
        self.image = layer_picker(napari_viewer, Image, "image",
                                  "EM stack (Z, Y, X) or single slice (Y, X)")
        self.model = ComboBox(label="model", choices=self._model_choices, nullable=True,
                              tooltip="Bundled model, or a checkpoint trained here / browsed to")
        self.browse = FileEdit(label="checkpoint file", mode="r", filter="*.pt",
                               tooltip="Browse… for a napari-emseg checkpoint (.pt)")
        self.extent = ComboBox(label="run on", choices=list(EXTENTS), value="volume",
                               tooltip="Whole volume, or only the slice shown (fast preview)")
        self.tta = CheckBox(text="test-time augmentation (8× slower)", value=False)
        self.device = ComboBox(label="device", choices=list(DEVICES), value="auto")
        self.advanced = CheckBox(text="advanced", value=False)
        self.patch = LineEdit(label="patch", value="auto",
                              tooltip="'auto' (the model's), '256' or '32,128,128'")
        self.overlap = FloatSpinBox(label="overlap", value=0.25, min=0.0, max=0.9, step=0.05)
        self.batch = SpinBox(label="batch (0 = auto)", value=0, min=0, max=512)
        self.amp = CheckBox(text="mixed precision on GPU", value=True)
        self.run_button = PushButton(text="Predict")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                            labels=False)
        self._advanced = [self.patch, self.overlap, self.batch, self.amp]
        self.extend([self.reason, self.image, self.model, self.browse, self.extent, self.tta,
                     self.device, self.advanced, *self._advanced, buttons, self.status])
        self._show_advanced(False)

        self.advanced.changed.connect(self._show_advanced)
        self.browse.changed.connect(self._browsed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.image.changed.connect(self._update_state)
        self._follow_registry(napari_viewer)
        self._update_state()

    # -- choices and state
    def _layers_changed(self) -> None:
        self.image.reset_choices()
        self._update_state()

    def _show_advanced(self, visible: bool) -> None:
        for widget in self._advanced:
            widget.visible = bool(visible)

    def _browsed(self, value=None) -> None:
        path = Path(str(self.browse.value))
        if not path.is_file():
            return
        self._registry.add(path)

    def _update_state(self, _value=None) -> None:
        problem = _check_image(self.image.value)
        if problem is None and not self.model.value:
            problem = "no model: no bundled models found; browse to a checkpoint file"
        self.reason.value = problem or ""
        self.reason.visible = bool(problem)
        self.run_button.enabled = problem is None and not self._busy()

    def predict_options(self) -> dict:
        """Keyword arguments for ``predict_volume`` from the widget's fields."""
        return {
            "patch": parse_patch(self.patch.value),
            "overlap": float(self.overlap.value),
            "batch_size": int(self.batch.value) or None,
            "device": self.device.value,
            "amp": bool(self.amp.value),
            "tta": bool(self.tta.value),
        }

    # -- actions
    def run(self, _value=None) -> Job | None:
        """Start prediction with the current settings (returns the job)."""
        if self._busy():
            _common.info("Predict: a prediction is already running")
            return None
        layer = self.image.value
        try:
            opts = self.predict_options()
        except ValueError as exc:
            _common.error(f"Predict: {exc}")
            return None
        z = None
        if self.extent.value == "slice" and layer is not None and layer_array(layer).ndim == 3:
            z = _common.current_index(self._viewer, layer)
        job = predict_job(self._viewer, layer, self.model.value, z=z, options=opts,
                          on_finished=self._finished)
        if job is None:
            return None
        self.job = job
        self.status.value = "running…"
        self.run_button.enabled = False
        self.cancel_button.enabled = not job.done
        if job.done:  # synchronous
            self._finished(job)
        return job
