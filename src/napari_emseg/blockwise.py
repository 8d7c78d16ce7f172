"""Out-of-core prediction and instance segmentation, block by block, zarr to zarr.

Volumes larger than memory are cut into blocks aligned with the chunks of a
zarr target (``block_shape``), so two blocks never write the same chunk.

* :func:`predict_blockwise` reads each block with a halo (clipped at the
  volume border), runs :func:`napari_emseg.predict.predict_volume` on it with
  a normalisation range computed once over the whole source, and writes the
  block's core.  A small marker file per finished block
  (``<target>/.emseg_done/<z>_<y>_<x>``, holding the SHA-256 of the block as
  read back from the target) makes runs **resumable**: after a crash or a
  cancel only the missing blocks are computed, and a block whose data no
  longer matches its marker (deleted, changed or corrupt chunk) is computed
  again.
* :func:`label_blockwise` labels each block (connected components, or a
  seeded watershed on the block plus its halo), **stitches ids across block
  faces** with a union-find over the face pairs, and renumbers the ids to
  1..N, block by block.  Blockwise connected components equal
  ``scipy.ndimage.label`` of the whole mask (same connectivity) up to the
  order of the ids.
* :func:`track_blockwise` links per-slice instances of a zarr volume with
  :func:`napari_emseg.tracking.track_slices`, streaming slices.

Work runs on local threads, or on a ``dask.distributed`` cluster when a
``client`` (or a scheduler address) is given: one task per block, the model
shipped as a checkpoint (or a name / path) and loaded once per worker process;
workers with a GPU use it automatically.  Memory stays bounded by a few blocks
per worker (plus, for labelling, one id lookup table of O(number of objects)).

Halo rule: along every axis that is split into several blocks the block must
be **larger than the halo** (``block > halo``); 2.5D models need a z halo of at
least their ``context``.

torch is imported only when a model runs; ``distributed`` only with a client.
"""

from __future__ import annotations

import hashlib
import io as _io
import itertools
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_path
from ._progress import CancelCheck, Cancelled, ProgressCallback, check_cancel, report

__all__ = [
    "DEFAULT_BLOCK",
    "block_grid",
    "connect_client",
    "default_halo",
    "label_blockwise",
    "predict_blockwise",
    "track_blockwise",
]

DEFAULT_BLOCK = (64, 512, 512)
DONE_DIR = ".emseg_done"
FACES_DIR = ".emseg_faces"
ATTR = "emseg_blockwise"
_FORMAT = 1
# predict_volume arguments that change the numbers (and so must match on resume)
_RESULT_KWARGS = ("patch", "overlap", "tta", "dims", "activation", "context")

# per worker-process caches (models loaded once, sources opened once)
_MODEL_CACHE: dict[str, Any] = {}
_SOURCE_CACHE: dict[tuple, Any] = {}


# --------------------------------------------------------------------------- geometry


def _as_shape3(value, what: str) -> tuple[int, int, int]:
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    if np.isscalar(value):
        value = [value] * 3
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or 3 ints (z, y, x), got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"{what} must have 3 values (z, y, x), got {out}")
    return out  # type: ignore[return-value]


def block_grid(shape: Sequence[int], block_shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """Indices ``(iz, iy, ix)`` of the blocks covering ``shape``, in C order."""
    counts = [-(-int(s) // int(b)) for s, b in zip(shape, block_shape, strict=True)]
    return list(itertools.product(*(range(c) for c in counts)))


def _core(index, shape, block) -> tuple[slice, ...]:
    return tuple(
        slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(index, block, shape, strict=True)
    )


def _outer(core, shape, halo) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The core grown by the halo (clipped), and the core's position inside it."""
    outer, inner = [], []
    for c, s, h in zip(core, shape, halo, strict=True):
        a, b = max(0, c.start - h), min(s, c.stop + h)
        outer.append(slice(a, b))
        inner.append(slice(c.start - a, c.stop - a))
    return tuple(outer), tuple(inner)


def _check_block_halo(shape, block, halo, context: int = 0) -> tuple[int, int, int]:
    """Validate the halo rule; returns the halo (0 on axes that are not split)."""
    if any(b < 1 for b in block):
        raise ValueError(f"block_shape values must be >= 1, got {tuple(block)}")
    if any(h < 0 for h in halo):
        raise ValueError(f"halo values must be >= 0, got {tuple(halo)}")
    out = []
    for ax, (s, b, h) in enumerate(zip(shape, block, halo, strict=True)):
        if s <= b:  # one block along this axis: no neighbour, no halo needed
            out.append(0)
            continue
        if b <= h:
            raise ValueError(
                f"block_shape {tuple(block)} must be larger than the halo {tuple(halo)} "
                f"along every split axis (axis {'zyx'[ax]}: block {b} <= halo {h}); "
                "use larger blocks or a smaller halo"
            )
        out.append(h)
    if context and shape[0] > block[0] and out[0] < context:
        raise ValueError(
            f"the model reads {context} neighbouring slices on each side (2.5D context) "
            f"but the z halo is {halo[0]}; use a z halo >= {context}"
        )
    return tuple(out)  # type: ignore[return-value]


# --------------------------------------------------------------------------- sources


def _read(arr, sl) -> np.ndarray:
    """``arr[sl]`` as numpy; dask arrays are computed synchronously (safe in workers)."""
    part = arr[sl]
    if hasattr(part, "compute"):
        part = part.compute(scheduler="synchronous")
    return np.asarray(part)


def _open_path(path: str, key: str | None):
    cached = _SOURCE_CACHE.get((path, key))
    if cached is None:
        from .io import read_volume

        cached = read_volume(path, key=key, lazy=True)
        _SOURCE_CACHE[(path, key)] = cached
    return cached


@dataclass
class _Source:
    array: Any  # what the driver reads from (dask, numpy, zarr, h5py ...)
    spec: tuple | None  # how a worker re-opens it; None = the driver ships block data

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    def region(self, sl) -> np.ndarray:
        return _read(self.array, sl)


def _open_source(source, key: str | None, what: str = "source") -> _Source:
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
    return _Source(arr, spec)


def _worker_region(spec, sl) -> np.ndarray:
    if spec[0] == "path":
        return _read(_open_path(spec[1], spec[2]), sl)
    return _read(spec[1], sl)


def _strided_sample(arr, max_voxels: int = 4_000_000) -> np.ndarray:
    step = 1
    while np.prod([max(1, s // step) for s in arr.shape]) > max_voxels:
        step += 1
    return _read(arr, tuple(slice(None, None, step) for _ in arr.shape))


# --------------------------------------------------------------------------- target


def _open_array(path: str | Path, mode: str = "r+"):
    import zarr

    return zarr.open_array(str(path), mode=mode)


def _existing_array(path: Path):
    """The zarr array at ``path``, or None when it is something else."""
    try:
        return _open_array(path, mode="r")
    except Exception:
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _done_path(target: str | Path, index) -> Path:
    return Path(target) / DONE_DIR / "_".join(str(int(i)) for i in index)


def _done_blocks(target: Path) -> set[tuple[int, ...]]:
    folder = target / DONE_DIR
    if not folder.is_dir():
        return set()
    out = set()
    for name in os.listdir(folder):
        try:
            out.add(tuple(int(p) for p in name.split("_")))
        except ValueError:
            continue
    return out


def _block_digest(arr, core) -> str:
    """SHA-256 of one block's values as stored in the target."""
    return hashlib.sha256(np.ascontiguousarray(arr[(..., *core)]).tobytes()).hexdigest()


def _mark_done(target: str | Path, index, digest: str) -> None:
    """Write a block's marker (its digest) atomically: a killed write leaves no marker."""
    marker = _done_path(target, index)
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, marker)


def _marker_matches(arr, target: Path, index, shape, block) -> bool:
    """Whether the block's stored data still has the digest its marker recorded."""
    try:
        recorded = _done_path(target, index).read_text().strip()
        return bool(recorded) and recorded == _block_digest(arr, _core(index, shape, block))
    except Exception:  # unreadable marker or chunk: not done
        return False


def _verified_blocks(target: Path, grid, shape, block, workers: int) -> set[tuple[int, ...]]:
    """Blocks marked done whose data verifies; stale markers are removed, with a warning."""
    marked = sorted(_done_blocks(target) & set(grid))
    arr = _open_array(target, mode="r")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ok = list(pool.map(lambda i: _marker_matches(arr, target, i, shape, block), marked))
    bad = [i for i, good in zip(marked, ok, strict=True) if not good]
    for index in bad:
        _done_path(target, index).unlink(missing_ok=True)
    if bad:
        warnings.warn(f"{len(bad)} finished block(s) of {target} do not match their checksum "
                      "(missing, changed or corrupt chunks); computing them again",
                      stacklevel=3)
    return {i for i, good in zip(marked, ok, strict=True) if good}


def _check_zarr_target(target: Path) -> None:
    if target.suffix.lower() != ".zarr":
        raise ValueError(f"blockwise output must be a .zarr folder, got {target.name!r}")


# --------------------------------------------------------------------------- models


@dataclass
class _ModelInfo:
    dims: int
    context: int
    patch: tuple[int, ...] | None
    normalization: Any  # spec dict, (lo, hi) or None (= the default percentile spec)
    channels: int | None  # output channels after activation; None = unknown (probe)
    activation: str | None  # None = predict_volume decides (bare callables)


def _model_info(model, kwargs: dict) -> _ModelInfo:
    if isinstance(model, (str, os.PathLike)):
        from .models import zoo

        info = zoo.model_info(model)
        config = info.pop("config")
        meta = info
    else:
        meta = dict(getattr(model, "meta", None) or {})
        config = dict(getattr(model, "config", None) or {})
        if not callable(model):
            raise ValueError(
                f"model must be a model name, a checkpoint path or a callable, got {type(model)}"
            )
    dims = int(kwargs.get("dims") or meta.get("dims", config.get("dims", 2)))
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    context = kwargs.get("context")
    context = int(context if context is not None else meta.get("context", 0) or 0)
    patch = kwargs.get("patch") or meta.get("patch")
    if patch is not None:
        patch = (int(patch),) * dims if np.isscalar(patch) else tuple(int(p) for p in patch)
        patch = patch if len(patch) == dims else None
    normalization = meta.get("normalization") if meta else {"mode": "none"}
    if "normalization" in kwargs and kwargs["normalization"] is not None:
        normalization = kwargs["normalization"]
    channels = None
    out_channels = config.get("out_channels")
    activation = kwargs.get("activation") or meta.get("activation")
    if out_channels is not None:
        if activation is None:
            activation = "softmax" if out_channels > 1 else "sigmoid"
        channels = out_channels - 1 if (activation == "softmax" and out_channels > 1) \
            else out_channels
    return _ModelInfo(dims, context, patch, normalization, channels, activation)


def _block_kwargs(info: _ModelInfo, kwargs: dict) -> dict:
    """predict_volume arguments fixing what :func:`_model_info` decided.

    Passed explicitly because a model rebuilt from checkpoint bytes on a worker
    carries no ``.meta``; the normalization range is passed separately.
    """
    out = {k: v for k, v in kwargs.items() if k != "normalization"}
    out.update(dims=info.dims, context=info.context)
    if info.activation is not None:
        out["activation"] = info.activation
    if info.patch is not None:
        out["patch"] = info.patch
    return out


def default_halo(model, **predict_kwargs) -> tuple[int, int, int]:
    """Default halo ``(z, y, x)`` for a model.

    2D models: ``(context, py // 4, px // 4)`` (z needs only the 2.5D context
    slices); 3D models: ``patch // 4`` per axis, e.g. ``(8, 32, 32)`` for a
    32×128×128 patch.  ``patch`` is the model's (or ``predict_kwargs["patch"]``,
    else 256² / 32×128×128).
    """
    from .predict import DEFAULT_PATCH

    info = _model_info(model, predict_kwargs)
    patch = info.patch or DEFAULT_PATCH[info.dims]
    if info.dims == 2:
        return (info.context, max(1, patch[0] // 4), max(1, patch[1] // 4))
    return tuple(max(1, p // 4) for p in patch)  # type: ignore[return-value]


def _model_token(model) -> str:
    """A stable identity of a model, recorded to refuse resuming with another one."""
    if isinstance(model, (str, os.PathLike)):
        from .models import zoo

        path = zoo.resolve(model)
        st = path.stat()
        return f"file:{path}:{st.st_size}:{int(st.st_mtime)}"
    state = getattr(model, "state_dict", None)
    if callable(state):
        from .models.zoo import weights_sha256

        h = hashlib.sha1()
        h.update(json.dumps(getattr(model, "config", None), sort_keys=True,
                            default=str).encode())
        h.update(weights_sha256(state()).encode())
        return f"state:{h.hexdigest()}"
    name = getattr(model, "__qualname__", type(model).__qualname__)
    return f"callable:{getattr(model, '__module__', '?')}.{name}"


_MODEL_LOCK = threading.Lock()  # guards _MODEL_CACHE; loads run one at a time


def _local_model(model, device):
    """The model ready to run in this process: a name or path is loaded onto the device.

    predict_volume prepares a torch module (eval copy, BatchNorm fused,
    channels-last) once and caches it until its weights change, serialised by
    its own lock, so the blocks can all be given the same module.
    """
    if isinstance(model, (str, os.PathLike)):
        from .models import zoo
        from .predict import select_device

        model = zoo.load_model(model, device=str(select_device(device)))
    return model


def _model_payload(model) -> tuple[str, Any]:
    """What a worker needs to rebuild the model: a name/path, checkpoint bytes or the callable."""
    if isinstance(model, (str, os.PathLike)):
        return ("path", str(model))
    config = getattr(model, "config", None)
    if isinstance(config, dict) and hasattr(model, "state_dict"):
        import torch

        buf = _io.BytesIO()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        meta = dict(getattr(model, "meta", None) or {})
        torch.save({"config": config, "meta": meta, "state": state}, buf)
        return ("ckpt", buf.getvalue())
    return ("callable", model)


def _worker_model(payload, token: str, device):
    """Rebuild (once per process) the model of a payload."""
    key = f"{token}|{device}"
    with _MODEL_LOCK:
        model = _MODEL_CACHE.get(key)
    if model is not None:
        return model
    kind, value = payload
    if kind == "path":
        with _MODEL_LOCK:
            model = _local_model(value, device)
    elif kind == "ckpt":
        import torch

        from .models.unet import UNet

        ckpt = torch.load(_io.BytesIO(value), map_location="cpu", weights_only=True)
        model = UNet(**ckpt["config"])
        model.load_state_dict(ckpt["state"])
        model = model.eval()
    else:
        model = value
    with _MODEL_LOCK:
        return _MODEL_CACHE.setdefault(key, model)


# --------------------------------------------------------------------------- execution


def connect_client(address: str, timeout: float = 10.0):
    """Connect to a running ``dask.distributed`` scheduler.

    Parameters
    ----------
    address : str
        e.g. ``"tcp://10.0.0.5:8786"``.
    timeout : float
        Seconds to wait before giving up.

    Returns
    -------
    distributed.Client

    Raises
    ------
    ConnectionError
        The scheduler cannot be reached in time (an ``OSError``).
    ImportError
        ``distributed`` is not installed.
    """
    try:
        from distributed import Client
    except ImportError:
        raise ImportError(
            "a dask scheduler needs the 'distributed' package: "
            "pip install 'napari-emseg[distributed]'"
        ) from None
    try:
        from distributed.comm import parse_address
        from distributed.comm.registry import get_backend

        get_backend(parse_address(str(address))[0])  # a bad scheme fails here, quietly
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid dask scheduler address {address!r}: {exc}") from None
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"cannot reach the dask scheduler at {address!r} within {timeout:g} s ({exc}). "
            "Start one with `dask scheduler` and workers with `dask worker ADDRESS`, "
            "or run without a scheduler to use local threads."
        ) from None
    except ValueError as exc:
        raise ValueError(f"invalid dask scheduler address {address!r}: {exc}") from None


def _resolve_client(client, timeout: float = 10.0):
    """(client, owned): connect when given an address."""
    if client is None:
        return None, False
    if isinstance(client, str):
        return connect_client(client, timeout), True
    return client, False


def _map_blocks(
    fn: Callable,
    items: Sequence,
    *,
    client=None,
    workers: int = 1,
    scatter: dict | None = None,
    static: dict | None = None,
    data: Callable | None = None,
    on_done: Callable[[Any, Any], None] | None = None,
    cancel: CancelCheck | None = None,
) -> None:
    """Run ``fn(item, **scatter, **static[, data=...])`` for every item.

    Local: sequentially (``workers <= 1``) or on a thread pool; ``fn`` also gets
    ``cancel``.  Distributed: one task per item, at most ~2 per worker thread in
    flight; ``scatter`` values are broadcast to the workers once.  ``data(item)``
    (optional) reads block data on the driver, for sources workers cannot open.
    ``on_done(item, result)`` runs on the driver as items finish.  A cancel
    stops submitting, waits for (local) or cancels (distributed) the rest and
    raises :class:`Cancelled`.
    """
    scatter = dict(scatter or {})
    static = dict(static or {})
    items = list(items)
    if not items:
        return

    def _extra(item) -> dict:
        return {"data": data(item)} if data is not None else {}

    if client is None and workers <= 1:
        for item in items:
            check_cancel(cancel)
            result = fn(item, **scatter, **static, cancel=cancel, **_extra(item))
            if on_done is not None:
                on_done(item, result)
        return

    if client is None:
        pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="emseg-block")
        limit = 2 * int(workers)

        def submit(item):
            return pool.submit(fn, item, **scatter, **static, cancel=cancel, **_extra(item))

        def cancel_rest(futs):
            for f in futs:
                f.cancel()
            wait(futs)

        waiter = wait
    else:
        scattered = {k: client.scatter(v, broadcast=True, hash=False)
                     for k, v in scatter.items()}
        nthreads = sum(client.nthreads().values()) or 1
        limit = max(2, 2 * nthreads)
        pool = None

        def submit(item):
            return client.submit(fn, item, **scattered, **static, pure=False, **_extra(item))

        def cancel_rest(futs):
            if futs:
                client.cancel(list(futs))

        def waiter(futs, return_when):
            # polling: distributed.wait() needs a default client, which we never set
            while True:
                finished = [f for f in futs if f.done()]
                if finished:
                    return finished, None
                time.sleep(0.01)

    pending: dict[Any, Any] = {}
    todo = iter(items)
    try:
        while True:
            if cancel is not None and cancel():
                raise Cancelled("cancelled by the user")
            while len(pending) < limit:
                item = next(todo, None)
                if item is None:
                    break
                pending[submit(item)] = item
            if not pending:
                break
            finished, _ = waiter(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                item = pending.pop(fut)
                result = fut.result()
                if on_done is not None:
                    on_done(item, result)
    except BaseException:
        cancel_rest(list(pending))
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- prediction


def _predict_block(index, model_payload=None, *, src_spec, target: str, token: str,
                   shape, block, halo, norm, kwargs: dict, out_dtype: str, local_model=None,
                   cancel: CancelCheck | None = None, data=None) -> int:
    """Predict one block (with halo) and write its core; returns 1."""
    from .predict import predict_volume

    core = _core(index, shape, block)
    outer, inner = _outer(core, shape, halo)
    region = data if data is not None else _worker_region(src_spec, outer)
    model = local_model if local_model is not None else \
        _worker_model(model_payload, token, kwargs.get("device"))
    prob = predict_volume(region, model, normalization=norm, cancel=cancel, **kwargs)
    prob = prob[(..., *inner)]
    arr = _open_array(target)
    expect = tuple(arr.shape[:-3]) + tuple(c.stop - c.start for c in core)
    if prob.shape != expect:
        raise ValueError(
            f"model output for block {index} has shape {prob.shape}, expected {expect} "
            f"(target {target} has shape {tuple(arr.shape)})"
        )
    if out_dtype == "uint8":
        prob = np.round(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
    arr[(..., *core)] = prob
    _mark_done(target, index, _block_digest(arr, core))
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
        Stops submitting blocks, raises :class:`~napari_emseg._progress.Cancelled`;
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
    target = Path(target).expanduser()
    _check_zarr_target(target)
    if dtype not in ("float32", "uint8"):
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    src = _open_source(source, key)
    shape = src.shape
    info = _model_info(model, predict_kwargs)
    block = tuple(min(b, s) for b, s in zip(_as_shape3(block_shape, "block_shape"), shape,
                                             strict=True))
    halo = default_halo(model, **predict_kwargs) if halo is None else _as_shape3(halo, "halo")
    halo = _check_block_halo(shape, _as_shape3(block_shape, "block_shape"), halo, info.context)
    if src.array is target or (src.spec and src.spec[0] == "path"
                               and Path(src.spec[1]).resolve() == target.resolve()):
        raise ValueError("target must differ from source")

    token = _model_token(model)
    fingerprint = {
        "format": _FORMAT,
        "shape": list(shape),
        "block_shape": list(block),
        "halo": list(halo),
        "model": token,
        "dtype": dtype,
        "predict": {k: predict_kwargs.get(k) for k in _RESULT_KWARGS
                    if predict_kwargs.get(k) is not None},
        "normalization": _jsonable(predict_kwargs.get("normalization")),
    }
    fingerprint = json.loads(json.dumps(fingerprint, default=str))

    # --- an existing target: resume, or refuse
    resume_attrs = None
    if target.exists():
        if overwrite:
            _remove(target)
        else:
            resume_attrs = _check_resumable(target, shape, dtype, info.channels, fingerprint)

    client, owned = _resolve_client(client)
    try:
        if resume_attrs is not None:
            lo, hi = resume_attrs["range"]
            channels = int(resume_attrs["channels"])
        else:
            lo, hi = _global_range(src, info.normalization)
            channels = info.channels
            if channels is None:
                channels = _probe_channels(src, model, (lo, hi), info, predict_kwargs)
            out_shape = shape if channels == 1 else (channels, *shape)
            chunks = block if channels == 1 else (channels, *block)
            from .io import open_zarr_output

            arr = open_zarr_output(target, out_shape, np.dtype(dtype), chunks=chunks,
                                   overwrite=True, zarr_format=zarr_format)
            arr.attrs[ATTR] = {**fingerprint, "range": [lo, hi], "channels": channels}
            (target / DONE_DIR).mkdir(exist_ok=True)

        grid = block_grid(shape, block)
        done = set() if resume_attrs is None else \
            _verified_blocks(target, grid, shape, block, workers)
        todo = [i for i in grid if i not in done]
        total = len(grid)
        count = {"done": total - len(todo)}
        report(progress, count["done"], total)
        if not todo:
            return _open_array(target, mode="r")

        kwargs = _block_kwargs(info, predict_kwargs)
        static = dict(src_spec=src.spec, target=str(target), token=token, shape=shape,
                      block=block, halo=halo, norm=(lo, hi), kwargs=kwargs, out_dtype=dtype)
        if client is None:
            static["local_model"] = _local_model(model, predict_kwargs.get("device"))
            static["src_spec"] = ("array", src.array)
            scatter = {}
        else:
            scatter = {"model_payload": _model_payload(model)}

        def data(index):
            return src.region(_outer(_core(index, shape, block), shape, halo)[0])

        def on_done(index, _):
            count["done"] += 1
            report(progress, count["done"], total)

        _map_blocks(_predict_block, todo, client=client, workers=workers, scatter=scatter,
                    static=static, data=data if (client is not None and src.spec is None)
                    else None, on_done=on_done, cancel=cancel)
        return _open_array(target, mode="r")
    finally:
        if owned:
            client.close()


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value


def _check_resumable(target: Path, shape, dtype: str, channels, fingerprint) -> dict:
    arr = _existing_array(target)
    if arr is None:
        raise FileExistsError(
            f"{target} exists and is not a zarr array; pass overwrite=True to replace it"
        )
    spatial = tuple(arr.shape[-3:])
    expect = shape if channels in (None, 1) else (channels, *shape)
    ok_shape = tuple(arr.shape) == tuple(expect) if channels is not None else \
        (spatial == tuple(shape) and arr.ndim in (3, 4))
    if not ok_shape or np.dtype(arr.dtype) != np.dtype(dtype):
        raise ValueError(
            f"target {target} exists with shape {tuple(arr.shape)} and dtype {arr.dtype}, "
            f"but this run writes shape {tuple(expect)} and dtype {dtype}; "
            "pass overwrite=True to replace it or choose another target"
        )
    attrs = dict(arr.attrs).get(ATTR)
    if not isinstance(attrs, dict):
        raise FileExistsError(
            f"{target} exists and was not written by predict_blockwise, so it cannot be "
            "resumed; pass overwrite=True to replace it"
        )
    diff = sorted(k for k, v in fingerprint.items() if attrs.get(k) != v)
    if diff:
        raise ValueError(
            f"{target} was started with different settings ({', '.join(diff)} differ); "
            "pass overwrite=True to start over or choose another target"
        )
    return attrs


def _global_range(src: _Source, spec) -> tuple[float, float]:
    """The normalisation range over the whole source (subsampled), computed once."""
    from ._normalize import normalization_range

    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        lo, hi = (float(v) for v in spec)
        if not hi > lo:
            raise ValueError(f"normalization range must have high > low, got {spec}")
        return lo, hi
    if spec is not None and not isinstance(spec, dict):
        raise ValueError(f"normalization must be a spec dict or a (low, high) pair, got {spec!r}")
    if spec is not None and spec.get("mode") in ("none", "fixed"):
        return normalization_range(np.zeros((1, 1, 1), np.float32), spec)
    return normalization_range(_strided_sample(src.array), spec)


def _probe_channels(src: _Source, model, norm, info: _ModelInfo, kwargs: dict) -> int:
    """Output channels of a bare callable, from a small crop."""
    from .predict import predict_volume

    shape = src.shape
    depth = min(shape[0], 2 * info.context + 1 if info.dims == 2 else (info.patch or (8,))[0])
    crop = src.region((slice(0, depth), slice(0, min(shape[1], 64)),
                       slice(0, min(shape[2], 64))))
    kwargs = {k: v for k, v in kwargs.items() if k != "normalization"}
    out = predict_volume(crop, model, normalization=norm, **kwargs)
    return 1 if out.ndim == 3 else int(out.shape[0])


# --------------------------------------------------------------------------- labelling


def _structure(dims: int, connectivity: int) -> np.ndarray:
    from .postprocess import _structure as structure

    return structure(dims, connectivity)


def _label_block(index, *, src_spec, target: str, shape, block, halo, method: str,
                 threshold: float, dims: int, connectivity: int, ws_kwargs: dict,
                 stitch_axes: tuple[int, ...], cancel: CancelCheck | None = None,
                 data=None) -> int:
    """Label one block; write local ids 1..n into its core; returns n.

    For the watershed, the halo planes next to the core are saved (as local ids
    of this block) for the overlap stitching.
    """
    from .postprocess import connected_components, seeded_watershed
    from .postprocess import threshold as to_mask

    core = _core(index, shape, block)
    outer, inner = _outer(core, shape, halo)
    region = data if data is not None else _worker_region(src_spec, outer)
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
        faces = Path(target) / FACES_DIR
        for ax in stitch_axes:
            for side, pos in (("lo", inner[ax].start - 1), ("hi", inner[ax].stop)):
                if 0 <= pos < full.shape[ax]:
                    sl = list(inner)
                    sl[ax] = pos
                    np.save(faces / f"{_name(index)}_{ax}_{side}.npy", lut[full[tuple(sl)]])
    _open_array(target)[core] = lab.astype(np.uint32, copy=False)
    return n


def _name(index) -> str:
    return "_".join(str(int(i)) for i in index)


def _global_plane(arr, sl, grid_counts, block, offsets) -> np.ndarray:
    """Labels of a (possibly multi-block) region as global ids (local id + block offset)."""
    lab = np.asarray(arr[sl]).astype(np.int64)
    starts = [s.start for s in sl]
    bidx = np.ix_(*[(np.arange(st, st + n) // b) for st, n, b in
                    zip(starts, lab.shape, block, strict=True)])
    flat = np.ravel_multi_index(bidx, grid_counts)
    fg = lab > 0
    lab[fg] += offsets[np.broadcast_to(flat, lab.shape)[fg]]
    return lab


def _component_pairs(arr, index, shape, block, grid_counts, offsets, structure) -> list:
    """Global id pairs touching across the + faces of one block (connected components)."""
    core = _core(index, shape, block)
    shifts = np.argwhere(structure) - 1
    pairs = []
    for ax in range(3):
        e = core[ax].stop
        if e >= shape[ax]:
            continue
        sh = shifts[shifts[:, ax] == 1]
        if not len(sh):
            continue
        a_sl = list(core)
        a_sl[ax] = slice(e - 1, e)
        a = _global_plane(arr, tuple(a_sl), grid_counts, block, offsets)
        # the next plane, one voxel wider on the other axes (neighbours along edges/corners)
        b_sl, pad = list(core), []
        for o in range(3):
            if o == ax:
                b_sl[o] = slice(e, e + 1)
                pad.append((0, 0))
            else:
                lo, hi = max(0, core[o].start - 1), min(shape[o], core[o].stop + 1)
                b_sl[o] = slice(lo, hi)
                # zero padding where the wider plane was clipped at the volume border
                pad.append((1 - (core[o].start - lo), 1 - (hi - core[o].stop)))
        b = np.pad(_global_plane(arr, tuple(b_sl), grid_counts, block, offsets), pad)
        for d in sh:
            sl = tuple(slice(0, 1) if o == ax else slice(1 + d[o], 1 + d[o] + a.shape[o])
                       for o in range(3))
            bs = b[sl]
            both = (a > 0) & (bs > 0)
            if both.any():
                pairs.append(np.stack([a[both], bs[both]], axis=1))
    return pairs


def _watershed_pairs(arr, target: Path, index, shape, block, grid_counts, offsets,
                     stitch_axes, stitch_threshold: float) -> list:
    """Global id pairs whose overlap across a + face has IoU >= ``stitch_threshold``."""
    core = _core(index, shape, block)
    faces = target / FACES_DIR
    b_flat = np.ravel_multi_index(index, grid_counts)
    pairs = []
    for ax in stitch_axes:
        e = core[ax].stop
        if e >= shape[ax]:
            continue
        nb = list(index)
        nb[ax] += 1
        n_flat = np.ravel_multi_index(tuple(nb), grid_counts)
        f_hi = faces / f"{_name(index)}_{ax}_hi.npy"
        f_lo = faces / f"{_name(nb)}_{ax}_lo.npy"
        if not (f_hi.exists() and f_lo.exists()):
            continue  # halo 0 along this axis: nothing to compare
        sl_e, sl_e1 = list(core), list(core)
        sl_e[ax], sl_e1[ax] = e, e - 1
        # plane e: this block's halo vs the neighbour's core; plane e-1: the reverse
        u = np.concatenate([np.load(f_hi).ravel(), np.asarray(arr[tuple(sl_e1)]).ravel()])
        v = np.concatenate([np.asarray(arr[tuple(sl_e)]).ravel(), np.load(f_lo).ravel()])
        u = u.astype(np.int64)
        v = v.astype(np.int64)
        su = np.bincount(u)
        sv = np.bincount(v)
        both = (u > 0) & (v > 0)
        if not both.any():
            continue
        key = u[both] * (int(v.max()) + 1) + v[both]
        keys, inter = np.unique(key, return_counts=True)
        uu, vv = keys // (int(v.max()) + 1), keys % (int(v.max()) + 1)
        iou = inter / (su[uu] + sv[vv] - inter)
        ok = iou >= stitch_threshold
        if ok.any():
            pairs.append(np.stack([uu[ok] + offsets[b_flat], vv[ok] + offsets[n_flat]], axis=1))
    return pairs


def _merge_lut(pairs: list, n_total: int) -> np.ndarray:
    """Union-find over id pairs → lookup table global id → final id 1..M (0 stays 0)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as graph_components

    root = np.arange(n_total + 1, dtype=np.int64)
    if pairs:
        p = np.unique(np.concatenate(pairs), axis=0)
        nodes, inv = np.unique(p, return_inverse=True)
        inv = inv.reshape(p.shape)
        g = coo_matrix((np.ones(len(p), np.int8), (inv[:, 0], inv[:, 1])),
                       shape=(nodes.size, nodes.size))
        _, comp = graph_components(g, directed=False)
        smallest = np.full(comp.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(smallest, comp, nodes)
        root[nodes] = smallest[comp]
    # roots are the smallest id of each group: ranks keep the order of first appearance
    _, final = np.unique(root, return_inverse=True)
    if final.max(initial=0) > np.iinfo(np.uint32).max:
        raise ValueError(f"{final.max()} objects do not fit uint32 labels")
    return final.astype(np.uint32)


def _relabel_block(index, *, target: str, shape, block, offsets, lut,
                   cancel: CancelCheck | None = None, data=None) -> int:
    core = _core(index, shape, block)
    arr = _open_array(target)
    local = np.asarray(arr[core])
    flat = np.ravel_multi_index(index, [-(-s // b) for s, b in zip(shape, block, strict=True)])
    out = np.zeros(local.shape, np.uint32)
    fg = local > 0
    out[fg] = lut[local[fg].astype(np.int64) + offsets[flat]]
    arr[core] = out
    return 1


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
    _check_zarr_target(target)
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
    src = _open_source(source, key)
    shape = src.shape
    block_req = _as_shape3(block_shape, "block_shape")
    block = tuple(min(b, s) for b, s in zip(block_req, shape, strict=True))
    structure = _structure(dims, connectivity)
    if method == "components":
        if halo is not None and any(_as_shape3(halo, "halo")):
            raise ValueError("connected components need no halo; leave halo=None")
        halo = (0, 0, 0)
        stitch_axes: tuple[int, ...] = ()
    else:
        halo = ((0 if dims == 2 else 8), 32, 32) if halo is None else _as_shape3(halo, "halo")
        halo = _check_block_halo(shape, block_req, halo)
        stitch_axes = tuple(ax for ax in ((1, 2) if dims == 2 else (0, 1, 2))
                            if shape[ax] > block[ax])
        thin = [("zyx"[ax]) for ax in stitch_axes if halo[ax] < 1]
        if thin:
            raise ValueError(
                f"the watershed stitching needs a halo >= 1 along {', '.join(thin)}; "
                f"got halo {tuple(halo)}"
            )
    if isinstance(threshold, str):
        if threshold.lower() != "otsu":
            raise ValueError(f"threshold must be a number in [0, 1] or 'otsu', got {threshold!r}")
        from .postprocess import otsu_threshold

        threshold = otsu_threshold(_strided_sample(src.array))
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")

    grid = block_grid(shape, block)
    grid_counts = tuple(-(-s // b) for s, b in zip(shape, block, strict=True))
    total = 2 * len(grid)
    count = {"done": 0}
    report(progress, 0, total)

    def on_done(_index, _result):
        count["done"] += 1
        report(progress, count["done"], total)

    client, owned = _resolve_client(client)
    try:
        with atomic_path(target) as tmp:
            from .io import open_zarr_output

            open_zarr_output(tmp, shape, np.uint32, chunks=block, overwrite=True,
                             zarr_format=zarr_format)
            if method == "watershed":
                (tmp / FACES_DIR).mkdir()
            counts: dict[tuple, int] = {}

            def collect(index, n):
                counts[index] = int(n)
                on_done(index, n)

            static = dict(src_spec=src.spec if client is not None else ("array", src.array),
                          target=str(tmp), shape=shape, block=block, halo=halo,
                          method=method, threshold=threshold, dims=dims,
                          connectivity=connectivity, ws_kwargs=watershed_kwargs,
                          stitch_axes=stitch_axes)

            def data(index):
                return src.region(_outer(_core(index, shape, block), shape, halo)[0])

            _map_blocks(_label_block, grid, client=client, workers=workers, static=static,
                        data=data if (client is not None and src.spec is None) else None,
                        on_done=collect, cancel=cancel)

            # offsets: ids of block b are offsets[b] + 1 .. offsets[b] + n_b
            n_per = np.array([counts[i] for i in grid], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(n_per)[:-1]]).astype(np.int64)
            n_total = int(n_per.sum())
            arr = _open_array(tmp, mode="r")
            pairs: list = []
            for index in grid:
                check_cancel(cancel)
                if method == "components":
                    pairs += _component_pairs(arr, index, shape, block, grid_counts,
                                              offsets, structure)
                else:
                    pairs += _watershed_pairs(arr, tmp, index, shape, block, grid_counts,
                                              offsets, stitch_axes, float(stitch_threshold))
            lut = _merge_lut(pairs, n_total)
            del pairs
            shutil.rmtree(tmp / FACES_DIR, ignore_errors=True)
            # the final relabel runs on local threads (it needs the lookup table)
            _map_blocks(_relabel_block, grid, workers=workers,
                        static=dict(target=str(tmp), shape=shape, block=block,
                                    offsets=offsets, lut=lut),
                        on_done=on_done, cancel=cancel)
            _open_array(tmp).attrs[ATTR + "_labels"] = {
                "method": method, "threshold": threshold, "dims": dims,
                "connectivity": connectivity, "block_shape": list(block),
                "halo": list(halo), "objects": int(lut.max(initial=0)),
            }
        return _open_array(target, mode="r")
    finally:
        if owned:
            client.close()


# --------------------------------------------------------------------------- tracking


class _SlabReader:
    """``labels[z]`` served from slabs of ``step`` slices (one chunk read per slab)."""

    def __init__(self, arr, step: int) -> None:
        self.arr, self.step = arr, max(1, int(step))
        self.shape, self.dtype = tuple(arr.shape), arr.dtype
        self._z0, self._slab = -1, None

    def __getitem__(self, z):
        if not isinstance(z, (int, np.integer)):
            return _read(self.arr, z)
        z0 = (int(z) // self.step) * self.step
        if z0 != self._z0:
            self._slab = _read(self.arr, slice(z0, z0 + self.step))
            self._z0 = z0
        return self._slab[int(z) - z0]


class _SlabWriter:
    """``out[z] = slice`` buffered into slabs of ``step`` slices (whole chunks written)."""

    def __init__(self, arr, step: int) -> None:
        self.arr, self.step = arr, max(1, int(step))
        self.shape, self.dtype = tuple(arr.shape), arr.dtype
        self._z0, self._buf = -1, None

    def __setitem__(self, z, value) -> None:
        z = int(z)
        z0 = (z // self.step) * self.step
        if z0 != self._z0:
            self.flush()
            n = min(self.step, self.shape[0] - z0)
            self._z0, self._buf = z0, np.zeros((n, *self.shape[1:]), self.dtype)
        self._buf[z - z0] = value

    def flush(self) -> None:
        if self._buf is not None:
            self.arr[self._z0 : self._z0 + len(self._buf)] = self._buf
            self._buf, self._z0 = None, -1


def track_blockwise(
    source,
    target: str | os.PathLike,
    *,
    iou_threshold: float = 0.3,
    max_gap: int = 1,
    min_slices: int = 1,
    key: str | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    zarr_format: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
):
    """Link per-slice instances of a large label volume into 3D objects, zarr to zarr.

    Streams slices through :func:`napari_emseg.tracking.track_slices` (a few
    slabs in memory, whatever the number of slices).

    Parameters
    ----------
    source : str, path or array-like of int, (Z, Y, X)
        2D instance ids per slice (e.g. ``label_blockwise(..., dims=2)``).
    target : str or path
        ``.zarr`` folder for uint32 object ids, written atomically.
    iou_threshold, max_gap, min_slices
        See :func:`~napari_emseg.tracking.track_slices`.
    chunks : 3 ints, optional
        Target chunks; default the source's chunks (else ``(16, 512, 512)``).
    key, overwrite, zarr_format, progress, cancel
        As in :func:`predict_blockwise`.

    Returns
    -------
    zarr.Array
        uint32 object ids, opened read-only.
    """
    from .tracking import track_slices

    target = Path(target).expanduser()
    _check_zarr_target(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    src = _open_source(source, key, what="labels")
    if np.dtype(src.array.dtype).kind not in "biu":
        raise ValueError(f"labels must hold integer ids, got dtype {src.array.dtype}")
    shape = src.shape
    src_chunks = getattr(src.array, "chunksize", None) or getattr(src.array, "chunks", None)
    if not src_chunks or not all(np.isscalar(c) for c in src_chunks):
        src_chunks = None
    if chunks is None:
        chunks = tuple(src_chunks) if src_chunks else (16, 512, 512)
    chunks = tuple(min(int(c), s) for c, s in zip(_as_shape3(chunks, "chunks"), shape,
                                                   strict=True))
    with atomic_path(target) as tmp:
        from .io import open_zarr_output

        out = open_zarr_output(tmp, shape, np.uint32, chunks=chunks, overwrite=True,
                               zarr_format=zarr_format)
        reader = _SlabReader(src.array, (src_chunks or chunks)[0])
        writer = _SlabWriter(out, chunks[0])
        track_slices(reader, iou_threshold=iou_threshold, max_gap=max_gap,
                     min_slices=min_slices, out=writer, progress=progress, cancel=cancel)
        writer.flush()
    return _open_array(target, mode="r")
