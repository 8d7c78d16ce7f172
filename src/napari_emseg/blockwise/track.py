"""Linking per-slice instances of a large label volume into 3D objects, zarr to zarr."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._shapes import parse_shape
from ..io import atomic_path, open_zarr_output
from ..progress import CancelCheck, ProgressCallback
from ..tracking import track_slices
from .arrays import check_zarr_target, open_array, open_source, read_region

__all__ = ["SlabReader", "SlabWriter", "track_blockwise"]


class SlabReader:
    """``labels[z]`` served from slabs of ``step`` slices (one chunk read per slab)."""

    def __init__(self, arr, step: int) -> None:
        self.arr, self.step = arr, max(1, int(step))
        self.shape, self.dtype = tuple(arr.shape), arr.dtype
        self._z0, self._slab = -1, None

    def __getitem__(self, z):
        if not isinstance(z, (int, np.integer)):
            return read_region(self.arr, z)
        z0 = (int(z) // self.step) * self.step
        if z0 != self._z0:
            self._slab = read_region(self.arr, slice(z0, z0 + self.step))
            self._z0 = z0
        return self._slab[int(z) - z0]


class SlabWriter:
    """``out[z] = slice`` buffered into slabs of ``step`` slices (whole chunks written)."""

    def __init__(self, arr, step: int) -> None:
        self.arr, self.step = arr, max(1, int(step))
        self.shape, self.dtype = tuple(arr.shape), arr.dtype
        self._z0, self._buf = -1, None

    def __setitem__(self, z, value) -> None:
        z = int(z)
        z0 = (z // self.step) * self.step
        if z0 != self._z0:
            self.flush()
            n = min(self.step, self.shape[0] - z0)
            self._z0, self._buf = z0, np.zeros((n, *self.shape[1:]), self.dtype)
        self._buf[z - z0] = value

    def flush(self) -> None:
        """Write the buffered slab."""
        if self._buf is not None:
            self.arr[self._z0 : self._z0 + len(self._buf)] = self._buf
            self._buf, self._z0 = None, -1


def track_blockwise(
    source,
    target: str | os.PathLike,
    *,
    iou_threshold: float = 0.3,
    max_gap: int = 1,
    min_slices: int = 1,
    key: str | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    zarr_format: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
):
    """Link per-slice instances of a large label volume into 3D objects, zarr to zarr.

    Streams slices through :func:`napari_emseg.tracking.track_slices` (a few
    slabs in memory, whatever the number of slices).

    Parameters
    ----------
    source : str, path or array-like of int, (Z, Y, X)
        2D instance ids per slice (e.g. ``label_blockwise(..., dims=2)``).
    target : str or path
        ``.zarr`` folder for uint32 object ids, written atomically.
    iou_threshold, max_gap, min_slices
        See :func:`~napari_emseg.tracking.track_slices`.
    chunks : 3 ints, optional
        Target chunks; default the source's chunks (else ``(16, 512, 512)``).
    key, overwrite, zarr_format, progress, cancel
        As in :func:`predict_blockwise`.

    Returns
    -------
    zarr.Array
        uint32 object ids, opened read-only.
    """
    target = Path(target).expanduser()
    check_zarr_target(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    src = open_source(source, key, what="labels")
    if np.dtype(src.array.dtype).kind not in "biu":
        raise ValueError(f"labels must hold integer ids, got dtype {src.array.dtype}")
    shape = src.shape
    src_chunks = _regular_chunks(src.array)
    if chunks is None:
        chunks = tuple(src_chunks) if src_chunks else (16, 512, 512)
    chunks = tuple(min(int(c), s) for c, s in zip(parse_shape(chunks, 3, "chunks"), shape,
                                                   strict=True))
    with atomic_path(target) as tmp:
        out = open_zarr_output(tmp, shape, np.uint32, chunks=chunks, overwrite=True,
                               zarr_format=zarr_format)
        reader = SlabReader(src.array, (src_chunks or chunks)[0])
        writer = SlabWriter(out, chunks[0])
        track_slices(reader, iou_threshold=iou_threshold, max_gap=max_gap,
                     min_slices=min_slices, out=writer, progress=progress, cancel=cancel)
        writer.flush()
    return open_array(target, mode="r")


def _regular_chunks(arr) -> tuple | None:
    """The chunk shape of a zarr / dask / h5py array when it is one shape, else None."""
    chunks = getattr(arr, "chunksize", None) or getattr(arr, "chunks", None)
    if not chunks or not all(np.isscalar(c) for c in chunks):
        return None
    return chunks
