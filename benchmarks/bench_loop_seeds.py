"""The far painting-while-it-trains loop, counted in steps, over several seeds.

``bench_adapt.py`` times everything on the wall clock, as a user lives it, so two
runs of the same code differ by what else the machine does. To compare two
versions of the recipe, this runs the same loop with a fixed number of steps
(``--steps``, about what 180 s give on 2 cores) and a simulated user who looks at
the painted slices after fixed steps (``--looks``) and paints corrections of the
largest errors (``bench_adapt.paint_corrections_of``), up to 1 % in all. Each seed
changes the first strokes and the training batches. The corrections join the run at
the step right after each look (``train.STROKES_EVERY`` is set to 0 here; the Train
dock polls every 2 s), so a seed gives the same run again and two versions of the
recipe can be compared seed by seed. IoU on the unpainted slices at 0.3-0.7; mean
and spread over seeds.

    python benchmarks/bench_loop_seeds.py [--model mito-2d-dr] [--seeds 0 1 2]

Writes ``benchmarks/results/loop_seeds_<model>.json``. ``--case far`` (default): ISBI
2012 mitochondria, voxel size 50×4×4 nm, slices 4, 14, 24 painted; ``--case reverse``:
held-back Lucchi++ slices 140-164 (512² crop), slices 4, 12, 20 painted, for a model
trained on ISBI 2012 only (``scripts/train_bundled.py mito-isbi``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adapt as B  # noqa: E402

# case: (loader, painted slices, voxel size given)
CASES = {"far": (B.load_isbi_mito, [4, 14, 24], (50.0, 4.0, 4.0)),
         "reverse": (B.load_lucchi_heldback, [4, 12, 20], None)}


def parse_settings(pairs: list[str]) -> dict:
    """``["patch=192,192", "loss=focal"]`` → TrainConfig fields (ints, floats, tuples)."""
    out = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if not key or not text:
            raise SystemExit(f"--set wants key=value, got {pair!r}")
        vals = [_value(p.strip()) for p in text.split(",")]
        out[key] = tuple(vals) if len(vals) > 1 else vals[0]
    return out


def _value(text: str):
    """``"4"`` → 4, ``"1e-3"`` → 0.001, ``"true"`` → True, anything else as it is."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def run_seed(model_name: str, img, mask, seed: int, steps: int, looks: list[int],
             lr: float | None = None, tta: int = 0, settings: dict | None = None,
             case: str = "far", dense: bool = False) -> dict:
    """One loop run; IoU on the unpainted slices at each threshold (``lr``: the recipe's;
    ``tta``: also with that many test-time variants; ``settings``: TrainConfig fields
    that replace the recipe's; ``dense``: every pixel of the slices labelled at once,
    no looks: the ceiling of the strokes)."""
    from napari_emseg import train
    from napari_emseg.models.zoo import load_model
    from napari_emseg.predict import predict_volume

    train.STROKES_EVERY = 0.0  # corrections join at the next step, not the next 2-s poll
    model = load_model(model_name)
    fields = {"minutes": None, "steps": steps, "early_stop": 0, "lr": lr, "batch_size": None,
              "patch": None, "preview_every": 0.0, "seed": seed, **(settings or {})}
    cfg = replace(train.fine_tune_defaults(model, "far"), **fields)
    _, slices, voxel = CASES[case]
    if dense:
        first, looks = B.dense_labels(mask, slices), []
    else:
        first = B.paint(mask, slices, fraction=B.LIVE_FIRST, seed=seed)
    user = B._User(mask, first, slices, tuple(looks), voxel, unit="steps")
    steps_done = [0]

    def counting(m, _seconds) -> None:  # called before every step (preview_every 0)
        user.preview(m, img, steps_done[0])
        steps_done[0] += 1

    t0 = time.perf_counter()
    res = train.fine_tune(model, img, first, cfg, preview=counting, voxel_size=voxel,
                          strokes=user.strokes)
    scored = np.ones(img.shape[0], bool)
    scored[slices] = False
    prob = predict_volume(img, res.model)
    row = {"seed": seed, "steps": res.steps, "seconds": round(time.perf_counter() - t0, 1),
           "recipe": res.model.meta["training"]["recipe"],
           "threshold": res.model.meta.get("threshold"),
           "iou_by_threshold": {f"{t:.1f}": round(B.iou_rest(prob > t, mask, scored), 4)
                                for t in B.THRESHOLDS}}
    if tta:
        prob = predict_volume(img, res.model, tta=tta)
        row[f"iou_by_threshold_tta{tta}"] = {f"{t:.1f}": round(B.iou_rest(prob > t, mask, scored), 4)
                                            for t in B.THRESHOLDS}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mito-2d-dr")
    ap.add_argument("--case", default="far", choices=sorted(CASES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=550)
    ap.add_argument("--looks", type=int, nargs="+", default=[140, 275, 410])
    ap.add_argument("--lr", type=float, default=None, help="default: the far recipe's")
    ap.add_argument("--tta", type=int, default=0, help="also score with N test-time variants")
    ap.add_argument("--dense", action="store_true",
                    help="dense labels of the painted slices instead of strokes (the ceiling)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="TrainConfig fields that replace the recipe's, e.g. patch=192,192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    img, mask = CASES[args.case][0]()
    settings = parse_settings(args.set)
    runs = [run_seed(args.model, img, mask, s, args.steps, args.looks, args.lr, args.tta,
                     settings, args.case, args.dense) for s in args.seeds]
    at_half = np.array([r["iou_by_threshold"]["0.5"] for r in runs])
    res = {"device": f"cpu: {platform.processor() or 'cpu'}", "threads": args.threads,
           "case": args.case, "dense": args.dense, "model": args.model, "lr": args.lr,
           "settings": settings, "steps": args.steps, "looks": args.looks, "runs": runs,
           "iou_at_0.5": {"mean": round(float(at_half.mean()), 4),
                          "sd": round(float(at_half.std(ddof=1)), 4) if len(runs) > 1 else None}}
    name = Path(args.model).stem
    out = args.out or B.OUT / f"loop_seeds_{name}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"{res['iou_at_0.5']}; written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
