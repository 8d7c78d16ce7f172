"""Fine-tuning from ~1 % painted pixels: IoU on the unpainted rest against wall time.

Starts from a bundled model, paints strokes taken from the ground truth of a
held-back Lucchi++ crop (slices 140-164 were never trained on), fine-tunes, and
scores the unpainted voxels before (at the model's tuned threshold) and after (at
the threshold ``fine_tune`` chooses on the painted voxels, 0.5 for 3D; the curve during
training uses 0.5). Baseline in the same run: the same fine-tune with dense
labels of the crop (100 % painted).

    python benchmarks/bench_finetune.py [--model mito-2d] [--steps 60] [--lr LR]
        [--strokes corrections|skeletons]

Writes ``benchmarks/results/finetune_<model>_<strokes>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results"


def load_crop(zs=slice(148, 164), ys=slice(256, 512), xs=slice(384, 640)):
    """A held-back crop (Z, Y, X) of the Lucchi++ training volume and its mask."""
    img = np.stack([tifffile.imread(DATA / "lucchi_pp_train_image.tif", key=z)
                    for z in range(zs.start, zs.stop)])[:, ys, xs]
    mask = np.stack([tifffile.imread(DATA / "lucchi_pp_train_mask.tif", key=z)
                     for z in range(zs.start, zs.stop)])[:, ys, xs]
    return img, mask


def paint_strokes(mask: np.ndarray, fraction: float = 0.01, seed: int = 0) -> np.ndarray:
    """Sparse strokes like a user's: skeletons of objects (2) and background lines (1).

    Returns painted labels (0 unlabeled, 1 background, 2 foreground) covering
    about ``fraction`` of the voxels, on every other slice.
    """
    rng = np.random.default_rng(seed)
    painted = np.zeros(mask.shape, np.uint8)
    budget = int(fraction * mask.size)
    for z in range(0, mask.shape[0], 2):
        fg = mask[z] > 0
        skel = skeletonize(ndi.binary_erosion(fg, iterations=3))
        painted[z][skel] = 2
        bg_far = ndi.distance_transform_edt(~fg) > 12
        for _ in range(3):
            y = int(rng.integers(0, mask.shape[1]))
            row = bg_far[y]
            painted[z, y][row] = 1
    # thin out to the budget, keeping both classes
    idx = np.flatnonzero(painted)
    if idx.size > budget:
        drop = rng.choice(idx, idx.size - budget, replace=False)
        painted.flat[drop] = 0
    return painted


def _brush(line: np.ndarray) -> np.ndarray:
    """A 1-px line widened to a 3-px brush stroke."""
    return ndi.binary_dilation(line, structure=np.ones((3, 3), bool))


def paint_corrections(mask: np.ndarray, prob: np.ndarray, t: float, fraction: float = 0.01,
                      seed: int = 0, slices: list[int] | None = None) -> np.ndarray:
    """Strokes a user paints to correct a prediction, on every other slice.

    Strokes (3 px brush) along the skeletons of missed objects (2) and of
    false detections (1) come first, then strokes that confirm what is right:
    object skeletons (2) and a background line hugging each object 3-5 px
    outside it (1). The set is thinned at random to ``fraction`` of the
    voxels (of ``slices`` when given), corrections last.
    """
    rng = np.random.default_rng(seed)
    fix = np.zeros(mask.shape, np.uint8)
    confirm = np.zeros(mask.shape, np.uint8)
    for z in range(0, mask.shape[0], 2) if slices is None else slices:
        gt, pred = mask[z] > 0, prob[z] > t
        for value, err in ((2, gt & ~pred), (1, pred & ~gt)):
            err = ndi.binary_opening(err, iterations=1)
            fix[z][_brush(skeletonize(err)) & (gt if value == 2 else ~gt)] = value
        confirm[z][_brush(skeletonize(ndi.binary_erosion(gt, iterations=3)))] = 2
        ring = ndi.distance_transform_edt(~gt)
        confirm[z][(ring > 3) & (ring <= 5)] = 1
    painted = np.where(fix > 0, fix, confirm)
    # a fraction of all voxels (every other slice painted), or of the given slices
    budget = fraction * (mask.size if slices is None else len(slices) * mask[0].size)
    extra = int((painted > 0).sum()) - int(budget)
    for idx in (np.flatnonzero((fix == 0) & (confirm > 0)), np.flatnonzero(fix)):
        k = min(max(extra, 0), idx.size)
        painted.flat[rng.choice(idx, k, replace=False)] = 0
        extra -= k
    return painted


def iou_unpainted(prob: np.ndarray, mask: np.ndarray, painted: np.ndarray, t: float) -> float:
    keep = painted == 0
    p, g = (prob > t) & keep, (mask > 0) & keep
    return float((p & g).sum() / max((p | g).sum(), 1))


def run_one(model_name: str, img, mask, painted, scored, steps: int, label: str,
            lr: float, batch: int, before: float, layers: str = "all", optimizer: str = "adamw",
            freeze_norm: bool = False) -> dict:
    """Fine-tune on ``painted``; IoU on the voxels that ``scored`` leaves unpainted.

    ``before`` is the bundled model's IoU on those voxels (computed once by the caller).
    """
    from napari_emseg.models.zoo import load_model
    from napari_emseg.predict import predict_volume
    from napari_emseg.train import (
        FINE_TUNED_THRESHOLD,
        TrainConfig,
        fine_tune,
    )

    model = load_model(model_name)
    t = FINE_TUNED_THRESHOLD  # during training; at the end fine_tune picks one
    curve = [{"step": 0, "train_seconds": 0.0, "iou": round(before, 4)}]
    eval_time = 0.0
    t0 = time.perf_counter()

    def on_log(rec):
        nonlocal eval_time
        e0 = time.perf_counter()
        model.eval()
        # (the training loop puts the model back into training mode)
        iou = iou_unpainted(predict_volume(img, model), mask, scored, t)
        eval_time += time.perf_counter() - e0
        curve.append({"step": rec["step"],
                      "train_seconds": round(time.perf_counter() - t0 - eval_time, 1),
                      "iou": round(iou, 4)})
        print(f"  {label}: step {rec['step']:4d}  {curve[-1]['train_seconds']:6.1f} s  "
              f"IoU {iou:.4f}", flush=True)

    cfg = TrainConfig(steps=steps, lr=lr, warmup=10, batch_size=batch,
                      val_every=max(steps // 5, 1),
                      train_layers=layers, optimizer=optimizer, freeze_norm=freeze_norm)
    res = fine_tune(model, img, painted, cfg, on_log=on_log)
    seconds = time.perf_counter() - t0 - eval_time  # training + threshold choice
    chosen = float(res.model.meta["threshold"])
    after = iou_unpainted(predict_volume(img, res.model), mask, scored, chosen)
    return {"painted_fraction": round(float((painted > 0).mean()), 4), "before": before,
            "after": round(after, 4), "threshold": chosen, "seconds": round(seconds, 1),
            "batch_size": batch,
            "after_at_0.5": curve[-1]["iou"], "curve_at_0.5": curve}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mito-2d")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=None, help="default: the model's fine-tuning LR "
                    "(train.fine_tune_defaults: FINE_TUNE_LR, or FINE_TUNE_LR_3D for 3D)")
    ap.add_argument("--strokes", choices=["corrections", "skeletons"], default="corrections",
                    help="corrections: strokes on the model's errors first (a user fixing "
                         "a prediction); skeletons: object skeletons + far background lines")
    args = ap.parse_args(argv)
    import torch

    from napari_emseg.models.zoo import load_model
    from napari_emseg.predict import predict_volume
    from napari_emseg.train import FINE_TUNED_THRESHOLD, fine_tune_settings

    img, mask = load_crop()
    model = load_model(args.model)
    # as in the API: batch 4 (2D) or 2 (3D); LR per fine_tune_defaults unless given
    args.lr, batch = fine_tune_settings(model, args.lr, None)
    prob, t = predict_volume(img, model), float(model.meta.get("threshold", 0.5))
    if args.strokes == "corrections":
        sparse = paint_corrections(mask, prob, t)
    else:
        sparse = paint_strokes(mask)
    before = iou_unpainted(prob, mask, sparse, t)  # both runs score the same voxels
    before_half = iou_unpainted(prob, mask, sparse, FINE_TUNED_THRESHOLD)
    dense = np.where(mask > 0, 2, 1).astype(np.uint8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"crop {img.shape}, {args.strokes} on {100 * (sparse > 0).mean():.2f} % of voxels; "
          f"device {device} ({name}, {torch.get_num_threads()} threads)")
    res = {"model": args.model, "crop": list(img.shape), "device": f"{device}: {name}",
           "steps": args.steps, "lr": args.lr, "strokes": args.strokes,
           "threshold_before": t, "before_at_0.5": round(before_half, 4),
           "sparse_1pct": run_one(args.model, img, mask, sparse, sparse, args.steps,
                                  "1% strokes", args.lr, batch, before),
           "dense_baseline": run_one(args.model, img, mask, dense, sparse, args.steps,
                                    "dense", args.lr, batch, before)}
    # the dense model's IoU is scored on the same unpainted voxels as the sparse one
    res["ratio_sparse_vs_dense"] = round(res["sparse_1pct"]["after"]
                                         / max(res["dense_baseline"]["after"], 1e-9), 3)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"finetune_{args.model}_{args.strokes}.json"
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("model", "device", "ratio_sparse_vs_dense")}))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
