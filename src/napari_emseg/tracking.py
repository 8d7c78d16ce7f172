"""Link 2D instances slice by slice into 3D objects (Hungarian IoU matching).

For each slice the overlaps with earlier slices are counted from the pairs
of ids found at the same pixels (``np.unique`` of combined keys over the
pixels where both slices hold an object): linear in the number of pixels,
never a loop over pairs of objects.  The IoU matrix between the objects of
slice ``z`` and the still open objects is solved with
``scipy.optimize.linear_sum_assignment`` and matches with IoU >= threshold
are accepted.  Objects unmatched in slice ``z - 1`` stay open for
``max_gap`` more slices (their last footprint is compared with later
slices), so an object missing from one slice keeps its id.  Unmatched
instances start new objects; objects spanning fewer than ``min_slices``
slices (first to last, gaps included) are removed.

The input is read one slice at a time (``labels[z]``), twice: the first pass
decides the matches keeping only ``max_gap + 1`` slices in memory, the second
writes the relabelled slices into ``out``.  Any array-like with ``.shape``
and ``labels[z]`` works (numpy, dask, zarr), and ``out`` may be a zarr array
for volumes larger than memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .progress import CancelCheck, ProgressCallback, check_cancel, report

__all__ = ["match_slices", "slice_overlaps", "track_slices"]


@dataclass
class _Slice:
    z: int
    compact: np.ndarray  # int32 (Y, X): 0 = background, k = k-th object (1-based)
    areas: np.ndarray  # int64 (n,): pixel count of each object
    tracks: np.ndarray  # int64 (n,): track index of each object


def _compact(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted ids, compact image, areas) of one 2D label slice."""
    fg = s != 0
    vals = s[fg]
    ids, inv, areas = np.unique(vals, return_inverse=True, return_counts=True)
    compact = np.zeros(s.shape, dtype=np.int32)
    compact[fg] = inv.ravel().astype(np.int32) + 1
    return ids, compact, areas.astype(np.int64)


def slice_overlaps(
    a: np.ndarray, b: np.ndarray, n_b: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse overlap counts between two compact label images.

    Parameters
    ----------
    a, b : ndarray of int, same shape
        Compact ids (0 = background, objects 1..n).
    n_b : int, optional
        Largest id in ``b`` (computed when omitted).

    Returns
    -------
    rows, cols, counts : ndarray of int64, (k,)
        0-based object indices in ``a`` and ``b`` and the number of pixels
        they share, one entry per overlapping pair.
    """
    if a.shape != b.shape:
        raise ValueError(f"slice shapes differ: {a.shape} vs {b.shape}")
    both = (a != 0) & (b != 0)
    if n_b is None:
        n_b = int(b.max()) if b.size else 0
    keys = a[both].astype(np.int64) * (n_b + 1) + b[both]
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq // (n_b + 1) - 1, uniq % (n_b + 1) - 1, counts.astype(np.int64)


def match_slices(
    rows: np.ndarray,
    cols: np.ndarray,
    iou: np.ndarray,
    iou_threshold: float,
    *,
    most_pairs: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching maximising the total IoU (Hungarian algorithm).

    Parameters
    ----------
    rows, cols, iou : ndarray, (k,)
        Candidate pairs (object indices) and their IoU.
    iou_threshold : float
        Pairs below it are never matched.
    most_pairs : bool
        Match as many pairs as possible first, then the highest total IoU
        (object-detection scores); else the highest total IoU (tracking).

    Returns
    -------
    matched_rows, matched_cols : ndarray of int64
    """
    keep = iou >= iou_threshold
    rows, cols, iou = rows[keep], cols[keep], iou[keep]
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    # a bonus larger than any total IoU makes the number of pairs come first
    bonus = min(ur.size, uc.size) + 1.0 if most_pairs else 0.0
    weight = np.zeros((ur.size, uc.size), dtype=np.float64)
    weight[ri, ci] = bonus + iou
    r, c = linear_sum_assignment(weight, maximize=True)
    ok = (weight[r, c] - bonus >= iou_threshold) & (weight[r, c] > 0)
    return ur[r[ok]].astype(np.int64), uc[c[ok]].astype(np.int64)


def track_slices(
    labels,
    *,
    iou_threshold: float = 0.3,
    max_gap: int = 1,
    min_slices: int = 1,
    out=None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Give 2D instances consistent 3D ids by matching consecutive slices.

    Parameters
    ----------
    labels : array-like of int, (Z, Y, X)
        2D instance ids per slice (ids may repeat between slices or be unique
        across the stack; 0 = background).  Read with ``labels[z]``.
    iou_threshold : float in (0, 1]
        Minimum IoU for two instances to be the same object.
    max_gap : int
        How many missing slices an object may skip and keep its id
        (0 = only directly adjacent slices are linked).
    min_slices : int
        Objects spanning fewer slices (first to last) are removed.
    out : array-like, (Z, Y, X), optional
        Where to write the result (e.g. a uint32 zarr array); returned.
    progress, cancel
        Callbacks (two passes over z are reported as ``2 * Z`` steps).

    Returns
    -------
    ndarray of uint32 (or ``out``), (Z, Y, X)
        Object ids 1..N numbered by first appearance.
    """
    shape = tuple(labels.shape)
    if len(shape) != 3:
        raise ValueError(f"labels must be a 3D (Z, Y, X) stack of 2D instances; got {shape}")
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1]; got {iou_threshold}")
    if int(max_gap) < 0 or int(min_slices) < 1:
        raise ValueError("max_gap must be >= 0 and min_slices >= 1")
    dtype = getattr(labels, "dtype", None)
    if dtype is not None and not (
        np.issubdtype(np.dtype(dtype), np.integer) or np.dtype(dtype) == np.bool_
    ):
        raise ValueError(f"labels must hold integer ids; got dtype {dtype}")
    if out is None:
        out = np.zeros(shape, dtype=np.uint32)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out shape {tuple(out.shape)} does not match labels shape {shape}")
    nz = shape[0]
    if nz == 0:
        return out

    max_gap = int(max_gap)
    n_tracks = 0
    first = np.zeros(1024, dtype=np.int64)  # first slice of each track
    last = np.zeros(1024, dtype=np.int64)  # last slice of each track
    per_slice: list[tuple[np.ndarray, np.ndarray]] = []  # (ids, track of each id)
    window: deque[_Slice] = deque(maxlen=max_gap + 1)

    # pass 1: decide the matches
    for z in range(nz):
        check_cancel(cancel)
        ids, compact, areas = _compact(np.asarray(labels[z]))
        tracks = np.full(ids.size, -1, dtype=np.int64)
        for prev in reversed(window):  # nearest slice first
            todo = tracks < 0
            if not todo.any():
                break
            open_prev = last[prev.tracks] == prev.z
            if not open_prev.any():
                continue
            rows, cols, inter = slice_overlaps(compact, prev.compact, prev.areas.size)
            sel = todo[rows] & open_prev[cols]
            rows, cols, inter = rows[sel], cols[sel], inter[sel]
            iou = inter / (areas[rows] + prev.areas[cols] - inter)
            r, c = match_slices(rows, cols, iou, iou_threshold)
            tracks[r] = prev.tracks[c]
            last[prev.tracks[c]] = z
        new = np.flatnonzero(tracks < 0)
        if n_tracks + new.size > last.size:
            grow = max(last.size, new.size)
            first = np.concatenate([first, np.zeros(grow, np.int64)])
            last = np.concatenate([last, np.zeros(grow, np.int64)])
        tracks[new] = np.arange(n_tracks, n_tracks + new.size)
        first[tracks[new]] = z
        last[tracks[new]] = z
        n_tracks += new.size
        window.append(_Slice(z, compact, areas, tracks))
        per_slice.append((ids, tracks))
        report(progress, z + 1, 2 * nz)

    # drop short objects, number the rest 1..N by first appearance
    span = last[:n_tracks] - first[:n_tracks] + 1
    keep = span >= int(min_slices)
    final = np.zeros(span.size, dtype=np.uint32)
    final[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    window.clear()

    # pass 2: write the relabelled slices
    for z in range(nz):
        check_cancel(cancel)
        ids, tracks = per_slice[z]
        s = np.asarray(labels[z])
        res = np.zeros(s.shape, dtype=np.uint32)
        if ids.size:
            fg = s != 0
            res[fg] = final[tracks][np.searchsorted(ids, s[fg])]
        out[z] = res
        report(progress, nz + z + 1, 2 * nz)
    return out
