"""npe2 reader: EM volumes (multi-page TIFF, slice folders, zarr, HDF5, MRC).

The manifest offers it to napari for EM containers (zarr, HDF5, MRC) and
folders (zarr stores, slice folders); plain image files (TIFF, PNG, JPEG)
are left to napari's own reader. Labels written by
:func:`napari_emseg.io.write_labels` open as a Labels layer at their voxel
size, whatever their name.

``get_reader`` returns ``None`` for anything it cannot read, after a cheap
probe (headers and metadata only), so napari can fall back to other readers.
The returned reader function never raises into napari: if reading fails after
the probe (e.g. corrupt pixel data) it emits a warning, which napari shows as
a notification, and returns ``None`` so napari reports "no data" cleanly.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import io

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict, str]
ReaderFunction = Callable[[Any], "list[LayerData] | None"]

#: Starts of file-name words (split at ``_ - . space``) that mark an integer
#: volume as a segmentation, opened as a Labels layer.
LABEL_WORDS = ("label", "mask", "instance", "seg", "annot", "gt", "groundtruth")


def _single_path(path: str | os.PathLike | Sequence[str | os.PathLike]) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        return Path(os.fspath(path))
    except TypeError:
        return None


def _keys(path: Path) -> list[str | None]:
    """Arrays to open: ``[None]`` for single-array inputs, else each key."""
    return list(io.list_keys(path)) or [None]


def _can_read(path: Path) -> bool:
    if not (path.is_file() or path.is_dir()):  # missing, or a pipe / socket / device
        return False
    if path.is_dir():
        if not (io.is_zarr_dir(path) or io.list_slices(path)):
            return False
    elif path.suffix.lower() not in io.VOLUME_SUFFIXES:
        return False
    # probe: opens headers / metadata (and at most one slice), reads no volume
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            keys = _keys(path)
        except Exception as exc:
            logger.debug("napari-emseg cannot read %s: %s", path, exc)
            return False
        for key in keys:
            try:
                io.read_volume(path, key=key, lazy=True)
                return True
            except Exception as exc:  # any failure means "not for us"
                logger.debug("napari-emseg cannot read %s [%s]: %s", path, key, exc)
    return False


def get_reader(path: str | os.PathLike | Sequence[str | os.PathLike]) -> ReaderFunction | None:
    """Return a reader function for ``path``, or ``None`` if it cannot be read.

    Parameters
    ----------
    path : str or list of str
        One file or folder (a list of exactly one path is accepted).

    Returns
    -------
    callable or None
        ``reader(path) -> [(data, metadata, layer_type)]``.
    """
    try:
        single = _single_path(path)
        if single is None or not _can_read(single):
            return None
    except Exception:  # never raise into napari
        return None
    return read_em_volume


def _layer_name(path: Path) -> str:
    name = path.name.rstrip("/")
    for suffix in io.VOLUME_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def layer_type_for(path: Path, dtype: Any) -> str:
    """``"labels"`` for integer volumes named like a segmentation, else ``"image"``."""
    stem = _layer_name(path).lower()
    words = stem.replace("-", "_").replace(".", "_").replace(" ", "_").split("_")
    named = any(w.startswith(LABEL_WORDS) for w in words if w)
    is_int = np.issubdtype(np.dtype(dtype), np.integer) or np.dtype(dtype).kind == "b"
    return "labels" if named and is_int else "image"


def _layer_type(path: Path, key: str | None, name: str, dtype: Any) -> str:
    """``"labels"`` for integer data marked as labels in the file, else by its name."""
    if np.dtype(dtype).kind in "iub" and io.is_labels_file(path, key):
        return "labels"
    return layer_type_for(Path(name.replace("/", "_")), dtype)


def read_em_volume(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[LayerData] | None:
    """Read an EM volume as napari layer data; warn and return ``None`` on failure.

    An HDF5 file or zarr group with several arrays gives one layer per 2D/3D
    array (named ``"<file>/<key>"``). A voxel size found in the metadata
    (ImageJ TIFF, MRC, OME-Zarr, HDF5 attributes) becomes the layer scale, in
    nm. Zarr stores and volumes over :data:`napari_emseg.io.LAZY_BYTES` open
    lazily as dask arrays.
    """
    single = _single_path(path)
    if single is None:
        warnings.warn(f"napari-emseg reads one file or folder at a time, got {path!r}",
                      stacklevel=2)
        return None
    try:
        keys = _keys(single)
    except Exception as exc:
        warnings.warn(f"napari-emseg could not read {single}: {exc}", stacklevel=2)
        return None
    lazy = True if io.is_zarr_dir(single) else None
    layers: list[LayerData] = []
    errors: list[str] = []
    for key in keys:
        try:
            data = io.read_volume(single, key=key, lazy=lazy)
        except Exception as exc:
            errors.append(str(exc))
            continue
        name = _layer_name(single) if key is None else f"{_layer_name(single)}/{key}"
        layer_type = _layer_type(single, key, name, data.dtype)
        meta: dict[str, Any] = {"name": name}
        sizes = io.read_voxel_size(single, key, ndim=data.ndim)
        if sizes:  # physical voxel size from the file's metadata, in nm
            meta.update(scale=sizes, units="nm")
        if not isinstance(data, np.ndarray):
            meta["multiscale"] = False
        if layer_type == "labels" and data.dtype.kind == "b":
            data = data.astype("uint8")
        layers.append((data, meta, layer_type))
    if errors and (not layers or len(keys) == 1):
        warnings.warn(f"napari-emseg could not read {single}: {errors[0]}", stacklevel=2)
    elif errors:
        warnings.warn(f"napari-emseg skipped {len(errors)} array(s) of {single}: {errors[0]}",
                      stacklevel=2)
    return layers or None
