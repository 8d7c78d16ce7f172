"""``emseg segment`` and ``emseg evaluate`` sub-commands.

``emseg segment PROB OUT`` turns a probability volume into instance labels
(see :func:`napari_emseg.postprocess.segment`); with ``--from-membranes``
PROB is a membrane (boundary) map and the output is neurites traced through z
(:func:`napari_emseg.neurons.segment_neurons`).  With ``--model`` the input
is a raw EM volume that is first run through the model.  ``emseg evaluate
PRED GT`` prints a table of metrics (instances, ``--semantic``,
``--boundary``, ``--segmentation`` for neurons, ``--detection`` for
synaptic sites) and optionally writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ._textbar import progress_bar


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``segment`` and ``evaluate`` sub-commands to ``emseg``."""
    seg = subparsers.add_parser(
        "segment",
        help="probabilities (or raw EM with --model) -> instance labels",
        description=(
            "Threshold a probability volume and split it into objects with a seeded "
            "watershed or connected components, optionally linking 2D instances "
            "across slices. With --model, INPUT is a raw EM volume that is "
            "predicted first."
        ),
    )
    seg.add_argument("input", metavar="PROB", help="probability volume (or raw EM with --model)")
    seg.add_argument("output", metavar="OUT", help="label volume to write (.tif or .zarr)")
    seg.add_argument("--model", metavar="NAME|PATH", help="predict INPUT with this model first")
    seg.add_argument(
        "--from-membranes", action="store_true",
        help="PROB is a membrane (boundary) map: neurites = watershed from distance-transform "
             "seeds in the cell interiors (boundary < --threshold), linked through z "
             "(--no-track to keep 2D ids); uses --dims, --h, --min-distance, --min-size, "
             "--spacing, --iou, --max-gap, --min-slices",
    )
    from .postprocess import SegmentSettings

    d = SegmentSettings()  # the fallback defaults, shown in the help

    def default(value) -> str:
        return f"default: the --model's setting, else {value}"

    seg.add_argument("--method", choices=["watershed", "components"], default=None,
                     help=default(d.method))
    seg.add_argument("--dims", type=int, choices=[2, 3], default=None,
                     help=default(d.dims) + "; 2 with --track")
    seg.add_argument(
        "--threshold", default=None,
        help="foreground threshold in [0, 1] or 'otsu' (default: the --model's tuned "
             f"threshold, else {d.threshold})",
    )
    seg.add_argument("--zfilter", type=int, default=None, metavar="N",
                     help=f"median window along z, 0 = off ({default(d.zfilter)})")
    seg.add_argument("--zfilter-mode", choices=["z", "yz"], default=None,
                     help=default(d.zfilter_mode))
    seg.add_argument("--opening", type=int, default=None, metavar="R",
                     help=f"opening radius ({default(d.opening)})")
    seg.add_argument("--closing", type=int, default=None, metavar="R",
                     help=f"closing radius ({default(d.closing)})")
    seg.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None,
                     help=f"fill holes in the mask ({default(d.fill)})")
    seg.add_argument(
        "--min-size", type=int, default=None, metavar="VOXELS",
        help=f"remove objects with fewer voxels, measured on the 3D objects ({default(d.min_size)}); "
             "with --from-membranes: merge smaller fragments into their neighbours "
             "(default 50, pixels per section for --dims 2)",
    )
    seg.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="voxel size, used for 3D distances (default: from the input's metadata, "
        "relative to its finest axis)",
    )
    seg.add_argument("--seed-method", choices=["hmaxima", "peaks", "distance"], default=None,
                     help=default(d.seed_method))
    seg.add_argument("--h", type=float, default=None,
                     help=f"h-maxima height in distance units ({default(d.h)}; "
                          "--from-membranes: the engine's default)")
    seg.add_argument("--min-distance", type=float, default=None,
                     help=f"peak distance in pixels ({default(d.min_distance)}; --from-membranes: "
                          "seeds closer than this are joined, the engine's default)")
    seg.add_argument("--seed-threshold", type=float, default=None, help="distance seed level")
    seg.add_argument("--track", action=argparse.BooleanOptionalAction, default=None,
                     help="link 2D instances across z (implies --dims 2; default: the --model's "
                          "setting, else off; on with --from-membranes)")
    seg.add_argument("--iou", type=float, default=None,
                     help=f"tracking IoU threshold ({default(d.iou_threshold)})")
    seg.add_argument("--max-gap", type=int, default=None,
                     help=f"slices an object may skip ({default(d.max_gap)})")
    seg.add_argument("--min-slices", type=int, default=None,
                     help=f"drop objects spanning fewer slices ({default(d.min_slices)})")
    seg.add_argument("--channel", type=int, default=None, help="class channel of a multi-class map")
    seg.add_argument("--device", default=None, help="device for --model (cuda, mps, cpu)")
    seg.add_argument("--quiet", action="store_true", help="no progress output")
    from ._cli_blockwise import add_blockwise_arguments

    add_blockwise_arguments(seg)
    seg.set_defaults(func=run_segment)

    ev = subparsers.add_parser(
        "evaluate",
        help="score instance labels against ground truth",
        description="Foreground IoU/Dice, instance AP (Hungarian matching), VOI and "
        "adapted Rand error of PRED against GT (or, with --boundary, membrane-map "
        "scores; --segmentation, neuron scores; --detection, synaptic-site scores). "
        "A ground truth holding only 0 and 1 is split into connected components.",
    )
    ev.add_argument("pred", metavar="PRED", help="predicted labels")
    ev.add_argument("gt", metavar="GT", help="ground-truth labels")
    ev.add_argument("--json", metavar="OUT", help="also write the metrics to this JSON file")
    ev.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.5, 0.75], help="AP IoU thresholds"
    )
    ev.add_argument("--per-slice", action="store_true", help="also score every z-slice")
    ev.add_argument(
        "--semantic", action="store_true", help="values are classes: per-class IoU/Dice"
    )
    ev.add_argument(
        "--boundary", type=float, metavar="PX", default=None,
        help="nonzero = membrane/boundary: pixel error, pixel F1 and boundary F1 "
        "with matches within PX pixels in each slice",
    )
    ev.add_argument(
        "--segmentation", action="store_true",
        help="neurons: VOI split/merge, adapted Rand error and the ISBI 2012 V_rand / V_info, "
             "on the voxels where GT is nonzero",
    )
    ev.add_argument(
        "--detection", type=float, metavar="DIST_NM", default=None,
        help="synaptic sites: object precision/recall/F1 (a site is found by a prediction "
             "overlapping it or within DIST_NM) and mean distances in nm",
    )
    ev.add_argument(
        "--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), default=None,
        help="voxel size in nm for --detection (default: from GT's metadata)",
    )
    ev.set_defaults(func=run_evaluate)


def resolve_threshold(args: argparse.Namespace, meta: dict | None = None) -> float | str:
    """``--threshold``, else the ``--model``'s tuned threshold, else the default.

    ``meta``: the loaded model's metadata (else the checkpoint is read for it).
    """
    from .postprocess import SegmentSettings, segment_defaults

    if getattr(args, "threshold", None) is not None:
        return _parse_threshold(args.threshold)
    if getattr(args, "model", None):
        from .models.zoo import model_info

        value = segment_defaults(meta or model_info(args.model)).threshold
        if not getattr(args, "quiet", False):
            print(f"threshold {value:g} (tuned for {args.model})", file=sys.stderr)
        return value
    return SegmentSettings().threshold


def _parse_threshold(text: str) -> float | str:
    if str(text).lower() == "otsu":
        return "otsu"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--threshold must be a number in [0, 1] or 'otsu'; got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1]; got {value}")
    return value


#: SegmentSettings field -> ``emseg segment`` option (dest)
_SETTING_OPTIONS = {
    "method": "method", "dims": "dims", "zfilter": "zfilter", "zfilter_mode": "zfilter_mode",
    "opening": "opening", "closing": "closing", "fill": "fill_holes", "min_size": "min_size",
    "seed_method": "seed_method", "min_distance": "min_distance", "h": "h",
    "seed_threshold": "seed_threshold", "track": "track", "iou_threshold": "iou",
    "max_gap": "max_gap", "min_slices": "min_slices",
}


def segment_settings(args: argparse.Namespace, meta: dict | None = None):
    """The model's settings (else the defaults) with the options that were given.

    ``--track`` alone implies ``--dims 2``; ``--dims 3`` alone turns tracking off.

    Returns
    -------
    napari_emseg.postprocess.SegmentSettings
    """
    from .postprocess import segment_defaults

    given = {field: getattr(args, dest) for field, dest in _SETTING_OPTIONS.items()
             if getattr(args, dest, None) is not None}
    if "min_distance" in given:
        given["min_distance"] = int(given["min_distance"])
    if given.get("track") and "dims" not in given:
        given["dims"] = 2
    if given.get("dims") == 3 and "track" not in given:
        given["track"] = False
    if given.get("track") and given.get("dims") != 2:
        raise ValueError("--track links 2D instances across slices: use it with --dims 2")
    settings = segment_defaults(meta).updated(**given)
    return settings.updated(threshold=resolve_threshold(args, meta or {}))


def _spacing(args: argparse.Namespace, dims: int) -> tuple[float, ...] | None:
    """--spacing, else the input's voxel size (relative to its finest axis) for 3D."""
    if args.spacing:
        return tuple(args.spacing)
    if dims != 3:
        return None
    from ._voxel import read_voxel_size, relative_spacing, scale_text

    sizes = read_voxel_size(args.input, ndim=3)
    if sizes is None:
        return None
    spacing = relative_spacing(sizes)
    if not args.quiet:
        print(f"voxel size {scale_text(sizes)} (from the file): 3D spacing {spacing}",
              file=sys.stderr)
    return spacing


def run_segment(args: argparse.Namespace) -> int:
    """``emseg segment``: probabilities (or raw EM + --model) → instance labels."""
    if args.from_membranes:
        _check_membrane_options(args)
    if not Path(args.input).exists():
        raise FileNotFoundError(f"no such file or folder: {args.input}")
    model = None
    if args.model and not getattr(args, "blockwise", False):
        from .models.zoo import load_model

        model = load_model(args.model)  # read once: settings and prediction
    settings = None if args.from_membranes else segment_settings(args, _model_meta(args, model))
    if getattr(args, "blockwise", False):
        from ._cli_blockwise import run_blockwise_segment

        return run_blockwise_segment(_blockwise_args(args, settings))
    import numpy as np

    from .io import write_labels

    t0 = time.perf_counter()
    prob = _read_probabilities(args, model)
    if args.from_membranes:
        labels = _segment_neurons(args, prob)
        noun = "neurites"
    else:
        labels = _segment_instances(args, prob, settings)
        noun = "2D instances" if settings.dims == 2 and not settings.track else "objects"
    path = write_labels(args.output, labels)
    n = int(labels.max()) if labels.size else 0
    print(
        f"{n} {noun}, shape {tuple(np.shape(labels))}, written to {path} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def _model_meta(args: argparse.Namespace, model) -> dict | None:
    """The ``--model``'s metadata (None without a model)."""
    if model is not None:
        return model.meta
    if not args.model:
        return None
    from .models.zoo import model_info

    return model_info(args.model)


def _read_probabilities(args: argparse.Namespace, model):
    """INPUT as checked float32 probabilities (ZYX), predicted first with ``--model``."""
    from .io import read_volume
    from .postprocess import as_probabilities

    volume = read_volume(args.input)
    if model is None:
        try:
            return as_probabilities(volume, args.channel, name=str(args.input))
        except ValueError as exc:
            raise ValueError(f"{exc} (raw EM: add --model)") from None
    from .predict import predict_volume

    print(f"predicting {tuple(volume.shape)} with {args.model} ...", file=sys.stderr)
    prob = predict_volume(volume, model, device=args.device,
                          progress=progress_bar("predict", "tiles", args.quiet))
    if prob.ndim == volume.ndim + 1 == 3:  # classes of a 2D image: give them a z axis
        return as_probabilities(prob[:, None], args.channel, name="the prediction")[0]
    return as_probabilities(prob, args.channel, name="the prediction")


def _blockwise_args(args: argparse.Namespace, settings) -> argparse.Namespace:
    """``args`` with the method, dims, seeds and tracking of ``settings`` filled in."""
    filled = argparse.Namespace(**vars(args))
    if settings is not None:
        for field in ("method", "dims", "seed_method", "min_distance", "h", "seed_threshold",
                      "track"):
            dest = _SETTING_OPTIONS[field]
            if getattr(filled, dest, None) is None:
                setattr(filled, dest, getattr(settings, field))
    return filled


def _check_membrane_options(args: argparse.Namespace) -> None:
    """Refuse options of the mitochondria path that --from-membranes would ignore."""
    if getattr(args, "blockwise", False):
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


def _segment_neurons(args: argparse.Namespace, prob):
    """``--from-membranes``: :func:`napari_emseg.neurons.segment_neurons` with the given flags."""
    from .neurons import segment_neurons
    from .postprocess import otsu_threshold

    # a membrane model's tuned threshold is for pixels, not cells: only --threshold counts
    threshold = _parse_threshold(args.threshold) if args.threshold is not None else None
    if threshold == "otsu":
        threshold = otsu_threshold(prob)
    dims = args.dims or 2
    return segment_neurons(
        prob, dims=dims, spacing=_spacing(args, dims), track=args.track is not False,
        progress=progress_bar("neurons", "", args.quiet),
        **_given(threshold=threshold, h=args.h, min_distance=args.min_distance,
                 min_size=args.min_size, iou=args.iou, max_gap=args.max_gap,
                 min_slices=args.min_slices),
    )


def _given(**kwargs) -> dict:
    """The keyword arguments that were given (not None): the engine's defaults apply to the rest."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _segment_instances(args: argparse.Namespace, prob, settings):
    """Mitochondria-style instances: :func:`napari_emseg.postprocess.segment`."""
    from . import postprocess

    result = postprocess.segment(
        prob, settings=settings, spacing=_spacing(args, settings.dims),
        progress=progress_bar("segment", "", args.quiet),
    )
    return result.labels


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def format_table(result: dict) -> str:
    """Plain-text table of an :func:`napari_emseg.metrics.evaluate` result."""
    lines = [f"shape: {' x '.join(map(str, result['shape']))}"]
    lines += [f"note: {note}" for note in result.get("notes", [])]
    if "classes" in result:
        lines.append(f"{'class':>8} {'IoU':>8} {'Dice':>8} {'pred vox':>12} {'gt vox':>12}")
        for c, s in result["classes"].items():
            lines.append(
                f"{c:>8} {_fmt(s['iou']):>8} {_fmt(s['dice']):>8} "
                f"{s['pred_voxels']:>12} {s['gt_voxels']:>12}"
            )
    elif "segmentation" in result:
        lines += _segmentation_lines(result["segmentation"])
    elif "detection" in result:
        lines += _detection_lines(result["detection"], result.get("unit", "voxels"))
    elif "boundary" in result:
        b = result["boundary"]
        lines.append(f"pixel error {_fmt(b['pixel_error'])}, pixel F1 {_fmt(b['pixel_f1'])}")
        lines.append(
            f"boundary F1 within {b['tolerance']:g} px {_fmt(b['f1'])} "
            f"(precision {_fmt(b['precision'])}, recall {_fmt(b['recall'])})"
        )
    else:
        inst = result["instances"]
        fg = result["foreground"]
        lines.append(f"objects: pred {inst['n_pred']}, gt {inst['n_gt']}")
        lines.append(f"foreground IoU {_fmt(fg['iou'])}, Dice {_fmt(fg['dice'])}")
        lines.append(
            f"{'IoU thr':>8} {'TP':>6} {'FP':>6} {'FN':>6} {'prec':>8} {'recall':>8} "
            f"{'F1':>8} {'AP':>8}"
        )
        for t, s in inst["thresholds"].items():
            lines.append(
                f"{t:>8} {s['tp']:>6} {s['fp']:>6} {s['fn']:>6} {_fmt(s['precision']):>8} "
                f"{_fmt(s['recall']):>8} {_fmt(s['f1']):>8} {_fmt(s['ap']):>8}"
            )
        v, r = result["voi"], result["adapted_rand"]
        lines.append(
            f"VOI split {_fmt(v['split'])}, merge {_fmt(v['merge'])}, total {_fmt(v['total'])} (bits)"
        )
        lines.append(
            f"adapted Rand error {_fmt(r['error'])} "
            f"(precision {_fmt(r['precision'])}, recall {_fmt(r['recall'])})"
        )
    if result.get("per_slice"):
        keys = [k for k in result["per_slice"][0] if k != "z"]
        lines.append("per slice:")
        lines.append(f"{'z':>5} " + " ".join(f"{k:>10}" for k in keys))
        for row in result["per_slice"]:
            lines.append(f"{row['z']:>5} " + " ".join(f"{_fmt(row[k]):>10}" for k in keys))
        if result.get("slice_mean"):
            mean = result["slice_mean"]
            lines.append(f"{'mean':>5} " + " ".join(f"{_fmt(mean[k]):>10}" for k in keys))
    return "\n".join(lines)


def _segmentation_lines(seg: dict) -> list[str]:
    v, r, vr, vi = seg["voi"], seg["adapted_rand"], seg["v_rand"], seg["v_info"]
    return [
        f"objects on the GT foreground: pred {seg['n_pred']}, gt {seg['n_gt']}",
        f"VOI split {_fmt(v['split'])}, merge {_fmt(v['merge'])}, total {_fmt(v['total'])} "
        "(bits, GT foreground)",
        f"adapted Rand error {_fmt(r['error'])} "
        f"(precision {_fmt(r['precision'])}, recall {_fmt(r['recall'])})",
        f"V_rand {_fmt(vr['score'])} (split {_fmt(vr['split'])}, merge {_fmt(vr['merge'])})",
        f"V_info {_fmt(vi['score'])} (split {_fmt(vi['split'])}, merge {_fmt(vi['merge'])})",
    ]


def _detection_lines(det: dict, unit: str) -> list[str]:
    return [
        f"sites: pred {det['n_pred']}, gt {det['n_gt']}; found within "
        f"{det['max_distance']:g} {unit}: {det['found']} of gt, {det['correct']} of pred",
        f"precision {_fmt(det['precision'])}, recall {_fmt(det['recall'])}, "
        f"F1 {_fmt(det['f1'])}",
        f"mean distance pred -> gt {_fmt(det['mean_distance_pred_to_gt'])} {unit}, "
        f"gt -> pred {_fmt(det['mean_distance_gt_to_pred'])} {unit}",
    ]


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if hasattr(obj, "item"):  # numpy scalars
        return _json_safe(obj.item())
    return obj


def _detection_spacing(args: argparse.Namespace, ndim: int) -> tuple[float, ...] | None:
    """Voxel size in nm: --spacing, else GT's metadata, else None (distances in voxels)."""
    if args.spacing:
        return tuple(args.spacing)[-ndim:]
    from ._voxel import read_voxel_size

    sizes = read_voxel_size(args.gt, ndim=ndim)
    if sizes is None:
        print("voxel size unknown (give --spacing Z Y X in nm): distances in voxels",
              file=sys.stderr)
    return sizes


def run_evaluate(args: argparse.Namespace) -> int:
    """``emseg evaluate``: print a metrics table and optionally write JSON."""
    import numpy as np

    from .io import read_volume
    from .metrics import evaluate

    for p in (args.pred, args.gt):
        if not Path(p).exists():
            raise FileNotFoundError(f"no such file or folder: {p}")
    pred = np.asarray(read_volume(args.pred))
    gt = np.asarray(read_volume(args.gt))
    extra: dict = {}
    spacing = None
    if args.detection is not None:
        spacing = _detection_spacing(args, gt.ndim)
        extra["unit"] = "nm" if spacing is not None else "voxels"
        extra["spacing"] = list(spacing) if spacing is not None else None
    result = evaluate(
        pred, gt, thresholds=args.thresholds, per_slice=args.per_slice,
        semantic=args.semantic, boundary=args.boundary, segmentation=args.segmentation,
        detection=args.detection, spacing=spacing,
    )
    result = _json_safe({"pred": str(args.pred), "gt": str(args.gt), **extra, **result})
    print(format_table(result))
    if args.json:
        from ._atomic import atomic_path

        target = Path(args.json)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
        print(f"metrics written to {target}")
    return 0
