"""Neurons from a boundary map: distance-transform seeds, watershed, traced through z.

The pipeline of :func:`segment_neurons`, per section (``dims=2``) or on the
whole volume (``dims=3``, anisotropic ``spacing``):

1. cell interior = boundary probability below ``threshold``;
2. Euclidean distance transform of the interior (distance to the nearest
   membrane pixel, in ``spacing`` units);
3. seeds = maxima of that distance with a dynamic of at least ``h``
   (``skimage.morphology.h_maxima``); seeds closer than ``min_distance``
   are joined into one marker;
4. watershed of the boundary probability from the markers — every pixel,
   membranes included, goes to one cell;
5. fragments smaller than ``min_size`` pixels (voxels) are merged into their
   neighbours by flooding again without them;
6. ``dims=2`` with ``track``: the 2D cells are linked across sections with
   the Hungarian IoU matching of :func:`napari_emseg.tracking.track_slices`,
   so a neurite keeps its id through z (and across ``max_gap`` sections
   where it is missing).

Nothing here imports napari, Qt or torch; inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from .postprocess import (
    as_probabilities,
    as_zyx,
    axis_spacing,
    check_dims,
    object_sizes,
    relabel_sequential,
)
from .progress import CancelCheck, ProgressCallback, check_cancel, report, stage_progress
from .tracking import track_slices

__all__ = ["segment_neurons"]


def _boundary_zyx(boundary_prob) -> tuple[np.ndarray, bool]:
    """Checked float32 boundary probabilities as ZYX; the flag says whether to squeeze z."""
    arr = np.asarray(boundary_prob)
    if arr.ndim not in (2, 3):
        raise ValueError(f"boundary_prob must be 2D (YX) or 3D (ZYX); got shape {arr.shape}")
    return as_zyx(as_probabilities(arr, name="boundary_prob"))


def _ellipsoid(radius: float, sampling: tuple[float, ...]) -> np.ndarray:
    """Boolean footprint of all offsets within ``radius`` (in spacing units)."""
    half = [int(np.floor(radius / s)) for s in sampling]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in half)]
    dist2 = sum((g * s) ** 2 for g, s in zip(grids, sampling, strict=True))
    return dist2 <= radius * radius


def _markers(
    dist: np.ndarray, h: float, min_distance: float, sampling: tuple[float, ...]
) -> np.ndarray:
    """Markers (int32) at maxima of ``dist`` with dynamic >= h, joined within min_distance."""
    from skimage.morphology import h_maxima

    full = ndi.generate_binary_structure(dist.ndim, dist.ndim)
    if h > 0:
        peaks = h_maxima(dist, h, footprint=full).astype(bool)
    else:  # every regional maximum
        peaks = (dist == ndi.maximum_filter(dist, footprint=full)) & (dist > 0)
    if min_distance > 0:
        # seeds closer than min_distance share the grown blob: one marker
        grown = ndi.binary_dilation(peaks, structure=_ellipsoid(min_distance / 2, sampling))
        blobs, _ = ndi.label(grown, structure=full)
        return np.where(peaks, blobs, 0).astype(np.int32)
    return ndi.label(peaks, structure=full)[0].astype(np.int32)


def _merge_small(labels: np.ndarray, surface: np.ndarray, min_size: int) -> np.ndarray:
    """Flood fragments smaller than ``min_size`` from their neighbours (ids kept)."""
    from skimage.segmentation import watershed

    if min_size <= 0:
        return labels
    ids, counts = object_sizes(labels)
    small = ids[counts < min_size]
    if small.size == 0 or small.size == ids.size:
        return labels
    kept = np.where(np.isin(labels, small), 0, labels)
    return watershed(surface, kept).astype(labels.dtype, copy=False)


def _segment_region(
    p: np.ndarray,
    *,
    threshold: float,
    min_distance: float,
    h: float,
    min_size: int,
    sampling: tuple[float, ...],
) -> np.ndarray:
    """Cells of one section (Y, X) or volume (Z, Y, X): uint32 ids >= 1 (gaps possible), 0 if none."""
    from skimage.segmentation import watershed

    interior = p < threshold
    if not interior.any():
        return np.zeros(p.shape, np.uint32)
    if interior.all():  # no membrane at all: one cell
        return np.ones(p.shape, np.uint32)
    dist = ndi.distance_transform_edt(interior, sampling=sampling)
    markers = _markers(dist, h, min_distance, sampling)
    if not markers.any():
        return np.zeros(p.shape, np.uint32)
    labels = watershed(p, markers).astype(np.uint32)
    return _merge_small(labels, p, min_size)


def segment_neurons(
    boundary_prob,
    *,
    dims: int = 2,
    threshold: float = 0.6,
    min_distance: float = 4.0,
    h: float = 6.0,
    min_size: int = 50,
    spacing: Sequence[float] | None = None,
    track: bool = True,
    iou: float = 0.3,
    max_gap: int = 1,
    min_slices: int = 1,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Neurites from a membrane (boundary) probability map.

    Cell interior = ``boundary_prob < threshold``; seeds at maxima of its
    distance transform (dynamic >= ``h``, seeds within ``min_distance`` joined);
    watershed of ``boundary_prob`` from the seeds, covering every pixel;
    fragments below ``min_size`` merged into neighbours; with ``dims=2`` and
    ``track``, 2D cells linked through z by Hungarian IoU matching.

    Parameters
    ----------
    boundary_prob : array-like, (Z, Y, X) or (Y, X)
        Membrane probabilities: float in [0, 1], uint8 0-255 or a bool
        membrane mask (True = membrane).  Not modified.
    dims : 2 or 3
        2: per section (serial-section TEM); 3: one 3D watershed (isotropic
        FIB-SEM; needs a (Z, Y, X) volume).
    threshold : float in (0, 1]
        Boundary probability below which a pixel is cell interior.
    min_distance : float
        Seeds closer than this (spacing units) become one seed.
    h : float
        Minimum dynamic of a distance maximum to seed a cell (spacing units);
        0 seeds every regional maximum.
    min_size : int
        Fragments with fewer pixels (per section for ``dims=2``) or voxels
        are merged into their neighbours.
    spacing : sequence of float, optional
        Voxel size (z, y, x) ((y, x) is enough for ``dims=2``); default 1.
    track : bool
        ``dims=2``: link the 2D cells across sections (3D ids).  Without it,
        ids are unique across the stack but not linked.  Not used for
        ``dims=3``, whose ids are already 3D.
    iou, max_gap, min_slices
        Tracking: minimum IoU of a match, sections an object may skip, and
        shortest object kept (see :func:`napari_emseg.tracking.track_slices`).
    progress, cancel
        Progress is reported on a 0..1000 scale; ``cancel()`` returning True
        stops with :class:`napari_emseg.progress.Cancelled`.

    Notes
    -----
    The defaults (``threshold=0.6, h=6, min_distance=4, min_size=50``) were
    chosen on ISBI 2012 training sections 20-24 (ssTEM, 4 nm pixels) with the
    bundled ``membrane-2d`` model; ``h`` and ``min_distance`` are lengths,
    so scale them with the pixel size and the neurite calibre.

    Returns
    -------
    ndarray of uint32, same shape as ``boundary_prob``
        Cell ids 1..N (0 only where a section had no cell interior at all, or
        where tracking dropped objects shorter than ``min_slices``).
    """
    check_dims(dims)
    p3, squeeze = _boundary_zyx(boundary_prob)
    if dims == 3 and squeeze:
        raise ValueError(f"dims=3 needs a (Z, Y, X) volume; got shape {p3.shape[1:]}")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    if min_distance < 0 or h < 0 or min_size < 0:
        raise ValueError("min_distance, h and min_size must be >= 0")
    if dims == 3 and spacing is not None and len(tuple(spacing)) != 3:
        raise ValueError(f"spacing must be (z, y, x) for dims=3; got {spacing}")
    sampling = axis_spacing(spacing, dims)
    params = dict(threshold=float(threshold), min_distance=float(min_distance), h=float(h),
                  min_size=int(min_size), sampling=sampling)
    check_cancel(cancel)
    if dims == 3:
        labels = relabel_sequential(_segment_region(p3, **params))
        report(progress, 1000, 1000)
        return labels
    link = bool(track) and p3.shape[0] > 1
    labels = _segment_sections(p3, params, stage_progress(progress, 0, 700 if link else 1000),
                               cancel)
    if link:
        labels = track_slices(labels, iou_threshold=iou, max_gap=max_gap,
                              min_slices=min_slices, progress=stage_progress(progress, 700, 300),
                              cancel=cancel)
    else:
        labels = relabel_sequential(labels)
    report(progress, 1000, 1000)
    return labels[0] if squeeze else labels


def _segment_sections(
    p3: np.ndarray,
    params: dict,
    progress: ProgressCallback | None,
    cancel: CancelCheck | None,
) -> np.ndarray:
    """2D cells of every section of (Z, Y, X), ids unique across the stack (uint32)."""
    out = np.zeros(p3.shape, np.uint32)
    offset = 0
    for z in range(p3.shape[0]):
        check_cancel(cancel)
        cells = _segment_region(p3[z], **params)
        out[z] = np.where(cells > 0, cells + np.uint32(offset), 0)
        offset += int(cells.max())
        report(progress, z + 1, p3.shape[0])
    return out
