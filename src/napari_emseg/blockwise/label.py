"""Blockwise instance labelling in three named phases (as elf's ``parallel.label``).

1. :func:`label_block` — each block labelled on its own (local ids 1..n);
2. :func:`stitch_blocks` — ids made unique with per-block offsets, pairs found
   across block faces and merged with a union-find into one lookup table;
3. :func:`relabel_block` — the lookup table written back, block by block.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._shapes import parse_shape
from ..io import atomic_path, open_zarr_output
from ..postprocess import (
    connected_components,
    otsu_threshold,
    seeded_watershed,
    structuring_element,
)
from ..postprocess import threshold as to_mask
from ..progress import CancelCheck, ProgressCallback, check_cancel
from .arrays import (
    Source,
    check_zarr_target,
    driver_reader,
    open_array,
    open_source,
    strided_sample,
    worker_region,
)
from .executor import BlockProgress, map_blocks, resolve_client
from .grid import (
    DEFAULT_BLOCK,
    block_core,
    block_grid,
    block_outer,
    check_block_halo,
    clip_block,
    grid_counts,
)
from .resume import ATTR
from .stitch import (
    FACES_DIR,
    block_offsets,
    component_pairs,
    merge_lut,
    save_faces,
    watershed_pairs,
)

__all__ = ["LabelPlan", "label_block", "label_blockwise", "relabel_block", "stitch_blocks"]


def label_blockwise(
    source,
    target: str | os.PathLike,
    *,
    threshold: float | str = 0.5,
    method: str = "components",
    dims: int = 3,
    connectivity: int = 1,
    block_shape: int | Sequence[int] = DEFAULT_BLOCK,
    halo: int | Sequence[int] | None = None,
    stitch_threshold: float = 0.5,
    client=None,
    workers: int = 1,
    key: str | None = None,
    overwrite: bool = False,
    zarr_format: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    **watershed_kwargs,
):
    """Instance labels of a probability volume larger than memory, block by block.

    Each block is thresholded (``prob > threshold``) and labelled; ids are
    made unique with per-block offsets, merged across block faces with a
    union-find, and renumbered to 1..N (in order of first appearance, block by
    block), streaming: at most a few blocks and one lookup table of
    O(number of objects) are in memory.

    * ``method="components"``: connected components per block (no halo);
      objects touching across a face (foreground on both sides, with the same
      ``connectivity``, edges and corners included) are merged.  The result
      equals :func:`napari_emseg.postprocess.connected_components` (i.e.
      ``scipy.ndimage.label``) of the whole mask up to the order of the ids.
    * ``method="watershed"``: :func:`~napari_emseg.postprocess.seeded_watershed`
      on each block plus its ``halo``; two ids of neighbouring blocks are
      merged when their overlap on the two planes around the face (each block's
      halo plane against the other's core plane) has IoU >= ``stitch_threshold``.

    Parameters
    ----------
    source : str, path or array-like, (Z, Y, X)
        Probabilities (float in [0, 1], uint8 0-255) or a mask; a zarr / HDF5 /
        TIFF path or an array.
    target : str or path
        ``.zarr`` folder for uint32 labels (chunks = ``block_shape``), written
        to a temporary sibling and moved into place when complete.
    threshold : float or "otsu"
        ``"otsu"`` is computed once on a subsample of the whole volume.
    method : "components" or "watershed"
    dims : 2 or 3
        2: per-slice objects (ids unique across the stack, no merging along z).
    connectivity : int
        For components (1 = faces; see :func:`~napari_emseg.postprocess.connected_components`).
    block_shape : int or 3 ints
    halo : int or 3 ints, optional
        Watershed only; default ``(8, 32, 32)`` (``(0, 32, 32)`` for dims=2);
        must be >= 1 along stitched axes and smaller than the block.
    stitch_threshold : float in (0, 1]
        Watershed only: minimum IoU across a face to merge two ids.
    client, workers, key, overwrite, zarr_format, progress, cancel
        As in :func:`predict_blockwise` (progress counts 2 steps per block).
        Labelling is not resumable: a cancelled run leaves no target.
    **watershed_kwargs
        ``spacing``, ``seed_method``, ``min_distance``, ``h``, ``seed_threshold``
        for :func:`~napari_emseg.postprocess.seeded_watershed`.

    Returns
    -------
    zarr.Array
        uint32 labels, opened read-only.
    """
    target = Path(target).expanduser()
    _check_arguments(target, method, dims, stitch_threshold, overwrite, watershed_kwargs)
    plan = _plan(open_source(source, key), method, dims, connectivity, block_shape, halo,
                 threshold, float(stitch_threshold), watershed_kwargs)
    counter = BlockProgress(progress, 2 * len(plan.grid))
    client, owned = resolve_client(client)
    try:
        with atomic_path(target) as tmp:
            open_zarr_output(tmp, plan.shape, np.uint32, chunks=plan.block, overwrite=True,
                             zarr_format=zarr_format)
            counts = _label_blocks(tmp, plan, client, workers, counter, cancel)
            offsets, lut = stitch_blocks(tmp, plan, counts, cancel)
            _relabel_blocks(tmp, plan, offsets, lut, workers, counter, cancel)
            open_array(tmp).attrs[ATTR + "_labels"] = plan.attrs(int(lut.max(initial=0)))
        return open_array(target, mode="r")
    finally:
        if owned:
            client.close()


# --------------------------------------------------------------------------- settings


@dataclass
class LabelPlan:
    """The checked settings of one label_blockwise run."""

    src: Source
    block: tuple[int, int, int]
    halo: tuple[int, int, int]
    method: str
    threshold: float
    dims: int
    connectivity: int
    structure: np.ndarray
    stitch_axes: tuple[int, ...]
    stitch_threshold: float
    ws_kwargs: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.src.shape

    @property
    def grid(self) -> list[tuple[int, int, int]]:
        return block_grid(self.shape, self.block)

    def attrs(self, objects: int) -> dict[str, Any]:
        """What the target records about how it was labelled."""
        return {"method": self.method, "threshold": self.threshold, "dims": self.dims,
                "connectivity": self.connectivity, "block_shape": list(self.block),
                "halo": list(self.halo), "objects": objects}


def _check_arguments(target: Path, method: str, dims: int, stitch_threshold: float,
                     overwrite: bool, watershed_kwargs: dict) -> None:
    check_zarr_target(target)
    if method not in ("components", "watershed"):
        raise ValueError(f"method must be 'components' or 'watershed', got {method!r}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    if method == "components" and watershed_kwargs:
        raise ValueError(f"{sorted(watershed_kwargs)} apply to method='watershed' only")
    if not 0.0 < float(stitch_threshold) <= 1.0:
        raise ValueError(f"stitch_threshold must be in (0, 1], got {stitch_threshold}")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")


def _plan(src: Source, method: str, dims: int, connectivity: int, block_shape, halo,
          threshold, stitch_threshold: float, ws_kwargs: dict) -> LabelPlan:
    shape = src.shape
    block_req = parse_shape(block_shape, 3, "block_shape")
    block = clip_block(block_req, shape)
    structure = structuring_element(dims, connectivity)
    if method == "components":
        halo, stitch_axes = _components_halo(halo), ()
    else:
        halo, stitch_axes = _watershed_halo(halo, dims, shape, block_req, block)
    return LabelPlan(src, block, halo, method, _threshold(threshold, src), dims, connectivity,
                     structure, stitch_axes, stitch_threshold, ws_kwargs)


def _components_halo(halo) -> tuple[int, int, int]:
    if halo is not None and any(parse_shape(halo, 3, "halo", minimum=0)):
        raise ValueError("connected components need no halo; leave halo=None")
    return (0, 0, 0)


def _watershed_halo(halo, dims: int, shape, block_req,
                    block) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """(halo, axes stitched across) for the watershed; the halo must be >= 1 along them."""
    if halo is None:
        halo = ((0 if dims == 2 else 8), 32, 32)
    halo = check_block_halo(shape, block_req, parse_shape(halo, 3, "halo", minimum=0))
    stitch_axes = tuple(ax for ax in ((1, 2) if dims == 2 else (0, 1, 2))
                        if shape[ax] > block[ax])
    thin = [("zyx"[ax]) for ax in stitch_axes if halo[ax] < 1]
    if thin:
        raise ValueError(
            f"the watershed stitching needs a halo >= 1 along {', '.join(thin)}; "
            f"got halo {tuple(halo)}"
        )
    return halo, stitch_axes


def _threshold(threshold: float | str, src: Source) -> float:
    """A number in [0, 1]; ``"otsu"`` is computed on a subsample of the whole source."""
    if isinstance(threshold, str):
        if threshold.lower() != "otsu":
            raise ValueError(f"threshold must be a number in [0, 1] or 'otsu', got {threshold!r}")
        threshold = otsu_threshold(strided_sample(src.array))
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return threshold


# --------------------------------------------------------------------------- phase 1


def label_block(index, *, src_spec, target: str, shape, block, halo, method: str,
                threshold: float, dims: int, connectivity: int, ws_kwargs: dict,
                stitch_axes: tuple[int, ...], cancel: CancelCheck | None = None,
                data=None) -> int:
    """Label one block; write local ids 1..n into its core; returns n.

    For the watershed, the halo planes next to the core are saved (as local ids
    of this block) for the overlap stitching.
    """
    core = block_core(index, shape, block)
    outer, inner = block_outer(core, shape, halo)
    region = data if data is not None else worker_region(src_spec, outer)
    if method == "components":
        mask = to_mask(region[inner], threshold)
        lab = connected_components(mask, dims=dims, connectivity=connectivity)
        n = int(lab.max()) if lab.size else 0
    else:
        full = seeded_watershed(region, threshold, dims=dims, cancel=cancel, **ws_kwargs)
        ids = np.unique(full[inner])
        ids = ids[ids > 0]
        lut = np.zeros(int(full.max()) + 1, dtype=np.uint32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)
        lab = lut[full[inner]]
        n = int(ids.size)
        save_faces(target, index, full, inner, lut, stitch_axes)
    open_array(target)[core] = lab.astype(np.uint32, copy=False)
    return n


def _label_blocks(tmp: Path, plan: LabelPlan, client, workers: int, counter: BlockProgress,
                  cancel: CancelCheck | None) -> dict[tuple, int]:
    """Run :func:`label_block` on every block; returns the number of ids of each."""
    if plan.method == "watershed":
        (tmp / FACES_DIR).mkdir()
    counts: dict[tuple, int] = {}

    def collect(index, n) -> None:
        counts[index] = int(n)
        counter(index, n)

    src = plan.src
    static = dict(src_spec=src.spec if client is not None else ("array", src.array),
                  target=str(tmp), shape=plan.shape, block=plan.block, halo=plan.halo,
                  method=plan.method, threshold=plan.threshold, dims=plan.dims,
                  connectivity=plan.connectivity, ws_kwargs=plan.ws_kwargs,
                  stitch_axes=plan.stitch_axes)
    map_blocks(label_block, plan.grid, client=client, workers=workers, static=static,
               data=driver_reader(src, plan.block, plan.halo, client),
               on_done=collect, cancel=cancel)
    return counts


# --------------------------------------------------------------------------- phase 2


def stitch_blocks(tmp: Path, plan: LabelPlan, counts: dict[tuple, int],
                  cancel: CancelCheck | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lookup table): per-block id offsets and global id → final id 1..N.

    Pairs of ids are collected across the + faces of every block and merged
    with a union-find; the saved halo planes are removed afterwards.
    """
    grid = plan.grid
    offsets, n_total = block_offsets(counts, grid)
    counts_3 = grid_counts(plan.shape, plan.block)
    arr = open_array(tmp, mode="r")
    pairs: list = []
    for index in grid:
        check_cancel(cancel)
        if plan.method == "components":
            pairs += component_pairs(arr, index, plan.shape, plan.block, counts_3, offsets,
                                     plan.structure)
        else:
            pairs += watershed_pairs(arr, tmp, index, plan.shape, plan.block, counts_3,
                                     offsets, plan.stitch_axes, plan.stitch_threshold)
    lut = merge_lut(pairs, n_total)
    shutil.rmtree(tmp / FACES_DIR, ignore_errors=True)
    return offsets, lut


# --------------------------------------------------------------------------- phase 3


def relabel_block(index, *, target: str, shape, block, offsets, lut,
                  cancel: CancelCheck | None = None, data=None) -> int:
    """Write the final ids of one block (local id + offset through ``lut``); returns 1."""
    core = block_core(index, shape, block)
    arr = open_array(target)
    local = np.asarray(arr[core])
    flat = np.ravel_multi_index(index, grid_counts(shape, block))
    out = np.zeros(local.shape, np.uint32)
    fg = local > 0
    out[fg] = lut[local[fg].astype(np.int64) + offsets[flat]]
    arr[core] = out
    return 1


def _relabel_blocks(tmp: Path, plan: LabelPlan, offsets: np.ndarray, lut: np.ndarray,
                    workers: int, counter: BlockProgress, cancel: CancelCheck | None) -> None:
    """Run :func:`relabel_block` on every block, on local threads (it needs the table)."""
    map_blocks(relabel_block, plan.grid, workers=workers,
               static=dict(target=str(tmp), shape=plan.shape, block=plan.block,
                           offsets=offsets, lut=lut),
               on_done=counter, cancel=cancel)
