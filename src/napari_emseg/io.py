"""Read and write EM volumes: multi-page TIFF, slice folders, zarr, HDF5, MRC.

All readers return arrays in ZYX order (a single 2D image stays YX). Small
files are read into numpy; large ones (more than :data:`LAZY_BYTES`
uncompressed) or ``lazy=True`` give a dask array that reads chunks on demand.

Writers are atomic: data goes to a temporary sibling that is renamed onto the
target only once complete, so a failed write never leaves a partial file and
keeps an older file intact.

Labels keep their voxel size and reopen as labels whatever their name: a TIFF
gets resolution tags (pixels per cm) and ``voxel_size_nm`` plus a
``napari_emseg_layer: labels`` entry in its JSON description; a zarr store is
an OME-NGFF label image (a group with ``multiscales`` scale in nanometres,
``image-label`` and the array ``0``). :func:`is_labels_file` recognises both.
Probability volumes keep their voxel size too (``write_volume(voxel_size=)``),
and every zarr store written here carries a ``napari_emseg`` attribute, so
:func:`is_emseg_zarr` tells our outputs (safe to replace) from anything else.

This module imports no Qt, napari or torch.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_path
from ._voxel import read_voxel_size

__all__ = [
    "LAZY_BYTES",
    "SLICE_SUFFIXES",
    "VOLUME_SUFFIXES",
    "is_emseg_zarr",
    "is_labels_file",
    "list_keys",
    "natural_key",
    "open_zarr_output",
    "read_volume",
    "read_voxel_size",
    "write_labels",
    "write_volume",
]

#: Uncompressed size above which ``read_volume(lazy=None)`` returns a dask array.
LAZY_BYTES = 2 * 1024**3

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


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def natural_key(name: str) -> list[Any]:
    """Sort key ordering embedded numbers numerically (``z2`` before ``z10``)."""
    parts = re.split(r"(\d+)", name.lower())
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]


def _zarr_major() -> int:
    import zarr

    return int(zarr.__version__.split(".")[0])


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and (
        path.suffix.lower() in ZARR_SUFFIXES or any((path / m).exists() for m in _ZARR_MARKERS)
    )


def is_emseg_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr store that napari-emseg wrote (safe to replace).

    True for stores carrying :data:`ZARR_MARKER` (every zarr this module
    writes) or the attributes of a blockwise job.
    """
    path = Path(path)
    if not _is_zarr_dir(path):
        return False
    try:
        attrs = dict(_open_zarr(path).attrs)
    except ValueError:
        return False
    return any(k == ZARR_MARKER or k.startswith("emseg_blockwise") for k in attrs)


def _want_lazy(lazy: bool | None, shape: Sequence[int], dtype: Any) -> bool:
    if lazy is not None:
        return bool(lazy)
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize > LAZY_BYTES


def _rgb_error(path: Path, shape: Sequence[int]) -> ValueError:
    return ValueError(
        f"{path} holds RGB colour data (shape {tuple(shape)}); EM segmentation needs "
        "greyscale. Convert it to greyscale (e.g. Fiji: Image > Type > 8-bit) and try again."
    )


def _grey_from_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """Collapse an (..., 3|4) RGB(A) array whose colour channels are equal to grey."""
    rgb = arr[..., :3]
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    raise _rgb_error(path, arr.shape)


def _squeeze_to_3d(arr: Any, path: Path, axes: str | None = None) -> Any:
    """Drop singleton axes of a 4D+ array; error if it still has more than 3 axes."""
    if arr.ndim <= 3:
        return arr
    keep = [i for i, n in enumerate(arr.shape) if n != 1]
    if len(keep) <= 3:
        index = tuple(slice(None) if n != 1 else 0 for n in arr.shape)
        out = arr[index]
        while out.ndim < 2:  # pathological all-singleton shapes
            out = out[None]
        return out
    where = f" with axes {axes!r}" if axes else ""
    raise ValueError(
        f"{path} is {arr.ndim}D{where} (shape {tuple(arr.shape)}): the axes are ambiguous. "
        "napari-emseg reads 2D (YX) or 3D (ZYX) greyscale volumes; save one channel / "
        "one time point as a 3D stack."
    )


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if not (path.is_file() or path.is_dir()):
        raise ValueError(f"{path} is not a regular file or folder (a pipe, socket or device?)")
    return path


def _check_dims(arr: Any, path: Path) -> Any:
    if arr.ndim < 2:
        raise ValueError(f"{path} holds a {arr.ndim}D array of shape {arr.shape}; need 2D or 3D")
    if any(n == 0 for n in arr.shape):
        raise ValueError(f"{path} is empty (shape {tuple(arr.shape)})")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype.kind == "b"):
        raise ValueError(f"{path} has unsupported data type {arr.dtype}")
    return arr


# --------------------------------------------------------------------------- #
# reading
# --------------------------------------------------------------------------- #
def read_volume(
    path: str | os.PathLike, key: str | None = None, lazy: bool | None = None
) -> Any:
    """Read an EM volume as a ZYX array.

    Parameters
    ----------
    path : str or path-like
        A multi-page TIFF, a single 2D TIFF/PNG/JPEG, a folder of 2D slices
        (TIFF/PNG/JPEG, stacked in natural order: ``z2.png`` before
        ``z10.png``), a zarr store (v2 or v3; array, group or OME-Zarr
        multiscale group, of which level 0 is read), an HDF5 file or an MRC
        file (``.mrc``, ``.rec``, ``.map``).
    key : str, optional
        Dataset inside an HDF5 file or array path inside a zarr group. Not
        needed when the container holds a single array.
    lazy : bool, optional
        ``True`` returns a dask array (chunks read on demand), ``False`` a
        numpy array; ``None`` (default) is lazy only when the volume is larger
        than :data:`LAZY_BYTES` uncompressed.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        Shape (Z, Y, X), or (Y, X) for a single 2D image. Singleton extra axes
        (e.g. OME-Zarr's T and C of size 1) are dropped.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        Unknown extension, corrupt or empty file, empty folder, RGB colour
        data, 4D+ data with ambiguous axes, or an ambiguous/missing ``key``.
    """
    path = _existing(path)
    suffix = path.suffix.lower()
    if key is not None and not (_is_zarr_dir(path) or suffix in HDF5_SUFFIXES):
        raise ValueError(f"key={key!r} applies only to HDF5 files and zarr groups, not {path}")
    if _is_zarr_dir(path):
        arr = _read_zarr(path, key, lazy)
    elif path.is_dir():
        arr = _read_slice_folder(path, lazy)
    elif suffix in TIFF_SUFFIXES:
        arr = _read_tiff(path, lazy)
    elif suffix in PNG_JPEG_SUFFIXES:
        arr = _read_png_jpeg(path)
        if lazy:
            import dask.array as da

            arr = da.from_array(arr, chunks=arr.shape)
    elif suffix in HDF5_SUFFIXES:
        arr = _read_hdf5(path, key, lazy)
    elif suffix in MRC_SUFFIXES:
        arr = _read_mrc(path, lazy)
    elif suffix in ZARR_SUFFIXES:
        raise ValueError(f"{path} is not a zarr store (expected a folder)")
    else:
        raise ValueError(
            f"cannot read {path.name!r}: unsupported file type {suffix or '(no extension)'!r}. "
            f"Supported: {', '.join(VOLUME_SUFFIXES)} files or a folder of 2D slices."
        )
    return _check_dims(arr, path)


def list_keys(path: str | os.PathLike) -> list[str]:
    """Names of the arrays inside an HDF5 file or zarr group, for ``key=``.

    Returns an empty list for single-array files and folders, zarr arrays and
    OME-Zarr multiscale images (which need no key).
    """
    path = _existing(path)
    if _is_zarr_dir(path):
        node = _open_zarr(path)
        if hasattr(node, "shape") or _ome_level0(node.attrs) is not None:
            return []
        return _zarr_arrays(node)
    if path.is_file() and path.suffix.lower() in HDF5_SUFFIXES:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                names = _h5_datasets(f)
        except Exception as exc:
            raise ValueError(f"cannot open HDF5 file {path}: {exc} (corrupt?)") from exc
        return sorted(names)
    return []


def is_labels_file(path: str | os.PathLike, key: str | None = None) -> bool:
    """Whether ``path`` holds labels by its metadata, not its name.

    True for files written by :func:`write_labels` and for OME-Zarr label
    images (``image-label``); False for anything else, never an error.
    """
    path = Path(path)
    try:
        if _is_zarr_dir(path):
            return _zarr_is_labels(path, key)
        if path.is_file() and path.suffix.lower() in TIFF_SUFFIXES:
            return _tiff_description(path).get(TIFF_LAYER_KEY) == "labels"
    except Exception:  # metadata is a hint: unreadable means "no"
        return False
    return False


def _tiff_description(path: Path) -> dict:
    """The JSON description tifffile wrote (shaped TIFF), or ``{}``."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        meta = tif.shaped_metadata if tif.is_shaped else None
    return dict(meta[0]) if meta else {}


def _zarr_is_labels(path: Path, key: str | None) -> bool:
    node = _open_zarr(path)
    chain = [node] if key is None else [node[key], node]
    for item in chain:
        attrs = dict(item.attrs)
        if "image-label" in attrs or "image-label" in dict(attrs.get("ome") or {}):
            return True
    return False


# TIFF ---------------------------------------------------------------------- #
class _TiffErrors(logging.Handler):
    """Collect tifffile's logged errors (it logs, rather than raises, on broken files)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _tiff_errors_raise(path: Path) -> Iterator[None]:
    logger = logging.getLogger("tifffile")
    handler = _TiffErrors()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            yield
        except ValueError as exc:
            if str(exc).startswith("cannot read TIFF"):
                raise
            raise ValueError(f"cannot read TIFF {path}: {exc} (corrupt?)") from exc
        except Exception as exc:  # tifffile raises many types for broken files
            raise ValueError(f"cannot read TIFF {path}: {exc} (corrupt or not a TIFF?)") from exc
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    if handler.messages:
        raise ValueError(
            f"cannot read TIFF {path}: {handler.messages[0]} (corrupt or truncated?)"
        )


def _read_tiff(path: Path, lazy: bool | None) -> Any:
    import tifffile

    with _tiff_errors_raise(path):
        tif = tifffile.TiffFile(path)
    keep_open = False
    try:
        with _tiff_errors_raise(path):
            series_list = tif.series
            if not series_list or not tif.pages:
                raise ValueError(f"cannot read TIFF {path}: no images found (corrupt?)")
            series = series_list[0]
            shape, axes, dtype = tuple(series.shape), series.axes, series.dtype
        if axes == "SYX" and tif.is_shaped:
            # tifffile stores a plain (3|4, Y, X) stack as one planar RGB(A) page
            # unless told otherwise; such a file is a 3-4 slice ZYX stack.
            axes = "ZYX"
        if "S" in axes:
            if lazy:
                raise _rgb_error(path, shape)
            with _tiff_errors_raise(path):
                arr = series.asarray()
            arr = np.moveaxis(arr, axes.index("S"), -1)
            return _squeeze_to_3d(_grey_from_rgb(arr, path), path)
        if _want_lazy(lazy, shape, dtype):
            import dask.array as da
            import zarr

            store = tif.aszarr(series=0, level=0)
            keep_open = True  # the store reads from the open file
            arr = da.from_zarr(zarr.open(store, mode="r"))
        else:
            with _tiff_errors_raise(path):
                arr = series.asarray()
        return _squeeze_to_3d(arr, path, axes)
    finally:
        if not keep_open:
            tif.close()


# PNG / JPEG / slice folders ------------------------------------------------ #
def _read_png_jpeg(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    try:
        arr = np.asarray(iio.imread(path))
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {exc} (corrupt?)") from exc
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = _grey_from_rgb(arr, path)
    elif arr.ndim == 3 and arr.shape[-1] == 2:  # grey + alpha
        arr = np.ascontiguousarray(arr[..., 0])
    if arr.ndim != 2:
        raise ValueError(f"{path} is not a 2D greyscale image (shape {arr.shape})")
    return arr


def _read_slice(path: Path) -> np.ndarray:
    if path.suffix.lower() in TIFF_SUFFIXES:
        arr = _read_tiff(path, lazy=False)
    else:
        arr = _read_png_jpeg(path)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(
            f"{path} in a slice folder is not a 2D image (shape {arr.shape}); "
            "a slice folder must hold one 2D image per z-slice"
        )
    return arr


def _list_slices(folder: Path) -> list[Path]:
    files = [
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLICE_SUFFIXES
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def _read_slice_folder(folder: Path, lazy: bool | None) -> Any:
    files = _list_slices(folder)
    if not files:
        raise ValueError(
            f"folder {folder} contains no 2D image slices ({', '.join(SLICE_SUFFIXES)})"
        )
    first = _read_slice(files[0])
    shape, dtype = first.shape, first.dtype

    def load(p: Path) -> np.ndarray:
        arr = _read_slice(p)
        if arr.shape != shape or arr.dtype != dtype:
            raise ValueError(_mismatch(p, arr, files[0], shape, dtype))
        return arr

    if _want_lazy(lazy, (len(files), *shape), dtype):
        import dask
        import dask.array as da

        parts = [da.from_array(first, chunks=shape)] + [
            da.from_delayed(dask.delayed(load)(p), shape=shape, dtype=dtype) for p in files[1:]
        ]
        return da.stack(parts)
    out = np.empty((len(files), *shape), dtype=dtype)
    out[0] = first
    for i, p in enumerate(files[1:], start=1):
        out[i] = load(p)
    return out


def _mismatch(p: Path, arr: np.ndarray, first: Path, shape: tuple, dtype: Any) -> str:
    return (
        f"slice {p.name} has shape {arr.shape} and type {arr.dtype}, but {first.name} "
        f"has shape {shape} and type {dtype}; all slices of a folder must match"
    )


# zarr ---------------------------------------------------------------------- #
def _zarr_arrays(group: Any, prefix: str = "") -> list[str]:
    names = [prefix + name for name, _ in group.arrays()]
    for name, sub in group.groups():
        names += _zarr_arrays(sub, f"{prefix}{name}/")
    return sorted(names)


def _multiscales(attrs: Any) -> Any:
    """The OME-Zarr ``multiscales`` list of a group's attributes (v0.4 or v0.5), or None."""
    attrs = dict(attrs)
    return attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")


def _ome_level0(attrs: Any) -> str | None:
    ms = _multiscales(attrs)
    try:
        return str(ms[0]["datasets"][0]["path"])
    except (TypeError, KeyError, IndexError):
        return None


def _open_zarr(path: Path) -> Any:
    import zarr

    try:
        return zarr.open(str(path), mode="r")
    except Exception as exc:
        raise ValueError(f"cannot open zarr store {path}: {exc}") from exc


def _read_zarr(path: Path, key: str | None, lazy: bool | None) -> Any:
    node = _open_zarr(path)
    label = str(path)
    if not hasattr(node, "shape"):  # a group
        arrays = _zarr_arrays(node)
        if key is None:
            key = _ome_level0(node.attrs)
            if key is None:
                if not arrays:
                    raise ValueError(f"zarr group {path} holds no arrays")
                if len(arrays) > 1:
                    raise ValueError(
                        f"zarr group {path} holds several arrays: {', '.join(arrays)}; "
                        "choose one with key="
                    )
                key = arrays[0]
        try:
            node = node[key]
        except Exception as exc:
            raise ValueError(
                f"zarr group {path} has no array {key!r}; arrays: {', '.join(arrays) or 'none'}"
            ) from exc
        if not hasattr(node, "shape"):
            level = _ome_level0(node.attrs)
            if level is None:
                raise ValueError(f"{key!r} in {path} is a group, not an array")
            key = f"{key}/{level}"
            node = node[level]
        label = f"{path}[{key}]"
    elif key is not None:
        raise ValueError(f"{path} is a single zarr array; key={key!r} does not apply")
    if _want_lazy(lazy, node.shape, node.dtype):
        import dask.array as da

        arr = da.from_zarr(node)
    else:
        try:
            arr = np.asarray(node[...])
        except Exception as exc:
            raise ValueError(f"cannot read zarr array {label}: {exc} (corrupt?)") from exc
    return _squeeze_to_3d(arr, Path(label))


# HDF5 ---------------------------------------------------------------------- #
def _h5_datasets(f: Any) -> list[str]:
    """Paths of every dataset in an open HDF5 file, in visiting order."""
    import h5py

    names: list[str] = []
    f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    return names


def _read_hdf5(path: Path, key: str | None, lazy: bool | None) -> Any:
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise ValueError(f"cannot open HDF5 file {path}: {exc} (corrupt?)") from exc
    keep_open = False
    try:
        names = _h5_datasets(f)
        if key is None:
            if not names:
                raise ValueError(f"HDF5 file {path} holds no datasets")
            if len(names) > 1:
                raise ValueError(
                    f"HDF5 file {path} holds several datasets: {', '.join(sorted(names))}; "
                    "choose one with key="
                )
            key = names[0]
        dset = f.get(key)
        if not isinstance(dset, h5py.Dataset):
            raise ValueError(
                f"HDF5 file {path} has no dataset {key!r}; datasets: "
                f"{', '.join(sorted(names)) or 'none'}"
            )
        label = Path(f"{path}[{key}]")
        if _want_lazy(lazy, dset.shape, dset.dtype):
            import dask.array as da

            keep_open = True  # the dask graph reads from the open file
            arr = da.from_array(dset, chunks=dset.chunks or "auto")
        else:
            try:
                arr = dset[()]
            except Exception as exc:
                raise ValueError(f"cannot read {label}: {exc} (corrupt?)") from exc
        return _squeeze_to_3d(arr, label)
    finally:
        if not keep_open:
            f.close()


# MRC ----------------------------------------------------------------------- #
def _read_mrc(path: Path, lazy: bool | None) -> Any:
    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # permissive mode warns about odd headers
        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except Exception as exc:
            raise ValueError(f"cannot read MRC file {path}: {exc} (corrupt?)") from exc
    data = mrc.data
    if data is None:
        mrc.close()
        raise ValueError(f"cannot read MRC file {path}: invalid header or no data (corrupt?)")
    if _want_lazy(lazy, data.shape, data.dtype):
        import dask.array as da

        arr = da.from_array(data, chunks=(1, *data.shape[1:]) if data.ndim == 3 else data.shape)
    else:
        arr = np.array(data)
        mrc.close()
    return _squeeze_to_3d(arr, path)


# --------------------------------------------------------------------------- #
# writing
# --------------------------------------------------------------------------- #
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
        if _zarr_major() >= 3:
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
        kwargs = {"zarr_format": fmt} if _zarr_major() >= 3 else {}
        group = zarr.open_group(str(tmp), mode="w", **kwargs)
        _fill(_create_zarr(tmp / "0", data.shape, dtype, chunks, fmt), data, dtype)
        group.attrs.update(_ome_label_attrs(path.stem, data.ndim, sizes, fmt))
        group.attrs[ZARR_MARKER] = {"written_by": "napari-emseg"}


def _default_zarr_format() -> int:
    import zarr

    if _zarr_major() < 3:
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
        import shutil

        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    return _create_zarr(path, shape, dtype, chunks, zarr_format)
