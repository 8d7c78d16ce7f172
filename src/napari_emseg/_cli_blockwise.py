"""``--blockwise`` options shared by ``emseg predict`` and ``emseg segment``.

The sub-command modules call :func:`add_blockwise_arguments` on their parser
and hand over to :func:`run_blockwise_predict` / :func:`run_blockwise_segment`
when ``args.blockwise`` is set.  Heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from . import _cli_common as common
from ._cli_common import check_output
from ._cli_segment import resolve_threshold
from ._textbar import progress_bar

__all__ = ["add_blockwise_arguments", "run_blockwise_predict", "run_blockwise_segment"]

# options of ``emseg segment`` that the blockwise path does not implement
_UNSUPPORTED = {
    "zfilter": 0,
    "opening": 0,
    "closing": 0,
    "fill_holes": False,
    "min_size": 0,
    "smooth": False,
}


def add_blockwise_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--blockwise --scheduler --block --halo --workers --overwrite`` to a parser.

    Options the parser already defines (e.g. its own ``--overwrite``) are skipped.
    """
    group = parser.add_argument_group("volumes larger than memory")
    have = parser._option_string_actions

    def add(name: str, **kwargs) -> None:
        if name not in have:
            group.add_argument(name, **kwargs)

    add("--blockwise", action="store_true",
        help="process block by block into a chunked .zarr OUT (bounded memory, resumable)")
    add("--scheduler", metavar="ADDRESS", default=None,
        help="run the blocks on this dask.distributed scheduler (e.g. tcp://host:8786)")
    add("--block", metavar="Z,Y,X", type=common.shape((1, 3), name="block"),
        default="64,512,512", help="block (= zarr chunk) size for --blockwise")
    add("--halo", metavar="Z,Y,X", type=common.shape((1, 3), minimum=0, name="halo"),
        default=None, help="context read around each block (default: from the model's patch)")
    add("--workers", type=common.positive_int, default=1, metavar="N",
        help="local threads for --blockwise without --scheduler")
    add("--scheduler-timeout", type=common.positive_float, default=10.0, metavar="S",
        help="seconds to wait for --scheduler")
    add("--overwrite", action="store_true",
        help="replace an existing OUT (without it, --blockwise resumes an unfinished OUT)")


def _client(args):
    address = getattr(args, "scheduler", None)
    if not address:
        return None
    from .blockwise import connect_client

    return connect_client(address, timeout=getattr(args, "scheduler_timeout", 10.0))


def _zarr_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".zarr":
        raise ValueError("--blockwise writes a chunked zarr: OUT must end in .zarr, "
                         f"got {out.name}")
    return out


def _predict_kwargs(args) -> dict:
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
    from .blockwise import predict_blockwise

    out = _zarr_output(args.output)
    for flag in ("adapt", "voxel_size"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} is not available with --blockwise")
    model = getattr(args, "model", None)
    if not model:
        raise ValueError("--blockwise prediction needs a model (--model NAME|PATH)")
    t0 = time.perf_counter()
    client = _client(args)
    try:
        arr = predict_blockwise(
            args.input, out, model,
            block_shape=args.block,
            halo=args.halo,
            client=client,
            workers=max(1, int(getattr(args, "workers", 1) or 1)),
            key=getattr(args, "key", None),
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


def run_blockwise_segment(args: argparse.Namespace) -> int:
    """``emseg segment IN OUT.zarr --blockwise``: blockwise instance labels.

    With ``--model`` the raw volume is first predicted into
    ``<OUT stem>_probabilities.zarr`` (kept, and resumed on a re-run).
    Supports ``--method``, ``--dims``, ``--threshold``, the watershed seed
    options, ``--channel`` and ``--track``; morphology, z-filtering and
    size filtering are not available blockwise.
    """
    import dask.array as da

    from .blockwise import label_blockwise, predict_blockwise, track_blockwise

    out = _zarr_output(args.output)
    used = [name for name, off in _UNSUPPORTED.items()
            if getattr(args, name, off) not in (off, None)]
    if used:
        flags = ", ".join("--" + u.replace("_", "-") for u in used)
        raise ValueError(f"{flags} not supported with --blockwise")
    overwrite = bool(getattr(args, "overwrite", False))
    model = getattr(args, "model", None)
    check_output(out, [args.input, model], overwrite)
    if getattr(args, "track", False) and int(getattr(args, "dims", 2)) != 2:
        raise ValueError("--track links 2D instances across slices: use it with --dims 2")
    threshold = resolve_threshold(args)
    quiet = getattr(args, "quiet", False)
    t0 = time.perf_counter()
    client = _client(args)
    workers = max(1, int(getattr(args, "workers", 1) or 1))
    try:
        source = args.input
        if model:
            prob_path = out.with_name(out.stem + "_probabilities.zarr")
            check_output(prob_path, [args.input, model], overwrite, resume=True)
            prob = predict_blockwise(
                args.input, prob_path, args.model, block_shape=args.block, halo=args.halo,
                client=client, workers=workers, overwrite=bool(args.overwrite),
                progress=progress_bar("predict", "blocks", quiet), **_predict_kwargs(args),
            )
            source = prob_path
            if prob.ndim == 4:
                ch = getattr(args, "channel", None) or 0
                if not 0 <= ch < prob.shape[0]:
                    raise ValueError(f"--channel {ch} out of range for {prob.shape[0]} classes")
                source = da.from_zarr(str(prob_path))[ch]
        elif getattr(args, "channel", None) is not None:
            from .io import read_volume

            vol = read_volume(args.input, lazy=True)
            if vol.ndim != 4 or not 0 <= args.channel < vol.shape[0]:
                raise ValueError(f"--channel {args.channel} does not fit shape {vol.shape}")
            source = vol[args.channel]
        method = getattr(args, "method", "components")
        ws = {}
        if method == "watershed":
            for name in ("seed_method", "min_distance", "h", "seed_threshold"):
                if getattr(args, name, None) is not None:
                    ws[name] = getattr(args, name)
            if getattr(args, "spacing", None):
                ws["spacing"] = tuple(args.spacing)
        halo = args.halo if method == "watershed" else None
        track = bool(getattr(args, "track", False))
        labels_path = out.with_name(f".{out.stem}_instances2d.zarr") if track else out
        try:
            labels = label_blockwise(
                source, labels_path, threshold=threshold,
                method=method, dims=int(getattr(args, "dims", 3)), block_shape=args.block,
                halo=halo, client=client, workers=workers, overwrite=True if track
                else bool(args.overwrite), progress=progress_bar("label", "blocks", quiet), **ws,
            )
            if track:
                labels = track_blockwise(
                    labels_path, out, iou_threshold=getattr(args, "iou", 0.3),
                    max_gap=getattr(args, "max_gap", 1),
                    min_slices=getattr(args, "min_slices", 1),
                    overwrite=bool(args.overwrite), progress=None,
                )
        finally:
            if track:
                shutil.rmtree(labels_path, ignore_errors=True)
    finally:
        if client is not None:
            client.close()
    n = int(labels.attrs.get("emseg_blockwise_labels", {}).get("objects", -1)) if not track \
        else None
    what = f"{n} objects, " if n is not None and n >= 0 else ""
    print(f"{what}labels {tuple(labels.shape)} written to {out} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
