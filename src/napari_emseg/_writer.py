"""npe2 writer: save a Labels layer atomically as TIFF or zarr."""

from __future__ import annotations

import os
from typing import Any

from . import io


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
        Layer attributes from napari (unused apart from ``multiscale``).

    Returns
    -------
    list of str
        The written path; an existing file is replaced only once the new one
        is complete.
    """
    if (meta or {}).get("multiscale") or isinstance(data, (list, tuple)):
        data = data[0]
    return [str(io.write_labels(path, data, overwrite=True))]
