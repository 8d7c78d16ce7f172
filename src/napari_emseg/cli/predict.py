"""``emseg predict IN OUT``: probabilities of a volume with a bundled or saved model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .._textbar import progress_bar
from ..adapt import predict_adapted, voxel_scale
from ..io import read_volume, scale_text, write_volume
from ..models.zoo import load_model
from ..predict import predict_planes
from . import common
from .blockwise import add_blockwise_arguments, run_blockwise_predict
from .common import check_output, memory_guard, model_help

DEFAULT_MODEL = "mito-2d"
OUTPUT_SUFFIXES = (".tif", ".tiff", ".zarr")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` sub-command to ``emseg``'s sub-parsers."""
    p = subparsers.add_parser(
        "predict",
        help="predict foreground probabilities of an EM volume",
        description=(
            "Tiled U-Net prediction of an EM volume (TIFF, slice folder, zarr, HDF5, MRC). "
            "Writes float32 probabilities (or 0-255 uint8 with --uint8) with the input's "
            "voxel size to a .tif/.tiff or .zarr file. When the volume's voxels are more than "
            "5 % finer or 1.5x coarser than the model's, it is predicted at the model's "
            "voxel size."
        ),
    )
    p.add_argument("input", metavar="IN", help="input volume (file or folder)")
    p.add_argument("output", metavar="OUT",
                   help="output .tif, .tiff or .zarr (never one of the inputs)")
    p.add_argument("--model", metavar="NAME|PATH", default=DEFAULT_MODEL, help=model_help())
    p.add_argument("--key", default=None,
                   help="dataset inside an HDF5 file or zarr group (default: the only one)")
    p.add_argument("--tta", type=common.tta_count, nargs="?", const=True, default=0,
                   metavar="N",
                   help="test-time augmentation: average N flips/rotations (4 = flips, 8 = "
                        "flips and rotations); --tta alone: all (8 in 2D, 16 in 3D)")
    p.add_argument("--device", type=common.device, default=None,
                   help=f"{common.DEVICE_CHOICES} (default: the best available)")
    p.add_argument("--patch", type=common.shape((2, 3), name="patch"), default=None,
                   metavar="[Z,]Y,X",
                   help="tile size, e.g. 256,256 (2D) or 32,128,128 (3D) (default: the model's)")
    p.add_argument("--overlap", type=common.fraction, default=0.25,
                   help="tile overlap fraction in [0, 1)")
    p.add_argument("--batch-size", type=common.positive_int, default=None, metavar="N",
                   help="tiles per forward pass (default: from the device's memory)")
    p.add_argument("--no-amp", action="store_true", help="no bf16/fp16 autocast on CUDA")
    p.add_argument("--uint8", action="store_true",
                   help="store probabilities as uint8 0-255 instead of float32")
    p.add_argument("--adapt", action="store_true",
                   help="re-estimate the model's BatchNorm statistics on this volume first "
                        "(label-free adaptation to a new microscope or stain)")
    common.add_voxel_size(p, "IN")
    p.add_argument("--no-resample", action="store_true",
                   help="predict at the volume's own voxel size even when it differs from "
                        "the model's")
    p.add_argument("--planes", action="store_true",
                   help="isotropic volumes, one-slice 2D models: predict the xy, xz and yz "
                        "sections and average them (boundaries in every orientation)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_blockwise_arguments(p)
    p.set_defaults(func=run)


def _check_output(args: argparse.Namespace) -> Path:
    """OUT: a .tif/.tiff/.zarr that is no input and replaces nothing unasked."""
    out = Path(args.output)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {out.name!r} must end in .tif, .tiff or .zarr")
    return check_output(out, [args.input, args.model], args.overwrite,
                         resume=args.blockwise)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    """predict_volume arguments from the flags."""
    return dict(patch=args.patch, overlap=args.overlap, batch_size=args.batch_size,
                device=args.device, amp=not args.no_amp, tta=args.tta)


def _predict_planes(args: argparse.Namespace, volume, model, voxel, bar) -> np.ndarray:
    """``--planes``: the mean of the three sectionings, at the volume's own voxel size."""
    if args.adapt:
        raise ValueError("--planes cannot be combined with --adapt")
    if voxel_scale(voxel, model.meta.get("voxel_size_nm"), 2) and not args.no_resample:
        raise ValueError("--planes predicts at the volume's voxel size, which does not fit "
                         "the model's: add --no-resample to accept that")
    return predict_planes(volume, model, progress=bar, **_engine_kwargs(args))


def model_label(given: str, meta: dict) -> str:
    """How the model is named in messages: a checkpoint by its file (and what it came from)."""
    name = meta.get("name")
    if not Path(given).suffix:  # a bundled model's name
        return name or given
    start = (meta.get("training") or {}).get("fine_tuned_from")
    return f"{Path(given).name} (fine-tuned from {start})" if start else Path(given).name


def run(args: argparse.Namespace) -> int:
    """Run ``emseg predict``; returns the exit code."""
    out = _check_output(args)
    if args.blockwise:
        return run_blockwise_predict(args)
    volume = read_volume(args.input, key=args.key)
    model = load_model(args.model)
    voxel = common.voxel_size_of(args, args.input, volume.ndim, args.key)
    meta = model.meta
    if not args.quiet:
        print(f"emseg predict: {Path(args.input).name} {tuple(volume.shape)} {volume.dtype}, "
              f"voxel {scale_text(voxel)}, with {model_label(args.model, meta)} "
              f"({meta['dims']}D, context {meta.get('context', 0)})", file=sys.stderr)
    t0 = time.perf_counter()
    with memory_guard(volume.shape, volume.dtype):
        bar = progress_bar("predict", "tiles", args.quiet)
        if args.planes:
            prob, info = _predict_planes(args, volume, model, voxel, bar), {}
        else:
            prob, info = predict_adapted(
                volume, model, voxel_size=voxel, adapt=args.adapt,
                resample_to_model=not args.no_resample, progress=bar,
                on_info=lambda info: common.tell_adaptation("predict", info),
                **_engine_kwargs(args))
        if args.uint8:
            prob = np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    spatial = voxel if voxel is not None and len(voxel) == min(prob.ndim, 3) else None
    write_volume(out, prob, voxel_size=spatial)
    if not args.quiet:
        print(f"emseg predict: wrote {out} {tuple(prob.shape)} {prob.dtype} "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
