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

Modules: :mod:`.formats` (suffixes and metadata probes), :mod:`.read`,
:mod:`.write`, :mod:`.voxel` (voxel size from metadata) and :mod:`.atomic`
(write to a temporary sibling, then rename).  This package imports no Qt,
napari or torch.
"""

from __future__ import annotations

from .atomic import atomic_path
from .formats import (
    HDF5_SUFFIXES,
    MRC_SUFFIXES,
    PNG_JPEG_SUFFIXES,
    SLICE_SUFFIXES,
    TIFF_LAYER_KEY,
    TIFF_SUFFIXES,
    VOLUME_SUFFIXES,
    ZARR_MARKER,
    ZARR_SUFFIXES,
    is_zarr_dir,
    list_slices,
    natural_key,
)
from .read import LAZY_BYTES, is_labels_file, list_keys, read_volume
from .voxel import NM_PER_UNIT, read_voxel_size, relative_spacing, scale_text
from .write import is_emseg_zarr, open_zarr_output, write_labels, write_volume

__all__ = [
    "HDF5_SUFFIXES",
    "LAZY_BYTES",
    "MRC_SUFFIXES",
    "NM_PER_UNIT",
    "PNG_JPEG_SUFFIXES",
    "SLICE_SUFFIXES",
    "TIFF_LAYER_KEY",
    "TIFF_SUFFIXES",
    "VOLUME_SUFFIXES",
    "ZARR_MARKER",
    "ZARR_SUFFIXES",
    "atomic_path",
    "is_emseg_zarr",
    "is_labels_file",
    "is_zarr_dir",
    "list_keys",
    "list_slices",
    "natural_key",
    "open_zarr_output",
    "read_volume",
    "read_voxel_size",
    "relative_spacing",
    "scale_text",
    "write_labels",
    "write_volume",
]
