"""Read EM volumes as ZYX arrays: multi-page TIFF, slice folders, zarr, HDF5, MRC.

Small files are read into numpy; large ones (more than :data:`LAZY_BYTES`
uncompressed) or ``lazy=True`` give a dask array that reads chunks on demand.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .formats import (
    HDF5_SUFFIXES,
    MRC_SUFFIXES,
    PNG_JPEG_SUFFIXES,
    SLICE_SUFFIXES,
    TIFF_LAYER_KEY,
    TIFF_SUFFIXES,
    VOLUME_SUFFIXES,
    ZARR_SUFFIXES,
    h5_datasets,
    is_zarr_dir,
    list_slices,
    ome_level0,
    open_zarr,
    zarr_arrays,
)

#: Uncompressed size above which ``read_volume(lazy=None)`` returns a dask array.
LAZY_BYTES = 2 * 1024**3


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
    if key is not None and not (is_zarr_dir(path) or suffix in HDF5_SUFFIXES):
        raise ValueError(f"key={key!r} applies only to HDF5 files and zarr groups, not {path}")
    if is_zarr_dir(path):
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
    if is_zarr_dir(path):
        node = open_zarr(path)
        if hasattr(node, "shape") or ome_level0(node.attrs) is not None:
            return []
        return zarr_arrays(node)
    if path.is_file() and path.suffix.lower() in HDF5_SUFFIXES:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                names = h5_datasets(f)
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
        if is_zarr_dir(path):
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
    node = open_zarr(path)
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



def _read_slice_folder(folder: Path, lazy: bool | None) -> Any:
    files = list_slices(folder)
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
def _read_zarr(path: Path, key: str | None, lazy: bool | None) -> Any:
    node = open_zarr(path)
    label = str(path)
    if not hasattr(node, "shape"):  # a group
        arrays = zarr_arrays(node)
        if key is None:
            key = ome_level0(node.attrs)
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
            level = ome_level0(node.attrs)
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
def _read_hdf5(path: Path, key: str | None, lazy: bool | None) -> Any:
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise ValueError(f"cannot open HDF5 file {path}: {exc} (corrupt?)") from exc
    keep_open = False
    try:
        names = h5_datasets(f)
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


