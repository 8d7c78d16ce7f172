"""``emseg segment PROB OUT``: probabilities (or raw EM with ``--model``) → instance labels.

Mitochondria-style instances come from :func:`napari_emseg.postprocess.segment`
with the ``--model``'s settings (else the defaults) and the options given;
with ``--from-membranes`` PROB is a membrane (boundary) map and the output is
neurites traced through z (:func:`napari_emseg.neurons.segment_neurons`).
With ``--model`` the input is a raw EM volume that is predicted first.  The
labels keep the input's voxel size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .. import postprocess
from .._textbar import progress_bar
from ..adapt import predict_adapted
from ..io import read_volume, relative_spacing, scale_text, write_labels
from ..models.zoo import load_model, model_info
from ..neurons import segment_neurons
from . import common
from .blockwise import add_blockwise_arguments, run_blockwise_segment
from .common import check_output, memory_guard, model_help, resolve_threshold

__all__ = ["fitted_settings", "register", "run", "segment_settings"]

#: SegmentSettings field -> ``emseg segment`` option (dest)
SETTING_OPTIONS = {
    "method": "method", "dims": "dims", "zfilter": "zfilter", "zfilter_mode": "zfilter_mode",
    "opening": "opening", "closing": "closing", "fill": "fill_holes", "min_size": "min_size",
    "seed_method": "seed_method", "min_distance": "min_distance", "h": "h",
    "seed_threshold": "seed_threshold", "track": "track", "iou_threshold": "iou",
    "max_gap": "max_gap", "min_slices": "min_slices",
}
#: SegmentSettings fields the blockwise path takes from the resolved settings
BLOCKWISE_FIELDS = ("method", "dims", "seed_method", "min_distance", "h", "seed_threshold",
                    "track", "iou_threshold", "max_gap", "min_slices")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``segment`` sub-command to ``emseg``."""
    seg = subparsers.add_parser(
        "segment",
        help="probabilities (or raw EM with --model) -> instance labels",
        description=(
            "Threshold a probability volume and split it into objects with a seeded "
            "watershed or connected components, optionally linking 2D instances "
            "across slices. With --model, INPUT is a raw EM volume that is "
            "predicted first. The labels keep the input's voxel size."
        ),
    )
    seg.add_argument("input", metavar="PROB", help="probability volume (or raw EM with --model)")
    seg.add_argument("output", metavar="OUT",
                     help="label volume to write (.tif or .zarr; never the input)")
    seg.add_argument("--model", metavar="NAME|PATH",
                     help=model_help("predict INPUT with this model first"))
    seg.add_argument(
        "--from-membranes", action="store_true",
        help="PROB is a membrane (boundary) map: neurites = watershed from distance-transform "
             "seeds in the cell interiors (boundary < --threshold), linked through z "
             "(--no-track to keep 2D ids); uses --dims, --h, --min-distance, --min-size, "
             "--spacing, --iou, --max-gap, --min-slices",
    )
    _add_setting_arguments(seg)
    common.add_voxel_size(seg, "INPUT (with --model: predicted at the model's voxel size "
                               "as emseg predict does; the labels keep it)")
    seg.add_argument("--channel", type=common.non_negative_int, default=None, metavar="C",
                     help="class channel of a multi-class map")
    seg.add_argument("--device", type=common.device, default=None,
                     help=f"device for --model: {common.DEVICE_CHOICES} "
                          "(default: the best available)")
    seg.add_argument("--overwrite", action="store_true",
                     help="replace an existing OUT (without it, --blockwise resumes an "
                          "unfinished OUT)")
    seg.add_argument("--quiet", action="store_true", help="no progress output")
    add_blockwise_arguments(seg)
    seg.set_defaults(func=run)


def _add_setting_arguments(seg: argparse.ArgumentParser) -> None:
    """The options of :class:`~napari_emseg.postprocess.SegmentSettings` (and --spacing)."""
    d = postprocess.SegmentSettings()  # the fallback defaults, shown in the help

    def default(value) -> str:
        return f"default: the --model's setting, else {value}"

    seg.add_argument("--method", choices=["watershed", "components"], default=None,
                     help=default(d.method))
    seg.add_argument("--dims", type=int, choices=[2, 3], default=None,
                     help=default(d.dims) + "; 2 with --track")
    seg.add_argument("--threshold", type=common.threshold, default=None, metavar="T",
                     help="foreground threshold in [0, 1] or 'otsu' (default: the --model's "
                          f"tuned threshold, else {d.threshold})")
    seg.add_argument("--zfilter", type=common.non_negative_int, default=None, metavar="N",
                     help=f"median window along z, 0 = off ({default(d.zfilter)})")
    seg.add_argument("--zfilter-mode", choices=["z", "yz"], default=None,
                     help=default(d.zfilter_mode))
    seg.add_argument("--opening", type=common.non_negative_int, default=None, metavar="R",
                     help=f"opening radius ({default(d.opening)})")
    seg.add_argument("--closing", type=common.non_negative_int, default=None, metavar="R",
                     help=f"closing radius ({default(d.closing)})")
    seg.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None,
                     help=f"fill holes in the mask ({default(d.fill)})")
    seg.add_argument(
        "--min-size", type=common.non_negative_int, default=None, metavar="VOXELS",
        help=f"remove objects with fewer voxels, measured on the 3D objects "
             f"({default(d.min_size)}); with --from-membranes: merge smaller fragments into "
             "their neighbours (default 50, pixels per section for --dims 2)",
    )
    seg.add_argument("--spacing", type=common.positive_float, nargs=3, metavar=("Z", "Y", "X"),
                     help="voxel size, used for 3D distances (default: from the input's "
                          "metadata, relative to its finest axis)")
    seg.add_argument("--seed-method", choices=["hmaxima", "peaks", "distance"], default=None,
                     help=default(d.seed_method))
    seg.add_argument("--h", type=common.positive_float, default=None,
                     help=f"h-maxima height in distance units ({default(d.h)}; "
                          "--from-membranes: the engine's default)")
    seg.add_argument("--min-distance", type=common.positive_float, default=None, metavar="PX",
                     help=f"peak distance, whole pixels ({default(d.min_distance)}); "
                          "--from-membranes: seeds closer than this are joined, fractions "
                          "allowed (the engine's default)")
    seg.add_argument("--seed-threshold", type=common.non_negative_float, default=None,
                     metavar="D",
                     help="distance seed level")
    seg.add_argument("--track", action=argparse.BooleanOptionalAction, default=None,
                     help="link 2D instances across z (implies --dims 2; default: the --model's "
                          "setting, else off; on with --from-membranes)")
    seg.add_argument("--iou", type=common.probability, default=None,
                     help=f"tracking IoU threshold ({default(d.iou_threshold)})")
    seg.add_argument("--max-gap", type=common.non_negative_int, default=None, metavar="N",
                     help=f"slices an object may skip ({default(d.max_gap)})")
    seg.add_argument("--min-slices", type=common.positive_int, default=None, metavar="N",
                     help=f"drop objects spanning fewer slices ({default(d.min_slices)})")


# ----------------------------------------------------------------- settings
def _whole_pixels(value: float) -> int:
    """``--min-distance`` of the mitochondria path: a whole number of pixels, never truncated."""
    if not float(value).is_integer():
        raise ValueError(f"--min-distance must be a whole number of pixels, got {value:g} "
                         "(fractions only with --from-membranes)")
    return int(value)


def segment_settings(args: argparse.Namespace, meta: dict | None = None):
    """The model's settings (else the defaults) with the options that were given.

    ``--track`` alone implies ``--dims 2``; ``--dims 3`` alone turns tracking off.

    Returns
    -------
    napari_emseg.postprocess.SegmentSettings
    """
    given = {field: getattr(args, dest) for field, dest in SETTING_OPTIONS.items()
             if getattr(args, dest, None) is not None}
    if "min_distance" in given:
        given["min_distance"] = _whole_pixels(given["min_distance"])
    if given.get("track") and "dims" not in given:
        given["dims"] = 2
    if given.get("dims") == 3 and "track" not in given:
        given["track"] = False
    if given.get("track") and given.get("dims") != 2:
        raise ValueError("--track links 2D instances across slices: use it with --dims 2")
    settings = postprocess.segment_defaults(meta).updated(**given)
    return settings.updated(threshold=resolve_threshold(args, meta or {}))


def fitted_settings(args: argparse.Namespace, settings, prob: np.ndarray,
                    voxel: tuple[float, ...] | None, meta: dict | None):
    """``settings`` fitted to thick sections (z-filter, min size) unless given as flags.

    The section thickness comes from ``--spacing``, the voxel size, or the
    probabilities themselves (:func:`napari_emseg.postprocess.section_ratio`).
    """
    keep = [field for field, dest in SETTING_OPTIONS.items()
            if getattr(args, dest, None) is not None]
    settings, note = postprocess.fit_to_data(settings, prob, args.spacing or voxel, keep, meta)
    if note and not args.quiet:
        print(f"{note} (give --zfilter / --min-size to choose them)", file=sys.stderr)
    return settings


def _model_meta(args: argparse.Namespace, model) -> dict | None:
    """The ``--model``'s metadata (None without a model)."""
    if model is not None:
        return model.meta
    return model_info(args.model) if args.model else None


def blockwise_skipped(settings) -> list[str]:
    """Steps of ``settings`` that ``--blockwise`` does not apply, as readable text."""
    skipped = []
    if settings.zfilter and settings.zfilter > 1:
        skipped.append(f"z-median filter {settings.zfilter}")
    if settings.min_size or settings.min_volume:
        skipped.append(f"size filter ({settings.min_volume or settings.min_size} "
                       f"{'nm³' if settings.min_volume else 'voxels'})")
    skipped += [what for what, on in (("smoothing", settings.smooth),
                                      (f"opening {settings.opening}", settings.opening),
                                      (f"closing {settings.closing}", settings.closing),
                                      ("hole filling", settings.fill)) if on]
    return skipped


def _blockwise_args(args: argparse.Namespace, settings) -> argparse.Namespace:
    """``args`` with the threshold, method, dims, seeds and tracking of ``settings``.

    Steps the blockwise path cannot apply (z-median, size filter, morphology)
    are named in a warning on stderr: the result has more, smaller objects.
    """
    skipped = blockwise_skipped(settings)
    if skipped:
        print(f"warning: --blockwise skips the {', '.join(skipped)} of these settings: "
              "expect more and smaller objects than without --blockwise", file=sys.stderr)
    filled = argparse.Namespace(**vars(args))
    filled.threshold = settings.threshold
    for field in BLOCKWISE_FIELDS:
        setattr(filled, SETTING_OPTIONS[field], getattr(settings, field))
    return filled


def _check_membrane_options(args: argparse.Namespace) -> None:
    """Refuse options of the mitochondria path that --from-membranes would ignore."""
    if args.blockwise:
        raise ValueError("--from-membranes does not run --blockwise")
    if args.track and args.dims == 3:
        raise ValueError("--track links 2D sections through z: use it with --dims 2")
    unused = [flag for flag, on in (
        ("--method components", args.method not in (None, "watershed")),
        ("--zfilter", bool(args.zfilter)), ("--zfilter-mode", args.zfilter_mode is not None),
        ("--opening", bool(args.opening)), ("--closing", bool(args.closing)),
        ("--fill-holes", bool(args.fill_holes)),
        ("--seed-method", args.seed_method not in (None, "hmaxima")),
        ("--seed-threshold", args.seed_threshold is not None)) if on]
    if unused:
        raise ValueError(f"not used with --from-membranes: {', '.join(unused)}")


# ----------------------------------------------------------------- the work
def looks_like_probabilities(volume) -> bool:
    """Floating-point values within [0, 1] (on a sample of at most about 100 000 voxels)."""
    a = np.asarray(volume)
    if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
        return False
    sample = a.ravel()[:: max(1, a.size // 100_000)]
    return bool(np.nanmin(sample) >= 0.0 and np.nanmax(sample) <= 1.0)


def _probabilities(args: argparse.Namespace, volume, model,
                   voxel: tuple[float, ...] | None) -> np.ndarray:
    """INPUT as checked float32 probabilities (ZYX), predicted first with ``--model``.

    The prediction is ``emseg predict``'s (:func:`~napari_emseg.adapt.predict_adapted`
    at the volume's voxel size, without ``--adapt``).
    """
    if model is None:
        try:
            return postprocess.as_probabilities(volume, args.channel, name=str(args.input))
        except ValueError as exc:
            raise ValueError(f"{exc} (raw EM: add --model)") from None
    if not args.quiet:
        print(f"predicting {tuple(volume.shape)} with {args.model} ...", file=sys.stderr)
        if looks_like_probabilities(volume):
            print(f"emseg segment: warning: {args.input} holds values in [0, 1] like "
                  "probabilities; with --model it is predicted as raw EM (drop --model to "
                  "segment it as it is)", file=sys.stderr)
    prob, _info = predict_adapted(
        volume, model, voxel_size=voxel, device=args.device,
        progress=progress_bar("predict", "tiles", args.quiet),
        on_info=None if args.quiet else lambda info: common.tell_adaptation("segment", info))
    if prob.ndim == volume.ndim + 1 == 3:  # classes of a 2D image: give them a z axis
        return postprocess.as_probabilities(prob[:, None], args.channel,
                                            name="the prediction")[0]
    return postprocess.as_probabilities(prob, args.channel, name="the prediction")


def _spacing(args: argparse.Namespace, dims: int,
             voxel: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """--spacing, else the input's voxel size (relative to its finest axis) for 3D."""
    if args.spacing:
        return tuple(args.spacing)
    if dims != 3 or voxel is None or len(voxel) != 3:
        return None
    spacing = relative_spacing(voxel)
    if not args.quiet:
        print(f"voxel size {scale_text(voxel)}: 3D spacing {spacing}",
              file=sys.stderr)
    return spacing


def _neurites(args: argparse.Namespace, prob: np.ndarray,
              voxel: tuple[float, ...] | None) -> np.ndarray:
    """``--from-membranes``: :func:`napari_emseg.neurons.segment_neurons` with the given flags."""
    # a membrane model's tuned threshold is for pixels, not cells: only --threshold counts
    threshold = args.threshold
    if threshold == "otsu":
        threshold = postprocess.otsu_threshold(prob)
    dims = args.dims or 2
    given = dict(threshold=threshold, h=args.h, min_distance=args.min_distance,
                 min_size=args.min_size, iou=args.iou, max_gap=args.max_gap,
                 min_slices=args.min_slices)
    return segment_neurons(
        prob, dims=dims, spacing=_spacing(args, dims, voxel), track=args.track is not False,
        progress=progress_bar("neurons", "", args.quiet),
        **{k: v for k, v in given.items() if v is not None},  # the engine's defaults for the rest
    )


def _instances(args: argparse.Namespace, prob: np.ndarray, settings,
               voxel: tuple[float, ...] | None) -> postprocess.Segmentation:
    """Mitochondria-style instances: :func:`napari_emseg.postprocess.segment`."""
    return postprocess.segment(
        prob, settings=settings, spacing=_spacing(args, settings.dims, voxel),
        progress=progress_bar("segment", "", args.quiet),
    )


def _labels(args: argparse.Namespace, prob: np.ndarray, settings,
            voxel: tuple[float, ...] | None) -> tuple[np.ndarray, str]:
    """The labels and what they are called ("6 objects (2 smaller than … removed)")."""
    if args.from_membranes:
        labels = _neurites(args, prob, voxel)
        return labels, f"{int(labels.max()) if labels.size else 0} neurites"
    noun = "2D instances" if settings.dims == 2 and not settings.track else "objects"
    result = _instances(args, prob, settings, voxel)
    labels = result.labels
    text = f"{int(labels.max()) if labels.size else 0} {noun}"
    if result.dropped:
        text += f" ({result.dropped} smaller ones removed by --min-size {settings.min_size}"
        text += "; lower it to keep them)" if not labels.any() else ")"
    return labels, text


def run(args: argparse.Namespace) -> int:
    """``emseg segment``: probabilities (or raw EM + --model) → instance labels."""
    if args.from_membranes:
        _check_membrane_options(args)
    if not Path(args.input).exists():
        raise FileNotFoundError(f"no such file or folder: {args.input}")
    # read the model once: settings and prediction (blockwise predicts from the file)
    model = load_model(args.model) if args.model and not args.blockwise else None
    meta = _model_meta(args, model)
    settings = None if args.from_membranes else segment_settings(args, meta)
    if args.blockwise:
        if args.voxel_size:
            raise ValueError("--voxel-size is not available with --blockwise")
        return run_blockwise_segment(_blockwise_args(args, settings))
    out = check_output(args.output, [args.input, args.model], args.overwrite)
    t0 = time.perf_counter()
    volume = read_volume(args.input)
    with memory_guard(volume.shape, volume.dtype):
        voxel = common.voxel_size_of(args, args.input, volume.ndim)
        prob = _probabilities(args, volume, model, voxel)
        voxel = voxel if prob.ndim == volume.ndim else None  # a 2D image got a z axis
        if settings is not None:
            settings = fitted_settings(args, settings, prob, voxel, meta)
        labels, found = _labels(args, prob, settings, voxel)
    path = write_labels(out, labels, voxel_size=voxel)
    print(f"{found}, shape {tuple(np.shape(labels))}, written to {path} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
