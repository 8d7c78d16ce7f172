"""Dock workflows as engine functions that can run in a child process.

Each takes plain arrays and settings plus the job callbacks (``progress``,
``cancel``, ``log``, ``focus``) and returns something picklable, so a dock can
run it with :class:`~napari_emseg.child.ChildProcess` (or in a thread, in
tests). No Qt, no napari.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: ``source`` value that means "a new 2D U-Net" instead of a checkpoint.
SCRATCH = "__scratch__"


def start_model(source: str, painted: np.ndarray, patch, depth: int, width: int):
    """The model to train: ``source`` loaded, or a new 2D U-Net for ``SCRATCH``.

    Parameters
    ----------
    painted : ndarray, the strokes (0 unlabeled, 1 background, 2.. classes);
        a new model gets one output per painted class.
    patch : one size, one per axis, or None; depth, width : architecture of a
        new model.
    """
    from .models import zoo
    from .train import TrainConfig, new_model, painted_classes

    if source != SCRATCH:
        return zoo.load_model(source)
    size = (patch or (256,))[0]
    return new_model(painted_classes(painted),
                     TrainConfig(dims=2, depth=depth, width=width, patch=(size, size)))


def expand_patch(patch: tuple[int, ...] | None, dims: int) -> tuple[int, ...] | None:
    """One value → (p, p) for 2D or (min(p, 32), p, p) for 3D; else as given."""
    if patch is None:
        return None
    if len(patch) == 1:
        p = patch[0]
        return (p, p) if dims == 2 else (min(p, 32), p, p)
    if len(patch) != dims:
        raise ValueError(f"patch {patch} has {len(patch)} sizes but the model is {dims}D")
    return patch


def train_from_strokes(image: np.ndarray, painted: np.ndarray, *, source: str,
                       checkpoint: str | Path, config: dict, patch=None,
                       model_label: str = "the model", depth: int = 4,
                       width: int = 16, voxel_size: tuple[float, ...] | None = None,
                       preview: bool = True, progress: Callable | None = None,
                       cancel: Callable[[], bool] | None = None,
                       log: Callable[[dict], None] | None = None,
                       focus: Callable[[], Any] | None = None,
                       strokes: Callable[[], dict | None] | None = None,
                       switch_start: bool = True):
    """Fine-tune ``source`` (or train a new model) on painted strokes, with a live preview.

    Parameters
    ----------
    image : ndarray, (Y, X) or (Z, Y, X)
    painted : ndarray, same shape, 0 unlabeled, 1 background, 2.. classes
    source : checkpoint path or bundled name, or :data:`SCRATCH`
    checkpoint : where the trained model is written
    config : :class:`~napari_emseg.train.TrainConfig` fields (patch set here)
    model_label : how errors name ``source``
    voxel_size : the image's voxel size in nm (ZYX), optional
    preview : log ``{"preview": prob, "z": z, "seconds": s}`` at the start and
        every ``config["preview_every"]`` s: the prediction of slice ``focus()``
        (``prob`` (C, Y, X) or (Y, X) for a 2D image)
    strokes : ``() -> {z: (Y, X) labels} or None``: slices painted again while
        training runs (a :class:`StrokeFeed`); training goes on with them
    switch_start : a bundled ``source`` far from the data may be swapped for
        another bundled model of the same task that fits the strokes better
        (:func:`~napari_emseg.train.best_start`)

    Returns
    -------
    TrainResult without the model (``meta`` holds its metadata): it is
    picklable; load ``result.checkpoint`` to use the model.
    """
    from .adapt import ESTIMATE, predict_slice_adapted, reads_neighbours, section_voxel
    from .models import zoo
    from .predict import predict_volume
    from .train import TrainConfig, fine_tune

    img = np.asarray(image)
    painted = np.asarray(painted)
    model = start_model(source, painted, patch, depth, width)
    dims = int(model.config["dims"])
    if dims == 3 and img.ndim == 2:
        raise ValueError(f"{model_label} is a 3D model but the image is 2D (Y, X); start "
                         "from a 2D model or from scratch")
    cfg = TrainConfig(**config, patch=expand_patch(patch, dims))
    device = cfg.device

    sections: dict[str, Any] = {}

    def fitting(net):
        """What decides whether the sections fit a 2.5D ``net``: once per trained voxel size."""
        if not reads_neighbours(net):
            return ESTIMATE  # only 2.5D models ask
        key = str(net.meta.get("voxel_size_nm"))
        if key not in sections:
            sections[key] = section_voxel(net, img, voxel_size)[0]
        return sections[key]

    def show(net, seconds: float) -> None:
        z = focus() if focus else None
        if img.ndim == 2:
            prob = predict_volume(img, net, device=device, cancel=cancel)
        else:  # at the scale the model trains at (fine_tune resamples too)
            prob = predict_slice_adapted(img, net, z or 0, voxel_size=voxel_size,
                                         sections=fitting(net), device=device, cancel=cancel)
        if log:
            log({"preview": prob, "z": z, "seconds": seconds})

    Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
    if preview:  # at once: measuring the model first takes a while
        show(model, 0.0)
    result = fine_tune(model, img, painted, cfg, checkpoint=checkpoint, progress=progress,
                       cancel=cancel, on_log=log, preview=show if preview else None,
                       voxel_size=voxel_size, strokes=strokes,
                       alternatives=zoo.related_models(source) if switch_start else ())
    return dataclasses.replace(result, model=None, meta=result.model_meta())


class StrokeFeed:
    """Slices of a labels array painted since the last look: strokes added while training.

    ``touch()`` (connected to the layer's paint event) says something was
    painted; ``changes()``, polled from a worker thread, then compares the
    array with its last copy, at most every ``every`` seconds, and returns
    the changed slices. Cheap while nothing is painted.

    Parameters
    ----------
    read : ``() -> ndarray``, the labels now ((Z, Y, X) or (Y, X))
    painted : ndarray, the labels the run started with: the job's own copy, which
        nobody changes (copied again at the first look, off the GUI thread)
    """

    def __init__(self, read: Callable[[], np.ndarray], painted: np.ndarray,
                 every: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.read, self.every, self.clock = read, every, clock
        self.start = painted  # copied at the first look, in the caller's (worker) thread
        self.last: np.ndarray | None = None
        self.dirty, self.next = False, 0.0

    def touch(self, *_event) -> None:
        """Something was painted (any arguments are ignored: an event handler)."""
        self.dirty = True

    def changes(self) -> dict[int, np.ndarray] | None:
        """``{z: (Y, X) labels}`` of the slices changed since the last call, or None."""
        if not self.dirty or self.clock() < self.next:
            return None
        self.dirty, self.next = False, self.clock() + self.every
        if self.last is None:
            self.last = np.array(self.start, copy=True)
        now = np.asarray(self.read())
        if now.shape != self.last.shape:
            return None
        now3, last3 = (now, self.last) if now.ndim == 3 else (now[None], self.last[None])
        zs = np.flatnonzero((now3 != last3).reshape(len(now3), -1).any(axis=1))
        out = {int(z): np.array(now3[z], copy=True) for z in zs}
        for z, labels in out.items():
            last3[z] = labels
        return out or None


def load_for_image(model, shape: tuple[int, ...], *, model_label: str = "the model",
                   image_label: str = "the image"):
    """``model`` (name, path or loaded) loaded and checked against an image's shape."""
    from .models import zoo

    net = zoo.load_model(model) if isinstance(model, (str, Path)) else model
    dims = int(net.meta.get("dims", net.config["dims"]))
    if dims == 3 and len(shape) == 2:
        raise ValueError(f"{model_label} is a 3D model but {image_label} is 2D (Y, X); "
                         "choose a 2D model")
    if dims == 3 and shape[0] < 2:
        raise ValueError(f"{model_label} is a 3D model but {image_label} has only "
                         f"{shape[0]} slice")
    return net


def predict_image(image: np.ndarray, *, model, z: int | None = None,
                  options: dict | None = None, adaptation: dict | None = None,
                  planes: bool = False,
                  model_label: str = "the model", image_label: str = "the image",
                  progress: Callable | None = None, cancel: Callable[[], bool] | None = None,
                  log: Callable[[dict], None] | None = None,
                  focus: Callable[[], Any] | None = None):
    """The Predict dock's job: one slice, the whole image, or the image adapted.

    Parameters
    ----------
    image : ndarray, (Y, X) or (Z, Y, X)
    model : bundled name, checkpoint path or loaded model
    z : predict only this slice of a 3D image
    options : :func:`~napari_emseg.predict.predict_volume` keywords
    adaptation : :func:`~napari_emseg.adapt.predict_adapted` keywords (whole images)
    planes : average the z, y and x sectionings of a 3D image
        (:func:`~napari_emseg.predict.predict_planes`; no adaptation, no resampling)
    log : gets ``{"note": what the adaptation will do}`` before an adapted
        prediction starts

    Returns
    -------
    (prob, threshold, note) : probabilities ((Y, X) for a slice, else the image's
        shape, with a leading class axis for multi-class models), the model's
        threshold (or None) and what the adaptation did ("" without one).
    """
    from . import predict as engine

    net = load_for_image(model, image.shape, model_label=model_label,
                         image_label=image_label)
    threshold = getattr(net, "meta", {}).get("threshold")
    opts = dict(options or {})
    if z is not None and image.ndim == 3:  # as the whole volume would be, without AdaBN
        from .adapt import predict_slice_adapted

        given = adaptation or {}
        voxel = given.get("voxel_size") if given.get("resample_to_model", True) else None
        return predict_slice_adapted(image, net, z, voxel_size=voxel, progress=progress,
                                     cancel=cancel, **opts), threshold, ""
    if planes:
        if image.ndim != 3:
            raise ValueError(f"{image_label} is 2D: predicting along z, y and x needs a "
                             "3D (Z, Y, X) volume")
        if adaptation and adaptation.get("adapt"):
            raise ValueError("'adapt to this volume' cannot be combined with predicting "
                             "along z, y and x; untick one of them")
        return engine.predict_planes(np.asarray(image), net, progress=progress,
                                     cancel=cancel, **opts), threshold, \
            "mean of the z, y and x sectionings"
    if adaptation is None:
        return engine.predict_volume(image, net, progress=progress, cancel=cancel,
                                     **opts), threshold, ""
    from .adapt import describe, predict_adapted

    def tell(info: dict) -> None:  # before the run: a warning should not wait for it
        note = describe(info)
        if log is not None and note:
            log({"note": note})

    prob, info = predict_adapted(np.asarray(image), net, **adaptation, progress=progress,
                                 cancel=cancel, on_info=tell, **opts)
    return prob, threshold, describe(info)
