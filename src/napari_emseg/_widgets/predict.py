"""Predict dock widget: image layer + model → "<image> probabilities" layer.

A whole in-memory volume is predicted through :func:`napari_emseg.adapt.predict_adapted`:
resampled to the model's voxel size when the layer's differs ("match the model's
voxel size") and, on request, with BatchNorm statistics re-estimated on the
volume ("adapt to this volume", AdaBN).
"""

from __future__ import annotations

import os
import time
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

from .._shapes import parse_shape
from ..child import shared_child
from ..workflows import load_for_image, predict_image
from . import jobs, layers
from .dock import ScrollingDock
from .jobs import CancellableJobOwner, Job, ProgressPanel, child_process_wanted
from .layers import base_name, layer_array, layer_picker
from .registry import ModelChoices, model_label, model_registry

if TYPE_CHECKING:
    import napari

PROB_DISPLAY = {"colormap": "magma", "blending": "additive", "contrast_limits": (0.0, 1.0)}
#: Where blockwise predictions of layers without a local source file are written.
DEFAULT_PREDICTION_DIR = "~/.napari-emseg/predictions"
#: Default core block (z, y, x) of a blockwise prediction.
DEFAULT_BLOCK = (64, 512, 512)
#: The lazily shown probabilities are refreshed at most this often (seconds).
REFRESH_INTERVAL = 0.5
DEVICES = ("auto", "cpu", "cuda", "mps")
EXTENTS = (("whole volume (3D)", "volume"), ("current slice (2D)", "slice"),
           ("whole volume, along z, y and x (isotropic)", "planes"))


def parse_voxel_size(text: str) -> tuple[float, ...] | None:
    """``""`` → None (unknown); ``"5"`` → (5, 5, 5); ``"40, 5, 5"`` → (40, 5, 5) (nm)."""
    text = text.strip().lower()
    if text in ("", "auto", "none", "unknown"):
        return None
    try:
        values = tuple(float(v) for v in text.replace("x", ",").replace(" ", ",").split(",")
                       if v)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) not in (2, 3) or not all(0 < v < float("inf") for v in values):
        raise ValueError("voxel size must be empty (unknown) or 1 to 3 numbers > 0 in nm, "
                         f"e.g. '5' or '40,5,5'; got {text!r}")
    return values


#: Image layer metadata key: the voxel size typed into the Predict dock (text; "" = unknown).
TYPED_VOXEL = "emseg_voxel_size"


def image_voxel_size(layer: Image | None) -> tuple[float, ...] | None:
    """An image layer's voxel size in nm, the one every dock uses.

    In order: typed into the Predict dock (kept in the layer's metadata), the
    layer's scale, the metadata of the file it was opened from (napari's own
    TIFF reader leaves the scale at 1). None when unknown.
    """
    if layer is None:
        return None
    typed = layer.metadata.get(TYPED_VOXEL)
    if typed is not None:
        try:
            return parse_voxel_size(str(typed))
        except ValueError:
            pass
    return _known_voxel_size(layer)


def _known_voxel_size(layer: Image) -> tuple[float, ...] | None:
    """The voxel size from the layer's scale, else from its file's metadata."""
    from .._writer import layer_voxel_size

    ndim = layer_array(layer).ndim
    sizes = layer_voxel_size(layer.scale, getattr(layer, "units", None), ndim)
    return sizes if sizes is not None else _file_voxel_size(layer, ndim)


def _file_voxel_size(layer: Image, ndim: int) -> tuple[float, ...] | None:
    """The voxel size in the metadata of the file the layer was opened from."""
    path = layers.source_path(layer)
    if path is None:
        return None
    from ..io import read_voxel_size

    return read_voxel_size(path, ndim=ndim)


def voxel_text(layer: Image | None) -> str:
    """:func:`image_voxel_size` as text ("" when unknown)."""
    sizes = image_voxel_size(layer)
    return "" if sizes is None else ",".join(f"{v:g}" for v in sizes)


def keep_as_previous(viewer: napari.viewer.Viewer, layer) -> None:
    """Rename ``layer`` to "<name> (previous)", replacing an older such layer."""
    name = f"{layer.name} (previous)"
    old = layers.find_layer(viewer, name)
    if old is not None and old is not layer:
        viewer.layers.remove(old)
    layer.name = name


def _threshold_tag(threshold) -> dict:
    return {} if threshold is None else {layers.THRESHOLD_KEY: float(threshold)}


def probabilities_name(image_name: str) -> str:
    """Name of the probabilities layer of an image layer."""
    return f"{base_name(image_name)} probabilities"


def parse_patch(text: str) -> tuple[int, ...] | None:
    """``"auto"``/``""`` → None; ``"256"`` → (256,); ``"32, 128, 128"`` → (32, 128, 128)."""
    if text.strip().lower() in ("", "auto", "none"):
        return None
    return parse_shape(text, (1, 2, 3), "patch")


def parse_block(text: str) -> tuple[int, int, int]:
    """``"auto"``/``""`` → :data:`DEFAULT_BLOCK`; ``"64"`` → (64, 64, 64); ``"8,256,256"``."""
    if text.strip().lower() in ("", "auto", "none"):
        return DEFAULT_BLOCK
    return parse_shape(text, 3, "block")  # type: ignore[return-value]


def is_lazy(data: Any) -> bool:
    """True for array data that is not in memory (dask, zarr, ...), i.e. not numpy."""
    return not isinstance(data, np.ndarray)


def default_target(layer: Image) -> Path:
    """Where a blockwise prediction of ``layer`` is written by default.

    ``<source stem>_probabilities.zarr`` next to the layer's local source file
    or zarr folder (``_<key>`` added for one array of a multi-array file); else
    ``~/.napari-emseg/predictions/<layer name>.zarr``.
    """
    from .. import io

    source = layers.source_path(layer)
    if source is not None and os.access(source.parent, os.W_OK):
        name = source.name.rstrip("/")
        stem = name
        for suffix in io.VOLUME_SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                stem = name[: -len(suffix)]
                break
        if layer.name.startswith(f"{stem}/"):  # one array of an HDF5 file / zarr group
            stem = f"{stem}_{layers.safe_name(layer.name[len(stem) + 1:])}"
        return source.parent / f"{stem}_probabilities.zarr"
    return Path(DEFAULT_PREDICTION_DIR).expanduser() / f"{layers.safe_name(layer.name)}.zarr"


def _check_image(layer: Image | None) -> str | None:
    """Why ``layer`` cannot be predicted on, or None when it can."""
    if layer is None:
        return "no image layer: open an EM stack or add an Image layer first"
    if layer.rgb:
        return layers.rgb_problem(layer)
    ndim = layer_array(layer).ndim
    if ndim not in (2, 3):
        return (f"image layer {layer.name!r} has {ndim} dimensions; "
                "predict needs a 2D (Y, X) or 3D (Z, Y, X) image")
    return None


def _inputs_ok(layer, model) -> bool:
    """True when ``layer`` is a usable image and a model is chosen; else notify."""
    problem = _check_image(layer)
    if problem:
        jobs.error(f"Predict: {problem}")
        return False
    if model is None or model == "":
        jobs.error("Predict: no model chosen (pick a bundled model or browse to a "
                      "checkpoint file)")
        return False
    return True


def predict_job(
    viewer: napari.viewer.Viewer,
    layer: Image,
    model: Any,
    *,
    z: int | None = None,
    options: dict | None = None,
    on_finished: Callable[[Job], None] | None = None,
    synchronous: bool | None = None,
    target: str | Path | None = None,
    block_shape: tuple[int, int, int] | None = None,
    overwrite: bool = False,
    adaptation: dict | None = None,
    keep_previous: bool = False,
    make_current: bool = True,
    planes: bool = False,
    progress_bar: ProgressPanel | None = None,
    on_note: Callable[[str], None] | None = None,
    under_strokes: bool = False,
) -> Job | None:
    """Predict ``layer`` with ``model`` in a worker; the result updates the viewer.

    A lazy (dask / zarr) 3D layer predicted as a whole volume is predicted
    block by block into a zarr (:func:`predict_blockwise_job`); ``target``,
    ``block_shape`` and ``overwrite`` apply to that case only.

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
    adaptation : dict, optional
        ``voxel_size``, ``adapt`` and ``resample_to_model`` for
        :func:`napari_emseg.adapt.predict_adapted` (whole in-memory volumes only).
    keep_previous : bool
        Keep an existing probabilities layer as "<name> (previous)".
    make_current : bool
        Make ``model`` the viewer's current model once the prediction is shown.
    planes : bool
        Average the predictions of the z, y and x sectionings (in-memory 3D
        images, one-slice 2D models; :func:`napari_emseg.predict.predict_planes`).
    progress_bar : ProgressPanel, optional
        The dock's own progress bar.
    on_note : called on the GUI thread with what the adaptation will do (a
        warning among it), before the prediction runs.
    under_strokes : a new probabilities layer goes right above ``layer`` (under
        the strokes painted on it) and does not take the selection.

    Returns
    -------
    Job or None
        None (and an error notification) when the inputs are unusable. Its
        ``info`` dict holds ``note``: what the adaptation did (may be empty), and
        ``previous``: whether an older result was kept as "(previous)".
    """
    if not _inputs_ok(layer, model):
        return None
    data = layer_array(layer)
    if z is None and data.ndim == 3 and is_lazy(data) and not planes:
        return predict_blockwise_job(viewer, layer, model, target=target,
                                     block_shape=block_shape, overwrite=overwrite,
                                     options=options, on_finished=on_finished,
                                     synchronous=synchronous, progress_bar=progress_bar)
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if opts.get("device") == "auto":
        opts.pop("device")
    known = model_registry(viewer)
    key = model if isinstance(model, (str, Path)) else None
    name = model_label(str(key)) if key else "model"
    layer_name = probabilities_name(layer.name)

    tuned: dict = {"note": ""}  # the model's threshold (for Segment), what adapt did
    in_child = key is not None and child_process_wanted(data.nbytes)

    def work(progress, cancel, log) -> np.ndarray:
        kwargs = {"model": key if key is not None else model, "z": z, "options": opts,
                  "adaptation": adaptation, "planes": planes, "model_label": name,
                  "image_label": f"image layer {layer.name!r}"}
        if in_child:
            image = np.asarray(data)  # a lazy 2D layer is read here, in the worker thread
            out = shared_child().run("napari_emseg.workflows:predict_image",
                                     {"image": image, **kwargs},
                                     progress=progress, cancel=cancel, log=log)
        else:
            out = predict_image(data, **kwargs, progress=progress, cancel=cancel, log=log)
        prob, tuned["threshold"], tuned["note"] = out
        return prob

    def show(prob: np.ndarray) -> None:
        prob = np.asarray(prob, dtype=np.float32)
        tag = _threshold_tag(tuned.get("threshold"))
        existing = layers.find_layer(viewer, layer_name, Image)
        if existing is not None and keep_previous and z is None:
            keep_as_previous(viewer, existing)
            tuned["previous"], existing = True, None
        if existing is not None:  # before its data changes: Segment reads it then
            existing.metadata.update(tag)
        if z is not None and data.ndim == 3:
            extra = prob.shape[:-2]  # class axis of a multi-class model
            full = (*extra, *data.shape)
            if existing is not None and tuple(existing.data.shape) == full and \
                    existing.data.dtype == np.float32 and isinstance(existing.data, np.ndarray):
                existing.data[..., z, :, :] = prob
                existing.refresh()
                return
            volume = np.zeros(full, np.float32)
            volume[..., z, :, :] = prob
            prob = volume
        metadata = {**(existing.metadata if existing is not None else {}), **tag}
        layers.set_layer(viewer, layer_name, prob, "image", source=layer, metadata=metadata,
                         above=layer if under_strokes else None,
                         keep_selection=under_strokes, **PROB_DISPLAY)
        if key is not None and make_current:
            known.set_current(str(key))

    where = f" (slice {z})" if z is not None and data.ndim == 3 else ""
    def noted(record: dict) -> None:
        if on_note is not None and record.get("note"):
            on_note(record["note"])

    job = Job(work, description=f"Predict {layer.name!r} with {name}{where}",
              on_returned=show, on_finished=on_finished, synchronous=synchronous,
              preload=() if in_child else ("torch",), on_log=noted,
              progress_bar=progress_bar)
    job.info = tuned
    return job


def predict_blockwise_job(
    viewer: napari.viewer.Viewer,
    layer: Image,
    model: Any,
    *,
    target: str | Path | None = None,
    block_shape: tuple[int, int, int] | None = None,
    overwrite: bool = False,
    options: dict | None = None,
    on_finished: Callable[[Job], None] | None = None,
    synchronous: bool | None = None,
    progress_bar: ProgressPanel | None = None,
) -> Job | None:
    """Predict a lazy 3D layer block by block into a zarr, shown lazily as it fills.

    The probabilities layer (``dask.array.from_zarr`` of the target) appears as
    soon as the target exists and is refreshed at most every
    :data:`REFRESH_INTERVAL` seconds while blocks finish.  A re-run with the
    same target resumes (finished blocks are skipped) unless ``overwrite``; a
    cancel keeps the finished blocks.

    Parameters
    ----------
    viewer : napari.Viewer
    layer : napari.layers.Image
        3D (Z, Y, X) image whose data is a dask / zarr array.
    model : str or UNet
    target : str or path, optional
        Output ``.zarr`` folder (``.zarr`` is appended when missing); default
        :func:`default_target`.
    block_shape : 3 ints, optional
        Core block (z, y, x); default :data:`DEFAULT_BLOCK`.
    overwrite : bool
        Replace an existing target instead of resuming it.
    options : dict
        ``predict_volume`` keywords (patch, overlap, batch_size, device, amp, tta).

    Returns
    -------
    Job or None
        None (and an error notification) when the inputs are unusable.
    """
    if not _inputs_ok(layer, model):
        return None
    data = layer_array(layer)
    if data.ndim != 3:
        jobs.error(f"Predict: blockwise prediction needs a 3D (Z, Y, X) image; "
                      f"{layer.name!r} has {data.ndim} dimensions")
        return None
    target = default_target(layer) if target in (None, "") else Path(target).expanduser()
    if target.suffix.lower() != ".zarr":
        target = target.with_name(target.name + ".zarr")
    source = layers.source_path(layer)
    if source is not None and source.resolve() == target.resolve():
        jobs.error(f"Predict: the output {target} is the image's own file; "
                      "choose another output path")
        return None
    block = tuple(block_shape or DEFAULT_BLOCK)
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if opts.get("device") == "auto":
        opts.pop("device")
    known = model_registry(viewer)
    key = model if isinstance(model, (str, Path)) else None
    name = model_label(str(key)) if key else "model"
    layer_name = probabilities_name(layer.name)
    state = {"ready": False}  # set in the worker once the target exists
    shown: dict[str, Any] = {"layer": None}  # GUI thread only

    def work(progress, cancel, log) -> str:
        from ..blockwise import predict_blockwise

        net = load_for_image(key if key is not None else model, data.shape, model_label=name,
                             image_label=f"image layer {layer.name!r}")
        state["threshold"] = getattr(net, "meta", {}).get("threshold")
        last = {"t": 0.0}

        def blocks_done(done: int, total: int) -> None:
            progress(done, total)
            now = time.monotonic()
            if not state["ready"]:  # the first report comes once the target exists
                state["ready"] = True
                last["t"] = now
                log({"blockwise": "ready"})
            elif done < total and now - last["t"] >= REFRESH_INTERVAL:
                last["t"] = now
                log({"blockwise": "refresh"})

        predict_blockwise(data, target, net, block_shape=block, overwrite=overwrite,
                          progress=blocks_done, cancel=cancel, **opts)
        return str(target)

    def show() -> None:
        """Add the lazy layer (once), else re-read the blocks written since (GUI thread)."""
        current = shown["layer"]
        if current is not None and current in viewer.layers:
            current.refresh()
            return
        import dask.array as da
        import zarr

        lazy = da.from_zarr(zarr.open_array(str(target), mode="r"))
        existing = layers.find_layer(viewer, layer_name)
        index = None
        if existing is not None:  # replaced: a cached or in-memory layer would not refresh
            index = viewer.layers.index(existing)
            viewer.layers.remove(existing)
        new = layers.set_layer(viewer, layer_name, lazy, "image", source=layer, cache=False,
                                metadata={"emseg_target": str(target),
                                          **_threshold_tag(state.get("threshold"))},
                                **PROB_DISPLAY)
        if index is not None:
            viewer.layers.move(viewer.layers.index(new), index)
        shown["layer"] = new

    def on_log(record: dict) -> None:
        if record.get("blockwise") in ("ready", "refresh"):
            show()

    def returned(_path: str) -> None:
        show()
        if key is not None:
            known.set_current(str(key))

    def finished(job: Job) -> None:
        try:
            if state["ready"] and (job.cancelled or job.exception is not None):
                show()  # the finished blocks, zeros elsewhere
        except Exception as exc:
            jobs.error(f"Predict: could not show {target}: {exc}")
        if on_finished is not None:
            on_finished(job)

    job = Job(work, description=f"Predict {layer.name!r} with {name} → {target.name}",
              on_returned=returned, on_log=on_log, on_finished=finished,
              synchronous=synchronous, preload=("torch", "zarr"), progress_bar=progress_bar)
    job.target = target
    job.info = {"note": ""}
    return job


class PredictWidget(ScrollingDock, ModelChoices, CancellableJobOwner, Container):
    """Dock widget: run a model on an image layer.

    The output is an Image layer ``"<image> probabilities"`` (magma, additive,
    contrast 0–1) that a re-run updates in place. The first bundled model is
    chosen when the viewer has no current model.
    """

    done_status = "done"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True, scrollable=True)
        jobs.warm_up()
        self._viewer = napari_viewer
        self._registry = model_registry(napari_viewer)
        self.job: Job | None = None
        self._build(napari_viewer)
        self._show_advanced(False)

        self.advanced.changed.connect(self._show_advanced)
        self.browse.changed.connect(self._browsed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.image.changed.connect(self._image_changed)
        self.voxel.changed.connect(self._voxel_typed)
        self._follow_registry(napari_viewer)
        self._default_model()
        self._image_changed()
        self.fit_narrow()

    def _build(self, viewer) -> None:
        self.reason = layers.reason_label()
        self.image = layer_picker(viewer, Image, "image",
                                  "EM stack (Z, Y, X) or single slice (Y, X)")
        self.model = ComboBox(label="model", choices=self._model_choices, nullable=True,
                              tooltip="Bundled model, or a checkpoint trained here / browsed to")
        self.browse = FileEdit(label="checkpoint file", mode="r", filter="*.pt",
                               tooltip="Browse… for a napari-emseg checkpoint (.pt)")
        self.extent = ComboBox(label="run on", choices=list(EXTENTS), value="volume",
                               tooltip="Whole volume, or only the slice shown (fast preview: "
                                       "at the model's voxel size, without AdaBN), or the "
                                       "whole volume sectioned along z, y and x and "
                                       "averaged (one-slice 2D models "
                                       "on isotropic volumes such as FIB-SEM: boundaries "
                                       "lying in a section become visible; 3× the time)")
        self.voxel = LineEdit(label="voxel size (nm)", value="",
                              tooltip="The image's voxel size in nm, 'z,y,x' or one value; "
                                      "filled from the layer's scale or its file's metadata; "
                                      "the Train dock uses it too. Empty = unknown (no "
                                      "resampling)")
        self.match_voxel = CheckBox(text="match the model's voxel size", value=True,
                                    tooltip="Resample the image to the voxel size the model "
                                            "was trained at (when its pixels are more than 5 % "
                                            "finer or 1.5x coarser), and the probabilities "
                                            "back")
        self.adapt = CheckBox(text="adapt to this volume", value=False,
                              tooltip="Re-estimate the model's BatchNorm statistics on this "
                                      "volume before predicting (AdaBN, no labels needed); "
                                      "helps on EM that looks different from the model's")
        self.tta = CheckBox(text="test-time augmentation (8× slower)", value=False,
                            tooltip="Average the predictions of the 8 flips / rotations")
        self.device = ComboBox(label="device", choices=list(DEVICES), value="auto",
                               tooltip="auto: CUDA, then Apple MPS, else CPU")
        self.advanced = CheckBox(text="advanced", value=False,
                                 tooltip="Show tiling, batch and blockwise options")
        self.patch = LineEdit(label="patch", value="auto",
                              tooltip="'auto' (the model's), '256' or '32,128,128'")
        self.overlap = FloatSpinBox(label="overlap", value=0.25, min=0.0, max=0.9, step=0.05,
                                    tooltip="Fraction of a tile shared with its neighbours "
                                            "(blended with a Gaussian weight)")
        self.batch = SpinBox(label="batch (0 = auto)", value=0, min=0, max=512,
                             tooltip="Tiles per forward pass; auto fits the device")
        self.amp = CheckBox(text="mixed precision on GPU", value=True,
                            tooltip="bfloat16 on CUDA: faster, same result within 1e-2")
        tip = " (lazy dask / zarr images only: predicted block by block into a zarr)"
        self.output = FileEdit(label="output zarr", mode="w", filter="*.zarr", value="",
                               tooltip="Where the probabilities are written; empty = "
                                       "<image>_probabilities.zarr next to the image" + tip)
        self.block = LineEdit(label="block", value=",".join(map(str, DEFAULT_BLOCK)),
                              tooltip="Block (z, y, x) predicted at a time, e.g. "
                                      "'64,512,512'" + tip)
        self.overwrite = CheckBox(text="overwrite output (else resume)", value=False,
                                  tooltip="Start the output zarr over instead of resuming "
                                          "its unfinished blocks" + tip)
        self.run_button = PushButton(text="Predict", tooltip="Predict with these settings")
        self.cancel_button = PushButton(text="Cancel", enabled=False,
                                        tooltip="Stop; the layers stay as they were")
        self.progress = ProgressPanel()
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                            labels=False)
        self._advanced = [self.patch, self.overlap, self.batch, self.amp, self.output,
                          self.block, self.overwrite]
        self.extend([self.reason, self.image, self.model, self.browse, self.extent, self.voxel,
                     self.match_voxel, self.adapt, self.tta, self.device, self.advanced,
                     *self._advanced, buttons, self.progress, self.status])

    # -- choices and state
    def _default_model(self) -> None:
        """Choose the first bundled model when none is chosen."""
        if self.model.value:
            return
        bundled = [key for _label, key in self._registry.choices()
                   if "/" not in key and "\\" not in key]
        if bundled:
            self.model.value = bundled[0]

    def _layers_changed(self) -> None:
        self.image.reset_choices()
        self._update_state()

    def _image_changed(self, _value=None) -> None:
        """Prefill the voxel size from the new image layer (:func:`image_voxel_size`)."""
        try:
            self.voxel.value = voxel_text(self.image.value)
        except RuntimeError:  # widget deleted
            return
        self._update_state()

    def _voxel_typed(self, text: str = "") -> None:
        """Keep a valid typed voxel size on the layer, where the Train dock finds it."""
        layer = self.image.value
        if layer is None:
            return
        try:
            typed = parse_voxel_size(str(text))
        except ValueError:
            return
        if typed == _known_voxel_size(layer):  # nothing typed over: follow the layer
            layer.metadata.pop(TYPED_VOXEL, None)
        else:
            layer.metadata[TYPED_VOXEL] = str(text)

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
            problem = ("no model chosen: pick one or browse to a checkpoint file"
                       if self.model.choices else
                       "no model: no bundled models found; browse to a checkpoint file")
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

    def adaptation(self) -> dict:
        """``predict_adapted`` keywords: voxel size, adapt, resample to the model's."""
        return {
            "voxel_size": parse_voxel_size(self.voxel.value),
            "adapt": bool(self.adapt.value),
            "resample_to_model": bool(self.match_voxel.value),
        }

    def blockwise_options(self) -> dict:
        """``target``, ``block_shape`` and ``overwrite`` for a lazy (dask / zarr) image."""
        output = str(self.output.value or "").strip()
        return {
            "target": None if output in ("", ".") else output,
            "block_shape": parse_block(self.block.value),
            "overwrite": bool(self.overwrite.value),
        }

    # -- actions
    def run(self, _value=None) -> Job | None:
        """Start prediction with the current settings (returns the job)."""
        if self._busy():
            jobs.info("Predict: a prediction is already running")
            return None
        layer = self.image.value
        try:
            opts = self.predict_options()
            blockwise = self.blockwise_options()
            adaptation = self.adaptation()
        except ValueError as exc:
            jobs.error(f"Predict: {exc}")
            return None
        z = None
        if self.extent.value == "slice" and layer is not None and layer_array(layer).ndim == 3:
            z = layers.current_index(self._viewer, layer)
        planes = self.extent.value == "planes"
        job = predict_job(self._viewer, layer, self.model.value, z=z, options=opts,
                          on_finished=self._finished, adaptation=adaptation,
                          planes=planes, progress_bar=self.progress, on_note=self._noted,
                          **blockwise)
        if job is None:
            return None
        self.job = job
        target = getattr(job, "target", None)
        self.status.value = f"writing {target.name}…" if target is not None else "running…"
        self.run_button.enabled = False
        self.cancel_button.enabled = not job.done
        if job.done:  # synchronous
            self._finished(job)
        return job

    def _noted(self, note: str) -> None:
        """What the adaptation will do, before the prediction runs (GUI thread)."""
        try:
            self.status.value = f"running… {note}"
        except RuntimeError:  # widget deleted
            return
        if note.startswith("warning"):
            jobs.warning(f"Predict: {note}")

    def _finished(self, job: Job) -> None:
        super()._finished(job)
        note = getattr(job, "info", {}).get("note")
        if note and job.exception is None and not job.cancelled:
            try:
                self.status.value = f"done: {note}"
            except RuntimeError:
                pass
