"""``emseg train IMAGE LABELS OUT.pt``: train or fine-tune a U-Net."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    p = sub.add_parser(
        "train",
        help="train a U-Net from dense labels, or fine-tune one from painted labels",
        description="Train a U-Net on IMAGE with LABELS (dense: 0 background, 1.. classes). "
        "With --from MODEL the model is fine-tuned; with --painted the labels follow the "
        "napari painting convention (0 unlabeled, 1 background, 2.. classes).",
    )
    p.add_argument("image", help="EM volume (TIFF, slice folder, zarr, HDF5, MRC)")
    p.add_argument("labels", help="label volume of the same shape")
    p.add_argument("out", help="checkpoint to write (.pt)")
    p.add_argument("--from", dest="source", default=None,
                   help="bundled model name or checkpoint to fine-tune")
    p.add_argument("--painted", action="store_true",
                   help="labels are painted (0 unlabeled, 1 background, 2.. classes)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--context", type=int, default=0,
                   help="2D only: adjacent slices each side fed as channels (2.5D)")
    p.add_argument("--steps", type=int, default=None, help="training steps")
    p.add_argument("--epochs", type=int, default=None,
                   help="alternative to --steps: passes of 100 steps each")
    p.add_argument("--minutes", type=float, default=None, help="time budget")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--patch", default=None, help="patch size, e.g. 256,256 or 32,128,128")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 2e-3 new; with --from the model's "
                        "fine-tuning rate, 3e-5 for 2D, 1e-5 for 3D)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--residual", action="store_true")
    p.add_argument("--ignore-label", type=int, default=None,
                   help="dense labels: value to ignore in the loss")
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key", default=None, help="dataset inside HDF5/zarr inputs")
    p.set_defaults(func=run)


def _config(args):
    from .train import TrainConfig

    kw = dict(dims=args.dims, context=args.context, width=args.width, depth=args.depth,
              residual=args.residual, device=args.device, seed=args.seed)
    steps = args.steps or (args.epochs * 100 if args.epochs else None)
    if steps:
        kw["steps"] = steps
    elif args.minutes:
        kw["steps"] = 10**9
    if args.minutes:
        kw["minutes"] = args.minutes
    if args.batch_size:
        kw["batch_size"] = args.batch_size
    if args.lr:
        kw["lr"] = args.lr
    if args.patch:
        kw["patch"] = tuple(int(v) for v in args.patch.split(","))
    return TrainConfig(**kw)


def _with_fine_tune_defaults(args, config):
    """Load ``--from``; its fine-tuning LR and batch size fill what the user left unset."""
    from .models.zoo import load_model
    from .train import fine_tune_settings

    model = load_model(args.source)
    config.lr, config.batch_size = fine_tune_settings(model, args.lr, args.batch_size)
    return model


def run(args) -> int:
    """Run ``emseg train``."""
    import numpy as np

    from ._textbar import ProgressBar
    from .io import read_volume
    from .train import fine_tune, fit, threshold_note

    image = np.asarray(read_volume(args.image, key=args.key))
    labels = np.asarray(read_volume(args.labels, key=args.key))
    config = _config(args)

    def log(rec):
        sys.stderr.write(f"\n  step {rec['step']}: loss {rec['loss']:.4f}, "
                         f"val IoU {rec['val_iou']:.4f}\n")

    bar = ProgressBar("training", "steps")
    if args.source or args.painted:
        painted = labels if args.painted else np.where(labels > 0, labels + 1, 1)
        if args.source is None:
            from .models.zoo import build_model

            n_out = max(1, int(painted.max()) - 1)
            model = build_model(dict(dims=args.dims, in_channels=2 * args.context + 1
                                     if args.dims == 2 else 1, out_channels=n_out,
                                     depth=args.depth, width=args.width,
                                     residual=args.residual),
                                {"context": args.context if args.dims == 2 else 0})
        else:
            model = _with_fine_tune_defaults(args, config)
        res = fine_tune(model, image, painted, config, checkpoint=args.out, progress=bar,
                        on_log=log)
    else:
        res = fit(image, labels, config, checkpoint=args.out, ignore_label=args.ignore_label,
                  resume=args.resume, progress=bar, on_log=log)
    sys.stderr.write("\n")
    state = "cancelled" if res.cancelled else "done"
    note = threshold_note(res.model.meta)
    chosen = f"{note}; " if note else ""
    print(f"{state}: {res.steps} steps in {res.seconds:.0f} s, best IoU {res.best_iou:.4f}; "
          f"{chosen}checkpoint {res.checkpoint}")
    return 0
