"""``emseg train IMAGE LABELS OUT.pt``: train or fine-tune a U-Net."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .._textbar import ProgressBar
from ..io import read_volume
from ..models.zoo import load_model, related_models
from ..train import (
    FINE_TUNE_EARLY_STOP,
    FINE_TUNE_MAX_STEPS,
    FINE_TUNE_MINUTES,
    TrainConfig,
    fine_tune,
    fit,
    model_classes,
    new_model,
    one_class_warning,
    painted_classes,
    resume_path,
    start_text,
    threshold_note,
)
from . import common
from .common import check_output, memory_guard, model_help


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


CROP_HINT = "train on a crop of the volume (a few hundred slices are plenty)"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    p = sub.add_parser(
        "train",
        help="train a U-Net from dense labels, or fine-tune one from painted labels",
        description="Train a U-Net on IMAGE with LABELS (dense: 0 background, 1.. classes). "
        "With --from MODEL the model is fine-tuned; with --painted the labels follow the "
        "napari painting convention (0 unlabeled, 1 background, 2.. classes).",
    )
    p.add_argument("image", metavar="IMAGE", help="EM volume (TIFF, slice folder, zarr, HDF5, MRC)")
    p.add_argument("labels", metavar="LABELS", help="label volume of the same shape")
    p.add_argument("out", metavar="OUT", help="checkpoint to write (.pt; never one of the inputs)")
    p.add_argument("--from", dest="source", metavar="NAME|PATH", default=None,
                   help=model_help("fine-tune this model") + " (default: a new U-Net)")
    p.add_argument("--keep-start", action="store_true",
                   help="fine-tune exactly the --from model; by default a bundled model far "
                        "from the data is swapped for another bundled model of the same task "
                        "that scores clearly better on the labels (said on stderr)")
    p.add_argument("--painted", action="store_true",
                   help="labels are painted (0 unlabeled, 1 background, 2.. classes)")
    common.add_voxel_size(p, "IMAGE (fine-tuning: a model trained at another voxel size "
                          "learns at its own, as emseg predict then predicts)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2,
                   help="2: a 2D U-Net run slice by slice; 3: a 3D U-Net")
    p.add_argument("--context", type=common.non_negative_int, default=0, metavar="N",
                   help="2D only: adjacent slices each side fed as channels (2.5D)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=common.positive_int, default=None, metavar="N",
                        help="training steps (default: 500, or until --minutes)")
    length.add_argument("--epochs", type=common.positive_int, default=None, metavar="N",
                        help="alternative to --steps: passes of 100 steps each")
    p.add_argument("--minutes", type=common.positive_float, default=None,
                   help="time budget; stops early when it runs out (default: none)")
    p.add_argument("--batch-size", type=common.positive_int, default=None, metavar="N",
                   help="patches per step (default: 8 new; with --from the model's "
                        "fine-tuning batch)")
    p.add_argument("--patch", type=common.shape((2, 3), name="patch"), default=None,
                   metavar="[Z,]Y,X",
                   help="patch size, e.g. 256,256 or 32,128,128 (default: 256,256 for 2D, "
                        "32,128,128 for 3D)")
    p.add_argument("--lr", type=common.positive_float, default=None,
                   help="peak learning rate (default 2e-3 new; with --from the model's "
                        "fine-tuning rate, 3e-5 for 2D, 1e-5 for 3D)")
    p.add_argument("--width", type=common.positive_int, default=16,
                   help="channels of the first U-Net level (doubled at each level)")
    p.add_argument("--depth", type=common.positive_int, default=4,
                   help="resolution levels of the U-Net (depth - 1 poolings)")
    p.add_argument("--residual", action="store_true",
                   help="residual convolution blocks (Res-U-Net)")
    p.add_argument("--ignore-label", type=common.non_negative_int, default=None,
                   help="dense labels: value to ignore in the loss (default: none)")
    p.add_argument("--device", type=common.device, default=None,
                   help=f"{common.DEVICE_CHOICES} (default: the best available)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT's .resume.pt state")
    p.add_argument("--seed", type=common.non_negative_int, default=0,
                   help="random seed (weights, patch sampling)")
    p.add_argument("--key", default=None,
                   help="dataset inside HDF5/zarr inputs (default: the only one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training settings the flags give (the engine's defaults for the rest)."""
    kw = dict(dims=args.dims, context=args.context, width=args.width, depth=args.depth,
              residual=args.residual, device=args.device, seed=args.seed)
    steps = args.steps if args.steps is not None else (
        args.epochs * 100 if args.epochs is not None else None)
    if steps is not None:
        kw["steps"] = steps
    elif args.minutes is not None:
        kw["steps"] = 10**9
    for name in ("minutes", "batch_size", "lr", "patch"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return TrainConfig(**kw)


def _fine_tune_config(args: argparse.Namespace, config: TrainConfig) -> TrainConfig:
    """Fine-tuning: the recipe's time budget and early stop unless --steps, --epochs or
    --minutes is given; LR, batch and patch left to the recipe unless given."""
    if args.steps is None and args.epochs is None and args.minutes is None:
        config = replace(config, steps=FINE_TUNE_MAX_STEPS, minutes=FINE_TUNE_MINUTES,
                         early_stop=FINE_TUNE_EARLY_STOP, warmup=10, val_every=50)
    return config


def _check_resume(out: str) -> None:
    """``--resume``: a resume state that exists must be readable (else a clean error)."""
    import torch

    path = resume_path(Path(out))
    if not path.exists():
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "optim", "step", "best", "history", "elapsed"} - set(state)
    except Exception as exc:  # truncated, not torch, not a dict
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--resume: {path} is corrupt ({cause}); delete it to start over") \
            from None
    if missing:
        lacking = ", ".join(sorted(missing))
        raise ValueError(f"--resume: {path} is not a training state (no {lacking}); "
                         "delete it to start over")


def _new_model(args: argparse.Namespace, painted: np.ndarray):
    """A fresh U-Net for painted labels without ``--from``."""
    return new_model(painted_classes(painted), train_config(args))


def _check_labels(args: argparse.Namespace, labels: np.ndarray, painted: np.ndarray,
                  model) -> None:
    """Name LABELS that do not fit the model or the painting convention, before training.

    Dense labels above the model's classes are refused with a pointer to
    ``--painted``; strokes of one class only get a warning (as in the Train dock).
    """
    foreground = model_classes(model) - 1
    top = int(labels.max()) if labels.size else 0
    if not args.painted and top > foreground:
        raise ValueError(
            f"LABELS {args.labels} hold values up to {top}, but the model predicts "
            f"{foreground} foreground class(es): dense labels are 0 = background, "
            f"1..{foreground} = classes. Painted strokes (0 = not painted, 1 = background, "
            "2.. = classes)? add --painted. Instance ids? train on labels > 0")
    problem = one_class_warning(painted)
    if problem:
        sys.stderr.write(f"emseg train: warning: {problem}\n")


def _train(args: argparse.Namespace, image: np.ndarray, labels: np.ndarray,
           config: TrainConfig, bar, log):
    """One engine call: :func:`fine_tune` (--from / --painted) or :func:`fit`."""
    if args.source or args.painted:
        painted = labels if args.painted else np.where(labels > 0, labels + 1, 1)
        model = load_model(args.source) if args.source else _new_model(args, painted)
        _check_labels(args, labels, painted, model)
        others = related_models(args.source) if args.source and not args.keep_start else []
        voxel = common.voxel_size_of(args, args.image, image.ndim, args.key)
        return fine_tune(model, image, painted, _fine_tune_config(args, config),
                         checkpoint=args.out, progress=bar, on_log=log, alternatives=others,
                         voxel_size=voxel)
    return fit(image, labels, config, checkpoint=args.out, ignore_label=args.ignore_label,
               resume=args.resume, progress=bar, on_log=log)


def run(args: argparse.Namespace) -> int:
    """Run ``emseg train``."""
    check_output(args.out, [args.image, args.labels, args.source],
                 args.overwrite or args.resume)
    if args.resume:
        _check_resume(args.out)
    image = read_volume(args.image, key=args.key)
    labels = read_volume(args.labels, key=args.key)
    config = train_config(args)

    def log(rec):
        if "recipe" in rec:  # fine-tuning: the recipe chosen before the first step
            sys.stderr.write(f"  recipe {rec['recipe']} (feature shift "
                             f"{_fmt(rec.get('feature_shift'))}, IoU on painted voxels "
                             f"{_fmt(rec.get('painted_iou_before'))})\n")
            if rec.get("start_scores"):
                sys.stderr.write(f"  {start_text(rec['start'], rec['start_scores'])}\n")
            if rec.get("adaptation"):
                sys.stderr.write(f"  {rec['adaptation']}\n")
            return
        sys.stderr.write(f"\n  step {rec['step']}: loss {rec['loss']:.4f}, "
                         f"val IoU on painted voxels {rec['val_iou']:.4f}\n")

    with memory_guard(image.shape, image.dtype, hint=CROP_HINT):
        res = _train(args, np.asarray(image), np.asarray(labels), config,
                     ProgressBar("training", "steps"), log)
    sys.stderr.write("\n")
    state = "cancelled" if res.cancelled else "done"
    note = threshold_note(res.model.meta)
    chosen = f"{note}; " if note else ""
    kept = "the saved model's IoU" if args.source else "best IoU"  # fine-tunes keep the last
    print(f"{state}: {res.steps} steps in {res.seconds:.0f} s, {kept} on painted voxels "
          f"{res.best_iou:.4f}; "
          f"{chosen}checkpoint {res.checkpoint}")
    return 0
