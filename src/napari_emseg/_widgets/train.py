"""Train dock widget: paint → fine-tune (or train from scratch) → predict again.

While training runs, the slice the user looks at shows the current model's
prediction ("<image> live preview", refreshed every :data:`PREVIEW_EVERY`
seconds). A run that ends worse on the painted voxels than the model it started
from is saved but does not become the current model unless the user chooses it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

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
from napari.layers import Image, Labels

from ..child import shared_child
from ..train import (
    FAR_LR,
    FINE_TUNE_EARLY_STOP,
    FINE_TUNE_LR,
    FINE_TUNE_LR_3D,
    FINE_TUNE_MAX_STEPS,
    FINE_TUNE_MINUTES,
    NEAR_IOU,
    NEAR_STEPS,
    SCRATCH_LR,
    one_class_warning,
    start_swapped,
    start_text,
    threshold_note,
)
from ..workflows import SCRATCH, StrokeFeed, train_from_strokes
from . import jobs, layers, registry
from .dock import ScrollingDock
from .jobs import Job, JobOwner, ProgressPanel, child_process_wanted
from .layers import base_name, current_index, layer_array, layer_picker
from .plot import LossPlot
from .predict import DEVICES, image_voxel_size, parse_patch, predict_job
from .registry import ModelChoices, model_registry

if TYPE_CHECKING:
    import napari

#: Seconds between live previews of the shown slice while training.
PREVIEW_EVERY = 15.0
#: Layer metadata key that marks a layer made by "New annotation layer".
ANNOTATION_KEY = "emseg_annotations"
PREVIEW_DISPLAY = {"colormap": "magma", "blending": "additive", "contrast_limits": (0.0, 1.0),
                   "opacity": 0.7}
HELP = ("Paint in the annotation layer: <b>1</b> = background, <b>2</b> = foreground "
        "(3, 4, … = more classes); <b>0</b> = unlabeled, ignored by training. "
        "A few strokes on a few slices are enough to start. To fine-tune, paint where "
        "the prediction is wrong (missed parts as 2, false detections as 1) and a "
        "background line just outside some objects.")


def annotations_name(image_name: str) -> str:
    """Name of the annotation (painted Labels) layer of an image layer."""
    return f"{base_name(image_name)} annotations"


def preview_name(image_name: str) -> str:
    """Name of the live-preview layer of an image layer."""
    return f"{base_name(image_name)} live preview"


def is_annotation_layer(layer: Labels, shape: tuple[int, ...] | None = None) -> bool:
    """True for a layer made by "New annotation layer" or with both 1 and 2 painted.

    Only such layers are chosen as annotations by default: a ground-truth mask
    (0/1, where 1 would mean background) is never picked without the user.
    """
    data = layer_array(layer)
    if shape is not None and tuple(data.shape) != tuple(shape):
        return False
    if layer.metadata.get(ANNOTATION_KEY):
        return True
    if not isinstance(data, np.ndarray):  # lazy: too costly to scan
        return False
    return bool((data == 1).any() and (data >= 2).any())


def painted_slices(painted: np.ndarray) -> np.ndarray:
    """Indices of the slices (first axis) with any non-zero label; ``[0]`` or ``[]`` in 2D."""
    painted = np.asarray(painted)
    if painted.ndim < 3:
        return np.flatnonzero([painted.any()])
    if painted.size == 0:
        return np.array([], int)
    return np.flatnonzero(painted.reshape(painted.shape[0], -1).max(axis=1) != 0)


def ended_worse(before: float | None, after: float) -> bool:
    """True when a run's IoU on the painted voxels fell below the starting model's."""
    return before is not None and after < before


def estimate_text(minutes: float, steps: int) -> str:
    """What the run will take, shown before it starts."""
    if minutes > 0:
        return (f"at most {minutes:g} min: stops earlier when the loss on the painted "
                f"voxels stops improving, or after {NEAR_STEPS} steps when the model "
                "already fits your data")
    return f"{steps} steps, no time limit"


def recipe_text(record: dict) -> str:
    """``"recipe near: IoU on painted voxels before training 0.81"`` (and the start chosen)
    from a fine-tune's ``recipe`` log record or ``meta["training"]``."""
    recipe, before = record.get("recipe"), record.get("painted_iou_before")
    if not recipe:
        return ""
    what = {"near": "gentle fine-tuning", "far": "BatchNorm re-estimated, larger steps"}
    text = f"recipe {recipe} ({what.get(recipe, recipe)})"
    if record.get("start_scores"):  # the scores say it (and the IoU before)
        text = f"{start_text(record['start'], record['start_scores'])}; {text}"
    elif before is not None:
        text += f"; IoU on painted voxels before training {before:.3f}"
    return f"{text}; {record['adaptation']}" if record.get("adaptation") else text


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


class TrainWidget(ScrollingDock, ModelChoices, JobOwner, Container):
    """Dock widget: fine-tune a model on painted strokes, or train one from scratch.

    The checkpoint goes to the chosen folder (default ``~/.napari-emseg/models``)
    and is registered with the viewer so Predict and Save offer it; it becomes
    the current model unless it scores worse on the painted voxels than the
    model it started from.
    """

    model_field = "start_from"
    keep_previous_model = True

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True, scrollable=True)
        jobs.warm_up()
        self._viewer = napari_viewer
        self._registry = model_registry(napari_viewer)
        self.job: Job | None = None
        self._strokes: StrokeFeed | None = None  # strokes painted while a run goes on
        self._strokes_layer: Labels | None = None
        self.predict_job: Job | None = None
        self.last_checkpoint: Path | None = None
        self.result = None
        self.previous_model: str | None = None  # current before the last run
        self.rejected: Path | None = None  # last run ended worse: not made current
        self._confirmed: tuple | None = None  # one-class painting the user accepted
        self._preview_z: int | None = None  # read by the worker thread

        self._build_fields(napari_viewer)
        self._build_buttons()
        self._connect()
        self._follow_registry(napari_viewer)
        self._default_start_model()
        self._layers_changed()
        self.fit_narrow()

    def _build_fields(self, viewer) -> None:
        self.reason = layers.reason_label()
        self.image = layer_picker(viewer, Image, "image", "The EM stack to learn from")
        self.annotations = layer_picker(
            viewer, Labels, "annotations",
            "Painted Labels layer (same shape as the image): 1 = background, 2 = "
            "foreground, 0 = unlabeled. Chosen by default only when made by 'New annotation "
            "layer' or when both 1 and 2 are painted", nullable=True)
        self.new_layer_button = PushButton(
            text="New annotation layer",
            tooltip="Add an empty '<image> annotations' Labels layer and start painting (2)")
        self.help = Label(value=HELP)
        self.help.native.setWordWrap(True)
        self.start_from = ComboBox(label="start from", choices=self._model_choices,
                                   tooltip="Fine-tune a model (default: the current one), or "
                                           "train a new U-Net from scratch")
        self.new_depth = SpinBox(label="new model depth", value=4, min=1, max=6,
                                 tooltip="Down-sampling levels of the new U-Net")
        self.new_width = SpinBox(label="new model width", value=16, min=2, max=128,
                                 tooltip="Channels of the first level of the new U-Net")
        self.minutes = FloatSpinBox(
            label="time budget (min)", value=FINE_TUNE_MINUTES, min=0.0, max=10_000.0,
            step=0.5, tooltip="Stop after this many minutes, or earlier when the loss on the "
                              "painted voxels stops improving; 0 = run 'steps' steps instead")
        self.steps = SpinBox(label="steps", value=200, min=1, max=1_000_000, step=50,
                             tooltip="Training steps (used only when the time budget is 0)")
        self.estimate = Label(value="")
        self.estimate.native.setWordWrap(True)
        self.lr = FloatSpinBox(
            label="learning rate (0 = auto)", value=0.0, min=0.0, max=1.0, step=1e-4,
            tooltip=f"auto: chosen from the model's IoU on the painted voxels — {SCRATCH_LR:g} "
                    f"for a new model; {FINE_TUNE_LR:g} (2D) / {FINE_TUNE_LR_3D:g} (3D) when "
                    f"it scores ≥ {NEAR_IOU:g}; {FAR_LR:g} (2D) after re-estimating its "
                    "BatchNorm statistics when it scores less")
        self.lr.native.setDecimals(6)
        self.batch = SpinBox(label="batch (0 = auto)", value=0, min=0, max=256,
                             tooltip="Patches per step; auto: from the recipe (4 or 8 for "
                                     "2D, 2 for 3D)")
        self.val_every = SpinBox(label="validate every (0 = auto)", value=0, min=0,
                                 max=1_000_000,
                                 tooltip="Steps between IoU checks on the painted voxels "
                                         "(one plot point each)")
        self.patch = LineEdit(label="patch", value="auto",
                              tooltip="'auto' (from the recipe / the model), '128', or "
                                      "'32,128,128' for 3D")
        self.device = ComboBox(label="device", choices=list(DEVICES), value="auto",
                               tooltip="auto: CUDA, then Apple MPS, else CPU")
        folder = Path(registry.DEFAULT_MODEL_DIR).expanduser()
        self.folder = FileEdit(label="save to folder", mode="d", value=folder,
                               tooltip="Where the new checkpoint (.pt), its log (.csv) and "
                                       "loss chart (.png) are written")
        self.live_preview = CheckBox(
            text="live preview of the shown slice", value=True,
            tooltip=f"Every {PREVIEW_EVERY:g} s while training, predict the slice you are "
                    "looking at with the current model ('<image> live preview' layer)")

    def _build_buttons(self) -> None:
        self.train_button = PushButton(text="Train", tooltip="Start training")
        self.cancel_button = PushButton(text="Cancel", enabled=False,
                                        tooltip="Stop; the best model so far is kept")
        self.predict_again_button = PushButton(
            text="Predict again", enabled=False,
            tooltip="Predict the image with the new model; the previous probabilities stay "
                    "as '<image> probabilities (previous)' for comparison")
        self.use_new_button = PushButton(
            text="Use new model", enabled=False,
            tooltip="Make the last trained model the current one although it scored worse "
                    "on the painted voxels than the model it started from")
        self.revert_button = PushButton(
            text="Revert to previous model", enabled=False,
            tooltip="Make the model that was current before the last run current again")
        self.progress = ProgressPanel()
        self.recipe = Label(value="")
        self.recipe.native.setWordWrap(True)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        buttons = Container(widgets=[self.train_button, self.cancel_button,
                                     self.predict_again_button],
                            layout="horizontal", labels=False)
        choice = Container(widgets=[self.use_new_button, self.revert_button],
                           layout="horizontal", labels=False)
        self.extend([self.reason, self.image, self.annotations, self.new_layer_button,
                     self.help, self.start_from, self.new_depth, self.new_width, self.minutes,
                     self.steps, self.estimate, self.lr, self.batch, self.val_every,
                     self.patch, self.device, self.folder, self.live_preview, buttons,
                     self.progress, self.recipe, self.status, choice])
        self.plot = LossPlot()
        self.content.layout().addWidget(self.plot)

    def _connect(self) -> None:
        self.new_layer_button.clicked.connect(self.new_annotation_layer)
        self.train_button.clicked.connect(self.train)
        self.cancel_button.clicked.connect(self.cancel)
        self.predict_again_button.clicked.connect(self.predict_again)
        self.use_new_button.clicked.connect(self.use_new_model)
        self.revert_button.clicked.connect(self.revert)
        for widget in (self.image, self.annotations, self.minutes, self.steps):
            widget.changed.connect(self._update_state)
        self.image.changed.connect(self._track_z)
        self.start_from.changed.connect(self._update_state)
        self._viewer.dims.events.current_step.connect(self._track_z)

    # -- choices and state
    def _model_choices(self, _widget=None) -> list[tuple[str, str]]:
        return [("new model (from scratch)", SCRATCH), *self._registry.choices()]

    def _default_start_model(self) -> None:
        """Start from the current model, else the first bundled one (not from scratch)."""
        if self._registry.current or self.start_from.value != SCRATCH:
            return
        bundled = [key for _label, key in self._registry.choices()
                   if "/" not in key and "\\" not in key]
        if bundled:
            self.start_from.value = bundled[0]

    def _layers_changed(self) -> None:
        self.image.reset_choices()
        self.annotations.reset_choices()
        if self.annotations.value is None:
            default = self._default_annotations()
            if default is not None:
                self.annotations.value = default
        self._track_z()
        self._update_state()

    def _default_annotations(self) -> Labels | None:
        """``"<image> annotations"`` or another real annotation layer; never a mask."""
        image = self.image.value
        shape = tuple(layer_array(image).shape) if image is not None else None
        candidates = [layer for layer in self._viewer.layers if isinstance(layer, Labels)]
        if image is not None:
            name = annotations_name(image.name)
            candidates.sort(key=lambda layer: layer.name != name)  # that name first
        for layer in candidates:
            if is_annotation_layer(layer, shape):
                return layer
        return None

    def _track_z(self, _event=None) -> None:
        """Remember the slice shown (GUI thread); the live preview predicts it."""
        image = self.image.value
        try:
            if image is None or layer_array(image).ndim != 3:
                self._preview_z = None
            else:
                self._preview_z = current_index(self._viewer, image)
        except RuntimeError:  # widget deleted
            pass

    def _problem(self) -> str | None:
        image, painted = self.image.value, self.annotations.value
        if image is None:
            return "no image layer: open an EM stack first"
        if image.rgb:
            return layers.rgb_problem(image)
        if layer_array(image).ndim not in (2, 3):
            return f"image layer {image.name!r} must be 2D (Y, X) or 3D (Z, Y, X) grey values"
        if painted is None:
            return ("no annotation layer: click 'New annotation layer' and paint strokes "
                    "(2 = foreground, 1 = background)")
        if tuple(layer_array(painted).shape) != tuple(layer_array(image).shape):
            return (f"annotation layer {painted.name!r} has shape "
                    f"{tuple(layer_array(painted).shape)} but image {image.name!r} has "
                    f"{tuple(layer_array(image).shape)}")
        return None

    def _update_state(self, _value=None) -> None:
        try:
            scratch = self.start_from.value == SCRATCH
            self.new_depth.visible = self.new_width.visible = scratch
            self.steps.enabled = not self.minutes.value
            self.estimate.value = estimate_text(float(self.minutes.value),
                                                int(self.steps.value))
            self.new_layer_button.enabled = self.image.value is not None
            problem = self._problem()
            self.reason.value = problem or ""
            self.reason.visible = bool(problem)
            busy = self._busy()
            self.train_button.enabled = problem is None and not busy
            self.predict_again_button.enabled = (
                self.last_checkpoint is not None and self.image.value is not None
                and not busy)
            self.use_new_button.enabled = self.rejected is not None and not busy
            self.revert_button.enabled = (
                self.rejected is None and self.last_checkpoint is not None and not busy
                and bool(self.previous_model)
                and self._registry.current == str(self.last_checkpoint.resolve()))
        except RuntimeError:  # widget deleted
            pass

    # -- actions
    def new_annotation_layer(self, _value=None) -> Labels | None:
        """Add an empty Labels layer shaped like the image ("<image> annotations")."""
        image = self.image.value
        if image is None:
            jobs.error("Train: no image layer to annotate; open an EM stack first")
            return None
        shape = tuple(layer_array(image).shape)
        name = annotations_name(image.name)
        existing = layers.find_layer(self._viewer, name, Labels)
        if existing is not None and tuple(existing.data.shape) == shape:
            layer = existing
        else:
            layer = self._viewer.add_labels(np.zeros(shape, np.uint8), name=name,
                                            **layers.layer_geometry(image, len(shape)))
        layer.metadata[ANNOTATION_KEY] = True
        layer.selected_label = 2
        layer.brush_size = 10
        layer.mode = "paint"
        self._viewer.layers.selection.active = layer
        self.annotations.reset_choices()
        self.annotations.value = layer
        jobs.info("Paint with 2 = foreground, 1 = background; 0 stays unlabeled")
        return layer

    def config_fields(self) -> dict:
        """TrainConfig keywords from the widget ("auto" fields as None: the recipe decides)."""
        minutes = float(self.minutes.value) or None
        steps = FINE_TUNE_MAX_STEPS if minutes else int(self.steps.value)
        val_every = int(self.val_every.value) or (50 if minutes else max(1, min(50, steps // 10)))
        return {
            "steps": steps,
            "minutes": minutes,
            "early_stop": FINE_TUNE_EARLY_STOP if minutes else 0,
            "lr": float(self.lr.value) or None,
            "batch_size": int(self.batch.value) or None,
            "val_every": val_every,
            "warmup": 10 if minutes else min(10, max(0, steps // 5)),
            "preview_every": PREVIEW_EVERY,
            "device": None if self.device.value == "auto" else self.device.value,
        }

    def _painted(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(labels, strokes)``: a copy of the painted labels and a view of the painted
        slices, or None (and an error) when unusable.

        One pass over the layer finds the painted slices; the other checks look
        at those only (the GUI thread waits for them).
        """
        layer = self.annotations.value
        painted = np.asarray(layer_array(layer))
        not_labels = (f"Train: annotation layer {layer.name!r} must hold non-negative "
                      "integer labels")
        if not np.issubdtype(painted.dtype, np.integer):
            jobs.error(not_labels)
            return None
        zs = painted_slices(painted)
        if zs.size == 0:
            jobs.error(f"Train: annotation layer {layer.name!r} is empty: paint "
                          "background (1) and foreground (2) strokes first")
            return None
        strokes = painted[zs] if painted.ndim >= 3 else painted
        if np.issubdtype(painted.dtype, np.signedinteger) and strokes.min() < 0:
            jobs.error(not_labels)
            return None
        return painted.copy(), strokes

    def _confirm_one_class(self, strokes: np.ndarray) -> bool:
        """Warn once about one-class painting (``strokes``: the painted slices); True when
        training may go ahead."""
        problem = one_class_warning(strokes)
        if problem is None:
            return True
        key = (id(self.annotations.value), bool((strokes == 1).any()),
               bool((strokes >= 2).any()))
        if self._confirmed == key:
            return True
        self._confirmed = key
        jobs.warning(f"Train: {problem}. Click Train again to train anyway.")
        self.status.value = f"warning: {problem}. Click Train again to train anyway."
        return False

    def _checkpoint_path(self, image_name: str) -> Path:
        folder = Path(str(self.folder.value)).expanduser()
        stem = f"{_slug(base_name(image_name))}-{time.strftime('%Y%m%d-%H%M%S')}"
        checkpoint, n = folder / f"{stem}.pt", 1
        while checkpoint.exists() or checkpoint == self.last_checkpoint:  # same second
            n += 1
            checkpoint = folder / f"{stem}-{n}.pt"
        return checkpoint

    def train(self, _value=None) -> Job | None:
        """Start fine-tuning / training with the current settings (returns the job)."""
        if self._busy():
            jobs.info("Train: training is already running")
            return None
        problem = self._problem()
        if problem:
            jobs.error(f"Train: {problem}")
            return None
        checked = self._painted()
        if checked is None or not self._confirm_one_class(checked[1]):
            return None
        painted = checked[0]
        try:
            patch = parse_patch(self.patch.value)
        except ValueError as exc:
            jobs.error(f"Train: {exc}")
            return None
        image_layer = self.image.value
        source = self.start_from.value
        self.previous_model = self._registry.current or (None if source == SCRATCH else source)
        self._track_z()
        self._prepare_preview(image_layer)
        work = self._work(layer_array(image_layer), painted, source, patch,
                          self._checkpoint_path(image_layer.name))
        self.plot.clear()
        self.recipe.value = ""
        self.progress.budget = (float(self.minutes.value) * 60) or None
        self.train_button.enabled = self.predict_again_button.enabled = False
        self.use_new_button.enabled = self.revert_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = "training… (measuring the model on the painted voxels)"
        self.job = Job(work, description=f"Train on {image_layer.name!r}",
                       on_returned=self._trained, on_log=self._logged,
                       on_finished=self._finished,
                       preload=() if work.in_child else ("torch",),
                       progress_bar=self.progress)
        return self.job

    def voxel_size(self) -> tuple[float, ...] | None:
        """The image layer's voxel size in nm, as the Predict dock has it (None: unknown)."""
        return image_voxel_size(self.image.value)

    def _work(self, image, painted: np.ndarray, source: str, patch, checkpoint: Path):
        """The job's function: :func:`~napari_emseg.workflows.train_from_strokes` in the
        shared child process (in this thread when jobs run synchronously, in tests)."""
        kwargs = {"source": source, "checkpoint": str(checkpoint),
                  "config": self.config_fields(), "patch": patch,
                  "model_label": registry.model_label(source),
                  "depth": int(self.new_depth.value), "width": int(self.new_width.value),
                  "voxel_size": self.voxel_size(), "preview": bool(self.live_preview.value)}
        widget = self
        in_child = child_process_wanted(image.nbytes)
        self._watch_strokes(painted)
        strokes = self._strokes.changes

        def focus():
            return widget._preview_z

        def work(progress, cancel, log):
            img = np.asarray(image)  # a lazy layer is read here, in the worker thread
            if not in_child:
                return train_from_strokes(img, painted, **kwargs, progress=progress,
                                          cancel=cancel, log=log, focus=focus,
                                          strokes=strokes)
            return shared_child().run("napari_emseg.workflows:train_from_strokes",
                                      {"image": img, "painted": painted, **kwargs},
                                      progress=progress, cancel=cancel, log=log, focus=focus,
                                      strokes=strokes)

        work.in_child = in_child  # the job preloads torch only when it trains here
        return work

    def _watch_strokes(self, painted: np.ndarray) -> None:
        """Feed strokes painted on the annotation layer during this run to the training."""
        self._unwatch_strokes()
        layer = self.annotations.value
        self._strokes = StrokeFeed(lambda: layer_array(layer), painted)
        self._strokes_layer = layer
        layer.events.paint.connect(self._strokes.touch)

    def _unwatch_strokes(self) -> None:
        layer, feed = self._strokes_layer, self._strokes
        if layer is not None and feed is not None:
            try:
                layer.events.paint.disconnect(feed.touch)
            except (RuntimeError, ValueError):  # already gone with the layer
                pass
        self._strokes_layer = None

    def _logged(self, record: dict) -> None:
        """A record from the worker: live preview, recipe, new strokes or a validation point."""
        if "preview" in record:
            self._show_preview(record)
            return
        if "strokes" in record:
            slices = ", ".join(str(z) for z in record["slices"])
            self.status.value = (f"training… now with the strokes painted on slice "
                                 f"{slices} ({record['strokes']} painted voxels in all)")
            if record.get("dropped"):
                jobs.warning(f"Train: {record['dropped']} voxels painted with a label above "
                             f"{record['classes']} are ignored: the model knows labels "
                             f"1..{record['classes']} (1 = background)")
            return
        if "recipe" in record:
            self.recipe.value = recipe_text(record)
            if start_swapped(record.get("start", ""), record.get("start_scores") or {}):
                jobs.info(f"Train: {start_text(record['start'], record['start_scores'])}")
        if "step" in record:
            self.plot.add(record)
            self.status.value = (f"training… step {record['step']}: IoU on painted voxels "
                                 f"{float(record.get('val_iou', np.nan)):.3f}")

    def _show_preview(self, record: dict) -> None:
        """Show the preview of one slice in "<image> live preview" (GUI thread)."""
        image = self.image.value
        if image is None:
            return
        prob = np.asarray(record["preview"], np.float32)
        if prob.ndim == layer_array(image).ndim:  # (C, Y, X) or (C, ...): any foreground
            prob = 1.0 - prob[0]
        z = record.get("z")
        self._set_preview(image, prob, z)
        where = f"slice {z}" if z is not None else "the image"
        self.status.value = (f"training… live preview of {where} at "
                             f"{jobs.clock(float(record.get('seconds', 0.0)))}")

    def _set_preview(self, image: Image, prob: np.ndarray, z: int | None) -> None:
        """Put ``prob`` (Y, X) of slice ``z`` in "<image> live preview", right above the
        image (under the strokes), leaving the selected layer selected."""
        scale = np.asarray(image.scale, float)
        translate = np.asarray(image.translate, float).copy()
        if z is not None:
            prob = prob[None]
            translate[0] += z * scale[0]
        layers.set_layer(self._viewer, preview_name(image.name), prob, "image",
                         scale=list(scale), translate=list(translate), above=image,
                         keep_selection=True, **PREVIEW_DISPLAY)

    def _prepare_preview(self, image: Image) -> None:
        """Add the (empty) preview layer now, at the click, if it is missing: napari
        needs 100-400 ms of the GUI thread to add a layer, which the first preview
        would otherwise cost while training competes for the CPU."""
        if not self.live_preview.value or layers.find_layer(self._viewer,
                                                              preview_name(image.name)):
            return
        shape = layer_array(image).shape[-2:]
        self._set_preview(image, np.zeros(shape, np.float32), self._preview_z)

    def _drop_preview(self) -> None:
        """Remove the live preview: the new prediction of the whole image replaces it."""
        image = self.image.value
        preview = image is not None and layers.find_layer(self._viewer,
                                                          preview_name(image.name))
        if preview:
            self._viewer.layers.remove(preview)

    def _trained(self, result) -> None:
        self.result = result
        if result.cancelled and result.checkpoint is None:
            self.status.value = "cancelled before the first check: no model was saved"
            return
        if result.checkpoint is None or not Path(result.checkpoint).is_file():
            jobs.error("Train: no checkpoint was written")
            return
        self.last_checkpoint = Path(result.checkpoint)
        training = result.model_meta().get("training", {})
        before = training.get("painted_iou_before")
        self.recipe.value = recipe_text(training)
        worse = ended_worse(before, result.best_iou)
        self.rejected = self.last_checkpoint if worse else None
        self._registry.add(self.last_checkpoint, make_current=not worse)
        text = _result_text(result, before)
        self.status.value = ("stopped early: " if result.cancelled else "") + text
        if worse:
            jobs.warning(
                f"Train: the new model is worse on the painted voxels (IoU {before:.3f} → "
                f"{result.best_iou:.3f}); saved to {self.last_checkpoint} but NOT used. "
                f"The current model stays {registry.model_label(self.previous_model)}; click "
                "'Use new model' to use it anyway")
            self.status.value += " — worse than before: not used (see 'Use new model')"
        elif result.cancelled:
            jobs.info(f"Training stopped; best model so far saved and now current: "
                         f"{self.last_checkpoint}")
        else:
            jobs.info(f"Training done: {text}. It is now the current model (Predict "
                         "uses it; 'Revert to previous model' undoes this)")

    def use_new_model(self, _value=None) -> None:
        """Make the last (rejected) run's model current anyway."""
        if self.rejected is None:
            return
        self._registry.set_current(str(self.rejected.resolve()))
        self.status.value = f"using {self.rejected.name} (chosen although it scored worse)"
        self.rejected = None
        self._update_state()

    def revert(self, _value=None) -> None:
        """Make the model that was current before the last run current again."""
        if not self.previous_model:
            return
        self._registry.set_current(self.previous_model)
        self.status.value = f"reverted to {registry.model_label(self.previous_model)}"
        jobs.info(f"Train: {self.status.value}")
        self._update_state()

    def cancel(self, _value=None) -> None:
        """Stop training (the best model so far is kept) or the running prediction."""
        for job in (self.job, self.predict_job):
            if job is not None and not job.done:
                job.cancel()
                self.status.value = "stopping…"

    def predict_again(self, _value=None) -> Job | None:
        """Predict the image with the newest checkpoint; the old probabilities stay.

        The previous "<image> probabilities" layer is kept as
        "<image> probabilities (previous)" for comparison.
        """
        if self.last_checkpoint is None:
            jobs.error("Train: nothing trained yet; click Train first")
            return None
        if self.predict_job is not None and not self.predict_job.done:
            jobs.info("Train: a prediction is already running")
            return None
        options = {"device": self.device.value}
        self.progress.budget = None  # a prediction has no time budget
        self.predict_job = predict_job(self._viewer, self.image.value,
                                       str(self.last_checkpoint), options=options,
                                       adaptation={"voxel_size": self.voxel_size(),
                                                   "resample_to_model": True},
                                       on_finished=self._finished, keep_previous=True,
                                       make_current=self.rejected is None,
                                       progress_bar=self.progress, under_strokes=True)
        if self.predict_job is not None and not self.predict_job.done:
            self.cancel_button.enabled = True
            self.predict_again_button.enabled = False
            self.status.value = "predicting with the new model…"
        return self.predict_job

    def _finished(self, job: Job) -> None:
        if job is self.job:
            self._unwatch_strokes()
        try:
            running = any(j is not None and not j.done for j in (self.job, self.predict_job))
            self.cancel_button.enabled = running
            if job.exception is not None and not job.cancelled:
                self.status.value = "failed (see notification)"
            elif job is self.predict_job and not job.cancelled:
                self._drop_preview()
                previous = ("; the previous result is '… probabilities (previous)'"
                            if getattr(job, "info", {}).get("previous") else "")
                self.status.value = f"predicted with {self.last_checkpoint.name}{previous}"
            elif job.cancelled and job is self.predict_job:
                self.status.value = "prediction cancelled"
            self._update_state()
        except RuntimeError:
            pass


def _result_text(result, before: float | None) -> str:
    """``"IoU on painted voxels 0.812 (before 0.640) after 120 steps (95 s) → path"``."""
    text = f"IoU on painted voxels {result.best_iou:.3f}"
    if before is not None:
        text += f" (before training {before:.3f})"
    text += f" after {result.steps} steps ({result.seconds:.0f} s of training)"
    added = result.model_meta().get("training", {}).get("painted_while_training")
    if added:
        text += f", with {added} voxels painted while it ran"
    note = threshold_note(result.model_meta())  # chosen after fine-tuning
    if note:
        text += f", {note}"
    return f"{text} → {result.checkpoint}"
