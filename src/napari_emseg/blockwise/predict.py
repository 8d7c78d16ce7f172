"""Blockwise prediction: each block with its halo through ``predict_volume``, resumable.

Phases: plan (check the settings, fingerprint them) → start or resume the
target (normalisation range and output channels fixed once for the whole
volume) → predict the blocks not verified done, writing each core and its
done-marker.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._normalize import normalization_range
from .._shapes import parse_shape
from ..io import open_zarr_output
from ..predict import predict_volume
from ..progress import CancelCheck, ProgressCallback
from .arrays import (
    Source,
    check_zarr_target,
    driver_reader,
    open_array,
    open_source,
    remove_path,
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
)
from .model import (
    ModelInfo,
    block_kwargs,
    default_halo,
    local_model,
    model_info,
    model_payload,
    model_token,
    worker_model,
)
from .resume import (
    ATTR,
    DONE_DIR,
    block_digest,
    check_resumable,
    fingerprint,
    mark_done,
    verified_blocks,
)

__all__ = ["predict_block", "predict_blockwise"]


def predict_block(index, model_payload=None, *, src_spec, target: str, token: str,
                  shape, block, halo, norm, kwargs: dict, out_dtype: str, local_model=None,
                  cancel: CancelCheck | None = None, data=None) -> int:
    """Predict one block (with halo), write its core and its done-marker; returns 1."""
    core = block_core(index, shape, block)
    outer, inner = block_outer(core, shape, halo)
    region = data if data is not None else worker_region(src_spec, outer)
    model = local_model if local_model is not None else \
        worker_model(model_payload, token, kwargs.get("device"))
    prob = predict_volume(region, model, normalization=norm, cancel=cancel, **kwargs)
    prob = prob[(..., *inner)]
    arr = open_array(target)
    expect = tuple(arr.shape[:-3]) + tuple(c.stop - c.start for c in core)
    if prob.shape != expect:
        raise ValueError(
            f"model output for block {index} has shape {prob.shape}, expected {expect} "
            f"(target {target} has shape {tuple(arr.shape)})"
        )
    if out_dtype == "uint8":
        prob = np.round(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
    arr[(..., *core)] = prob
    mark_done(target, index, block_digest(arr, core))
    return 1


def predict_blockwise(
    source,
    target: str | os.PathLike,
    model,
    *,
    block_shape: int | Sequence[int] = DEFAULT_BLOCK,
    halo: int | Sequence[int] | None = None,
    client=None,
    workers: int = 1,
    key: str | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
    zarr_format: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    **predict_kwargs,
):
    """Predict a volume larger than memory into a chunked zarr, block by block.

    Parameters
    ----------
    source : str, path or array-like, (Z, Y, X)
        A zarr / HDF5 / TIFF / MRC path (opened lazily) or an array (numpy,
        dask, zarr, h5py dataset).  Never modified.
    target : str or path
        ``.zarr`` folder; chunks = ``block_shape`` (so writes never race).
        Float32 probabilities in [0, 1] of shape (Z, Y, X), or (C, Z, Y, X)
        for several output classes (``dtype="uint8"`` stores 0-255).
    model : UNet, str, path or callable
        As for :func:`~napari_emseg.predict.predict_volume`.  For a
        distributed ``client`` it is shipped as a checkpoint (U-Nets), a
        name/path (loaded on each worker) or pickled (other callables).
    block_shape : int or 3 ints
        Core size of a block (z, y, x); ``"64,512,512"`` strings work too.
    halo : int or 3 ints, optional
        Context read around each block (clipped at the volume border); default
        :func:`default_halo`.  Must be smaller than the block along every axis
        split into several blocks, and >= the model's 2.5D context along z.
    client : distributed.Client or str, optional
        Run one task per block on this cluster (an address is connected with
        :func:`connect_client`).  Default: local threads.
    workers : int
        Local threads (without ``client``); 1 = sequential.
    key : str, optional
        Dataset / array inside an HDF5 file or zarr group.
    overwrite : bool
        Replace an existing ``target``.  Without it, an existing target written
        by an identical earlier run is **resumed** (finished blocks skipped);
        anything else raises.
    dtype : "float32" or "uint8"
    zarr_format : int, optional
        2 or 3 for a new target; zarr's default when None.
    progress : callable(done, total), optional
        Blocks finished (skipped blocks count as done).
    cancel : callable() -> bool, optional
        Stops submitting blocks, raises :class:`~napari_emseg.progress.Cancelled`;
        finished blocks stay marked done.
    **predict_kwargs
        Passed to ``predict_volume`` (``patch``, ``overlap``, ``batch_size``,
        ``device``, ``amp``, ``tta``, ``dims``, ``activation``, ``context``,
        ``normalization``).  The normalisation range is computed once over the
        whole source (subsampled) and fixed for every block.

    Returns
    -------
    zarr.Array
        The target, opened read-only (view it lazily with
        ``dask.array.from_zarr(target)``).

    Raises
    ------
    ValueError
        Target exists with another shape / dtype / settings, bad block or halo.
    FileExistsError
        Target exists and was not written by ``predict_blockwise``.
    ConnectionError
        ``client`` is an unreachable scheduler address.
    """
    plan = _plan(source, target, model, block_shape, halo, key, dtype, predict_kwargs)
    resumed = _resume_or_replace(plan, overwrite)
    client, owned = resolve_client(client)
    try:
        if resumed is not None:
            norm = tuple(resumed["range"])
        else:
            norm = _start_target(plan, model, zarr_format)
        todo = _blocks_to_do(plan, resumed is not None, workers)
        counter = BlockProgress(progress, len(plan.grid), len(plan.grid) - len(todo))
        if todo:
            _predict_blocks(plan, model, todo, norm, client, workers, counter, cancel)
        return open_array(plan.target, mode="r")
    finally:
        if owned:
            client.close()


@dataclass
class _Plan:
    """The checked settings of one predict_blockwise run."""

    target: Path
    src: Source
    block: tuple[int, int, int]
    halo: tuple[int, int, int]
    info: ModelInfo
    token: str
    dtype: str
    predict_kwargs: dict
    fingerprint: dict

    @property
    def shape(self) -> tuple[int, ...]:
        return self.src.shape

    @property
    def grid(self) -> list[tuple[int, int, int]]:
        return block_grid(self.shape, self.block)


def _plan(source, target, model, block_shape, halo, key, dtype: str,
          predict_kwargs: dict) -> _Plan:
    """Check the arguments (before any work) and fingerprint the run."""
    target = Path(target).expanduser()
    check_zarr_target(target)
    if dtype not in ("float32", "uint8"):
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    src = open_source(source, key)
    shape = src.shape
    info = model_info(model, predict_kwargs)
    block_req = parse_shape(block_shape, 3, "block_shape")
    block = clip_block(block_req, shape)
    halo = default_halo(model, **predict_kwargs) if halo is None else parse_shape(halo, 3, "halo", minimum=0)
    halo = check_block_halo(shape, block_req, halo, info.context)
    if src.array is target or (src.spec and src.spec[0] == "path"
                               and Path(src.spec[1]).resolve() == target.resolve()):
        raise ValueError("target must differ from source")
    token = model_token(model)
    return _Plan(target, src, block, halo, info, token, dtype, predict_kwargs,
                 fingerprint(shape, block, halo, token, dtype, predict_kwargs))


def _resume_or_replace(plan: _Plan, overwrite: bool) -> dict | None:
    """An existing target: removed (``overwrite``), else its attributes if it can be resumed."""
    if not plan.target.exists():
        return None
    if overwrite:
        remove_path(plan.target)
        return None
    return check_resumable(plan.target, plan.shape, plan.dtype, plan.info.channels,
                           plan.fingerprint)


def _start_target(plan: _Plan, model, zarr_format: int | None) -> tuple[float, float]:
    """Create the target with its fingerprint; returns the normalisation range."""
    lo, hi = _global_range(plan.src, plan.info.normalization)
    channels = plan.info.channels
    if channels is None:
        channels = _probe_channels(plan.src, model, (lo, hi), plan.info, plan.predict_kwargs)
    shape, block = plan.shape, plan.block
    out_shape = shape if channels == 1 else (channels, *shape)
    chunks = block if channels == 1 else (channels, *block)
    arr = open_zarr_output(plan.target, out_shape, np.dtype(plan.dtype), chunks=chunks,
                           overwrite=True, zarr_format=zarr_format)
    arr.attrs[ATTR] = {**plan.fingerprint, "range": [lo, hi], "channels": channels}
    (plan.target / DONE_DIR).mkdir(exist_ok=True)
    return lo, hi


def _blocks_to_do(plan: _Plan, resumed: bool, workers: int) -> list[tuple[int, int, int]]:
    """The blocks of the grid not verified done, in grid order."""
    grid = plan.grid
    done = verified_blocks(plan.target, grid, plan.shape, plan.block, workers,
                           stacklevel=3) if resumed else set()
    return [i for i in grid if i not in done]


def _predict_blocks(plan: _Plan, model, todo: list, norm, client, workers: int,
                    on_done: BlockProgress, cancel: CancelCheck | None) -> None:
    """Run :func:`predict_block` on every block of ``todo``."""
    static: dict[str, Any] = dict(
        src_spec=plan.src.spec, target=str(plan.target), token=plan.token, shape=plan.shape,
        block=plan.block, halo=plan.halo, norm=norm,
        kwargs=block_kwargs(plan.info, plan.predict_kwargs), out_dtype=plan.dtype)
    if client is None:
        static["local_model"] = local_model(model, plan.predict_kwargs.get("device"))
        static["src_spec"] = ("array", plan.src.array)
        scatter = {}
    else:
        scatter = {"model_payload": model_payload(model)}
    map_blocks(predict_block, todo, client=client, workers=workers, scatter=scatter,
               static=static, data=driver_reader(plan.src, plan.block, plan.halo, client),
               on_done=on_done, cancel=cancel)


def _global_range(src: Source, spec) -> tuple[float, float]:
    """The normalisation range over the whole source (subsampled), computed once."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        lo, hi = (float(v) for v in spec)
        if not hi > lo:
            raise ValueError(f"normalization range must have high > low, got {spec}")
        return lo, hi
    if spec is not None and not isinstance(spec, dict):
        raise ValueError(f"normalization must be a spec dict or a (low, high) pair, got {spec!r}")
    if spec is not None and spec.get("mode") in ("none", "fixed"):
        return normalization_range(np.zeros((1, 1, 1), np.float32), spec)
    return normalization_range(strided_sample(src.array), spec)


def _probe_channels(src: Source, model, norm, info: ModelInfo, kwargs: dict) -> int:
    """Output channels of a bare callable, from a small crop."""
    shape = src.shape
    depth = min(shape[0], 2 * info.context + 1 if info.dims == 2 else (info.patch or (8,))[0])
    crop = src.region((slice(0, depth), slice(0, min(shape[1], 64)),
                       slice(0, min(shape[2], 64))))
    kwargs = {k: v for k, v in kwargs.items() if k != "normalization"}
    out = predict_volume(crop, model, normalization=norm, **kwargs)
    return 1 if out.ndim == 3 else int(out.shape[0])
