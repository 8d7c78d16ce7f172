"""Voxel size from file metadata: ImageJ TIFF, MRC, OME-Zarr, HDF5 attributes.

Sizes are returned in nanometres, in ZYX order (YX for a 2D image), or
``None`` when the file does not say (or says something unusable, such as
TIFF's default 72 dpi). Never raises for missing or odd metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .formats import (
    HDF5_SUFFIXES,
    MRC_SUFFIXES,
    TIFF_SUFFIXES,
    h5_datasets,
    is_zarr_dir,
    ome_multiscales,
)

#: Nanometres per unit, for the unit names EM software writes.
NM_PER_UNIT = {
    "nm": 1.0, "nanometer": 1.0, "nanometre": 1.0,
    "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3, "micrometer": 1e3, "micrometre": 1e3,
    "\\u00b5m": 1e3, "mm": 1e6, "millimeter": 1e6, "cm": 1e7, "centimeter": 1e7,
    "a": 0.1, "å": 0.1, "angstrom": 0.1,
}


def _nm(unit: Any) -> float | None:
    return NM_PER_UNIT.get(str(unit).strip().lower()) if unit is not None else None


def _valid(sizes: list[float] | tuple[float, ...] | None) -> tuple[float, ...] | None:
    if not sizes or any(not 0 < s < float("inf") for s in sizes):  # NaN fails too
        return None
    return tuple(round(float(s), 6) for s in sizes)


def read_voxel_size(path: str | os.PathLike, key: str | None = None,
                    ndim: int = 3) -> tuple[float, ...] | None:
    """Voxel size in nm (``ndim`` values, ZYX order) from a volume's metadata.

    Parameters
    ----------
    path : str or path-like
        A file or store :func:`napari_emseg.io.read_volume` reads.
    key : str, optional
        Dataset inside an HDF5 file or zarr group.
    ndim : int
        2 for a single image (YX), 3 for a stack (ZYX).

    Returns
    -------
    tuple of float or None
        ``None`` when the metadata does not give every axis (a 3D stack
        needs a z spacing as well).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            sizes = _zarr_size(path, key) if is_zarr_dir(path) else None
        elif suffix in TIFF_SUFFIXES:
            sizes = _tiff_size(path)
        elif suffix in MRC_SUFFIXES:
            sizes = _mrc_size(path)
        elif suffix in HDF5_SUFFIXES:
            sizes = _hdf5_size(path, key)
        else:
            sizes = None
    except Exception:  # metadata is a convenience: unreadable means unknown
        return None
    sizes = _valid(sizes)
    if sizes is None or len(sizes) < ndim:
        return None
    return sizes[-ndim:]


def _tiff_size(path: Path) -> list[float] | None:
    """Voxel size from a TIFF's metadata.

    In order: ``voxel_size_nm`` (labels written by napari-emseg), ImageJ
    (``unit``, ``spacing``), or centimetre-based resolution tags.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        shaped = tif.shaped_metadata if tif.is_shaped else None
        if shaped and shaped[0].get("voxel_size_nm"):
            return [float(s) for s in shaped[0]["voxel_size_nm"]]
        page = tif.pages[0]
        ij = tif.imagej_metadata or {}
        tags = page.tags
        if "XResolution" not in tags or "YResolution" not in tags:
            return None
        per_unit = []
        for name in ("YResolution", "XResolution"):
            num, den = tags[name].value
            per_unit.append(num / den if den else 0.0)
        res_unit = int(getattr(tags.get("ResolutionUnit"), "value", 1))
        stack = len(tif.series[0].shape) >= 3
    if ij.get("unit") is not None:
        scale = _nm(ij["unit"])
    else:  # plain TIFF: only centimetres mean a physical size (inch is mostly 72 dpi)
        scale = 1e7 if res_unit == 3 else None
    if scale is None or min(per_unit) <= 0:
        return None
    yx = [scale / p for p in per_unit]
    if stack or "spacing" in ij:
        if "spacing" not in ij:
            return yx  # a stack without z spacing: only 2D sizes are known
        return [float(ij["spacing"]) * scale, *yx]
    return yx


def _mrc_size(path: Path) -> list[float] | None:
    """MRC header voxel size (Å) → nm."""
    import mrcfile

    with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
        v = mrc.voxel_size
        xyz = [float(v.x), float(v.y), float(v.z)]
    return [s * 0.1 for s in reversed(xyz)]


def _ome_scale(attrs: dict) -> list[float] | None:
    """Level-0 scale of an OME-Zarr multiscale, spatial axes only, in nm."""
    ms = ome_multiscales(attrs)
    if not ms:
        return None
    axes = ms[0].get("axes") or []
    transforms = ms[0]["datasets"][0].get("coordinateTransformations") or []
    scale = next((t["scale"] for t in transforms if t.get("type") == "scale"), None)
    if scale is None:
        return None
    if not axes or isinstance(axes[0], str):  # v0.3: names only, units unknown
        return None
    out = []
    for ax, s in zip(axes, scale, strict=True):
        if ax.get("type") == "space":
            factor = _nm(ax.get("unit"))
            if factor is None:
                return None
            out.append(float(s) * factor)
    return out


def _zarr_size(path: Path, key: str | None) -> list[float] | None:
    import zarr

    node = zarr.open(str(path), mode="r")
    for attrs in _attr_chain(node, key):
        sizes = _ome_scale(attrs) or _attr_size(attrs)
        if sizes:
            return sizes
    return None


def _attr_chain(node: Any, key: str | None) -> list[dict]:
    """Attributes of the array ``key`` (if any), then of the group itself."""
    chain = []
    if key is not None:
        chain.append(dict(node[key].attrs))
    chain.append(dict(node.attrs))
    return chain


def _attr_size(attrs: dict) -> list[float] | None:
    """``element_size_um`` (Fiji/ilastik, µm) or ``resolution`` (CREMI, nm) attributes."""
    if "element_size_um" in attrs:
        return [float(s) * 1e3 for s in attrs["element_size_um"]]
    if "resolution" in attrs:
        unit = attrs.get("unit") or attrs.get("units") or "nm"
        factor = _nm(unit if isinstance(unit, str) else "nm")
        if factor is None:
            return None
        return [float(s) * factor for s in attrs["resolution"]]
    return None


def _hdf5_size(path: Path, key: str | None) -> list[float] | None:
    import h5py

    with h5py.File(path, "r") as f:
        if key is None:
            names = h5_datasets(f)
            key = names[0] if len(names) == 1 else None
        for attrs in _attr_chain(f, key):
            sizes = _attr_size({k: _plain(v) for k, v in attrs.items()})
            if sizes:
                return sizes
    return None


def _plain(value: Any) -> Any:
    """HDF5 attribute values (numpy arrays, bytes) as lists and str."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def relative_spacing(sizes) -> tuple[float, ...]:
    """Voxel size divided by its smallest axis: (6, 1, 1) for 30×5×5 nm.

    Post-processing parameters (``h``, ``min_distance``) stay in voxels of the
    finest axis while 3D distances become anisotropic.
    """
    sizes = tuple(float(s) for s in sizes)
    return tuple(round(s / min(sizes), 6) for s in sizes)


def scale_text(sizes: tuple[float, ...] | None) -> str:
    """'z 30 × y 5 × x 5 nm' (for messages), or 'unknown'."""
    if not sizes:
        return "unknown"
    axes = "zyx"[-len(sizes):]
    return " × ".join(f"{a} {s:g}" for a, s in zip(axes, sizes, strict=True)) + " nm"
