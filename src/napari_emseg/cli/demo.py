"""``emseg demo``: segment the bundled Lucchi++ sample with the bundled model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .._sample_data import SAMPLE_SCALE, load_sample
from .._textbar import ProgressBar
from ..io import write_labels, write_volume
from ..metrics import evaluate
from ..models.zoo import load_model
from ..postprocess import segment, segment_defaults
from ..predict import predict_volume
from . import common
from .common import check_output, model_help

OUTPUTS = ("instances.tif", "probabilities.tif", "overview.png", "summary.json")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command."""
    p = sub.add_parser(
        "demo",
        help="segment the bundled EM sample with the bundled model and write the results",
        description="Predict mitochondria on the bundled Lucchi++ crop, split them into "
        "instances with the model's segmentation settings (as `emseg segment --model`), "
        "score against the ground truth "
        "and write labels, probabilities and a PNG overview.",
    )
    p.add_argument("--out", default="emseg-demo",
                   help="output folder (" + ", ".join(OUTPUTS) + ")")
    p.add_argument("--model", metavar="NAME|PATH", default="mito-2d", help=model_help())
    p.add_argument("--tta", type=common.tta_count, nargs="?", const=True, default=0,
                   metavar="N",
                   help="test-time augmentation: average N flips/rotations (4 = flips, 8 = "
                        "flips and rotations, N times slower); --tta alone: all")
    p.add_argument("--device", type=common.device, default=None,
                   help=f"{common.DEVICE_CHOICES} (default: the best available)")
    p.add_argument("--show", action="store_true",
                   help="open the result in napari (needs a display)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results of an earlier run in --out")
    p.set_defaults(func=run)


def overview_png(path: Path, image: np.ndarray, prob: np.ndarray, labels: np.ndarray,
                 truth: np.ndarray) -> Path:
    """Save a 3-panel PNG (image, probabilities, instances) of the middle slice."""
    import matplotlib  # slow to import: only when a PNG is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    z = image.shape[0] // 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    axes[0].imshow(image[z], cmap="gray")
    axes[0].contour(truth[z] > 0, levels=[0.5], colors="lime", linewidths=0.8)
    axes[0].set_title(f"EM slice z={z} (green: ground truth)")
    axes[1].imshow(prob[z], cmap="magma", vmin=0, vmax=1)
    axes[1].set_title("mitochondria probability")
    rng = np.random.default_rng(0)
    colors = rng.uniform(0.2, 1.0, (int(labels.max()) + 1, 3))
    colors[0] = 0
    over = 0.6 * np.repeat((image[z] / max(image[z].max(), 1))[..., None], 3, -1)
    over = over + 0.4 * colors[labels[z]]
    over[find_boundaries(labels[z])] = 1.0
    axes[2].imshow(np.clip(over, 0, 1))
    axes[2].set_title(f"instances ({len(np.unique(labels)) - 1} objects in 3D)")
    for a in axes:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def display_problem() -> str | None:
    """Why no window can open here (one line), or None when a display is available."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform in ("offscreen", "minimal"):
        return f"QT_QPA_PLATFORM={platform} opens no windows"
    if sys.platform.startswith("linux") and not platform and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return None


def _check_show() -> None:
    """``--show`` needs a display and napari with a Qt binding: a clear error first."""
    problem = display_problem()
    if problem:
        raise ValueError(f"--show needs a display: {problem}; run without --show and open "
                         "the written files instead")
    import importlib.util

    if importlib.util.find_spec("napari") is None:
        raise ValueError("--show needs napari: pip install 'napari[all]'")


def _write_results(out: Path, image: np.ndarray, prob: np.ndarray, labels: np.ndarray,
                   truth: np.ndarray, summary: dict) -> None:
    """probabilities.tif, instances.tif (with the sample's voxel size), overview.png, summary.json."""
    write_volume(out / "probabilities.tif", prob, voxel_size=SAMPLE_SCALE)
    write_labels(out / "instances.tif", labels, voxel_size=SAMPLE_SCALE)
    overview_png(out / "overview.png", image, prob, labels, truth)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))


def _print_summary(summary: dict, out: Path) -> None:
    scores = summary["scores_vs_ground_truth"]
    fg = scores["foreground"]
    aps = scores["instances"]["thresholds"]
    print(f"\npredicted in {summary['predict_seconds']:.1f} s, segmented in "
          f"{summary['segment_seconds']:.1f} s: {summary['objects']} objects")
    print(f"  vs ground truth: foreground IoU {fg['iou']:.3f}, Dice {fg['dice']:.3f}, "
          + ", ".join(f"AP@{t} {v['ap']:.2f}" for t, v in aps.items()))
    print(f"results written to {out.resolve()}/ ({', '.join(OUTPUTS)})")


def _show(image: np.ndarray, prob: np.ndarray, labels: np.ndarray) -> None:
    """Open the result in napari (blocks until the window is closed)."""
    import napari  # heavy: only for --show

    viewer = napari.Viewer()
    viewer.add_image(image, name="Lucchi++ EM")
    viewer.add_image(prob, name="probabilities", colormap="magma", blending="additive")
    viewer.add_labels(labels, name="instances")
    napari.run()


def run(args: argparse.Namespace) -> int:
    """Run ``emseg demo``."""
    if args.show:
        _check_show()
    out = Path(args.out)
    for name in OUTPUTS:
        check_output(out / name, [args.model], args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    image, truth = load_sample()
    model = load_model(args.model)
    print(f"sample: {image.shape} {image.dtype}; model: {args.model} "
          f"({model.meta.get('description', '')})")
    t0 = time.perf_counter()
    prob = predict_volume(image, model, tta=args.tta, device=args.device,
                          progress=ProgressBar("predict", "tiles"))
    t1 = time.perf_counter()
    labels = segment(prob, segment_defaults(model.meta)).labels  # as `emseg segment --model`
    t2 = time.perf_counter()
    scores = evaluate(labels, ndi.label(truth > 0)[0].astype(np.uint32))
    summary = {"model": args.model, "shape": list(image.shape), "tta": args.tta,
               "predict_seconds": round(t1 - t0, 2), "segment_seconds": round(t2 - t1, 2),
               "objects": int(len(np.unique(labels)) - 1),
               "scores_vs_ground_truth": scores}
    _write_results(out, image, prob, labels, truth, summary)
    _print_summary(summary, out)
    if args.show:
        _show(image, prob, labels)
    return 0
