"""Train dock widget: paint → fine-tune (or train from scratch) → predict again."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels

from ..train import FINE_TUNE_LR, FINE_TUNE_LR_3D, SCRATCH_LR, threshold_note
from . import _common
from ._common import (
    Job,
    JobOwner,
    ModelChoices,
    base_name,
    layer_array,
    layer_picker,
    model_registry,
)
from .predict import DEVICES, parse_patch, predict_job

if TYPE_CHECKING:
    import napari

SCRATCH = "__scratch__"
HELP = ("Paint in the annotation layer: <b>1</b> = background, <b>2</b> = foreground "
        "(3, 4, … = more classes); <b>0</b> = unlabeled, ignored by training. "
        "A few strokes on a few slices are enough to start. To fine-tune, paint where "
        "the prediction is wrong (missed parts as 2, false detections as 1) and a "
        "background line just outside some objects.")


def annotations_name(image_name: str) -> str:
    """Name of the annotation (painted Labels) layer of an image layer."""
    return f"{base_name(image_name)} annotations"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _expand_patch(patch: tuple[int, ...] | None, dims: int) -> tuple[int, ...] | None:
    """One value → (p, p) for 2D or (min(p, 32), p, p) for 3D; else as given."""
    if patch is None:
        return None
    if len(patch) == 1:
        p = patch[0]
        return (p, p) if dims == 2 else (min(p, 32), p, p)
    if len(patch) != dims:
        raise ValueError(f"patch {patch} has {len(patch)} sizes but the model is {dims}D")
    return patch


class _LossPlot:
    """Loss and validation IoU against training step.

    A matplotlib canvas when matplotlib is installed (a core dependency),
    else a text line with the latest values.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.iou: list[float] = []
        try:
            from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
            from matplotlib.figure import Figure
        except ImportError:
            from qtpy.QtWidgets import QLabel

            self.canvas = QLabel("loss / IoU plot needs matplotlib")
            self._ax = None
            return
        fig = Figure(figsize=(3.2, 2.2), tight_layout=True, facecolor="#262930")
        self.canvas = FigureCanvasQTAgg(fig)
        self.canvas.setMinimumHeight(170)
        ax = fig.add_subplot(111)
        ax2 = ax.twinx()
        for a in (ax, ax2):
            a.set_facecolor("#262930")
            a.tick_params(colors="#d0d0d0", labelsize=7)
            for spine in a.spines.values():
                spine.set_color("#808080")
        ax.set_xlabel("step", color="#d0d0d0", fontsize=8)
        ax.set_ylabel("loss", color="#ff9f40", fontsize=8)
        ax2.set_ylabel("val IoU", color="#50c8ff", fontsize=8)
        ax2.set_ylim(0, 1)
        (self._loss,) = ax.plot([], [], "-o", color="#ff9f40", ms=2, lw=1.2)
        (self._iou,) = ax2.plot([], [], "-o", color="#50c8ff", ms=2, lw=1.2)
        self._ax = ax

    def clear(self) -> None:
        self.steps, self.loss, self.iou = [], [], []
        self._redraw()

    def add(self, record: dict) -> None:
        self.steps.append(int(record.get("step", len(self.steps) + 1)))
        self.loss.append(float(record.get("loss", np.nan)))
        self.iou.append(float(record.get("val_iou", np.nan)))
        self._redraw()

    def _redraw(self) -> None:
        if self._ax is None:
            if self.steps:
                self.canvas.setText(f"step {self.steps[-1]}: loss {self.loss[-1]:.4f}, "
                                    f"val IoU {self.iou[-1]:.3f}")
            return
        self._loss.set_data(self.steps, self.loss)
        self._iou.set_data(self.steps, self.iou)
        self._ax.relim()
        self._ax.autoscale_view()
        self.canvas.draw_idle()


class TrainWidget(ModelChoices, JobOwner, Container):
    """Dock widget: fine-tune a model on painted strokes, or train one from scratch.

    The checkpoint goes to the chosen folder (default ``~/.napari-emseg/models``)
    and is registered with the viewer so Predict and Save offer it.
    """

    model_field = "start_from"
    keep_previous_model = True

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._registry = model_registry(napari_viewer)
        self.job: Job | None = None
        self.predict_job: Job | None = None
        self.last_checkpoint: Path | None = None
        self.result = None

        self.reason = _common.reason_label()
        self.image = layer_picker(napari_viewer, Image, "image", "The EM stack to learn from")
        self.annotations = layer_picker(napari_viewer, Labels, "annotations",
                                        "Painted Labels layer (same shape as the image)")
        self.new_layer_button = PushButton(text="New annotation layer")
        self.help = Label(value=HELP)
        self.help.native.setWordWrap(True)
        self.start_from = ComboBox(label="start from", choices=self._model_choices,
                                   tooltip="Fine-tune a model, or a new U-Net from scratch")
        self.new_depth = SpinBox(label="new model depth", value=4, min=1, max=6)
        self.new_width = SpinBox(label="new model width", value=16, min=2, max=128)
        self.steps = SpinBox(label="steps", value=200, min=1, max=1_000_000, step=50)
        self.minutes = FloatSpinBox(label="time budget (min, 0 = off)", value=0.0, min=0.0,
                                    max=10_000.0, step=1.0,
                                    tooltip="Stop after this many minutes (steps ignored)")
        self.lr = FloatSpinBox(label="learning rate (0 = auto)", value=0.0, min=0.0, max=1.0,
                               step=1e-4, tooltip=f"auto: {SCRATCH_LR:g} for a new model; to "
                               f"fine-tune, {FINE_TUNE_LR:g} (2D) or {FINE_TUNE_LR_3D:g} (3D)")
        self.lr.native.setDecimals(6)
        self.batch = SpinBox(label="batch (0 = auto)", value=0, min=0, max=256,
                             tooltip="Patches per step; auto: 4 for a 2D model, 2 for 3D")
        self.val_every = SpinBox(label="validate every (0 = auto)", value=0, min=0,
                                 max=1_000_000, tooltip="Steps between IoU checks / plot points")
        self.patch = LineEdit(label="patch", value="auto",
                              tooltip="'auto' (the model's), '128', or '32,128,128' for 3D")
        self.device = ComboBox(label="device", choices=list(DEVICES), value="auto")
        folder = Path(_common.DEFAULT_MODEL_DIR).expanduser()
        self.folder = FileEdit(label="save to folder", mode="d", value=folder)
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.predict_again_button = PushButton(text="Predict again", enabled=False)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        buttons = Container(widgets=[self.train_button, self.cancel_button,
                                     self.predict_again_button],
                            layout="horizontal", labels=False)
        self.extend([self.reason, self.image, self.annotations, self.new_layer_button,
                     self.help, self.start_from, self.new_depth, self.new_width, self.steps,
                     self.minutes, self.lr, self.batch, self.val_every, self.patch,
                     self.device, self.folder, buttons, self.status])
        self.plot = _LossPlot()
        self.native.layout().addWidget(self.plot.canvas)

        self.new_layer_button.clicked.connect(self.new_annotation_layer)
        self.train_button.clicked.connect(self.train)
        self.cancel_button.clicked.connect(self.cancel)
        self.predict_again_button.clicked.connect(self.predict_again)
        for widget in (self.image, self.annotations, self.minutes):
            widget.changed.connect(self._update_state)
        self.start_from.changed.connect(self._update_state)
        self._follow_registry(napari_viewer)
        self._layers_changed()

    # -- choices and state
    def _model_choices(self, _widget=None) -> list[tuple[str, str]]:
        return [("new model (from scratch)", SCRATCH), *self._registry.choices()]

    def _layers_changed(self) -> None:
        self.image.reset_choices()
        self.annotations.reset_choices()
        image = self.image.value
        if image is not None:  # prefer "<image> annotations"
            match = _common.find_layer(self._viewer, annotations_name(image.name), Labels)
            if match is not None and match in self.annotations.choices:
                self.annotations.value = match
        self._update_state()

    def _problem(self) -> str | None:
        image, painted = self.image.value, self.annotations.value
        if image is None:
            return "no image layer: open an EM stack first"
        if image.rgb or layer_array(image).ndim not in (2, 3):
            return f"image layer {image.name!r} must be 2D (Y, X) or 3D (Z, Y, X) grey values"
        if painted is None:
            return "no annotation layer: click 'New annotation layer' and paint strokes"
        if tuple(layer_array(painted).shape) != tuple(layer_array(image).shape):
            return (f"annotation layer {painted.name!r} has shape "
                    f"{tuple(layer_array(painted).shape)} but image {image.name!r} has "
                    f"{tuple(layer_array(image).shape)}")
        return None

    def _update_state(self, _value=None) -> None:
        scratch = self.start_from.value == SCRATCH
        self.new_depth.visible = self.new_width.visible = scratch
        self.steps.enabled = not self.minutes.value
        self.new_layer_button.enabled = self.image.value is not None
        problem = self._problem()
        self.reason.value = problem or ""
        self.reason.visible = bool(problem)
        self.train_button.enabled = problem is None and not self._busy()
        self.predict_again_button.enabled = (
            self.last_checkpoint is not None and self.image.value is not None
            and not self._busy())

    # -- actions
    def new_annotation_layer(self, _value=None) -> Labels | None:
        """Add an empty Labels layer shaped like the image ("<image> annotations")."""
        image = self.image.value
        if image is None:
            _common.error("Train: no image layer to annotate; open an EM stack first")
            return None
        shape = tuple(layer_array(image).shape)
        name = annotations_name(image.name)
        existing = _common.find_layer(self._viewer, name, Labels)
        if existing is not None and tuple(existing.data.shape) == shape:
            layer = existing
        else:
            layer = self._viewer.add_labels(np.zeros(shape, np.uint8), name=name,
                                            **_common._geometry(image, len(shape)))
        layer.selected_label = 2
        layer.brush_size = 10
        layer.mode = "paint"
        self._viewer.layers.selection.active = layer
        self.annotations.reset_choices()
        self.annotations.value = layer
        _common.info("Paint with 2 = foreground, 1 = background; 0 stays unlabeled")
        return layer

    def config_fields(self) -> dict:
        """TrainConfig keywords from the widget (patch as parsed, not expanded)."""
        minutes = float(self.minutes.value) or None
        steps = 1_000_000 if minutes else int(self.steps.value)
        val_every = int(self.val_every.value) or (25 if minutes else max(1, min(50, steps // 10)))
        return {
            "steps": steps,
            "minutes": minutes,
            "lr": float(self.lr.value),
            "batch_size": int(self.batch.value),
            "val_every": val_every,
            "warmup": 10 if minutes else min(10, max(0, steps // 5)),
            "device": None if self.device.value == "auto" else self.device.value,
        }

    def train(self, _value=None) -> Job | None:
        """Start fine-tuning / training with the current settings (returns the job)."""
        if self._busy():
            _common.info("Train: training is already running")
            return None
        problem = self._problem()
        if problem:
            _common.error(f"Train: {problem}")
            return None
        image_layer, painted_layer = self.image.value, self.annotations.value
        painted = np.asarray(layer_array(painted_layer))
        if not painted.any():
            _common.error(f"Train: annotation layer {painted_layer.name!r} is empty: paint "
                          "background (1) and foreground (2) strokes first")
            return None
        if not np.issubdtype(painted.dtype, np.integer) or painted.min() < 0:
            _common.error(f"Train: annotation layer {painted_layer.name!r} must hold "
                          "non-negative integer labels")
            return None
        try:
            patch = parse_patch(self.patch.value)
        except ValueError as exc:
            _common.error(f"Train: {exc}")
            return None
        painted = painted.copy()
        image = layer_array(image_layer)
        fields = self.config_fields()
        source = self.start_from.value
        depth, width = int(self.new_depth.value), int(self.new_width.value)
        folder = Path(str(self.folder.value)).expanduser()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        stem = f"{_slug(base_name(image_layer.name))}-{stamp}"
        checkpoint = folder / f"{stem}.pt"
        n = 1
        while checkpoint.exists() or checkpoint == self.last_checkpoint:  # same second
            n += 1
            checkpoint = folder / f"{stem}-{n}.pt"

        def work(progress, cancel, log):
            from ..models import zoo
            from ..train import TrainConfig, fine_tune, fine_tune_settings

            img = np.asarray(image)
            if source == SCRATCH:
                n_fg = max(1, int(painted.max()) - 1)
                classes = (["background", "foreground"] if n_fg == 1 else
                           ["background"] + [f"class {i}" for i in range(1, n_fg + 1)])
                size = (patch or (256,))[0]
                model = zoo.build_model(
                    dict(dims=2, in_channels=1, out_channels=1 if n_fg == 1 else n_fg + 1,
                         depth=depth, width=width, norm="batch"),
                    {"name": "scratch", "classes": classes, "patch": [size, size],
                     "activation": "sigmoid" if n_fg == 1 else "softmax"})
            else:
                model = zoo.load_model(source)
            dims = int(model.config["dims"])
            if dims == 3 and img.ndim == 2:
                raise ValueError(f"{_common.model_label(source)} is a 3D model but the image "
                                 "is 2D (Y, X); start from a 2D model or from scratch")
            lr, batch = fine_tune_settings(model, fields["lr"], fields["batch_size"])  # 0 = auto
            config = TrainConfig(**{**fields, "lr": lr, "batch_size": batch},
                                 patch=_expand_patch(patch, dims))
            folder.mkdir(parents=True, exist_ok=True)
            return fine_tune(model, img, painted, config, checkpoint=checkpoint,
                             progress=progress, cancel=cancel, on_log=log)

        self.plot.clear()
        self.job = Job(work, description=f"Train on {image_layer.name!r}",
                       on_returned=self._trained, on_log=self.plot.add,
                       on_finished=self._finished, preload=("torch",))
        if not self.job.done:
            self.status.value = "training…"
            self.train_button.enabled = self.predict_again_button.enabled = False
            self.cancel_button.enabled = True
        return self.job

    def _trained(self, result) -> None:
        self.result = result
        if result.checkpoint is None or not Path(result.checkpoint).is_file():
            _common.error("Train: no checkpoint was written")
            return
        self.last_checkpoint = Path(result.checkpoint)
        self._registry.add(self.last_checkpoint)
        text = (f"best IoU {result.best_iou:.3f} after {result.steps} steps "
                f"({result.seconds:.0f} s)")
        note = threshold_note(result.model.meta)  # chosen after fine-tuning
        if note:
            text += f", {note}"
        text += f" → {self.last_checkpoint}"
        self.status.value = ("stopped early: " if result.cancelled else "") + text
        if result.cancelled:
            _common.info(f"Training stopped; best model so far saved: {self.last_checkpoint}")
        else:
            _common.info(f"Training done: {text}")

    def cancel(self, _value=None) -> None:
        """Stop training (the best model so far is kept) or the running prediction."""
        for job in (self.job, self.predict_job):
            if job is not None and not job.done:
                job.cancel()
                self.status.value = "stopping…"

    def predict_again(self, _value=None) -> Job | None:
        """Predict the image layer with the newest checkpoint (updates its probabilities)."""
        if self.last_checkpoint is None:
            _common.error("Train: nothing trained yet; click Train first")
            return None
        if self.predict_job is not None and not self.predict_job.done:
            _common.info("Train: a prediction is already running")
            return None
        options = {"device": self.device.value}
        self.predict_job = predict_job(self._viewer, self.image.value,
                                       str(self.last_checkpoint), options=options,
                                       on_finished=self._finished)
        if self.predict_job is not None and not self.predict_job.done:
            self.cancel_button.enabled = True
            self.predict_again_button.enabled = False
            self.status.value = "predicting with the new model…"
        return self.predict_job

    def _finished(self, job: Job) -> None:
        try:
            running = any(j is not None and not j.done for j in (self.job, self.predict_job))
            self.cancel_button.enabled = running
            if job.exception is not None and not job.cancelled:
                self.status.value = "failed (see notification)"
            elif job is self.predict_job and not job.cancelled:
                self.status.value = f"predicted with {self.last_checkpoint.name}"
            elif job.cancelled and job is self.predict_job:
                self.status.value = "prediction cancelled"
            self._update_state()
        except RuntimeError:
            pass
