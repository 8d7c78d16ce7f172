"""npe2 writer: save a Labels layer atomically as TIFF or zarr, with its voxel size."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import io
from .io.voxel import NM_PER_UNIT


def write_labels(path: str | os.PathLike, data: Any, meta: dict) -> list[str]:
    """Save one Labels layer (npe2 single-layer writer).

    Parameters
    ----------
    path : str
        Target ending in ``.tif``, ``.tiff`` or ``.zarr``.
    data : array-like, shape (Z, Y, X) or (Y, X)
        Label ids (numpy or dask); for a multiscale layer the full-resolution
        level is saved.
    meta : dict
        Layer attributes from napari: ``multiscale``, and ``scale`` / ``units``
        for the voxel size (see :func:`layer_voxel_size`).

    Returns
    -------
    list of str
        The written path; an existing file is replaced only once the new one
        is complete. It reopens as a Labels layer at the same scale.
    """
    meta = meta or {}
    if meta.get("multiscale") or isinstance(data, (list, tuple)):
        data = data[0]
    sizes = layer_voxel_size(meta.get("scale"), meta.get("units"), len(data.shape))
    return [str(io.write_labels(path, data, voxel_size=sizes, overwrite=True))]


def layer_voxel_size(scale: Sequence[float] | None, units: Sequence[Any] | None,
                     ndim: int) -> tuple[float, ...] | None:
    """Voxel size in nm of a layer's last ``ndim`` axes, or None when unknown.

    Parameters
    ----------
    scale : sequence of float
        The layer's scale.
    units : sequence of str or pint units, optional
        The layer's units. Length units convert to nm; napari's default
        ``pixel`` means the scale is already in nm (as this plugin's reader
        sets it), unless every scale value is 1 (no voxel size known).
    ndim : int
        Axes of the saved data (2 or 3).
    """
    scale = [float(s) for s in (scale if scale is not None else [])][-ndim:]
    if len(scale) != ndim:
        return None
    factors = [NM_PER_UNIT.get(str(u).strip().lower()) for u in list(units or [])[-ndim:]]
    if not any(factors):  # pixels (or no units at all)
        if all(s == 1.0 for s in scale):
            return None
        factors = [1.0] * ndim
    if len(factors) != ndim or None in factors:
        return None
    return tuple(round(s * f, 6) for s, f in zip(scale, factors, strict=True))
