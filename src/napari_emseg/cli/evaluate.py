"""``emseg evaluate PRED GT``: score labels against ground truth.

Prints a table of :func:`napari_emseg.metrics.evaluate` results (instances,
``--semantic``, ``--boundary``, ``--segmentation`` for neurons,
``--detection`` for synaptic sites) and optionally writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from .. import metrics
from ..io import atomic_path, read_volume, read_voxel_size
from . import common
from .common import check_output

__all__ = ["format_table", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` sub-command to ``emseg``."""
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
    ev.add_argument("--json", metavar="OUT",
                    help="also write the metrics to this JSON file (never PRED or GT)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    ev.add_argument("--thresholds", type=common.probability, nargs="+", default=[0.5, 0.75],
                    metavar="IOU", help="AP IoU thresholds")
    ev.add_argument("--per-slice", action="store_true", help="also score every z-slice")
    ev.add_argument(
        "--semantic", action="store_true", help="values are classes: per-class IoU/Dice"
    )
    ev.add_argument(
        "--boundary", type=common.non_negative_float, metavar="PX", default=None,
        help="nonzero = membrane/boundary: pixel error, pixel F1 and boundary F1 "
        "with matches within PX pixels in each slice",
    )
    ev.add_argument(
        "--segmentation", action="store_true",
        help="neurons: VOI split/merge, adapted Rand error and the ISBI 2012 V_rand / V_info, "
             "on the voxels where GT is nonzero",
    )
    ev.add_argument(
        "--detection", type=common.non_negative_float, metavar="DIST_NM", default=None,
        help="synaptic sites: object precision/recall/F1 (a site is found by a prediction "
             "overlapping it or within DIST_NM) and mean distances in nm",
    )
    ev.add_argument(
        "--spacing", type=common.positive_float, nargs=3, metavar=("Z", "Y", "X"), default=None,
        help="voxel size in nm for --detection (default: from GT's metadata)",
    )
    ev.set_defaults(func=run)


def _fmt(x) -> str:
    """A table cell: 4 decimals for floats, ``n/a`` for None."""
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
        lines += _class_lines(result["classes"])
    elif "segmentation" in result:
        lines += _segmentation_lines(result["segmentation"])
    elif "detection" in result:
        lines += _detection_lines(result["detection"], result.get("unit", "voxels"))
    elif "boundary" in result:
        lines += _boundary_lines(result["boundary"])
    else:
        lines += _instance_lines(result)
    if result.get("per_slice"):
        lines += _per_slice_lines(result["per_slice"], result.get("slice_mean"))
    return "\n".join(lines)


def _class_lines(classes: dict) -> list[str]:
    lines = [f"{'class':>8} {'IoU':>8} {'Dice':>8} {'pred vox':>12} {'gt vox':>12}"]
    for c, s in classes.items():
        lines.append(f"{c:>8} {_fmt(s['iou']):>8} {_fmt(s['dice']):>8} "
                     f"{s['pred_voxels']:>12} {s['gt_voxels']:>12}")
    return lines


def _boundary_lines(b: dict) -> list[str]:
    return [
        f"pixel error {_fmt(b['pixel_error'])}, pixel F1 {_fmt(b['pixel_f1'])}",
        f"boundary F1 within {b['tolerance']:g} px {_fmt(b['f1'])} "
        f"(precision {_fmt(b['precision'])}, recall {_fmt(b['recall'])})",
    ]


def _instance_lines(result: dict) -> list[str]:
    inst, fg = result["instances"], result["foreground"]
    lines = [
        f"objects: pred {inst['n_pred']}, gt {inst['n_gt']}",
        f"foreground IoU {_fmt(fg['iou'])}, Dice {_fmt(fg['dice'])}",
        f"{'IoU thr':>8} {'TP':>6} {'FP':>6} {'FN':>6} {'prec':>8} {'recall':>8} "
        f"{'F1':>8} {'AP':>8}",
    ]
    for t, s in inst["thresholds"].items():
        lines.append(
            f"{t:>8} {s['tp']:>6} {s['fp']:>6} {s['fn']:>6} {_fmt(s['precision']):>8} "
            f"{_fmt(s['recall']):>8} {_fmt(s['f1']):>8} {_fmt(s['ap']):>8}"
        )
    v, r = result["voi"], result["adapted_rand"]
    lines.append(f"VOI split {_fmt(v['split'])}, merge {_fmt(v['merge'])}, "
                 f"total {_fmt(v['total'])} (bits)")
    lines.append(f"adapted Rand error {_fmt(r['error'])} "
                 f"(precision {_fmt(r['precision'])}, recall {_fmt(r['recall'])})")
    return lines


def _per_slice_lines(rows: list[dict], mean: dict | None) -> list[str]:
    keys = [k for k in rows[0] if k != "z"]
    lines = ["per slice:", f"{'z':>5} " + " ".join(f"{k:>10}" for k in keys)]
    for row in rows:
        lines.append(f"{row['z']:>5} " + " ".join(f"{_fmt(row[k]):>10}" for k in keys))
    if mean:
        lines.append(f"{'mean':>5} " + " ".join(f"{_fmt(mean[k]):>10}" for k in keys))
    return lines


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
    """``obj`` with string keys, NaN as None and numpy scalars as Python numbers."""
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
    sizes = read_voxel_size(args.gt, ndim=ndim)
    if sizes is None:
        print("voxel size unknown (give --spacing Z Y X in nm): distances in voxels",
              file=sys.stderr)
    return sizes


def _write_json(path: str, result: dict) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    return target


def run(args: argparse.Namespace) -> int:
    """``emseg evaluate``: print a metrics table and optionally write JSON."""
    for p in (args.pred, args.gt):
        if not Path(p).exists():
            raise FileNotFoundError(f"no such file or folder: {p}")
    if args.json:
        check_output(args.json, [args.pred, args.gt], args.overwrite, name="--json")
    pred = np.asarray(read_volume(args.pred))
    gt = np.asarray(read_volume(args.gt))
    extra: dict = {}
    spacing = None
    if args.detection is not None:
        spacing = _detection_spacing(args, gt.ndim)
        extra["unit"] = "nm" if spacing is not None else "voxels"
        extra["spacing"] = list(spacing) if spacing is not None else None
    result = metrics.evaluate(
        pred, gt, thresholds=args.thresholds, per_slice=args.per_slice,
        semantic=args.semantic, boundary=args.boundary, segmentation=args.segmentation,
        detection=args.detection, spacing=spacing,
    )
    result = _json_safe({"pred": str(args.pred), "gt": str(args.gt), **extra, **result})
    print(format_table(result))
    if args.json:
        print(f"metrics written to {_write_json(args.json, result)}")
    return 0
