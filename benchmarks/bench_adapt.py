"""Adapting a model to EM it was not trained on: IoU on unpainted slices against wall time.

A simulated user paints about 1 % of the pixels of 3 slices (object skeletons as
foreground; background lines hugging objects 3-5 px outside them, and short
swipes across the background away from objects); every other slice is scored. Methods, each on the same strokes, in the same run:

* ``new``: ``fine_tune`` with its defaults (the gap rule picks the recipe), given
  the longest time budget of the curve; it returns the run's last weights;
* ``new-best``: the same, returning the weights with the best IoU on the painted
  voxels (``TrainConfig(keep="best")``, the behaviour before);
* ``today``: the previous defaults (200 steps, lr 3e-5, batch 4, no adaptation);
* ``rf``: a random forest on ``skimage.feature.multiscale_basic_features`` of the
  painted slices (what ilastik and napari-convpaint do);
* ``dense``: ``fine_tune`` (new defaults) on dense labels of the 3 slices (a ceiling);
* ``new-live``: the interactive loop. The user paints half the strokes (0.5 %), looks
  at the live prediction of the painted slices after 45, 90 and 135 s and each time
  paints corrections of its largest errors (background on false detections,
  foreground on misses), up to the same 1 % in all; the run takes them while it goes
  on (``fine_tune(strokes=...)``, what the Train dock does with strokes painted
  during training);
* ``rf-live``: the same rounds for the random forest (corrections of its own
  prediction, trained again after each);
* ``start``: no training; which bundled model of the task ``fine_tune`` would start
  from on these strokes (``train.choose_start``), with the scores (the runs above
  always start from ``--model``).

Cases: ``far`` (``mito-2d``, trained on Lucchi++ FIB-SEM, adapted to the ISBI 2012
ssTEM mitochondria), ``near`` (``mito-2d`` on held-back Lucchi++ slices, where a
user paints corrections of its errors first: ``bench_finetune.paint_corrections``), and
``reverse`` (a model trained on ISBI 2012 mitochondria only, adapted to held-back
Lucchi++ slices; needs ``--reverse-model``).

    python benchmarks/bench_adapt.py [--cases far near] [--budget 180] [--threads 2] [--start auto]

Writes ``benchmarks/results/adapt.json`` (one entry per case, with the device).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_finetune
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results"
TIMES = (15, 30, 60, 120, 180)
LONG_TIMES = (300, 600, 1200)  # also snapshotted when the budget reaches them
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  # the end result scored at each (is the chosen one better?)
# "new-live" / "rf-live": the user paints LIVE_FIRST of the 3 slices' pixels, then looks
# at the prediction of those slices at each of LIVE_LOOKS (s) and corrects its largest
# errors, up to 1 % in all (in even steps)
LIVE_FIRST, LIVE_LOOKS = 0.005, (45.0, 90.0, 135.0)


# ------------------------------------------------------------------ data
def load_isbi_mito() -> tuple[np.ndarray, np.ndarray]:
    """ISBI 2012 ssTEM (30, 512, 512) and its mitochondria mask."""
    img = tifffile.imread(DATA / "isbi2012_train_image.tif")
    return img, (tifffile.imread(DATA / "isbi2012_train_mito.tif") > 0).astype(np.uint8)


def load_lucchi_heldback() -> tuple[np.ndarray, np.ndarray]:
    """Held-back Lucchi++ slices 140-164, a 512×512 crop, and the mask."""
    zs = range(140, 165)
    ys, xs = slice(128, 640), slice(256, 768)
    img = np.stack([tifffile.imread(DATA / "lucchi_pp_train_image.tif", key=z) for z in zs])
    mask = np.stack([tifffile.imread(DATA / "lucchi_pp_train_mask.tif", key=z) for z in zs])
    return img[:, ys, xs], mask[:, ys, xs]


# --------------------------------------------------------------- strokes
def _strokes_of_slice(fg: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Candidate strokes of one slice: (label, mask) pairs, one per object and side."""
    out = []
    objects, n = ndi.label(fg)
    dist_out = ndi.distance_transform_edt(~fg)
    ring = (dist_out > 3) & (dist_out <= 5)
    near, _ = ndi.label(ring)
    for k in range(1, n + 1):
        obj = objects == k
        core = ndi.binary_erosion(obj, iterations=2)
        skel = skeletonize(core if core.any() else obj)
        brush = ndi.binary_dilation(skel, iterations=1) & obj
        if brush.any():
            out.append((2, brush))
    for k in range(1, near.max() + 1):
        out.append((1, near == k))
    far = dist_out > 8
    rng = np.random.default_rng(int(fg.sum()))
    for _ in range(6):  # short swipes across the background, away from objects
        y, x = int(rng.integers(2, fg.shape[0] - 2)), int(rng.integers(0, fg.shape[1] - 80))
        swipe = np.zeros_like(fg)
        swipe[y - 1 : y + 2, x : x + 80] = True
        if (swipe & far).sum() > 120:
            out.append((1, swipe & far))
    return out


def dense_labels(mask: np.ndarray, slices: list[int]) -> np.ndarray:
    """Every pixel of ``slices`` labelled (1 background, 2 mitochondria), 0 elsewhere."""
    dense = np.zeros(mask.shape, np.uint8)
    dense[slices] = np.where(mask[slices] > 0, 2, 1)
    return dense


def paint(mask: np.ndarray, slices: list[int], fraction: float = 0.01,
          seed: int = 0) -> np.ndarray:
    """Painted labels (0 unlabeled, 1 background, 2 mitochondria) on ``slices``.

    Whole strokes (an object's skeleton, 3 px brush; a background line hugging an
    object 3-5 px outside it) are added in random order, alternating foreground
    and background, until about ``fraction`` of the pixels of those slices are
    painted.
    """
    rng = np.random.default_rng(seed)
    painted = np.zeros(mask.shape, np.uint8)
    budget = int(fraction * len(slices) * mask[0].size)
    pools = {1: [], 2: []}
    for z in slices:
        for value, stroke in _strokes_of_slice(mask[z] > 0):
            pools[value].append((z, stroke))
    for value in pools:
        rng.shuffle(pools[value])
    used = 0
    while used < budget and (pools[1] or pools[2]):
        for value in (2, 1):
            if pools[value] and used < budget:
                z, stroke = pools[value].pop()
                painted[z][stroke & (painted[z] == 0)] = value
                used = int((painted > 0).sum())
    return painted


def paint_corrections_of(mask: np.ndarray, pred: np.ndarray, painted: np.ndarray,
                         slices: list[int], fraction: float = 0.01) -> np.ndarray:
    """``painted`` plus strokes on what ``pred`` gets wrong in ``slices``, up to ``fraction``.

    What a user does after looking at the prediction of the slices they painted:
    a stroke (3 px brush) along the skeleton of each error, largest first:
    background (1) on false detections, foreground (2) on missed parts.
    """
    out = painted.copy()
    budget = int(fraction * len(slices) * mask[0].size)
    errors = []
    for z in slices:
        gt = mask[z] > 0
        for value, err in ((1, pred[z] & ~gt), (2, gt & ~pred[z])):
            parts, n = ndi.label(ndi.binary_opening(err, iterations=2))
            for k in range(1, n + 1):
                part = parts == k
                errors.append((int(part.sum()), z, value, part))
    for _size, z, value, part in sorted(errors, key=lambda e: -e[0]):
        if int((out > 0).sum()) >= budget:
            break
        stroke = ndi.binary_dilation(skeletonize(part), iterations=1) & part
        out[z][stroke & (out[z] == 0)] = value
    return out


def iou_rest(pred: np.ndarray, mask: np.ndarray, scored: np.ndarray) -> float:
    """Foreground IoU of ``pred`` on the ``scored`` slices."""
    p, g = pred[scored], mask[scored] > 0
    return float((p & g).sum() / max((p | g).sum(), 1))


# ---------------------------------------------------------------- methods
def live_fractions(n: int) -> list[float]:
    """Painted fraction after each of ``n`` looks: from LIVE_FIRST up to 1 % in even steps."""
    return [LIVE_FIRST + (k + 1) / n * (0.01 - LIVE_FIRST) for k in range(n)]


class _User:
    """A simulated user who looks at the live preview of the painted slices at each
    of ``looks`` and paints corrections of what it shows (fed to the run).

    ``looks`` are on the clock the caller passes to :meth:`preview`: seconds here,
    steps in ``bench_loop_seeds.py`` (``unit``).
    """

    def __init__(self, mask, painted, slices, looks: tuple[float, ...], voxel_size,
                 unit: str = "s"):
        self.mask, self.painted, self.slices = mask, painted, slices
        self.looks, self.voxel_size, self.unit = list(looks), voxel_size, unit
        self.fractions = live_fractions(len(looks))
        self.pending: dict | None = None

    def preview(self, model, img, now: float) -> None:
        from napari_emseg.adapt import predict_slice_adapted

        if not self.looks or now < self.looks[0]:
            return
        self.looks.pop(0)
        pred = np.zeros(self.mask.shape, bool)
        for z in self.slices:
            pred[z] = predict_slice_adapted(img, model, z, voxel_size=self.voxel_size) > 0.5
        more = paint_corrections_of(self.mask, pred, self.painted, self.slices,
                                    self.fractions.pop(0))
        print(f"  user at {now:.0f} {self.unit}: "
              f"{int((more > 0).sum() - (self.painted > 0).sum())} px of corrections", flush=True)
        self.painted = more
        self.pending = {z: more[z] for z in self.slices}

    def strokes(self):
        out, self.pending = self.pending, None
        return out


def run_unet(model_name: str, img, mask, painted, scored, config, recipe: str,
             label: str, voxel_size=None, user: _User | None = None,
             alternatives: tuple[str, ...] = ()) -> dict:
    """Fine-tune; snapshots at TIMES (wall time from the call) scored afterwards.

    With a ``user``, corrections painted while the run goes on are fed to it;
    ``alternatives`` are other starts ``fine_tune`` may take (``--start auto``).
    """
    from napari_emseg.models.zoo import load_model
    from napari_emseg.predict import predict_volume
    from napari_emseg.train import fine_tune

    model = load_model(model_name)
    snaps: list[tuple[float, dict]] = []
    budget = (config.minutes or 0) * 60
    targets = [0, *TIMES, *(t for t in LONG_TIMES if t <= budget)]
    t_call = time.perf_counter()

    def keep(m, _elapsed):
        wall = time.perf_counter() - t_call
        if len(snaps) < len(targets) and wall >= targets[len(snaps)]:
            snaps.append((wall, {k: v.detach().clone() for k, v in m.state_dict().items()}))
        if user is not None:
            user.preview(m, img, wall)

    config = replace(config, preview_every=1.0)
    res = fine_tune(model, img, painted, config, recipe=recipe, preview=keep,
                    voxel_size=voxel_size, strokes=user.strokes if user else None,
                    alternatives=alternatives)
    wall = time.perf_counter() - t_call
    final_t = float(res.model.meta.get("threshold", 0.5))
    curve = []
    state = {k: v.clone() for k, v in res.model.state_dict().items()}
    for seconds, snap in snaps:
        res.model.load_state_dict(snap)
        iou = iou_rest(predict_volume(img, res.model) > 0.5, mask, scored)
        curve.append({"seconds": round(seconds, 1), "iou_at_0.5": round(iou, 4)})
        print(f"  {label}: {seconds:6.1f} s  IoU {iou:.4f}", flush=True)
    res.model.load_state_dict(state)
    prob = predict_volume(img, res.model)
    final = iou_rest(prob > final_t, mask, scored)
    by_threshold = {f"{t:.1f}": round(iou_rest(prob > t, mask, scored), 4)
                    for t in THRESHOLDS}
    training = res.model.meta.get("training", {})
    print(f"  {label}: end {wall:.1f} s, {res.steps} steps, IoU {final:.4f} at {final_t}",
          flush=True)
    return {"curve": curve, "final_iou": round(final, 4), "final_threshold": final_t,
            "threshold_source": res.model.meta.get("threshold_source"),
            "final_iou_by_threshold": by_threshold,
            "painted_pixels": training.get("painted_voxels"),
            "seconds": round(wall, 1), "steps": res.steps,
            "steps_per_second": round(res.steps / max(res.seconds, 1e-9), 2),
            "recipe": training.get("recipe"),
            "painted_iou_before": training.get("painted_iou_before"),
            "start": training.get("start", model_name),
            "start_scores": training.get("start_scores")}


def rf_features(slice_2d: np.ndarray) -> np.ndarray:
    """(Y, X, F) multiscale intensity / edge / texture features of one slice."""
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(slice_2d.astype(np.float32) / 255.0, sigma_min=1,
                                     sigma_max=16, channel_axis=None)


def _fit_rf(img, painted, threads: int):
    from sklearn.ensemble import RandomForestClassifier

    xs, ys = [], []
    for z in [z for z in range(img.shape[0]) if (painted[z] > 0).any()]:
        f = rf_features(img[z])
        sel = painted[z] > 0
        xs.append(f[sel])
        ys.append(painted[z][sel] == 2)
    rf = RandomForestClassifier(n_estimators=100, max_depth=16, n_jobs=threads, random_state=0)
    return rf.fit(np.concatenate(xs), np.concatenate(ys))


def _rf_predict(rf, img, zs) -> np.ndarray:
    pred = np.zeros(img.shape, bool)
    for z in zs:
        f = rf_features(img[z])
        pred[z] = rf.predict_proba(f.reshape(-1, f.shape[-1]))[:, 1].reshape(f.shape[:2]) > 0.5
    return pred


def run_rf(img, mask, painted, scored, threads: int, slices: list[int] | None = None) -> dict:
    """Random forest on the painted pixels; wall time = features + fit.

    With ``slices``, the user then paints corrections of the forest's prediction of
    those slices and it is trained again, as often as ``new-live`` looks
    (``LIVE_LOOKS``), up to the same 1 %.
    """
    t0 = time.perf_counter()
    rf = _fit_rf(img, painted, threads)
    for fraction in live_fractions(len(LIVE_LOOKS)) if slices is not None else []:
        painted = paint_corrections_of(mask, _rf_predict(rf, img, slices), painted, slices,
                                       fraction)
        rf = _fit_rf(img, painted, threads)
    seconds = time.perf_counter() - t0
    iou = iou_rest(_rf_predict(rf, img, np.flatnonzero(scored)), mask, scored)
    print(f"  rf: {seconds:.1f} s  IoU {iou:.4f}", flush=True)
    return {"seconds": round(seconds, 1), "final_iou": round(iou, 4),
            "painted_pixels": int((painted > 0).sum())}


# ------------------------------------------------------------------ cases
def start_choice(model_name: str, img, painted, voxel_size) -> dict:
    """The start :func:`~napari_emseg.train.choose_start` takes among the bundled
    models of the task, the scores behind it, and the seconds it took."""
    from napari_emseg.models.zoo import load_model, related_models
    from napari_emseg.train import choose_start

    t0 = time.perf_counter()
    start, scores = choose_start(load_model(model_name), related_models(model_name), img,
                                 painted, voxel_size=voxel_size)
    out = {"start": start.name, "recipe": start.recipe, "scores": scores,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(f"  start: {out}", flush=True)
    return out


def run_case(name: str, model_name: str, img, mask, slices: list[int], budget: float,
             threads: int, methods: list[str], strokes: str = "skeletons",
             voxel_size=None, start: str = "given") -> dict:
    from napari_emseg.adapt import feature_shift
    from napari_emseg.models.zoo import load_model, related_models
    from napari_emseg.predict import predict_volume
    from napari_emseg.train import TrainConfig, choose_recipe, fine_tune_defaults, painted_iou

    scored = np.ones(img.shape[0], bool)
    scored[slices] = False
    model = load_model(model_name)
    t = float(model.meta.get("threshold", 0.5))
    prob = predict_volume(img, model)
    before = iou_rest(prob > t, mask, scored)
    if strokes == "corrections":  # a user fixing the prediction (bench_finetune.py)
        from bench_finetune import paint_corrections

        painted = paint_corrections(mask, prob, t, slices=slices)
    else:
        painted = paint(mask, slices)
    gap = painted_iou(model, img, painted)
    shift = feature_shift(model, img)
    recipe = choose_recipe(model, gap, shift)
    print(f"{name}: {model_name} on {img.shape}, painted {100 * (painted > 0).mean():.2f} % "
          f"of the volume ({int((painted > 0).sum())} px on slices {slices}); before "
          f"{before:.4f}; painted IoU {gap}; recipe {recipe}", flush=True)
    out = {"model": model_name, "shape": list(img.shape), "painted_slices": slices,
           "strokes": strokes,
           "painted_pixels": int((painted > 0).sum()),
           "painted_fraction_of_slices": round(float((painted[slices] > 0).mean()), 4),
           "before": round(before, 4), "painted_iou_before": gap, "feature_shift": shift,
           "recipe": recipe, "voxel_size_nm": voxel_size}
    if "start" in methods:  # which bundled start fine_tune(alternatives=...) would take
        out["start"] = start_choice(model_name, img, painted, voxel_size)
    # the recipe's settings with a longer budget; lr, batch and patch left to fine_tune
    new_cfg = replace(fine_tune_defaults(model, recipe), minutes=budget / 60, lr=None,
                      batch_size=None, patch=None)
    others = tuple(related_models(model_name)) if start == "auto" else ()
    out["start_option"] = start
    if "new" in methods:
        out["new"] = run_unet(model_name, img, mask, painted, scored, new_cfg, "auto", "new",
                              voxel_size, alternatives=others)
    if "new-best" in methods:  # the same run returning the best weights on painted voxels
        out["new-best"] = run_unet(model_name, img, mask, painted, scored,
                                   replace(new_cfg, keep="best"), "auto", "new-best",
                                   voxel_size)
    if "today" in methods:
        today = TrainConfig(steps=200, lr=3e-5, batch_size=4, warmup=10, val_every=50,
                            keep="best")
        out["today"] = run_unet(model_name, img, mask, painted, scored, today, "near", "today")
    if "rf" in methods:
        out["rf"] = run_rf(img, mask, painted, scored, threads)
    if "new-live" in methods or "rf-live" in methods:  # half first, corrections after
        first = paint(mask, slices, fraction=LIVE_FIRST)
        out["live_first_pixels"] = int((first > 0).sum())
    if "new-live" in methods:
        user = _User(mask, first, slices, LIVE_LOOKS, voxel_size)
        out["new-live"] = run_unet(model_name, img, mask, first, scored, new_cfg, "auto",
                                   "new-live", voxel_size, user=user, alternatives=others)
    if "rf-live" in methods:
        out["rf-live"] = run_rf(img, mask, first, scored, threads, slices=slices)
    if "dense" in methods:
        out["dense"] = run_unet(model_name, img, mask, dense_labels(mask, slices), scored, new_cfg, "auto", "dense",
                                voxel_size)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["far", "near"],
                    choices=["far", "near", "reverse"])
    ap.add_argument("--methods", nargs="+",
                    default=["new", "new-best", "today", "rf", "dense", "new-live", "rf-live"])
    ap.add_argument("--budget", type=float, default=180, help="seconds of training per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="mito-2d", help="start model of far and near")
    ap.add_argument("--reverse-model", default=None,
                    help="a model trained on ISBI 2012 mitochondria only (reverse case)")
    ap.add_argument("--start", choices=["given", "auto"], default="given",
                    help="given: new and new-live fine-tune --model itself; auto: as the "
                         "Train dock and emseg train do, a bundled model of the same task "
                         "that fits the strokes clearly better may be taken instead (on "
                         "ISBI 2012 that is mito-2d-mix, which was trained on it)")
    ap.add_argument("--out", type=Path, default=OUT / "adapt.json")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    load0 = round(os.getloadavg()[0], 2)  # other work on the machine slows every method
    res = {"device": f"{device}: {name}", "threads": args.threads, "budget_s": args.budget,
           "times_s": list(TIMES)}
    for case in args.cases:
        if case == "far":
            img, mask = load_isbi_mito()
            res[case] = run_case(case, args.model, img, mask, [4, 14, 24], args.budget,
                                 args.threads, args.methods, voxel_size=(50.0, 4.0, 4.0),
                                 start=args.start)
        elif case == "near":
            img, mask = load_lucchi_heldback()
            res[case] = run_case(case, args.model, img, mask, [4, 12, 20], args.budget,
                                 args.threads, args.methods, strokes="corrections",
                                 voxel_size=(5.0, 5.0, 5.0), start=args.start)
        elif args.reverse_model:
            img, mask = load_lucchi_heldback()
            res[case] = run_case(case, args.reverse_model, img, mask, [4, 12, 20],
                                 args.budget, args.threads, args.methods, start=args.start)
    res["load_average_1min"] = {"start": load0, "end": round(os.getloadavg()[0], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
