"""What blocks are read from (sources) and written to (zarr targets).

A source is a path (opened lazily, once per process) or an array (numpy,
dask, zarr, h5py ...).  Workers of a cluster re-open it from its ``spec``;
sources they cannot open (in-memory arrays) are read on the driver.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._normalize import MAX_SAMPLE, sample_slices
from ..io import read_volume
from .grid import block_core, block_outer

__all__ = [
    "Source",
    "check_zarr_target",
    "driver_reader",
    "existing_array",
    "open_array",
    "open_source",
    "read_region",
    "remove_path",
    "strided_sample",
    "worker_region",
]

# per worker-process cache: sources opened once
_SOURCE_CACHE: dict[tuple, Any] = {}


def read_region(arr, sl) -> np.ndarray:
    """``arr[sl]`` as numpy; dask arrays are computed synchronously (safe in workers)."""
    part = arr[sl]
    if hasattr(part, "compute"):
        part = part.compute(scheduler="synchronous")
    return np.asarray(part)


def _open_path(path: str, key: str | None):
    cached = _SOURCE_CACHE.get((path, key))
    if cached is None:
        cached = read_volume(path, key=key, lazy=True)
        _SOURCE_CACHE[(path, key)] = cached
    return cached


@dataclass
class Source:
    """A 3D volume to read blocks from."""

    array: Any  # what the driver reads from (dask, numpy, zarr, h5py ...)
    spec: tuple | None  # how a worker re-opens it; None = the driver ships block data

    @property
    def shape(self) -> tuple[int, ...]:
        """The volume's shape (Z, Y, X)."""
        return tuple(int(s) for s in self.array.shape)

    def region(self, sl) -> np.ndarray:
        """The voxels at ``sl`` as numpy."""
        return read_region(self.array, sl)


def open_source(source, key: str | None, what: str = "source") -> Source:
    """Open a path or wrap an array as a :class:`Source`, checking it is a 3D volume of numbers."""
    if isinstance(source, (str, os.PathLike)):
        path = str(Path(source).expanduser())
        arr = _open_path(path, key)
        spec: tuple | None = ("path", path, key)
    else:
        if key is not None:
            raise ValueError(f"key={key!r} applies only when {what} is a path")
        arr = source
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            arr = np.asarray(arr)
        spec = ("array", arr) if type(arr).__module__.startswith("zarr") else None
    _check_volume(arr, what)
    return Source(arr, spec)


def _check_volume(arr, what: str) -> None:
    shape = tuple(arr.shape)
    if len(shape) != 3:
        raise ValueError(
            f"blockwise processing needs a 3D (Z, Y, X) {what}, got shape {shape}; "
            "use predict_volume / segment for 2D images"
        )
    if 0 in shape:
        raise ValueError(f"{what} is empty (shape {shape})")
    if np.dtype(arr.dtype).kind not in "biuf":
        raise ValueError(f"{what} must hold numbers, got dtype {arr.dtype}")


def driver_reader(src: Source, block, halo, client) -> Callable | None:
    """Reads a block with its halo on the driver when cluster workers cannot open ``src``.

    None when workers read for themselves (local threads, or a source with a spec).
    """
    if client is None or src.spec is not None:
        return None

    def read(index) -> np.ndarray:
        return src.region(block_outer(block_core(index, src.shape, block), src.shape, halo)[0])

    return read


def worker_region(spec: tuple, sl) -> np.ndarray:
    """Read ``sl`` of a source from its spec (in a worker process)."""
    if spec[0] == "path":
        return read_region(_open_path(spec[1], spec[2]), sl)
    return read_region(spec[1], sl)


def strided_sample(arr, max_voxels: int = MAX_SAMPLE) -> np.ndarray:
    """:func:`~napari_emseg._normalize.sample_slices` of ``arr``, read with :func:`read_region`."""
    return read_region(arr, sample_slices(arr.shape, max_voxels))


def open_array(path: str | Path, mode: str = "r+"):
    """The zarr array at ``path``."""
    import zarr

    return zarr.open_array(str(path), mode=mode)


def existing_array(path: Path):
    """The zarr array at ``path``, or None when it is something else."""
    try:
        return open_array(path, mode="r")
    except Exception:
        return None


def remove_path(path: Path) -> None:
    """Delete a file or folder (nothing when missing)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def check_zarr_target(target: Path) -> None:
    """Refuse targets that are not ``.zarr`` folders."""
    if target.suffix.lower() != ".zarr":
        raise ValueError(f"blockwise output must be a .zarr folder, got {target.name!r}")
