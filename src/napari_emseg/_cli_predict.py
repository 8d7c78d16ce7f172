"""``emseg predict IN OUT``: probabilities of a volume with a bundled or saved model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ._textbar import ProgressBar

DEFAULT_MODEL = "mito-2d"
OUTPUT_SUFFIXES = (".tif", ".tiff", ".zarr")


def _parse_patch(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"patch must be integers separated by commas (e.g. 256,256), got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"patch sizes must be positive, got {text!r}")
    return values


def _parse_overlap(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"overlap must be in [0, 1), got {text}")
    return value


def register(subparsers) -> None:
    """Add the ``predict`` sub-command to ``emseg``'s sub-parsers."""
    p = subparsers.add_parser(
        "predict",
        help="predict foreground probabilities of an EM volume",
        description=(
            "Tiled U-Net prediction of an EM volume (TIFF, slice folder, zarr, HDF5, MRC). "
            "Writes float32 probabilities (or 0-255 uint8 with --uint8) to a .tif/.tiff "
            "or .zarr file."
        ),
    )
    p.add_argument("input", help="input volume (file or folder)")
    p.add_argument("output", help="output .tif, .tiff or .zarr")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled model name or checkpoint file (default: {DEFAULT_MODEL})")
    p.add_argument("--key", default=None, help="dataset inside an HDF5 file or zarr group")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average 8 (2D) / 16 (3D) flips and rotations")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--patch", type=_parse_patch, default=None,
                   help="tile size, e.g. 256,256 (2D) or 32,128,128 (3D); default from model")
    p.add_argument("--overlap", type=_parse_overlap, default=0.25,
                   help="tile overlap fraction in [0, 1) (default 0.25)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass")
    p.add_argument("--no-amp", action="store_true", help="no bf16/fp16 autocast on CUDA")
    p.add_argument("--uint8", action="store_true",
                   help="store probabilities as uint8 0-255 instead of float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from ._cli_blockwise import add_blockwise_arguments

    add_blockwise_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``emseg predict``; returns the exit code."""
    if getattr(args, "blockwise", False):
        from ._cli_blockwise import run_blockwise_predict

        return run_blockwise_predict(args)
    import numpy as np

    from . import io
    from .predict import predict_volume

    out_path = Path(args.output)
    if out_path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {out_path.name!r} must end in .tif, .tiff or .zarr")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    volume = io.read_volume(args.input, key=args.key)
    from .models import zoo

    model = zoo.load_model(args.model)
    meta = model.meta
    if not args.quiet:
        print(f"emseg predict: {Path(args.input).name} {tuple(volume.shape)} "
              f"{volume.dtype} with {meta.get('name') or args.model} "
              f"({meta['dims']}D, context {meta.get('context', 0)})", file=sys.stderr)
    progress = None if args.quiet else ProgressBar("predict", "tiles")
    t0 = time.perf_counter()
    try:
        prob = predict_volume(
            volume, model, patch=args.patch, overlap=args.overlap,
            batch_size=args.batch_size, device=args.device, amp=not args.no_amp,
            tta=args.tta, progress=progress,
        )
    except MemoryError as exc:
        print(f"emseg predict: error: {exc}", file=sys.stderr)
        return 2
    if args.uint8:
        prob = np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    io.write_volume(out_path, prob)
    if not args.quiet:
        print(f"emseg predict: wrote {out_path} {tuple(prob.shape)} {prob.dtype} "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
