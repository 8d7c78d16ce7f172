"""Verified resume of blockwise prediction.

A finished block leaves a marker file ``<target>/.emseg_done/<z>_<y>_<x>``
holding the SHA-256 of the block as read back from the target.  A rerun with
the same settings (the *fingerprint* stored in the target's attributes)
skips the blocks whose data still matches its marker and computes the rest
again (deleted, changed or corrupt chunks included).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .arrays import existing_array, open_array
from .grid import block_core, block_name

__all__ = [
    "ATTR",
    "DONE_DIR",
    "RESULT_KWARGS",
    "block_digest",
    "check_resumable",
    "fingerprint",
    "mark_done",
    "verified_blocks",
]

DONE_DIR = ".emseg_done"
#: Attribute of the target holding the fingerprint (and, for labels, ``ATTR + "_labels"``).
ATTR = "emseg_blockwise"
_FORMAT = 1
#: predict_volume arguments that change the numbers (and so must match on resume)
RESULT_KWARGS = ("patch", "overlap", "tta", "dims", "activation", "context")


def fingerprint(shape, block, halo, token: str, dtype: str, predict_kwargs: dict) -> dict:
    """The settings a resumed run must share with the run that started the target."""
    out = {
        "format": _FORMAT,
        "shape": list(shape),
        "block_shape": list(block),
        "halo": list(halo),
        "model": token,
        "dtype": dtype,
        "predict": {k: predict_kwargs.get(k) for k in RESULT_KWARGS
                    if predict_kwargs.get(k) is not None},
        "normalization": _jsonable(predict_kwargs.get("normalization")),
    }
    return json.loads(json.dumps(out, default=str))


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value


def check_resumable(target: Path, shape, dtype: str, channels, fingerprint: dict) -> dict:
    """The attributes of an existing target that this run may resume; raises otherwise."""
    arr = existing_array(target)
    if arr is None:
        raise FileExistsError(
            f"{target} exists and is not a zarr array; pass overwrite=True to replace it"
        )
    _check_target_layout(arr, target, shape, dtype, channels)
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


def _check_target_layout(arr, target: Path, shape, dtype: str, channels) -> None:
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


def _done_path(target: str | Path, index) -> Path:
    return Path(target) / DONE_DIR / block_name(index)


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


def block_digest(arr, core) -> str:
    """SHA-256 of one block's values as stored in the target."""
    return hashlib.sha256(np.ascontiguousarray(arr[(..., *core)]).tobytes()).hexdigest()


def mark_done(target: str | Path, index, digest: str) -> None:
    """Write a block's marker (its digest) atomically: a killed write leaves no marker."""
    marker = _done_path(target, index)
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, marker)


def _marker_matches(arr, target: Path, index, shape, block) -> bool:
    """Whether the block's stored data still has the digest its marker recorded."""
    try:
        recorded = _done_path(target, index).read_text().strip()
        return bool(recorded) and recorded == block_digest(arr, block_core(index, shape, block))
    except Exception:  # unreadable marker or chunk: not done
        return False


def verified_blocks(target: Path, grid, shape, block, workers: int,
                    stacklevel: int = 2) -> set[tuple[int, ...]]:
    """Blocks marked done whose data verifies; stale markers are removed, with a warning.

    ``stacklevel`` is passed to :func:`warnings.warn` (counted from the caller).
    """
    marked = sorted(_done_blocks(target) & set(grid))
    arr = open_array(target, mode="r")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ok = list(pool.map(lambda i: _marker_matches(arr, target, i, shape, block), marked))
    bad = [i for i, good in zip(marked, ok, strict=True) if not good]
    for index in bad:
        _done_path(target, index).unlink(missing_ok=True)
    if bad:
        warnings.warn(f"{len(bad)} finished block(s) of {target} do not match their checksum "
                      "(missing, changed or corrupt chunks); computing them again",
                      stacklevel=stacklevel + 1)
    return {i for i, good in zip(marked, ok, strict=True) if good}
