"""Label-free adaptation of a model to a new volume.

* :func:`adapt_batchnorm` re-estimates the BatchNorm statistics on the open
  volume (AdaBN, Li et al. 2016): every weight stays as it is, only the running
  means and variances are replaced by those of the new data. The grey values
  are normalised with the volume's own percentiles, as prediction does.
* :func:`voxel_scale` and :func:`resample` bring a volume to the voxel size the
  model was trained at (and probabilities back), when the image's voxels are
  finer than the model's by more than :data:`FINER_TOLERANCE` or coarser by
  more than :data:`COARSER_LIMIT` times.
* :func:`context_fits` says whether a 2.5D model's neighbouring slices are
  about as far apart in the volume as in its training data; :func:`sections_fit`
  whether a 3D model's sections are about as thick.

No torch at import time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from ._augment import crop_reflect
from ._normalize import DEFAULT_NORMALIZATION, apply_normalization, normalization_range
from .progress import CancelCheck, ProgressCallback, check_cancel, report

#: Voxels finer than the model's by more than this fraction are resampled: objects that
#: look larger than in training lose IoU fast (``mito-2d``, 5 nm, on Lucchi++ at 4.5 nm
#: pixels 0.81, at 4.2 nm 0.74, resampled 0.86; at 5 nm 0.88; docs/adaptation.md).
FINER_TOLERANCE = 0.05
#: Fine-tuning resamples finer voxels only beyond this fraction (the ±25 % rule before
#: 2026-12-07), and the tuned model records the volume's voxel size: the far recipe
#: re-learns the features, and on ISBI 2012 (4 nm, ``mito-2d`` at 5 nm) it did better at
#: the volume's own pixels (paint-while-training loop 0.61 and 0.62 against 0.54, 0.48
#: and 0.38 resampled to 5 nm; docs/adaptation.md).
TRAIN_FINER_TOLERANCE = 0.2
#: Voxels coarser than the model's are resampled only beyond this factor: up to 1.4x
#: coarser scored as well or better unresampled (0.91 against 0.86 resampled, which blurs).
COARSER_LIMIT = 1.5
#: Sections this much thicker than the model's training data make 2.5D context wrong.
CONTEXT_Z_RATIO = 2.0


def _tile_starts(shape: tuple[int, ...], tile: int, n: int, rng) -> list[tuple[int, int, int]]:
    """``n`` random (z, y, x) tile corners spread over the volume."""
    return [(int(rng.integers(shape[0])),
             int(rng.integers(max(1, shape[1] - tile + 1))),
             int(rng.integers(max(1, shape[2] - tile + 1)))) for _ in range(n)]


def _tiles(volume: np.ndarray, model, tile: int, n: int, seed: int) -> list[np.ndarray]:
    """Normalised input tiles for ``model``: (C, T, T) for 2D/2.5D, (1, Tz, T, T) for 3D.

    Grey values are normalised with the whole volume's range (the model's spec).
    """
    spec = model.meta.get("normalization") or DEFAULT_NORMALIZATION
    lo, hi = normalization_range(volume, spec)
    rng = np.random.default_rng(seed)
    size_yx = (min(tile, volume.shape[1]), min(tile, volume.shape[2]))
    div = model.divisor()
    size_yx = tuple(max(d, s // d * d) for s, d in zip(size_yx, div[-2:], strict=True))
    out = []
    for z, y, x in _tile_starts(volume.shape, tile, n, rng):
        if model.config["dims"] == 3:
            tz = max(div[0], min(16, volume.shape[0]) // div[0] * div[0])
            crop = crop_reflect(volume, (z - tz // 2, y, x), (tz, *size_yx))[None]
        else:
            c = (model.config["in_channels"] - 1) // 2
            crop = crop_reflect(volume, (z - c, y, x), (2 * c + 1, *size_yx))
        out.append(apply_normalization(crop, lo, hi))
    return out


def adapt_batchnorm(model, image: np.ndarray, *, tiles: int = 16, tile: int = 256,
                    batch: int = 4, seed: int = 0, device: str | None = None,
                    progress: ProgressCallback | None = None,
                    cancel: CancelCheck | None = None):
    """A copy of ``model`` whose BatchNorm statistics are those of ``image`` (AdaBN).

    Parameters
    ----------
    model : UNet with BatchNorm layers (``.meta`` as from ``load_model``)
    image : ndarray (Z, Y, X) or (Y, X), raw grey values of the new volume
    tiles, tile : how many random tiles (``tile`` px square) to average over
    batch : tiles per forward pass

    Returns
    -------
    UNet
        A new model in eval mode; weights identical to ``model``'s, running
        means and variances re-estimated; ``meta["adapted"]`` says on what.
        A model without BatchNorm is returned unchanged (a copy).
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from .predict import select_device

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"adapt_batchnorm needs a 2D or 3D image, got {image.ndim} dims")
    adapted = copy.deepcopy(model).cpu()
    norms = [m for m in adapted.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return adapted.eval()
    dev = select_device(device)
    adapted.to(dev).eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    crops = _tiles(image, model, tile, tiles, seed)
    with torch.no_grad():
        for k in range(0, len(crops), batch):
            check_cancel(cancel)
            adapted(torch.from_numpy(np.stack(crops[k:k + batch])).to(dev))
            report(progress, min(k + batch, len(crops)), len(crops))
    for m in norms:
        m.momentum = 0.1
    adapted.eval()
    adapted.meta = {**model.meta, "adapted": {"method": "batchnorm statistics (AdaBN)",
                                             "tiles": len(crops), "shape": list(image.shape)}}
    return adapted


def _zyx(voxel: tuple[float, ...]) -> list[float | None]:
    """A voxel size as [z, y, x]; z is None for a 2D size."""
    sizes = [float(v) for v in voxel][-3:]
    return sizes if len(sizes) == 3 else [None, *sizes]


def feature_shift(model, image: np.ndarray, *, tiles: int = 8, tile: int = 256,
                  seed: int = 0, device: str | None = None) -> float | None:
    """How far ``image`` is from the model's training data, without labels.

    The mean over the model's BatchNorm layers and channels of
    ``|mean_new - running_mean| / running_std``, where ``mean_new`` is the mean
    activation on tiles of ``image``. About 0.08 on Lucchi++ slices the
    bundled ``mito-2d`` never saw, 0.1 on FlyEM FIB-SEM and 0.38 on ISBI 2012
    ssTEM (benchmarks/bench_adapt.py records it for each case).

    Parameters
    ----------
    model : UNet with ``.meta``
    image : ndarray (Z, Y, X) or (Y, X), raw grey values

    Returns
    -------
    float, or None for a model without BatchNorm.
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from .predict import select_device

    image = np.asarray(image)
    image = image[None] if image.ndim == 2 else image
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return None
    x = np.stack(_tiles(image, model, tile, tiles, seed))
    shifts: list[float] = []

    def measure(module, inputs, _output):
        a = inputs[0].detach().float()
        mean = a.mean(dim=[0, *range(2, a.ndim)])
        std = (module.running_var + module.eps).sqrt()
        shifts.append(float(((mean - module.running_mean).abs() / std).mean()))

    hooks = [m.register_forward_hook(measure) for m in norms]
    was_training = model.training
    dev = select_device(device)
    try:
        model.eval()
        with torch.no_grad():
            model.to(dev)(torch.from_numpy(x).to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return float(np.mean(shifts))


def voxel_scale(image_voxel: tuple[float, ...] | None,
                model_voxel: tuple[float, ...] | None,
                dims: int = 2, finer_tolerance: float = FINER_TOLERANCE
                ) -> tuple[float, ...] | None:
    """Zoom factors (Z, Y, X) that bring the image to the model's voxel size.

    Parameters
    ----------
    image_voxel, model_voxel : voxel sizes in nm, (Z, Y, X) or (Y, X)
    dims : 2 for a model that works slice by slice (z is never resampled)
    finer_tolerance : see :func:`scale_fits`

    Returns
    -------
    tuple of 3 floats, or None when either size is unknown or every axis fits
    (:func:`scale_fits`).
    """
    if not image_voxel or not model_voxel:
        return None
    img, mod = _zyx(image_voxel), _zyx(model_voxel)
    factors = [1.0 if i is None or m is None or (k == 0 and dims == 2) else i / m
               for k, (i, m) in enumerate(zip(img, mod, strict=True))]
    if all(scale_fits(f, finer_tolerance) for f in factors):
        return None
    return tuple(round(f, 4) for f in factors)


def scale_fits(factor: float, finer_tolerance: float = FINER_TOLERANCE) -> bool:
    """True when an axis whose voxels are ``factor`` times the model's needs no resampling.

    Finer by at most ``finer_tolerance`` (:data:`FINER_TOLERANCE` to predict,
    :data:`TRAIN_FINER_TOLERANCE` to fine-tune), coarser by at most :data:`COARSER_LIMIT`.
    """
    return 1.0 - finer_tolerance <= factor <= COARSER_LIMIT


def resample(volume: np.ndarray, factors: tuple[float, ...] | None = None, *,
             shape: tuple[int, ...] | None = None, order: int = 1) -> np.ndarray:
    """Zoom a (Z, Y, X) volume by ``factors``, or to exactly ``shape``.

    ``order=0`` (nearest) for labels, 1 (linear) for grey values and
    probabilities. The dtype is kept.
    """
    volume = np.asarray(volume)
    if shape is None:
        if factors is None:
            return volume
        shape = tuple(max(1, int(round(s * f))) for s, f in zip(volume.shape, factors,
                                                                  strict=True))
    if tuple(shape) == volume.shape:
        return volume
    zoom = [t / s for t, s in zip(shape, volume.shape, strict=True)]
    out = ndi.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True)
    return out[tuple(slice(0, t) for t in shape)]


def z_step_pixels(volume, pairs: int = 8, max_shift: int = 32, crop: int = 512) -> float | None:
    """How far apart adjacent slices look, in in-plane pixels (about 1 = isotropic).

    The median correlation of adjacent slices is matched with the correlation
    of a slice and itself shifted by ``d`` pixels in y and x: the ``d`` (linearly
    interpolated) where the two are equal. Measured: Lucchi++ (5 nm FIB-SEM)
    1.1, FlyEM (10 nm FIB-SEM) 1.2, ISBI 2012 (4×4×50 nm ssTEM, truly 12.5) 11–12.5.

    Parameters
    ----------
    volume : array-like (Z, Y, X); only ``pairs`` pairs of slices are read
    pairs : slice pairs sampled evenly along z
    max_shift : the largest in-plane shift tried (returned when none matches)
    crop : central crop of each slice, in pixels

    Returns
    -------
    float, or None for fewer than 2 slices, flat slices or noise
    """
    if np.ndim(volume) != 3 or volume.shape[0] < 2:
        return None
    ys, xs = (slice(max(0, (n - crop) // 2), max(0, (n - crop) // 2) + crop)
              for n in volume.shape[1:])
    zs = np.unique(np.linspace(0, volume.shape[0] - 2, pairs).astype(int))
    slices, across = [], []
    for z in zs:
        a = np.asarray(volume[z, ys, xs], np.float32)
        b = np.asarray(volume[z + 1, ys, xs], np.float32)
        if a.std() > 0 and b.std() > 0:
            slices.append(a)
            across.append(_correlation(a, b))
    if not across:
        return None
    target, previous = float(np.median(across)), 1.0
    last = min(max_shift, *(n - 1 for n in slices[0].shape))
    for d in range(1, last + 1):
        within = float(np.median([(_correlation(a[:, :-d], a[:, d:])
                                   + _correlation(a[:-d], a[d:])) / 2 for a in slices]))
        if d == 1 and within < 0.1:  # no structure even between neighbouring pixels (noise)
            return None
        if within <= target:
            return round(d - 1 + (previous - target) / max(previous - within, 1e-6), 2)
        previous = within
    return float(last)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).mean() / (a.std() * b.std() + 1e-12))


ESTIMATE = "estimate"  # predict_slice_adapted(sections=...): work it out from the image


def section_voxel(model, image, voxel_size: tuple[float, ...] | None
                  ) -> tuple[tuple[float, ...] | None, float | None]:
    """The voxel size the section checks use, and the z step estimated for it.

    ``voxel_size`` when known. Unknown, for a model that reads along z (2.5D
    context or 3D) on a stack: the model's in-plane voxel size with sections
    :func:`z_step_pixels` pixels thick, so that serial sections without
    metadata are not fed as if they were FIB-SEM slices. It never resamples.
    """
    trained = model.meta.get("voxel_size_nm")
    reads_z = model.config["dims"] == 3 or int(model.meta.get("context", 0) or 0) > 0
    if voxel_size or not reads_z or not trained or len(trained) < 3 or np.ndim(image) != 3:
        return voxel_size, None
    step = z_step_pixels(image)
    if step is None:
        return None, None
    pixel = float(trained[-1])
    return (step * pixel, float(trained[-2]), pixel), step


def context_fits(model, image_voxel: tuple[float, ...] | None) -> bool:
    """False when a 2.5D model would see neighbours much farther apart than in training.

    Unknown voxel sizes count as fitting.
    """
    context = int(model.meta.get("context", 0) or 0)
    trained = model.meta.get("voxel_size_nm")
    if not context or not image_voxel or not trained or len(image_voxel) < 3 \
            or len(trained) < 3:
        return True
    return float(image_voxel[0]) <= CONTEXT_Z_RATIO * float(trained[0])


def sections_fit(model, image_voxel: tuple[float, ...] | None) -> bool:
    """False when a 3D model would get sections much thicker than it was trained on.

    Resampling 50 nm sections to a 5 nm model's z spacing invents nine of every
    ten slices, which a 3D model never saw (``mito-3d`` fine-tuned for 5 min on
    strokes of ISBI 2012 ssTEM: IoU 0.05). 2D models and unknown voxel sizes
    count as fitting.
    """
    trained = model.meta.get("voxel_size_nm")
    if model.config["dims"] != 3 or not image_voxel or not trained or len(image_voxel) < 3 \
            or len(trained) < 3:
        return True
    return float(image_voxel[0]) <= CONTEXT_Z_RATIO * float(trained[0])


def to_model_scale(model, image: np.ndarray, labels: np.ndarray | None,
                   voxel_size: tuple[float, ...] | None, *, resample_image: bool = True,
                   finer_tolerance: float = FINER_TOLERANCE):
    """``(model, image, labels, info)`` as the model saw its training data.

    A 2.5D model whose sections would be much thicker than in training becomes
    a one-slice model (:func:`context_fits`); an image whose voxel size does not
    fit the model's (:func:`scale_fits`) is resampled to it
    (labels by nearest neighbour) when ``resample_image``. Nothing changes
    when ``voxel_size`` is None, except that the section checks then use the
    z step estimated from the image (:func:`section_voxel`).

    Parameters
    ----------
    model : UNet with ``.meta``
    image : ndarray (Z, Y, X) or (Y, X)
    labels : integer ndarray of the same shape, or None
    voxel_size : the image's voxel size in nm, or None

    Returns
    -------
    model, image, labels, and ``info``: ``resampled`` (zoom factors ZYX or
    None), ``context_collapsed`` and ``sections_fit`` (bool), ``z_step_px`` (the
    estimated section thickness in pixels when the voxel size is unknown, else None)
    """
    from .models.unet import collapse_context

    sections, step = section_voxel(model, image, voxel_size)
    collapsed = model.config["dims"] == 2 and not context_fits(model, sections)
    if collapsed:
        model = collapse_context(model)
    factors = (voxel_scale(voxel_size, model.meta.get("voxel_size_nm"), model.config["dims"],
                           finer_tolerance)
               if resample_image and np.ndim(image) == 3 else None)
    if factors:
        image = resample(image, factors)
        labels = None if labels is None else resample(labels, factors, order=0)
    info = {"resampled": list(factors) if factors else None, "context_collapsed": collapsed,
            "sections_fit": sections_fit(model, sections), "z_step_px": step}
    return model, image, labels, info


def predict_adapted(image: np.ndarray, model, *, voxel_size: tuple[float, ...] | None = None,
                    adapt: bool = False, resample_to_model: bool = True,
                    progress: ProgressCallback | None = None,
                    cancel: CancelCheck | None = None,
                    on_info: Callable[[dict], None] | None = None,
                    **predict_kwargs) -> tuple[np.ndarray, dict]:
    """Predict ``image`` as the model's training data looked: scale, sections, statistics.

    1. When ``voxel_size`` does not fit the model's ``meta["voxel_size_nm"]``
       (:func:`scale_fits`), the image is resampled to the model's voxel
       size (``resample_to_model``) and the probabilities back to the image's shape.
    2. A 2.5D model whose neighbouring slices would be much farther apart than in
       training (:func:`context_fits`) sees each slice as its own neighbours
       (:func:`~napari_emseg.models.unet.collapse_context`).
    3. ``adapt=True`` re-estimates BatchNorm statistics on the (resampled) image
       (:func:`adapt_batchnorm`).

    Parameters
    ----------
    image : ndarray (Z, Y, X) or (Y, X), raw grey values
    model : UNet with ``.meta``
    voxel_size : the image's voxel size in nm (ZYX or YX), optional
    on_info : called with ``info`` (below) before the prediction starts, so a
        warning reaches the user before a long run, not after it
    **predict_kwargs : passed to :func:`napari_emseg.predict.predict_volume`

    Returns
    -------
    prob : float32 ndarray, the image's shape (``(C, Z, Y, X)`` for several classes)
    info : dict, what was done: ``adapted`` (bool), ``resampled`` (zoom factors
        ZYX or None), ``context_collapsed`` and ``sections_fit`` (bool); when the
        sections are too thick for the model, ``serial_models``: bundled one-slice
        models of the same task (:func:`serial_section_models`)
    """
    from .predict import predict_volume

    image = np.asarray(image)
    model, work, _, info = to_model_scale(model, image, None, voxel_size,
                                          resample_image=resample_to_model)
    info["adapted"] = adapt
    if adapt:
        model = adapt_batchnorm(model, work, device=predict_kwargs.get("device"),
                                cancel=cancel)
    serial = (serial_section_models(model)
              if info["context_collapsed"] or not info["sections_fit"] else [])
    if serial:
        info["serial_models"] = serial
    if on_info is not None:
        on_info(dict(info))
    prob = predict_volume(work, model, progress=progress, cancel=cancel, **predict_kwargs)
    if info["resampled"]:
        prob = (resample(prob, shape=image.shape) if prob.ndim == image.ndim else
                np.stack([resample(p, shape=image.shape) for p in prob]))
    return prob, info


def serial_section_models(model) -> list[str]:
    """Bundled one-slice 2D models for the same task as ``model`` (by its name)."""
    from .models import zoo

    name = str(getattr(model, "meta", {}).get("name", ""))
    infos = {other: zoo.bundled_info(other) for other in zoo.related_models(name)}
    return [other for other, info in infos.items()
            if info["config"]["dims"] == 2 and not int(info.get("context", 0) or 0)]


def predict_slice_adapted(image: np.ndarray, model, z: int, *,
                          voxel_size: tuple[float, ...] | None = None,
                          sections: tuple[float, ...] | None | str = ESTIMATE,
                          **predict_kwargs) -> np.ndarray:
    """Probabilities of slice ``z``, predicted at the model's voxel size.

    The live preview of a fine-tune that trains at the model's scale, and the
    Predict dock's one-slice preview: only the slices around ``z`` are resampled
    (y/x, and z for 3D models), with the grey-value range of the whole image; a
    2.5D model on sections too thick for it reads the slice alone, as
    :func:`predict_adapted` does.

    Parameters
    ----------
    image : ndarray (Z, Y, X), raw grey values
    model : UNet with ``.meta``
    z : slice index
    voxel_size : the image's voxel size in nm (ZYX), optional
    sections : the voxel size that decides whether the sections fit the model's
        context, ``section_voxel(model, image, voxel_size)[0]``, when the caller
        already has it (a live preview asks again and again); by default worked
        out here

    Returns
    -------
    float32 ndarray (Y, X), or (C, Y, X) for several classes
    """
    from ._normalize import normalization_range
    from .predict import predict_slice

    image = np.asarray(image)
    model = _fitting_context(model, image, voxel_size, sections)
    factors = voxel_scale(voxel_size, model.meta.get("voxel_size_nm"), model.config["dims"])
    if not factors:
        return predict_slice(image, model, z, **predict_kwargs)
    nz = image.shape[0]
    reach = int(model.meta.get("context", 0) or 0) if model.config["dims"] == 2 else 16
    z0, z1 = max(0, z - reach), min(nz, z + reach + 1)
    spec = model.meta.get("normalization")
    predict_kwargs.setdefault("normalization", normalization_range(image, spec))
    sub = resample(image[z0:z1], factors)
    zs = min(sub.shape[0] - 1, int(round((z - z0) * factors[0])))
    prob = predict_slice(sub, model, zs, **predict_kwargs)
    shape = (1, *image.shape[1:])
    if prob.ndim == 2:
        return resample(prob[None], shape=shape)[0]
    return np.stack([resample(p[None], shape=shape)[0] for p in prob])


def reads_neighbours(model) -> bool:
    """True for a 2.5D model: a 2D U-Net fed the neighbouring slices as channels."""
    return model.config["dims"] == 2 and int(model.meta.get("context", 0) or 0) > 0


def _fitting_context(model, image: np.ndarray, voxel_size: tuple[float, ...] | None,
                     sections: tuple[float, ...] | None | str = ESTIMATE):
    """``model``, with its 2.5D context collapsed when the sections are too thick for it."""
    if not reads_neighbours(model):
        return model
    from .models.unet import collapse_context

    if sections == ESTIMATE:
        sections, _ = section_voxel(model, image, voxel_size)
    return model if context_fits(model, sections) else collapse_context(model)


def describe(info: dict) -> str:
    """One line saying what :func:`predict_adapted` did ("" when nothing)."""
    parts = []
    step = info.get("z_step_px")
    if step and (info.get("context_collapsed") or not info.get("sections_fit", True)):
        parts.append(f"voxel size unknown: adjacent slices differ as much as pixels {step:.0f} "
                     "apart (FIB-SEM: about 1), so the sections are taken to be thick; give "
                     "the voxel size to decide otherwise")
    if not info.get("sections_fit", True):
        parts.append("warning: the sections are much thicker than those this 3D model was "
                     "trained on, so most slices it sees are made up between them; a 2D "
                     "model suits serial sections")
    if info.get("resampled"):
        parts.append("resampled to the model's voxel size (zoom "
                     + "×".join(f"{f:g}" for f in info["resampled"]) + ")")
    if info.get("context_collapsed"):
        parts.append("sections thicker than those the model was trained on: each slice is "
                     "read on its own, without its neighbours")
    if info.get("adapted"):
        parts.append("BatchNorm statistics re-estimated on this volume")
    if info.get("serial_models"):
        serial = info["serial_models"]
        parts.append("for serial sections try " + " or ".join(serial)
                     + (" (it reads" if len(serial) == 1 else " (they read")
                     + " one slice at a time)")
    return "; ".join(parts)
