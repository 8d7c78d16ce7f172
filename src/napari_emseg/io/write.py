"""Write label and probability volumes atomically as TIFF or zarr.

Data goes to a temporary sibling that is renamed onto the target only once
complete, so a failed write never leaves a partial file and keeps an older
file intact.  Labels are marked as labels (TIFF description entry, OME-NGFF
label image for zarr) and every file keeps its voxel size.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .formats import (
    TIFF_LAYER_KEY,
    TIFF_SUFFIXES,
    ZARR_MARKER,
    ZARR_SUFFIXES,
    is_zarr_dir,
    open_zarr,
    zarr_major,
)


def is_emseg_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr store that napari-emseg wrote (safe to replace).

    True for stores carrying :data:`ZARR_MARKER` (every zarr this module
    writes) or the attributes of a blockwise job.
    """
    path = Path(path)
    if not is_zarr_dir(path):
        return False
    try:
        attrs = dict(open_zarr(path).attrs)
    except ValueError:
        return False
    return any(k == ZARR_MARKER or k.startswith("emseg_blockwise") for k in attrs)


def _output_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in ZARR_SUFFIXES:
        return "zarr"
    raise ValueError(
        f"cannot write {path.name!r}: use a .tif, .tiff or .zarr file name"
    )


def _target(path: str | os.PathLike, overwrite: bool) -> tuple[Path, str]:
    """The output path and its kind ("tiff" or "zarr"), checked before any work."""
    path = Path(path)
    kind = _output_kind(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    return path, kind


def _labels_dtype(labels: Any) -> np.dtype:
    dtype = np.dtype(labels.dtype)
    if dtype.kind == "b":
        return np.dtype(np.uint16)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"labels must be integer-typed, got {dtype}")
    if labels.size == 0:
        raise ValueError(f"labels are empty (shape {tuple(labels.shape)})")
    lo, hi = labels.min(), labels.max()
    if hasattr(lo, "compute"):
        import dask

        lo, hi = dask.compute(lo, hi)
    if lo < 0:
        raise ValueError(f"labels must be >= 0, found {int(lo)}")
    if hi > np.iinfo(np.uint32).max:
        raise ValueError(f"label id {int(hi)} does not fit uint32")
    return np.dtype(np.uint16) if hi <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def write_labels(
    path: str | os.PathLike,
    labels: Any,
    *,
    voxel_size: Sequence[float] | None = None,
    overwrite: bool = True,
    compression: str = "zlib",
    chunks: Sequence[int] | None = None,
    zarr_format: int | None = None,
) -> Path:
    """Save a label volume atomically as TIFF or zarr.

    Parameters
    ----------
    path : str or path-like
        ``.tif``/``.tiff`` (multi-page, one page per z-slice) or ``.zarr``.
    labels : array-like, shape (Z, Y, X) or (Y, X)
        Non-negative integer ids (0 = background); numpy or dask. Saved as
        uint16 when every id fits, else uint32.
    voxel_size : sequence of float, optional
        Size of a voxel in nm, one value per axis (ZYX or YX); read back by
        :func:`read_voxel_size`. The file is marked as labels either way
        (TIFF description entry, or an OME-NGFF label image for zarr).
    overwrite : bool
        Replace an existing file (atomically). ``False`` raises
        ``FileExistsError`` instead.
    compression : str
        TIFF compression (``"zlib"``, ``"zstd"``, ``"lzw"``, ``"none"``);
        zarr stores use the library's default codec.
    chunks : sequence of int, optional
        zarr chunk shape (default: 1 × up to 512 × 512 per z-slice).
    zarr_format : int, optional
        2 or 3 for ``.zarr`` output; the installed zarr's default when ``None``.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path, kind = _target(path, overwrite)
    labels = _as_array(labels, "labels")
    sizes = _voxel_sizes(voxel_size, labels.ndim)
    dtype = _labels_dtype(labels)
    if kind == "tiff":
        _write_tiff(path, labels, dtype, compression, predictor=False,
                    **_labels_tiff_tags(sizes, labels.ndim))
    else:
        _write_ome_labels(path, labels, dtype, chunks, zarr_format, sizes)
    return path


def _voxel_sizes(voxel_size: Sequence[float] | None, ndim: int) -> list[float] | None:
    """``voxel_size`` checked: ``ndim`` finite sizes > 0 (nm), or None."""
    if voxel_size is None:
        return None
    sizes = [float(s) for s in voxel_size]
    if len(sizes) != ndim or not all(0 < s < float("inf") for s in sizes):
        raise ValueError(f"voxel_size must be {ndim} positive sizes in nm (one per axis), "
                         f"got {list(voxel_size)}")
    return sizes


def _labels_tiff_tags(sizes: list[float] | None, ndim: int) -> dict[str, Any]:
    """imwrite arguments marking labels and (if known) their voxel size."""
    tags = _voxel_tiff_tags(sizes)
    tags["metadata"] = {TIFF_LAYER_KEY: "labels", **tags.get("metadata", {})}
    return tags


def _voxel_tiff_tags(sizes: list[float] | None) -> dict[str, Any]:
    """imwrite arguments giving the voxel size (nothing when unknown)."""
    if sizes is None:
        return {}
    nm_per_cm = 1e7  # resolution tags: pixels per centimetre, read by Fiji and others
    return {"metadata": {"voxel_size_nm": sizes},
            "resolution": (nm_per_cm / sizes[-1], nm_per_cm / sizes[-2]),
            "resolutionunit": "CENTIMETER"}


def _voxel_zarr_attrs(sizes: list[float] | None) -> dict[str, Any]:
    """Array attributes giving the voxel size in nm (read back by :func:`read_voxel_size`)."""
    return {} if sizes is None else {"resolution": sizes, "unit": "nm"}


def write_volume(
    path: str | os.PathLike,
    array: Any,
    *,
    voxel_size: Sequence[float] | None = None,
    overwrite: bool = True,
    compression: str = "zlib",
    chunks: Sequence[int] | None = None,
    zarr_format: int | None = None,
) -> Path:
    """Save an image or probability volume atomically as TIFF or zarr.

    Parameters
    ----------
    path : str or path-like
        ``.tif``/``.tiff`` or ``.zarr``.
    array : array-like, shape (Z, Y, X), (Y, X) or (C, Z, Y, X)
        Floats are saved as float32, booleans as uint8, integers unchanged.
    voxel_size : sequence of float, optional
        Size of a voxel in nm for the spatial axes (ZYX or YX); read back by
        :func:`read_voxel_size`.
    overwrite, compression, chunks, zarr_format
        As in :func:`write_labels`.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path, kind = _target(path, overwrite)
    array = _as_array(array, "array", max_ndim=4)
    sizes = _voxel_sizes(voxel_size, min(array.ndim, 3))
    dtype = np.dtype(array.dtype)
    if dtype.kind == "b":
        dtype = np.dtype(np.uint8)
    elif np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float32)
    elif not np.issubdtype(dtype, np.integer):
        raise ValueError(f"cannot save data of type {dtype}")
    if kind == "tiff":
        _write_tiff(path, array, dtype, compression, predictor=True,
                    **_voxel_tiff_tags(sizes))
    else:
        _write_zarr(path, array, dtype, chunks, zarr_format, _voxel_zarr_attrs(sizes))
    return path


def _as_array(data: Any, what: str, max_ndim: int = 3) -> Any:
    if not hasattr(data, "dtype") or not hasattr(data, "shape"):
        data = np.asarray(data)
    if not 2 <= data.ndim <= max_ndim:
        raise ValueError(
            f"{what} must be 2D (YX) or 3D (ZYX)"
            + (" or 4D (CZYX)" if max_ndim == 4 else "")
            + f", got shape {tuple(data.shape)}"
        )
    if any(n == 0 for n in data.shape):
        raise ValueError(f"{what} are empty (shape {tuple(data.shape)})")
    return data


def _iter_pages(data: Any, dtype: np.dtype):
    """Yield 2D pages (numpy) of a 2D/3D/4D array, computing dask slices one by one."""
    if data.ndim == 2:
        yield np.asarray(data).astype(dtype, copy=False)
        return
    for i in range(data.shape[0]):
        if data.ndim == 3:
            yield np.asarray(data[i]).astype(dtype, copy=False)
        else:
            yield from _iter_pages(data[i], dtype)


def _write_tiff(path: Path, data: Any, dtype: np.dtype, compression: str,
                predictor: bool, metadata: dict | None = None, **tags: Any) -> None:
    import tifffile

    comp = None if compression in (None, "none", "None") else compression
    kwargs: dict[str, Any] = {"compression": comp}
    if comp == "zlib":
        kwargs["compressionargs"] = {"level": 6}
    if predictor and comp is not None:
        kwargs["predictor"] = True
    nbytes = int(np.prod(data.shape, dtype=np.int64)) * dtype.itemsize
    axes = "YX" if data.ndim == 2 else "ZYX" if data.ndim == 3 else "CZYX"
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            data=_iter_pages(data, dtype),
            shape=tuple(data.shape),
            dtype=dtype,
            bigtiff=nbytes > 2**31,
            metadata={"axes": axes, **(metadata or {})},
            photometric="minisblack",
            **tags,
            **kwargs,
        )


def _default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    if len(shape) == 2:
        return tuple(min(n, 512) for n in shape)
    return tuple([1] * (len(shape) - 2) + [min(n, 512) for n in shape[-2:]])


def _create_zarr(path: Path, shape: Sequence[int], dtype: Any,
                 chunks: Sequence[int] | None, zarr_format: int | None = None) -> Any:
    import zarr

    kwargs: dict[str, Any] = {
        "mode": "w",
        "shape": tuple(int(n) for n in shape),
        "dtype": np.dtype(dtype),
        "chunks": tuple(chunks) if chunks is not None else _default_chunks(shape),
        "fill_value": 0,
    }
    if zarr_format is not None:
        if zarr_major() >= 3:
            kwargs["zarr_format"] = zarr_format
        elif zarr_format != 2:
            raise ValueError(f"zarr {zarr.__version__} only writes zarr format 2")
    arr = zarr.open_array(str(path), **kwargs)
    arr.attrs[ZARR_MARKER] = {"written_by": "napari-emseg"}
    return arr


def _write_zarr(path: Path, data: Any, dtype: np.dtype, chunks: Sequence[int] | None,
                zarr_format: int | None = None, attrs: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        out = _create_zarr(tmp, data.shape, dtype, chunks, zarr_format)
        out.attrs.update(attrs or {})
        _fill(out, data, dtype)


def _fill(out: Any, data: Any, dtype: np.dtype) -> None:
    """Copy ``data`` into the zarr array ``out`` (dask: slab by slab)."""
    if hasattr(data, "compute"):
        step = out.chunks[0]
        for start in range(0, data.shape[0], step):
            out[start:start + step] = np.asarray(data[start:start + step]).astype(
                dtype, copy=False
            )
    else:
        out[...] = np.asarray(data).astype(dtype, copy=False)


def _write_ome_labels(path: Path, data: Any, dtype: np.dtype, chunks: Sequence[int] | None,
                      zarr_format: int | None, sizes: list[float] | None) -> None:
    """An OME-NGFF label image: a group with the array ``0`` and its scale."""
    import zarr

    fmt = zarr_format or _default_zarr_format()
    with atomic_path(path) as tmp:
        kwargs = {"zarr_format": fmt} if zarr_major() >= 3 else {}
        group = zarr.open_group(str(tmp), mode="w", **kwargs)
        _fill(_create_zarr(tmp / "0", data.shape, dtype, chunks, fmt), data, dtype)
        group.attrs.update(_ome_label_attrs(path.stem, data.ndim, sizes, fmt))
        group.attrs[ZARR_MARKER] = {"written_by": "napari-emseg"}


def _default_zarr_format() -> int:
    import zarr

    if zarr_major() < 3:
        return 2
    return int(zarr.config.get("default_zarr_format", 3))


def _ome_label_attrs(name: str, ndim: int, sizes: list[float] | None, fmt: int) -> dict:
    """OME-NGFF attributes: v0.4 for zarr format 2, v0.5 (under ``"ome"``) for 3."""
    axes = []
    for axis in "zyx"[-ndim:]:
        axes.append({"name": axis, "type": "space", **({"unit": "nanometer"} if sizes else {})})
    scale = {"type": "scale", "scale": sizes or [1.0] * ndim}
    multiscale = {"name": name, "axes": axes,
                  "datasets": [{"path": "0", "coordinateTransformations": [scale]}]}
    if fmt == 2:
        return {"multiscales": [{"version": "0.4", **multiscale}],
                "image-label": {"version": "0.4"}}
    return {"ome": {"version": "0.5", "multiscales": [multiscale], "image-label": {}}}


def open_zarr_output(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    zarr_format: int | None = None,
) -> Any:
    """Create (or reopen) a chunked zarr array for blockwise writing.

    Not atomic: blocks are written in place. An existing array with the same
    shape and dtype is reopened for writing (to resume a job); one that
    differs raises unless ``overwrite=True``, which replaces it.

    Parameters
    ----------
    path : str or path-like
        Target ``.zarr`` folder.
    shape : sequence of int
        Array shape, e.g. (Z, Y, X) or (C, Z, Y, X).
    dtype : numpy dtype
        Element type (e.g. ``float32`` probabilities, ``uint32`` labels).
    chunks : sequence of int, optional
        Chunk shape (default: 1 × up to 512 × 512 over the last two axes).
    overwrite : bool
        Replace an existing store.
    zarr_format : int, optional
        2 or 3; the installed zarr's default when ``None``.

    Returns
    -------
    zarr.Array
        Writable array, filled with 0 where nothing was written.
    """
    import zarr

    path = Path(path)
    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    if path.exists() and not overwrite:
        try:
            existing = zarr.open_array(str(path), mode="r+")
        except Exception as exc:
            raise ValueError(
                f"{path} exists and is not a zarr array; pass overwrite=True to replace it"
            ) from exc
        if tuple(existing.shape) != shape or np.dtype(existing.dtype) != dtype:
            raise ValueError(
                f"{path} exists with shape {tuple(existing.shape)} and dtype {existing.dtype}, "
                f"expected {shape} {dtype}; pass overwrite=True to replace it"
            )
        return existing
    if path.exists():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    return _create_zarr(path, shape, dtype, chunks, zarr_format)
