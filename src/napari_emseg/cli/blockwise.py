"""``--blockwise`` options shared by ``emseg predict`` and ``emseg segment``.

The sub-command modules call :func:`add_blockwise_arguments` on their parser
and hand over to :func:`run_blockwise_predict` / :func:`run_blockwise_segment`
when ``args.blockwise`` is set.  The work is done by
:mod:`napari_emseg.blockwise`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from .._textbar import progress_bar
from ..blockwise import connect_client, label_blockwise, predict_blockwise, track_blockwise
from ..io import read_volume
from . import common
from .common import check_output, resolve_threshold

__all__ = ["add_blockwise_arguments", "run_blockwise_predict", "run_blockwise_segment"]

#: options of ``emseg segment`` that the blockwise path does not implement (and their "off")
UNSUPPORTED = {
    "zfilter": 0,
    "opening": 0,
    "closing": 0,
    "fill_holes": False,
    "min_size": 0,
    "smooth": False,
}
#: options of ``emseg segment`` passed on to the blockwise watershed
WATERSHED_OPTIONS = ("seed_method", "min_distance", "h", "seed_threshold")


def add_blockwise_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--blockwise --scheduler --block --halo --workers --overwrite`` to a parser.

    Options the parser already defines (e.g. its own ``--overwrite``) are skipped.
    """
    group = parser.add_argument_group("volumes larger than memory")

    def add(name: str, **kwargs) -> None:
        try:
            group.add_argument(name, **kwargs)
        except argparse.ArgumentError:  # the parser has its own
            pass

    add("--blockwise", action="store_true",
        help="process block by block into a chunked .zarr OUT (bounded memory, resumable)")
    add("--scheduler", metavar="ADDRESS", default=None,
        help="run the blocks on this dask.distributed scheduler (e.g. tcp://host:8786)")
    add("--block", metavar="Z,Y,X", type=common.shape(3, name="block"),
        default="64,512,512", help="block (= zarr chunk) size for --blockwise")
    add("--halo", metavar="Z,Y,X", type=common.shape(3, minimum=0, name="halo"),
        default=None, help="context read around each block (default: from the model's patch)")
    add("--workers", type=common.positive_int, default=1, metavar="N",
        help="local threads for --blockwise without --scheduler")
    add("--scheduler-timeout", type=common.positive_float, default=10.0, metavar="S",
        help="seconds to wait for --scheduler")
    add("--overwrite", action="store_true",
        help="replace an existing OUT (without it, --blockwise resumes an unfinished OUT)")


def _client(args: argparse.Namespace):
    """A ``distributed.Client`` for ``--scheduler``, else None (local threads)."""
    address = getattr(args, "scheduler", None)
    if not address:
        return None
    return connect_client(address, timeout=getattr(args, "scheduler_timeout", 10.0))


def _workers(args: argparse.Namespace) -> int:
    return max(1, int(getattr(args, "workers", 1) or 1))


def _option(args: argparse.Namespace, name: str, default):
    """``args.name``, or ``default`` when it is missing or None (not given)."""
    value = getattr(args, name, None)
    return default if value is None else value


def _zarr_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".zarr":
        raise ValueError("--blockwise writes a chunked zarr: OUT must end in .zarr, "
                         f"got {out.name}")
    return out


def _predict_kwargs(args: argparse.Namespace) -> dict:
    """predict_volume options that were given (device, patch, overlap, ...)."""
    kwargs = {}
    for name in ("device", "patch", "overlap", "batch_size", "tta", "amp"):
        value = getattr(args, name, None)
        if value is not None and value is not False and not (name == "tta" and value == 0):
            kwargs[name] = value
    if getattr(args, "no_amp", False):
        kwargs["amp"] = False
    return kwargs


def run_blockwise_predict(args: argparse.Namespace) -> int:
    """``emseg predict IN OUT.zarr --model M --blockwise``: blockwise probabilities."""
    out = _zarr_output(args.output)
    for flag in ("adapt", "voxel_size", "planes"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} is not available with --blockwise")
    if not getattr(args, "model", None):
        raise ValueError("--blockwise prediction needs a model (--model NAME|PATH)")
    t0 = time.perf_counter()
    client = _client(args)
    try:
        arr = predict_blockwise(
            args.input, out, args.model, block_shape=args.block, halo=args.halo,
            client=client, workers=_workers(args), key=getattr(args, "key", None),
            overwrite=bool(getattr(args, "overwrite", False)),
            dtype="uint8" if getattr(args, "uint8", False) else "float32",
            progress=progress_bar("predict", "blocks", getattr(args, "quiet", False)),
            **_predict_kwargs(args),
        )
    finally:
        if client is not None:
            client.close()
    print(f"probabilities {tuple(arr.shape)} written to {out} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _check_segment_options(args: argparse.Namespace) -> None:
    """Refuse options the blockwise path does not implement."""
    used = [name for name, off in UNSUPPORTED.items()
            if getattr(args, name, off) not in (off, None)]
    if used:
        flags = ", ".join("--" + u.replace("_", "-") for u in used)
        raise ValueError(f"{flags} not supported with --blockwise")
    if _option(args, "track", False) and int(_option(args, "dims", 2)) != 2:
        raise ValueError("--track links 2D instances across slices: use it with --dims 2")


def _probability_source(args: argparse.Namespace, out: Path, client):
    """What to label: INPUT, one ``--channel`` of it, or its ``--model`` prediction.

    The prediction goes to ``<OUT stem>_probabilities.zarr`` (kept, and
    resumed on a re-run).
    """
    channel = getattr(args, "channel", None)
    model = getattr(args, "model", None)
    if not model:
        if channel is None:
            return args.input
        return _pick_channel(read_volume(args.input, lazy=True), channel)
    prob_path = out.with_name(out.stem + "_probabilities.zarr")
    check_output(prob_path, [args.input, model], args.overwrite, resume=True)
    prob = predict_blockwise(
        args.input, prob_path, model, block_shape=args.block, halo=args.halo,
        client=client, workers=_workers(args), overwrite=bool(args.overwrite),
        progress=progress_bar("predict", "blocks", getattr(args, "quiet", False)),
        **_predict_kwargs(args),
    )
    if prob.ndim != 4:
        return prob_path
    import dask.array as da  # only for a multi-class prediction

    return _pick_channel(da.from_zarr(str(prob_path)), channel or 0)


def _pick_channel(volume, channel: int):
    """``volume[channel]`` of a lazy (C, Z, Y, X) volume, with a clear error if it does not fit."""
    if volume.ndim != 4 or not 0 <= channel < volume.shape[0]:
        raise ValueError(f"--channel {channel} does not fit shape {tuple(volume.shape)}")
    return volume[channel]


def _watershed_kwargs(args: argparse.Namespace) -> dict:
    """Seed options (and ``--spacing``) for ``method="watershed"``; {} for components."""
    if _option(args, "method", "components") != "watershed":
        return {}
    kwargs = {name: getattr(args, name) for name in WATERSHED_OPTIONS
              if getattr(args, name, None) is not None}
    if getattr(args, "spacing", None):
        kwargs["spacing"] = tuple(args.spacing)
    return kwargs


def _label_and_track(args: argparse.Namespace, source, out: Path, threshold: float | str,
                     client):
    """label_blockwise into OUT, or (``--track``) per slice then track_blockwise into OUT."""
    method = _option(args, "method", "components")
    track = bool(_option(args, "track", False))
    labels_path = out.with_name(f".{out.stem}_instances2d.zarr") if track else out
    try:
        labels = label_blockwise(
            source, labels_path, threshold=threshold, method=method,
            dims=int(_option(args, "dims", 3)), block_shape=args.block,
            halo=args.halo if method == "watershed" else None, client=client,
            workers=_workers(args), overwrite=track or bool(args.overwrite),
            progress=progress_bar("label", "blocks", getattr(args, "quiet", False)),
            **_watershed_kwargs(args),
        )
        if not track:
            return labels
        return track_blockwise(
            labels_path, out, iou_threshold=_option(args, "iou", 0.3),
            max_gap=_option(args, "max_gap", 1), min_slices=_option(args, "min_slices", 1),
            overwrite=bool(args.overwrite), progress=None,
        )
    finally:
        if track:
            shutil.rmtree(labels_path, ignore_errors=True)


def run_blockwise_segment(args: argparse.Namespace) -> int:
    """``emseg segment IN OUT.zarr --blockwise``: blockwise instance labels.

    With ``--model`` the raw volume is first predicted into
    ``<OUT stem>_probabilities.zarr`` (kept, and resumed on a re-run).
    Supports ``--method``, ``--dims``, ``--threshold``, the watershed seed
    options, ``--channel`` and ``--track``; morphology, z-filtering and
    size filtering are not available blockwise.
    """
    out = _zarr_output(args.output)
    _check_segment_options(args)
    check_output(out, [args.input, getattr(args, "model", None)],
                 bool(getattr(args, "overwrite", False)))
    threshold = resolve_threshold(args)
    t0 = time.perf_counter()
    client = _client(args)
    try:
        source = _probability_source(args, out, client)
        labels = _label_and_track(args, source, out, threshold, client)
    finally:
        if client is not None:
            client.close()
    n = int(labels.attrs.get("emseg_blockwise_labels", {}).get("objects", -1))
    what = f"{n} objects, " if n >= 0 and not getattr(args, "track", False) else ""
    print(f"{what}labels {tuple(labels.shape)} written to {out} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
