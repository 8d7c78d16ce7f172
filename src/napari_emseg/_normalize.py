"""Intensity normalisation shared by training, prediction and blockwise runs.

Only finite grey values count: NaN and Inf voxels are left out of the range
and normalised to 0, i.e. treated as the volume's low grey value.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

MAX_SAMPLE = 4_000_000
#: Grey values at the 1st and 99.8th percentile map to 0 and 1 unless a model says otherwise.
DEFAULT_NORMALIZATION = {"mode": "percentile", "low": 1.0, "high": 99.8}


def sample_slices(shape: Sequence[int], max_voxels: int = MAX_SAMPLE) -> tuple[slice, ...]:
    """Every n-th voxel along each axis, n the smallest step giving at most ``max_voxels``."""
    step = 1
    while np.prod([max(1, s // step) for s in shape]) > max_voxels:
        step += 1
    return tuple(slice(None, None, step) for _ in shape)


def _sample(volume) -> np.ndarray:
    """A strided subsample of ``volume`` (numpy, dask or zarr) of at most ~4 M voxels."""
    sample = volume[sample_slices(volume.shape)]
    if hasattr(sample, "compute"):
        sample = sample.compute()
    return np.asarray(sample)


def normalization_range(volume, spec: dict | None) -> tuple[float, float]:
    """Low and high grey values that map to 0 and 1.

    Parameters
    ----------
    volume : array-like, (Z, Y, X) or (Y, X)
        Raw grey values (numpy, dask or zarr).
    spec : dict
        ``{"mode": "percentile", "low": 1, "high": 99.8}`` (default),
        ``{"mode": "minmax"}``, ``{"mode": "fixed", "low": 0, "high": 255}`` or
        ``{"mode": "none"}``.
    """
    spec = spec or DEFAULT_NORMALIZATION
    mode = spec.get("mode", "percentile")
    if mode == "none":
        return 0.0, 1.0
    if mode == "fixed":
        return float(spec["low"]), float(spec["high"])
    sample = _finite(_sample(volume).astype(np.float32, copy=False))
    if mode == "minmax":
        lo, hi = float(sample.min()), float(sample.max())
    elif mode == "percentile":
        lo, hi = (float(v) for v in np.percentile(sample, [spec.get("low", 1.0),
                                                             spec.get("high", 99.8)]))
    else:
        raise ValueError(f"unknown normalization mode {mode!r}")
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _finite(sample: np.ndarray) -> np.ndarray:
    """The finite values of a float sample; an error when there are none."""
    keep = np.isfinite(sample)
    if keep.all():
        return sample
    if not keep.any():
        raise ValueError("the volume holds no finite grey values (only NaN/Inf)")
    return sample[keep]


def count_nonfinite(volume) -> int:
    """Number of NaN/Inf voxels of an in-memory array (0 for integer types)."""
    volume = np.asarray(volume)
    if volume.dtype.kind not in "fc":
        return 0
    return int(volume.size - np.count_nonzero(np.isfinite(volume)))


def warn_nonfinite(volume, what: str = "volume") -> int:
    """Warn when ``volume`` holds NaN/Inf voxels; returns how many."""
    n = count_nonfinite(volume)
    if n:
        warnings.warn(f"{what} has {n} NaN/Inf voxel(s) of {np.size(volume)}; they are "
                      "treated as its low grey value", stacklevel=3)
    return n


def apply_normalization(block, lo: float, hi: float) -> np.ndarray:
    """``(block - lo) / (hi - lo)`` as float32 (a new array); NaN/Inf become 0."""
    block = np.asarray(block)
    out = np.asarray(block, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    if block.dtype.kind in "fc":
        out[~np.isfinite(out)] = 0.0
    return out


def normalize(volume, spec: dict | None) -> np.ndarray:
    """Normalise a whole (in-memory) volume with :func:`normalization_range`."""
    lo, hi = normalization_range(volume, spec)
    return apply_normalization(volume, lo, hi)
