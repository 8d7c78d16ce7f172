"""File formats: suffixes, markers and the small probes shared by readers and writers.

Nothing here reads pixel data; zarr and h5py are imported only when used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_JPEG_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Extensions accepted for the 2D images of a slice folder.
SLICE_SUFFIXES = TIFF_SUFFIXES + PNG_JPEG_SUFFIXES
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
MRC_SUFFIXES = (".mrc", ".rec", ".map", ".st", ".ali")
ZARR_SUFFIXES = (".zarr",)
#: Every file extension :func:`read_volume` understands (folders are accepted too).
VOLUME_SUFFIXES = SLICE_SUFFIXES + HDF5_SUFFIXES + MRC_SUFFIXES + ZARR_SUFFIXES

_ZARR_MARKERS = (".zarray", ".zgroup", "zarr.json")
#: Key of the TIFF description entry that marks a file written by :func:`write_labels`.
TIFF_LAYER_KEY = "napari_emseg_layer"
#: Attribute that marks a zarr store (array or group) written by napari-emseg.
ZARR_MARKER = "napari_emseg"


def natural_key(name: str) -> list[Any]:
    """Sort key ordering embedded numbers numerically (``z2`` before ``z10``)."""
    parts = re.split(r"(\d+)", name.lower())
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]


def zarr_major() -> int:
    """Major version of the installed zarr (2 or 3)."""
    import zarr

    return int(zarr.__version__.split(".")[0])


def is_zarr_dir(path: Path) -> bool:
    """Whether ``path`` is a zarr store: a ``.zarr`` folder or one holding zarr metadata."""
    return path.is_dir() and (
        path.suffix.lower() in ZARR_SUFFIXES or any((path / m).exists() for m in _ZARR_MARKERS)
    )


def list_slices(folder: Path) -> list[Path]:
    """The 2D images of a slice folder (hidden files skipped), in natural order."""
    files = [
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLICE_SUFFIXES
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def zarr_arrays(group: Any, prefix: str = "") -> list[str]:
    """Paths of every array in a zarr group and its subgroups, sorted."""
    names = [prefix + name for name, _ in group.arrays()]
    for name, sub in group.groups():
        names += zarr_arrays(sub, f"{prefix}{name}/")
    return sorted(names)


def ome_multiscales(attrs: Any) -> Any:
    """The OME-Zarr ``multiscales`` list of a group's attributes (v0.4 or v0.5), or None."""
    attrs = dict(attrs)
    return attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")


def ome_level0(attrs: Any) -> str | None:
    """Path of the full-resolution array of an OME-Zarr multiscale group, or None."""
    ms = ome_multiscales(attrs)
    try:
        return str(ms[0]["datasets"][0]["path"])
    except (TypeError, KeyError, IndexError):
        return None


def open_zarr(path: Path) -> Any:
    """Open a zarr array or group read-only; ``ValueError`` when it cannot be opened."""
    import zarr

    try:
        return zarr.open(str(path), mode="r")
    except Exception as exc:
        raise ValueError(f"cannot open zarr store {path}: {exc}") from exc


def h5_datasets(f: Any) -> list[str]:
    """Paths of every dataset in an open HDF5 file, in visiting order."""
    import h5py

    names: list[str] = []
    f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    return names
