"""From probability maps to instance labels.

Thresholding (fixed or Otsu), binary opening/closing, hole filling,
small-object removal (in voxels or physical units), bilateral smoothing,
z / yz median filtering of probabilities, connected components and a
distance-transform seeded watershed (2D per slice or 3D with anisotropic
spacing), plus :func:`segment`, the one call the widget and the CLI use,
with its settings (:class:`SegmentSettings`, model defaults from
:func:`segment_defaults`) and its input check (:func:`as_probabilities`).

Conventions: arrays are ZYX (a 2D YX array is treated as one slice),
probabilities are float32 in [0, 1] (``uint8`` 0-255 and ``bool`` are
accepted and converted; a ``uint8`` array holding only 0 and 1 is read as a
mask), labels are ``uint32`` with 0 = background.  No
function mutates its input; empty inputs give empty outputs.

Speed: the watershed works one connected component of the foreground at a
time, inside the component's bounding box.  Seeds of one component can never
flood another one (the flood is restricted to the foreground and uses the
same face connectivity), so this gives the same result as a whole-volume
watershed while touching only foreground voxels — and components holding
at most one seed skip the flood entirely.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from .progress import CancelCheck, ProgressCallback, check_cancel, report, stage_progress
from .tracking import track_slices

__all__ = [
    "SegmentSettings",
    "Segmentation",
    "as_probabilities",
    "connected_components",
    "fill_holes",
    "open_close",
    "otsu_threshold",
    "relabel_sequential",
    "remove_small_objects",
    "seeded_watershed",
    "segment",
    "segment_defaults",
    "smooth_bilateral",
    "threshold",
    "zfilter",
]

SeedMethod = Literal["hmaxima", "peaks", "distance"]
_CHUNK = 16  # z-slices processed at once by the streaming filters


# ----------------------------------------------------------------- helpers
def _as_prob(prob, name: str = "prob") -> np.ndarray:
    """``prob`` as float32 in [0, 1]: uint8 is divided by 255 (unless it only holds 0/1)."""
    arr = np.asarray(prob)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        # a uint8 array holding only 0 and 1 is a mask, not 0-255 probabilities
        if arr.size and int(arr.max()) <= 1:
            return arr.astype(np.float32)
        return arr.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32, copy=False)
    raise ValueError(
        f"{name} must be float probabilities in [0, 1], uint8 0-255 or bool; got dtype {arr.dtype}"
    )


def _check_ndim(arr: np.ndarray, name: str) -> None:
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2D (YX) or 3D (ZYX); got shape {arr.shape}")


def check_dims(dims: int) -> None:
    """Raise ``ValueError`` unless ``dims`` is 2 or 3."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3; got {dims!r}")


def as_zyx(arr: np.ndarray) -> tuple[np.ndarray, bool]:
    """Add a z axis to a 2D array; the flag says whether to squeeze it again."""
    return (arr[None], True) if arr.ndim == 2 else (arr, False)


def _prob_zyx(prob) -> tuple[np.ndarray, bool]:
    """Checked float32 probabilities as ZYX; the flag says whether to squeeze z again."""
    p = _as_prob(prob)
    _check_ndim(p, "prob")
    return as_zyx(p)


def _mask_zyx(mask, dims: int) -> tuple[np.ndarray, bool]:
    """Checked ``dims`` and a bool mask as ZYX; the flag says whether to squeeze z again."""
    check_dims(dims)
    m = np.asarray(mask).astype(bool)
    _check_ndim(m, "mask")
    return as_zyx(m)


def _fits_bincount(top: int, size: int) -> bool:
    """Whether ids up to ``top`` in ``size`` voxels are dense enough for a bincount."""
    return top <= 4 * size + 1_000_000


def structuring_element(dims: int, connectivity: int) -> np.ndarray:
    """3D structuring element; for ``dims=2`` it only links pixels within a slice."""
    if dims == 3:
        if connectivity not in (1, 2, 3):
            raise ValueError(f"connectivity must be 1, 2 or 3 for dims=3; got {connectivity}")
        return ndi.generate_binary_structure(3, connectivity)
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2 for dims=2; got {connectivity}")
    st = np.zeros((3, 3, 3), dtype=bool)
    st[1] = ndi.generate_binary_structure(2, connectivity)
    return st


def axis_spacing(spacing: Sequence[float] | None, dims: int) -> tuple[float, ...]:
    """Per-axis spacing used inside one object: (y, x) for dims=2, (z, y, x) for 3."""
    if spacing is None:
        return (1.0,) * dims
    sp = tuple(float(s) for s in spacing)
    if len(sp) == 3 and dims == 2:
        sp = sp[1:]
    if len(sp) != dims or any(not np.isfinite(s) or s <= 0 for s in sp):
        raise ValueError(f"spacing must be {dims} (or 3) positive numbers (z, y, x); got {spacing}")
    return sp


def _disk(radius: int, dims: int) -> np.ndarray:
    """Disk (dims=2, as a 1-thick 3D element) or ball of ``radius`` voxels."""
    r = int(radius)
    if dims == 2:
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        return (yy**2 + xx**2 <= r * r)[None]
    zz, yy, xx = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return zz**2 + yy**2 + xx**2 <= r * r


def bincount(flat: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount`` without its slow cast of unsigned ids (ids must fit int64/int32)."""
    flat = flat.ravel()
    if flat.dtype == np.uint32 and (flat.size == 0 or int(flat.max()) < 2**31):
        flat = flat.view(np.int32)
    elif flat.dtype == np.uint64:
        flat = flat.view(np.int64)
    elif flat.dtype == np.bool_:
        flat = flat.view(np.uint8)
    return np.bincount(flat, minlength=minlength)


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber ids to 1..N keeping their order; 0 stays background.

    Parameters
    ----------
    labels : ndarray of int, any shape

    Returns
    -------
    ndarray of uint32, same shape
    """
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer) and lab.dtype != np.bool_:
        raise ValueError(f"labels must be an integer array; got dtype {lab.dtype}")
    if lab.size == 0:
        return np.zeros(lab.shape, dtype=np.uint32)
    if lab.min() < 0:
        raise ValueError("labels must not contain negative ids")
    top = int(lab.max())
    if _fits_bincount(top, lab.size):
        present = bincount(lab, minlength=top + 1) > 0
        present[0] = False
        lut = np.zeros(top + 1, dtype=np.uint32)
        lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.uint32)
        return lut[lab]
    ids, inv = np.unique(lab, return_inverse=True)
    offset = 1 if ids[0] != 0 else 0
    return (inv.reshape(lab.shape) + offset).astype(np.uint32)


def object_sizes(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, voxel counts) of the nonzero ids of ``lab``."""
    top = int(lab.max()) if lab.size else 0
    if _fits_bincount(top, lab.size):
        counts = bincount(lab, minlength=top + 1)
        ids = np.flatnonzero(counts)
        ids = ids[ids > 0]
        return ids, counts[ids]
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    return ids, counts


# ------------------------------------------------------------ thresholding
def otsu_threshold(prob: np.ndarray) -> float:
    """Otsu threshold of a probability map (computed on the [0, 1] scale).

    Parameters
    ----------
    prob : ndarray, (Z, Y, X) or (Y, X)

    Returns
    -------
    float
        The threshold; 0.5 when the map is constant or empty.
    """
    from skimage.filters import threshold_otsu

    p = _as_prob(prob)
    if p.size == 0 or float(p.min()) == float(p.max()):
        return 0.5
    sample = p if p.size <= 20_000_000 else p.ravel()[:: int(np.ceil(p.size / 20_000_000))]
    return float(threshold_otsu(sample))


def threshold(prob: np.ndarray, value: float | str = 0.5) -> np.ndarray:
    """Foreground mask ``prob > value``.

    Parameters
    ----------
    prob : ndarray, (Z, Y, X) or (Y, X)
        float in [0, 1], uint8 0-255 (scaled) or bool.
    value : float in [0, 1] or ``"otsu"``

    Returns
    -------
    ndarray of bool, same shape
    """
    p = _as_prob(prob)
    if isinstance(value, str):
        if value.lower() != "otsu":
            raise ValueError(f"threshold must be a number in [0, 1] or 'otsu'; got {value!r}")
        value = otsu_threshold(p)
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {value}")
    return p > value


# -------------------------------------------------------------- morphology
def open_close(
    mask: np.ndarray, *, opening: int = 0, closing: int = 0, dims: int = 2
) -> np.ndarray:
    """Binary opening then closing with a disk (dims=2, per slice) or ball.

    Parameters
    ----------
    mask : ndarray of bool, (Z, Y, X) or (Y, X)
    opening, closing : int
        Radii in voxels; 0 skips the step.
    dims : 2 or 3

    Returns
    -------
    ndarray of bool, same shape
    """
    m3, squeeze = _mask_zyx(mask, dims)
    if opening < 0 or closing < 0:
        raise ValueError("opening and closing radii must be >= 0")
    out = m3.copy()
    if m3.size:
        if opening:
            out = ndi.binary_opening(out, structure=_disk(opening, dims))
        if closing:
            # pad so that closing does not erode objects touching the border
            pad = [(0, 0)] + [(closing, closing)] * 2 if dims == 2 else closing
            padded = np.pad(out, pad, mode="edge")
            closed = ndi.binary_closing(padded, structure=_disk(closing, dims))
            crop = (
                (slice(None),) + (slice(closing, -closing),) * 2
                if dims == 2
                else (slice(closing, -closing),) * 3
            )
            out = closed[crop]
    return out[0] if squeeze else out


def fill_holes(mask: np.ndarray, *, dims: int = 2) -> np.ndarray:
    """Fill holes: background regions not connected to the border.

    ``dims=2`` fills per slice (a hole only needs to be enclosed in its
    slice), ``dims=3`` fills cavities enclosed in 3D.

    Parameters
    ----------
    mask : ndarray of bool, (Z, Y, X) or (Y, X)
    dims : 2 or 3

    Returns
    -------
    ndarray of bool, same shape
    """
    m3, squeeze = _mask_zyx(mask, dims)
    if m3.size == 0:
        return (m3[0] if squeeze else m3).copy()
    bg, _ = ndi.label(~m3, structure=structuring_element(dims, 1))
    faces = [bg[:, 0], bg[:, -1], bg[:, :, 0], bg[:, :, -1]]
    if dims == 3:
        faces += [bg[0], bg[-1]]
    outside = np.unique(np.concatenate([f.ravel() for f in faces]))
    out = m3 | ~np.isin(bg, outside)
    return out[0] if squeeze else out


def remove_small_objects(
    labels: np.ndarray,
    min_size: float,
    *,
    spacing: Sequence[float] | None = None,
    dims: int = 3,
    connectivity: int = 1,
) -> np.ndarray:
    """Remove objects smaller than ``min_size``.

    Parameters
    ----------
    labels : ndarray of int or bool, (Z, Y, X) or (Y, X)
        Instance ids, or a mask (its connected components, per slice for
        ``dims=2``, are the objects).
    min_size : float
        Minimum size in voxels, or in physical units (voxel count times the
        product of ``spacing``) when ``spacing`` is given.
    spacing : sequence of float, optional
        Voxel size per axis of ``labels`` (e.g. nm).
    dims, connectivity : int
        Only used for masks, see :func:`connected_components`.

    Returns
    -------
    ndarray, same shape and dtype as ``labels`` (ids are kept, not renumbered)
    """
    lab = np.asarray(labels)
    _check_ndim(lab, "labels")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0; got {min_size}")
    is_mask = lab.dtype == np.bool_
    if not is_mask and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integer ids or a bool mask; got dtype {lab.dtype}")
    voxel = 1.0
    if spacing is not None:
        sp = tuple(float(s) for s in spacing)
        if len(sp) != lab.ndim or any(s <= 0 for s in sp):
            raise ValueError(
                f"spacing needs one positive value per axis ({lab.ndim}); got {spacing}"
            )
        voxel = float(np.prod(sp))
    ids_img = connected_components(lab, dims=dims, connectivity=connectivity) if is_mask else lab
    if lab.size == 0 or min_size == 0:
        return lab.copy()
    ids, counts = object_sizes(ids_img)
    small = ids[counts * voxel < min_size]
    if small.size == 0:
        return lab.copy()
    drop = np.isin(ids_img, small)
    out = lab.copy()
    out[drop] = 0
    return out


def smooth_bilateral(
    prob: np.ndarray,
    *,
    sigma_color: float = 0.1,
    sigma_spatial: float = 2.0,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Edge-preserving (bilateral) smoothing of a probability map, per slice.

    Slow (about a second per megapixel slice); use on crops or small stacks.

    Parameters
    ----------
    prob : ndarray, (Z, Y, X) or (Y, X)
    sigma_color : float
        Width of the range kernel on the probability scale.
    sigma_spatial : float
        Width of the spatial kernel in pixels.

    Returns
    -------
    ndarray of float32, same shape
    """
    from skimage.restoration import denoise_bilateral

    p3, squeeze = _prob_zyx(prob)
    out = np.empty(p3.shape, dtype=np.float32)
    for z in range(p3.shape[0]):
        check_cancel(cancel)
        out[z] = denoise_bilateral(
            p3[z].astype(np.float64), sigma_color=sigma_color, sigma_spatial=sigma_spatial
        )
        report(progress, z + 1, p3.shape[0])
    np.clip(out, 0.0, 1.0, out=out)
    return out[0] if squeeze else out


# ---------------------------------------------------------------- z-filter
def _median_along(block: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Median along ``axis`` of a block already padded by ``size // 2`` there."""
    n = block.shape[axis] - 2 * (size // 2)
    take = [slice(None)] * block.ndim

    def sl(i: int) -> np.ndarray:
        take[axis] = slice(i, i + n)
        return block[tuple(take)]

    if size == 3:  # median of three without sorting
        a, b, c = sl(0), sl(1), sl(2)
        return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))
    stack = np.stack([sl(i) for i in range(size)], axis=0)
    stack.partition(size // 2, axis=0)
    return stack[size // 2]


def zfilter(
    prob,
    size: int = 3,
    mode: Literal["z", "yz"] = "z",
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Median filter of a probability map along z (``"z"``) or along z then y (``"yz"``).

    Borders are mirrored (scipy's ``"reflect"``), so the result equals
    ``scipy.ndimage.median_filter(prob, size=(size, 1, 1))`` (followed by
    ``(1, size, 1)`` for ``"yz"``).  Works slab by slab, so ``prob`` may be
    any array-like supporting ``prob[z0:z1]`` (numpy, dask, zarr).

    Parameters
    ----------
    prob : array-like, (Z, Y, X)
    size : int
        Odd window length; 1 returns a float32 copy.
    mode : "z" or "yz"

    Returns
    -------
    ndarray of float32, (Z, Y, X)
    """
    if mode not in ("z", "yz"):
        raise ValueError(f"mode must be 'z' or 'yz'; got {mode!r}")
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"zfilter size must be a positive odd integer; got {size}")
    shape = tuple(prob.shape)
    if len(shape) != 3:
        raise ValueError(f"zfilter needs a 3D (Z, Y, X) array; got shape {shape}")
    nz = shape[0]
    out = np.empty(shape, dtype=np.float32)
    if nz == 0:
        return out
    r = size // 2
    for z0 in range(0, nz, _CHUNK):
        check_cancel(cancel)
        z1 = min(z0 + _CHUNK, nz)
        lo, hi = max(z0 - r, 0), min(z1 + r, nz)
        block = _as_prob(prob[lo:hi])
        if r:
            # mirror padding where the slab touches the volume border
            pad_lo, pad_hi = r - (z0 - lo), r - (hi - z1)
            if pad_lo or pad_hi:
                block = _reflect_pad(block, pad_lo, pad_hi, axis=0)
            block = _median_along(block, size, axis=0)
            if mode == "yz":
                block = _median_along(_reflect_pad(block, r, r, axis=1), size, axis=1)
        out[z0:z1] = block
        report(progress, z1, nz)
    return out


def _reflect_pad(block: np.ndarray, lo: int, hi: int, axis: int) -> np.ndarray:
    """``np.pad`` symmetric (= scipy "reflect") that also works when lo/hi > length."""
    pad = [(0, 0)] * block.ndim
    pad[axis] = (lo, hi)
    return np.pad(block, pad, mode="symmetric")


# ------------------------------------------------------ connected components
def connected_components(mask: np.ndarray, *, dims: int = 3, connectivity: int = 1) -> np.ndarray:
    """Label connected components of a mask.

    Parameters
    ----------
    mask : ndarray, (Z, Y, X) or (Y, X)
        Nonzero = foreground.
    dims : 2 or 3
        2: components per slice, ids offset so they are unique across the
        stack (increasing with z); 3: components in 3D.
    connectivity : int
        1 = faces only; 2 (and 3 for dims=3) add edges (and corners).

    Returns
    -------
    ndarray of uint32, same shape, ids 1..N
    """
    check_dims(dims)
    m = np.asarray(mask)
    _check_ndim(m, "mask")
    m3, squeeze = as_zyx(m != 0)
    out = np.zeros(m3.shape, dtype=np.uint32)
    if m3.size:
        ndi.label(m3, structure=structuring_element(dims, connectivity), output=out)
    return out[0] if squeeze else out


# --------------------------------------------------------- seeded watershed
def _seeds(
    dist: np.ndarray,
    comp: np.ndarray,
    method: str,
    h: float,
    min_distance: int,
    seed_threshold: float | None,
) -> tuple[np.ndarray, int]:
    """Markers (int32, connected components of the seeds) inside one component."""
    full = ndi.generate_binary_structure(dist.ndim, dist.ndim)
    if method == "distance":
        t = 0.5 * float(dist.max()) if seed_threshold is None else float(seed_threshold)
        seeds = comp & (dist >= t) & (dist > 0)
    elif method == "hmaxima":
        if float(dist.max()) < h:
            return np.zeros(dist.shape, np.int32), 0
        # cheap pre-check: a single plateau of local maxima means one object
        local = comp & (dist == ndi.maximum_filter(dist, footprint=full))
        if ndi.label(local, structure=full)[1] <= 1:
            return local.astype(np.int32), 1
        from skimage.morphology import h_maxima

        seeds = h_maxima(dist, h).astype(bool) & comp
    else:  # peaks
        from skimage.feature import peak_local_max

        coords = peak_local_max(
            dist,
            min_distance=max(int(min_distance), 1),
            threshold_abs=seed_threshold,
            labels=comp.astype(np.int32),
            exclude_border=False,
        )
        seeds = np.zeros(dist.shape, dtype=bool)
        seeds[tuple(coords.T)] = True
    markers, n = ndi.label(seeds, structure=full)
    return markers, n


def seeded_watershed(
    prob: np.ndarray,
    threshold: float | str = 0.5,
    *,
    dims: int = 2,
    spacing: Sequence[float] | None = None,
    seed_method: SeedMethod = "hmaxima",
    min_distance: int = 5,
    h: float = 2.0,
    seed_threshold: float | None = None,
    boundary: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Distance-transform seeded watershed of the foreground ``prob > threshold``.

    For each face-connected component of the foreground: Euclidean distance
    transform (anisotropic ``spacing``; space outside the array counts as
    background), seeds, markers = connected components of the seeds, then a
    watershed on ``-distance`` (or on ``boundary``) restricted to the
    component.  A component with one or no seed stays one object.

    Parameters
    ----------
    prob : ndarray, (Z, Y, X) or (Y, X)
        Probabilities (float in [0, 1], uint8 0-255) or a bool foreground mask
        (then ``threshold`` is ignored).
    threshold : float or "otsu"
    dims : 2 or 3
        2: per slice, ids offset to be unique across the stack; 3: in 3D.
    spacing : sequence of float, optional
        Voxel size (z, y, x) (y, x is enough for dims=2); default isotropic.
    seed_method : "hmaxima", "peaks" or "distance"
        ``hmaxima``: maxima of the distance map with dynamic >= ``h``;
        ``peaks``: ``skimage.feature.peak_local_max`` with ``min_distance``
        (pixels) and ``threshold_abs=seed_threshold``; ``distance``:
        distance >= ``seed_threshold`` (default: half the component's
        maximum distance).
    min_distance : int
        Minimum distance between peaks in pixels (``peaks`` only).
    h : float
        Minimum dynamic of a maximum, in distance units (``hmaxima`` only).
    seed_threshold : float, optional
        Distance threshold in spacing units (``distance``, ``peaks``).
    boundary : ndarray, optional
        Same shape as ``prob``: flood this map (e.g. a boundary probability,
        or ``1 - prob``) instead of ``-distance``.

    Returns
    -------
    ndarray of uint32, same shape, ids 1..N (increasing with z for dims=2)
    """
    check_dims(dims)
    if seed_method not in ("hmaxima", "peaks", "distance"):
        raise ValueError(
            f"seed_method must be 'hmaxima', 'peaks' or 'distance'; got {seed_method!r}"
        )
    arr = np.asarray(prob)
    _check_ndim(arr, "prob")
    if boundary is not None:
        boundary = np.asarray(boundary)
        if boundary.shape != arr.shape:
            raise ValueError(
                f"boundary shape {boundary.shape} does not match prob shape {arr.shape}"
            )
    if h < 0 or min_distance < 0:
        raise ValueError("h and min_distance must be >= 0")
    sampling = axis_spacing(spacing, dims)
    mask = arr if arr.dtype == np.bool_ else _threshold(arr, threshold)
    return _watershed_mask(
        mask,
        dims=dims,
        sampling=sampling,
        seed_method=seed_method,
        min_distance=min_distance,
        h=h,
        seed_threshold=seed_threshold,
        boundary=boundary,
        progress=progress,
        cancel=cancel,
    )


def _watershed_mask(
    mask: np.ndarray,
    *,
    dims: int,
    sampling: tuple[float, ...],
    seed_method: str,
    min_distance: int,
    h: float,
    seed_threshold: float | None,
    boundary: np.ndarray | None,
    progress: ProgressCallback | None,
    cancel: CancelCheck | None,
) -> np.ndarray:
    from skimage.segmentation import watershed

    m3, squeeze = as_zyx(mask)
    b3 = None if boundary is None else as_zyx(boundary)[0]
    out = np.zeros(m3.shape, dtype=np.uint32)
    if m3.size == 0:
        return out[0] if squeeze else out
    comps = connected_components(m3, dims=dims, connectivity=1)
    n_comp = int(comps.max())
    sizes = bincount(comps, minlength=n_comp + 1)
    # components too small to hold two seeds are never split (no Python loop)
    candidates = np.flatnonzero(sizes >= _min_split_size(seed_method, h, min_distance, sampling))
    candidates = candidates[candidates > 0]
    boxes = ndi.find_objects(comps)
    pieces: dict[int, tuple[np.ndarray, int]] = {}  # comp id -> (local labels in box, count)
    total = candidates.size
    for k, i in enumerate(candidates.tolist(), start=1):
        if k % 64 == 0:
            check_cancel(cancel)
            report(progress, k, total)
        box = boxes[i - 1]
        crop = comps[box] == i
        sub = crop[0] if dims == 2 else crop
        comp = np.pad(sub, 1)
        dist = ndi.distance_transform_edt(comp, sampling=sampling)
        markers, n = _seeds(dist, comp, seed_method, h, min_distance, seed_threshold)
        if n <= 1:
            continue
        if b3 is None:
            surface = -dist
        else:
            bsub = np.asarray(b3[box], dtype=np.float32)
            surface = np.pad(bsub[0] if dims == 2 else bsub, 1, mode="edge")
        ws = watershed(surface, markers, mask=comp)
        ws = ws[(slice(1, -1),) * ws.ndim]
        if dims == 2:
            ws = ws[None]
        # markers can be swallowed by ties; renumber what is actually there
        present = np.unique(ws[crop])
        lut = np.zeros(n + 1, dtype=np.uint32)
        lut[present] = np.arange(present.size, dtype=np.uint32)
        pieces[i] = (lut[ws[crop]], present.size)
    # ids: components in label order (scan order, so by z for dims=2), each
    # taking as many consecutive ids as it has pieces
    count = np.ones(n_comp + 1, dtype=np.int64)
    count[0] = 0
    for i, (_, k) in pieces.items():
        count[i] = k
    base = np.zeros(n_comp + 1, dtype=np.uint32)
    base[1:] = np.cumsum(count)[:-1] + 1
    out = base[comps]
    for i, (local, _) in pieces.items():
        box = boxes[i - 1]
        crop = comps[box] == i
        out[box][crop] = base[i] + local
    report(progress, total, total)
    return out[0] if squeeze else out


def _min_split_size(
    seed_method: str, h: float, min_distance: int, sampling: tuple[float, ...]
) -> float:
    """Voxel count below which a component cannot hold two separate seeds."""
    if seed_method == "hmaxima":
        # each of two maxima with dynamic >= h needs a ball of radius h inside
        # the component; one ball's volume is a safe lower bound
        r = [h / s for s in sampling]
        ball = np.pi * r[0] * r[1] if len(r) == 2 else 4.0 / 3.0 * np.pi * r[0] * r[1] * r[2]
        return max(float(ball), 3.0)
    if seed_method == "peaks":
        return float(max(int(min_distance), 1) + 1)
    return 3.0


# ------------------------------------------------------------ the pipeline
@dataclass(frozen=True)
class SegmentSettings:
    """Parameters of :func:`segment`, the mitochondria workflow.

    The defaults suit mitochondria in ~5 nm EM (tuned on the Lucchi++ sample
    with the bundled ``mito-2d``: 3D watershed, z-median 5, h 4, objects of
    at least 2000 voxels).  A model can store its own values in
    ``meta["segment"]``; :func:`segment_defaults` reads them.

    Attributes
    ----------
    method : "watershed" or "components"
    dims : 2 or 3
        2: instances per slice (linked into 3D objects with ``track``); 3: in 3D.
    threshold : float in [0, 1] or "otsu"
    zfilter : int
        Median window along z before thresholding (0 or 1 = off).
    zfilter_mode : "z" or "yz"
    smooth : bool
        Bilateral smoothing first (slow).
    opening, closing : int
        Radii of the binary opening / closing (0 = off).
    fill : bool
        Fill holes of the mask.
    min_size : int
        Objects with fewer voxels are removed: 3D objects (``dims=3`` or
        ``track``), else 2D instances.
    min_volume : float, optional
        Same in physical units (voxel count times the product of ``spacing``).
    seed_method, min_distance, h, seed_threshold
        See :func:`seeded_watershed`.
    connectivity : int
        For ``method="components"`` (see :func:`connected_components`).
    track : bool
        ``dims=2`` only: link the 2D instances into 3D objects.
    iou_threshold, max_gap, min_slices
        See :func:`napari_emseg.tracking.track_slices`.
    """

    method: Literal["watershed", "components"] = "watershed"
    dims: int = 3
    threshold: float | str = 0.5
    zfilter: int = 5
    zfilter_mode: Literal["z", "yz"] = "z"
    smooth: bool = False
    opening: int = 0
    closing: int = 0
    fill: bool = False
    min_size: int = 2000
    min_volume: float | None = None
    seed_method: SeedMethod = "hmaxima"
    min_distance: int = 5
    h: float = 4.0
    seed_threshold: float | None = None
    connectivity: int = 1
    track: bool = False
    iou_threshold: float = 0.3
    max_gap: int = 1
    min_slices: int = 1

    def __post_init__(self) -> None:
        check_dims(self.dims)
        if self.method not in ("watershed", "components"):
            raise ValueError(f"method must be 'watershed' or 'components'; got {self.method!r}")
        if self.track and self.dims != 2:
            raise ValueError("track=True links 2D instances across slices: use it with dims=2")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0; got {self.min_size}")

    def updated(self, **changes) -> SegmentSettings:
        """A copy with ``changes`` applied; unknown names are an error."""
        unknown = sorted(set(changes) - _SETTING_NAMES)
        if unknown:
            raise ValueError(f"unknown segment setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(_SETTING_NAMES))}")
        return replace(self, **changes)


_SETTING_NAMES = frozenset(f.name for f in fields(SegmentSettings))


def segment_defaults(meta: Mapping | None = None) -> SegmentSettings:
    """The segmentation settings a model recommends, else the mitochondria defaults.

    Parameters
    ----------
    meta : mapping, optional
        A model's metadata: ``meta["segment"]`` (a dict of
        :class:`SegmentSettings` fields) and ``meta["threshold"]`` (the tuned
        foreground threshold, used unless ``meta["segment"]`` names one).
        Unknown keys in ``meta["segment"]`` are skipped with a warning.

    Returns
    -------
    SegmentSettings
    """
    meta = meta or {}
    given = dict(meta.get("segment") or {})
    unknown = sorted(set(given) - _SETTING_NAMES)
    if unknown:
        warnings.warn(f"model metadata 'segment' has unknown keys {unknown}: skipped",
                      stacklevel=2)
    given = {k: v for k, v in given.items() if k in _SETTING_NAMES}
    if "threshold" not in given and meta.get("threshold") is not None:
        given["threshold"] = float(meta["threshold"])
    return SegmentSettings(**given)


#: sections this many times thicker than where the settings were tuned get z-settings fitted
THICK_SECTIONS = 2.0
#: without a voxel size, a section ratio estimated from probabilities counts from this on:
#: smooth maps overstate it (Lucchi++ FIB-SEM, truly 1: probabilities 1.5, mask 2.4;
#: ISBI 2012, truly 12.5: 15.8)
ESTIMATED_THICK = 4.0


def section_ratio(prob, voxel_size: Sequence[float] | None = None) -> float | None:
    """How many in-plane pixels thick a section of ``prob`` is (1 = isotropic).

    From ``voxel_size`` (z, y, x) when known, else estimated from how alike
    adjacent slices are (:func:`napari_emseg.adapt.z_step_pixels`, numpy only).

    Parameters
    ----------
    prob : array-like (Z, Y, X); 2D input gives None
    voxel_size : (z, y, x) in any unit, optional
    """
    if voxel_size is not None and len(tuple(voxel_size)) == 3:
        return _z_over_xy(voxel_size)
    if np.ndim(prob) != 3 or np.shape(prob)[0] < 2:
        return None
    from .adapt import z_step_pixels

    return z_step_pixels(prob)


def tuned_ratio(meta: Mapping | None) -> float:
    """The section ratio (z / in-plane voxel size) a model's segment settings were tuned at.

    1.0 (isotropic, as the defaults) unless ``meta["voxel_size_nm"]`` is (z, y, x).
    """
    voxel = (meta or {}).get("voxel_size_nm")
    ratio = _z_over_xy(voxel) if voxel and len(voxel) == 3 else None
    return 1.0 if ratio is None else ratio


def _z_over_xy(voxel: Sequence[float]) -> float | None:
    """z size over the mean y/x size of a (z, y, x) voxel; None for a zero in-plane size."""
    z, y, x = (float(v) for v in voxel)
    return z / ((y + x) / 2) if y > 0 and x > 0 else None


def fit_to_sections(settings: SegmentSettings, factor: float | None,
                    keep: Sequence[str] = ()) -> tuple[SegmentSettings, str]:
    """Settings tuned at one section thickness, fitted to sections ``factor`` times thicker.

    The z-median window and the minimum object size count slices, so on
    sections at least :data:`THICK_SECTIONS` times thicker (relative to their
    pixels) both are divided by ``factor``: a z-median of 5 FIB-SEM slices
    spans 25 nm, on 50 nm serial sections it would erase every object cut by
    fewer than 3 sections. Fields named in ``keep`` (given by the user) stay.

    Parameters
    ----------
    settings : SegmentSettings
    factor : section ratio of the data / that of the settings' tuning, or None
    keep : field names not to change

    Returns
    -------
    (settings, note) : the note says what changed ("" when nothing did)
    """
    if not factor or factor < THICK_SECTIONS:
        return settings, ""
    changes = {}
    if "zfilter" not in keep and settings.zfilter > 1:
        window = int(settings.zfilter / factor)
        window -= 1 - window % 2  # odd
        changes["zfilter"] = window if window >= 3 else 0
    if "min_size" not in keep and settings.min_size:
        changes["min_size"] = max(1, round(settings.min_size / factor))
    changes = {k: v for k, v in changes.items() if v != getattr(settings, k)}
    if not changes:
        return settings, ""
    said = []
    if "zfilter" in changes:
        said.append(f"z-filter {settings.zfilter} → {changes['zfilter'] or 'off'}")
    if "min_size" in changes:
        said.append(f"min size {settings.min_size} → {changes['min_size']} voxels")
    note = (f"sections {factor:.1f}× thicker than the settings were tuned for: "
            f"{', '.join(said)}")
    return settings.updated(**changes), note


def fit_to_data(settings: SegmentSettings, prob, voxel_size: Sequence[float] | None = None,
                keep: Sequence[str] = (), meta: Mapping | None = None
                ) -> tuple[SegmentSettings, str]:
    """:func:`fit_to_sections` for the sections of ``prob``.

    Parameters
    ----------
    settings : SegmentSettings
    prob : array-like (Z, Y, X), the probabilities to segment
    voxel_size : (z, y, x), optional; else estimated from ``prob`` (counted only from
        :data:`ESTIMATED_THICK` on)
    keep : field names given by the user (not changed)
    meta : the predicting model's metadata, for the thickness its settings
        were tuned at (:func:`tuned_ratio`; the defaults: isotropic)
    """
    ratio = section_ratio(prob, voxel_size)
    if voxel_size is None and ratio is not None and ratio < ESTIMATED_THICK:
        ratio = None
    factor = None if ratio is None else ratio / tuned_ratio(meta)
    return fit_to_sections(settings, factor, keep)


@dataclass(frozen=True)
class Segmentation:
    """Result of :func:`segment`.

    Attributes
    ----------
    instances : ndarray of uint32, same shape as the input
        ``dims=2``: 2D instances, ids unique across the stack and increasing
        with z; ``dims=3``: the 3D objects.
    objects : ndarray of uint32, same shape as ``instances``, or None
        The tracked 3D objects (``track=True``), covering exactly the voxels
        of ``instances``; None without tracking.
    dropped : int
        Objects removed by the size filter (``min_size`` / ``min_volume``).
    """

    instances: np.ndarray
    objects: np.ndarray | None = None
    dropped: int = 0

    def summary(self, min_size: int = 0) -> str:
        """``"6 objects"``, with what the size filter removed ("(4 smaller than …)")."""
        text = (f"{int(self.instances.max())} instances" if self.objects is None else
                f"{int(self.instances.max())} instances, {int(self.objects.max())} 3D objects")
        if self.dropped:
            size = f" {min_size} voxels" if min_size else " the minimum size"
            text += f" ({self.dropped} smaller than{size} removed)"
        return text

    @property
    def labels(self) -> np.ndarray:
        """The final labels: ``objects`` when tracked, else ``instances``."""
        return self.instances if self.objects is None else self.objects


def as_probabilities(data, channel: int | None = None, *, name: str = "prob") -> np.ndarray:
    """Checked probabilities as float32 in [0, 1], picking a class channel.

    Accepted: float in [0, 1]; ``uint8`` 0-255 (divided by 255); ``bool`` or
    integer masks holding only 0 and 1 (and ``uint8`` 0/255).  Refused with a
    message that says what to pass: label images (integers with few distinct
    values, or any integer type other than ``uint8``), raw EM and other values
    outside [0, 1].

    Parameters
    ----------
    data : array-like, (Y, X), (Z, Y, X) or (C, Z, Y, X)
    channel : int, optional
        Class channel of a (C, Z, Y, X) map; needed when C > 1.
    name : str
        How errors call the input.

    Returns
    -------
    ndarray of float32, (Y, X) or (Z, Y, X); ``data`` itself when it is
    already float32 (never modified)
    """
    arr = _pick_channel(np.asarray(data), channel, name)
    if np.issubdtype(arr.dtype, np.integer):
        _check_not_labels(arr, name)
        if arr.dtype != np.uint8:  # a 0/1 mask
            arr = arr.astype(np.uint8)
    p = _as_prob(arr, name)
    if p.size:
        lo, hi = float(np.min(p)), float(np.max(p))
        if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too
            raise ValueError(
                f"{name} values span [{lo:g}, {hi:g}], outside [0, 1]: pass probabilities "
                "(e.g. from Predict), not raw EM or a label image"
            )
    return p


def _pick_channel(arr: np.ndarray, channel: int | None, name: str) -> np.ndarray:
    """The (Z, Y, X) map of ``channel`` from (C, Z, Y, X); other shapes pass unchanged."""
    if arr.ndim != 4:
        if channel not in (None, 0):
            raise ValueError(f"channel {channel} given but {name} of shape {arr.shape} has "
                             "no class axis (C, Z, Y, X)")
        return arr
    if channel is None:
        if arr.shape[0] != 1:
            raise ValueError(f"{name} has {arr.shape[0]} class channels (shape {arr.shape}): "
                             "choose one with channel")
        channel = 0
    if not 0 <= channel < arr.shape[0]:
        raise ValueError(f"channel {channel} out of range for {arr.shape[0]} class channels")
    return arr[channel]


_LABEL_MAX_IDS = 32  # an integer image with at most this many small values is a label image


def _check_not_labels(arr: np.ndarray, name: str) -> None:
    """Refuse integer arrays that are label images (or raw EM of a wider type)."""
    if arr.size == 0:
        return
    top = int(arr.max())
    low = int(arr.min())
    if low >= 0 and top <= 1:
        return  # a 0/1 mask
    if arr.dtype == np.uint8:
        present = np.flatnonzero(bincount(arr, minlength=256))
        if present.tolist() == [0, 255] or present.size > _LABEL_MAX_IDS or top >= 128:
            return  # a 0/255 mask, or 0-255 probabilities
        what = f"{present.size} distinct values, up to {top}"
    else:
        what = f"values {low} to {top}"
    raise ValueError(
        f"{name} is an integer image of dtype {arr.dtype} ({what}): that looks like a label "
        "image, not probabilities; pass probabilities (float in [0, 1] or uint8 0-255, "
        "e.g. from Predict) or a 0/1 mask"
    )


# aliases: ``SegmentSettings`` has fields named like these functions
_threshold = threshold
_zfilter = zfilter


def segment(
    prob,
    settings: SegmentSettings | None = None,
    *,
    channel: int | None = None,
    spacing: Sequence[float] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    **changes,
) -> Segmentation:
    """Probabilities → instances (and tracked 3D objects), the whole chain in one call.

    Order of operations: bilateral smoothing (``smooth``) → z / yz median
    filter (``zfilter``) → threshold → opening / closing / hole filling →
    seeded watershed or connected components (``dims`` 2 or 3) → with
    ``track``: 2D instances linked into 3D objects (objects shorter than
    ``min_slices`` dropped) → objects smaller than ``min_size`` voxels (or
    ``min_volume``) removed, measured on the 3D objects whenever there are
    any → instances kept only where an object survived → ids renumbered
    1..N.  Sizes are measured in 3D so that the thin tips of a large object
    are kept and fragments are judged by their whole extent.

    Parameters
    ----------
    prob : array-like, (Z, Y, X), (Y, X) or (C, Z, Y, X)
        Probabilities, see :func:`as_probabilities` (label images and raw EM
        are refused).
    settings : SegmentSettings, optional
        Default: ``SegmentSettings()`` (the mitochondria defaults).
    channel : int, optional
        Class channel of a (C, Z, Y, X) map.
    spacing : sequence of float, optional
        Voxel size (z, y, x): anisotropic 3D distances and ``min_volume``.
    progress, cancel
        Progress is reported on a 0..1000 scale.
    **changes
        Fields of :class:`SegmentSettings` replacing those of ``settings``,
        e.g. ``segment(prob, dims=2, track=True)``.

    Returns
    -------
    Segmentation
        ``instances`` (uint32, same shape as the chosen map) and ``objects``
        (uint32, only with ``track``); ``.labels`` is the final result.
    """
    s = (settings or SegmentSettings()).updated(**changes)
    if spacing is not None and len(tuple(spacing)) != 3:
        raise ValueError(f"spacing must be (z, y, x); got {spacing}")
    p = as_probabilities(prob, channel)
    _check_ndim(p, "prob")
    p3, squeeze = as_zyx(p)
    check_cancel(cancel)
    mask = _foreground(p3, s, progress, cancel)
    report(progress, 300, 1000)
    instances = _instances(mask, s, spacing, stage_progress(progress, 300, 400), cancel)
    objects = None
    if s.track:
        objects = track_slices(instances, iou_threshold=s.iou_threshold, max_gap=s.max_gap,
                               min_slices=s.min_slices, cancel=cancel,
                               progress=stage_progress(progress, 700, 200))
    check_cancel(cancel)
    filtered = instances if objects is None else objects
    kept = _drop_small(filtered, s, spacing)
    dropped = _count_ids(filtered) - _count_ids(kept)
    if objects is not None:
        objects = relabel_sequential(kept)
        instances = relabel_sequential(np.where(objects > 0, instances, 0))
    else:
        instances = relabel_sequential(kept)
    report(progress, 1000, 1000)
    if squeeze:
        return Segmentation(instances[0], None if objects is None else objects[0], dropped)
    return Segmentation(instances, objects, dropped)


def _count_ids(labels: np.ndarray) -> int:
    """Distinct non-zero ids in ``labels``."""
    if labels.size == 0 or not labels.any():
        return 0
    return int(np.count_nonzero(np.bincount(labels.ravel())[1:]))


def _foreground(
    p3: np.ndarray, s: SegmentSettings, progress: ProgressCallback | None,
    cancel: CancelCheck | None,
) -> np.ndarray:
    """Smoothing, z-filter, threshold and morphology: the bool mask (Z, Y, X)."""
    if s.smooth:
        p3 = smooth_bilateral(p3, progress=stage_progress(progress, 0, 200), cancel=cancel)
    if s.zfilter and s.zfilter > 1 and p3.shape[0] > 1:
        p3 = _zfilter(p3, s.zfilter, s.zfilter_mode,
                      progress=stage_progress(progress, 200, 50), cancel=cancel)
    check_cancel(cancel)
    mask = _threshold(p3, s.threshold)
    if s.opening or s.closing:
        mask = open_close(mask, opening=s.opening, closing=s.closing, dims=s.dims)
    if s.fill:
        mask = fill_holes(mask, dims=s.dims)
    check_cancel(cancel)
    return mask


def _instances(
    mask: np.ndarray, s: SegmentSettings, spacing: Sequence[float] | None,
    progress: ProgressCallback | None, cancel: CancelCheck | None,
) -> np.ndarray:
    """Watershed or connected components of the mask (Z, Y, X), uint32."""
    if s.method == "components":
        return connected_components(mask, dims=s.dims, connectivity=s.connectivity)
    return _watershed_mask(
        mask, dims=s.dims, sampling=axis_spacing(spacing, s.dims), seed_method=s.seed_method,
        min_distance=s.min_distance, h=s.h, seed_threshold=s.seed_threshold, boundary=None,
        progress=progress, cancel=cancel,
    )


def _drop_small(
    labels: np.ndarray, s: SegmentSettings, spacing: Sequence[float] | None
) -> np.ndarray:
    """``labels`` without objects under ``min_size`` voxels or ``min_volume`` units."""
    if s.min_size:
        labels = remove_small_objects(labels, s.min_size)
    if s.min_volume:
        sp = tuple(spacing) if spacing is not None else (1.0, 1.0, 1.0)
        labels = remove_small_objects(labels, s.min_volume, spacing=sp)
    return labels
