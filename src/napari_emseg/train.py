"""Training and fine-tuning of the U-Nets, from dense or painted sparse labels.

Label conventions
-----------------
* dense (:func:`fit`): ``0`` = background, ``1..K`` = classes, ``ignore_label``
  (default ``None``) = not used by the loss;
* painted (:func:`fine_tune`, a napari Labels layer): ``0`` = unlabeled
  (ignored), ``1`` = background, ``2..`` = class 1, 2, ...
"""

from __future__ import annotations

import csv
import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._augment import augment, sample_patch
from ._normalize import DEFAULT_NORMALIZATION, apply_normalization, normalization_range
from .adapt import (
    TRAIN_FINER_TOLERANCE,
    adapt_batchnorm,
    describe,
    feature_shift,
    section_voxel,
    sections_fit,
    to_model_scale,
)
from .progress import CancelCheck, Cancelled, ProgressCallback, check_cancel, report

#: ``preview(model, seconds)``: called while training, the model in eval mode.
PreviewCallback = Callable[[Any, float], None]
#: ``strokes()``: slices painted again while training, ``{z: (Y, X) labels}``, or None.
StrokesCallback = Callable[[], "dict[int, np.ndarray] | None"]
#: Seconds between asking for strokes painted while a fine-tune runs.
STROKES_EVERY = 2.0

# Peak LR for fine-tuning a trained model from strokes; larger Adam steps undo
# what the model knew before the strokes help (benchmarks/bench_finetune.py).
FINE_TUNE_LR = 3e-5
# A 3D kernel has three times the taps of a 2D one, so each Adam step moves the
# output about three times as far: 3e-5 made mito-3d over-predict after 60 steps
# (IoU 0.939 -> 0.825 at 0.5), 1e-5 kept it (0.929; bench_finetune.py).
FINE_TUNE_LR_3D = 1e-5
# Peak LR when the painted strokes train a new (untrained) U-Net.
SCRATCH_LR = 1e-3
# A bundled model's threshold is chosen for its own calibration; after fine-tuning
# a 2D model the painted voxels choose a new one (painted_threshold), else 0.5.
FINE_TUNED_THRESHOLD = 0.5
# Thresholds a fine-tune may choose from its painted voxels: near 0.5 only. Strokes are a
# biased sample (corrections sit on the model's errors): on Lucchi++ corrections the
# held-out half confirmed 0.05, which scored 0.848 on the unpainted slices, 0.921 at 0.5.
CALIBRATION_THRESHOLDS = tuple(np.round(np.arange(0.3, 0.701, 0.05), 2))
MIN_CALIBRATION_VOXELS = 20  # of each class, to choose a threshold after fine-tuning
# Largest default patch when fine-tuning a 3D model: a step stays ~2 s on 2 CPU cores.
FINE_TUNE_PATCH_3D = (8, 128, 128)
# Training from scratch (fit): peak LR and batch when the config leaves them "auto".
FIT_LR = 2e-3
FIT_BATCH = 8
# Fine-tuning stops after this many minutes (or earlier, see FINE_TUNE_EARLY_STOP).
FINE_TUNE_MINUTES = 2.0
# ... or when the smoothed loss on the painted voxels has not improved for this many steps.
FINE_TUNE_EARLY_STOP = 150  # (60 stopped a far run after 21 s on the noisy sparse loss)
FINE_TUNE_MAX_STEPS = 5000
# Fine-tuning returns the last weights, not those with the best IoU on the painted
# voxels: strokes on object skeletons and background lines are nearly all right
# early (0.98), so that IoU picks weights by noise (far run, benchmarks/results/
# adapt.json: "new" keeps the last weights, "new-best" the best-scoring ones)
FINE_TUNE_KEEP = "last"
# The near recipe is a nudge: on Lucchi++ correction strokes mito-2d gained in the first
# ~60 steps (0.908 -> 0.923 at 16 s) and lost after (0.867 at 61 s, 246 steps; early stop
# on the loss does not see it), so a time-budgeted near run stops after this many steps.
NEAR_STEPS = 60
# The gap rule (choose_recipe), from two measurements before training:
# * the shift of the volume's features from the model's BatchNorm statistics
#   (adapt.feature_shift): 0.08 on unseen Lucchi++ slices, 0.10 on FlyEM FIB-SEM,
#   0.38 on ISBI ssTEM for mito-2d; 0.17 on Lucchi++ for a model trained on ISBI
#   mitochondria only (bench_adapt "reverse"), where the far recipe reached 0.55 and
#   the near one 0.48 (it was 0.2, which sent that case near); at or above FAR_SHIFT
#   the data is "far";
# * the model's foreground IoU on the painted voxels: below NEAR_IOU it is "far"
#   too. This alone misleads: a user who paints corrections paints exactly where
#   the model fails (IoU 0.44 on Lucchi++ corrections, where the gentle recipe
#   gains +0.015 and the far one loses 0.45; benchmarks/bench_adapt.py, near case).
FAR_SHIFT = 0.13
NEAR_IOU = 0.2
# ... but a shifted model that already scores FIT_IOU on the painted voxels gets the near
# recipe: mito-2d-mix (BatchNorm statistics blended from two volumes) on ISBI 2012 had a
# shift of 0.155 and scored 0.78 on skeleton strokes; on ISBI slices it never saw the far
# recipe took it from 0.633 to 0.550, the near one kept 0.616. On Lucchi++ corrections the
# far recipe cost 0.45. The far starts measured scored 0.10-0.52 (mito-2d on ISBI,
# mito-isbi on Lucchi++). 0.7 is a first guess between them.
FIT_IOU = 0.7
FAR_LR = 5e-4
FAR_PATCH_2D = (128, 128)
FAR_BATCH_2D = 8
# Held-out strokes must confirm a threshold other than 0.5 by this much IoU.
THRESHOLD_MARGIN = 0.01
# ... and then only this fraction of the way from 0.5 is taken. Strokes are biased the same
# way in both halves: foreground strokes sit on objects' centres, where any threshold keeps
# them, while background lines hug the objects, so high thresholds always look better on
# them. On the far loop (ISBI 2012) the confirmed choice lost 0.003-0.036 IoU on the
# unpainted slices in 11 of 13 runs (held-out gains of up to +0.07 did not predict it) and
# won +0.02 / +0.04 on the reverse case; halfway, the losses were 0.006-0.011 and the wins
# +0.017 / +0.028 (docs/adaptation.md).
THRESHOLD_SHRINK = 0.5
# Binary trained models: unpainted voxels around the strokes where the starting model
# (after AdaBN for "far") is this sure keep its answer (pseudo-labels, weighted
# PSEUDO_WEIGHT), so fine-tuning changes what was painted, not everything else. On the
# far case (ISBI from mito-2d) they lifted 45 s of training from 0.42 to 0.50 IoU.
PSEUDO_CONFIDENCE = 0.9
PSEUDO_WEIGHT = 0.5
PSEUDO_BG, PSEUDO_FG = -2, -3  # target codes (-1 = ignored)
HALF_TILE = 48  # px: the squares that split painted voxels into two halves
# best_start: an alternative start replaces the chosen model when it scores this much
# more foreground IoU on the painted voxels (both measured as they would train).
START_MARGIN = 0.05


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint)."""

    dims: int = 2
    context: int = 0
    depth: int = 4
    width: int = 16
    norm: str = "batch"
    residual: bool = False
    dropout: float = 0.0
    anisotropic_levels: int = 0
    pool_z: bool = True  # 3D: False pools only in y/x (see UNet)
    first_kernel_z: int = 0  # 3D: z extent of the first convolution (see UNet)
    patch: tuple[int, ...] | None = None
    batch_size: int | None = None  # None = auto (FIT_BATCH, or the fine-tuning recipe's)
    steps: int = 500
    minutes: float | None = None
    lr: float | None = None  # None = auto (FIT_LR, or the fine-tuning recipe's)
    early_stop: int = 0  # stop when the smoothed loss has not improved for this many steps
    keep: str | None = None  # weights returned: "best" validation IoU or "last"; None =
    # auto: "best" for fit (held-out validation), FINE_TUNE_KEEP for fine_tune
    preview_every: float = 15.0  # seconds between calls of the ``preview`` callback
    weight_decay: float = 1e-4
    warmup: int = 50
    loss: str = "bce_dice"
    label_bias: float = 0.5
    balance_volumes: bool = False  # sample each training volume equally often (else by size)
    own_neighbours: tuple[int, ...] = ()  # 2.5D: volumes (by index) whose sections are too
    # thick for the context: each slice is fed as its own neighbours (adapt.context_fits)
    elastic_p: float = 0.25
    strong_augment: bool = False  # also randomize pixel size, blur and contrast (_augment)
    val_every: int = 100
    val_slices: int = 8
    seed: int = 0
    device: str | None = None
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16
    threads: int | None = None
    freeze_norm: bool = False  # keep BatchNorm statistics fixed while training
    train_layers: str = "all"  # "decoder": keep the encoder fixed (fine-tuning)
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9: small gradients, small steps)
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    class_names: list[str] | None = None
    max_classes: int = 16  # more foreground classes than this is refused (instance ids?)

    def resolved_patch(self) -> tuple[int, ...]:
        """The patch size, defaulting to 256² (2D) or 32×128×128 (3D)."""
        if self.patch:
            return tuple(int(p) for p in self.patch)
        return (256, 256) if self.dims == 2 else (32, 128, 128)


@dataclass
class TrainResult:
    """What a training run produced."""

    model: Any
    checkpoint: Path | None
    best_iou: float
    history: list[dict]
    steps: int
    seconds: float
    cancelled: bool = False
    meta: dict | None = None  # the model's metadata (kept when ``model`` is dropped)

    def model_meta(self) -> dict:
        """The trained model's metadata (``model.meta``, or ``meta`` without a model)."""
        return dict(getattr(self.model, "meta", None) or self.meta or {})


# ----------------------------------------------------------------- data checks
def _as_list(x) -> list[np.ndarray]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _check_pair(image: np.ndarray, labels: np.ndarray, what: str) -> None:
    if image.ndim not in (2, 3):
        raise ValueError(f"{what}: image must be 2D (YX) or 3D (ZYX), got {image.ndim} dims")
    if image.shape != labels.shape:
        raise ValueError(
            f"{what}: image shape {image.shape} and labels shape {labels.shape} differ"
        )
    if not np.issubdtype(np.asarray(labels).dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers, got dtype {labels.dtype}")


def _prepare(images, targets, config: TrainConfig):
    """Normalise images, check shapes; returns (images, targets) lists as 3D arrays."""
    out_i, out_t = [], []
    for k, (img, tgt) in enumerate(zip(images, targets, strict=True)):
        img, tgt = np.asarray(img), np.asarray(tgt)
        _check_pair(img, tgt, f"volume {k}")
        if img.ndim == 2:
            img, tgt = img[None], tgt[None]
        lo, hi = normalization_range(img, config.normalization)
        out_i.append(apply_normalization(img, lo, hi))
        out_t.append(_loss_targets(img, tgt))
    return out_i, out_t


def _loss_targets(image: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """A new int64 copy of ``targets`` (3D) where NaN/Inf voxels of ``image`` are ignored."""
    tgt = targets.astype(np.int64)
    bad = ~np.isfinite(image) if np.issubdtype(image.dtype, np.floating) else None
    if bad is not None and bad.any():
        tgt[bad] = -1  # NaN/Inf voxels (normalised to 0) never count in the loss
    return tgt


def dense_targets(labels: np.ndarray, ignore_label: int | None = None) -> np.ndarray:
    """Dense labels (0 = background, 1.. = class) → loss targets (-1 = ignore)."""
    t = np.asarray(labels).astype(np.int64)
    if ignore_label is not None:
        t[np.asarray(labels) == ignore_label] = -1
    return t


def painted_targets(painted: np.ndarray) -> np.ndarray:
    """Painted labels (0 unlabeled, 1 background, 2.. class) → targets (-1 = ignore)."""
    return np.asarray(painted).astype(np.int64) - 1


# ---------------------------------------------------------------- the sampler
class PatchSampler:
    """Random training patches, biased towards labelled (or foreground) voxels."""

    def __init__(self, images, targets, config: TrainConfig, sparse: bool):
        self.images, self.cfg, self.sparse = images, config, sparse
        self.patch = config.resolved_patch()
        self.rng = np.random.default_rng(config.seed)
        self.set_targets(targets)
        sizes = np.array([1.0 if config.balance_volumes else t.size for t in targets])
        self.weights = sizes / sizes.sum()
        self.label_bias = 1.0 if sparse else config.label_bias

    def set_targets(self, targets) -> None:
        """Use new targets (same shapes), e.g. with strokes painted while training."""
        hot_lists = []  # voxels to centre on: labelled ones (sparse) or foreground ones
        for t in targets:
            hot = np.flatnonzero(t.ravel() >= 0) if self.sparse else np.flatnonzero(t.ravel() > 0)
            if hot.size > 2_000_000:
                hot = np.sort(self.rng.choice(hot, 2_000_000, replace=False))
            hot_lists.append(hot)
        self.targets, self.hot = list(targets), hot_lists  # swapped together

    def centre(self) -> tuple[int, tuple[int, int, int]]:
        k = int(self.rng.choice(len(self.images), p=self.weights))
        shape = self.targets[k].shape
        if self.hot[k].size and self.rng.random() < self.label_bias:
            flat = int(self.hot[k][self.rng.integers(self.hot[k].size)])
            c = np.unravel_index(flat, shape)
            jitter = [int(self.rng.integers(-p // 4, p // 4 + 1)) for p in self.patch]
            if self.cfg.dims == 2:
                c = (c[0], c[1] + jitter[0], c[2] + jitter[1])
            else:
                c = tuple(ci + j for ci, j in zip(c, jitter, strict=True))
            c = tuple(int(np.clip(ci, 0, s - 1)) for ci, s in zip(c, shape, strict=True))
        else:
            c = tuple(int(self.rng.integers(s)) for s in shape)
        return k, c

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        xs, ts = [], []
        for _ in range(self.cfg.batch_size):
            k, c = self.centre()
            x, t = sample_patch(self.images[k], self.targets[k], c, self.patch,
                                self.cfg.dims, self.cfg.context,
                                k in self.cfg.own_neighbours)
            x, t = augment(x, t, self.rng, self.cfg.dims, self.cfg.elastic_p,
                           self.cfg.strong_augment)
            xs.append(x)
            ts.append(t)
        return np.stack(xs), np.stack(ts)


def _prefetch(sampler: PatchSampler, stop: threading.Event, depth: int = 3) -> queue.Queue:
    """Fill a queue with batches from a background thread (numpy frees the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def run():
        while not stop.is_set():
            try:
                item = sampler.batch()
            except Exception as exc:  # surfaced in the training loop
                item = exc
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue

    threading.Thread(target=run, daemon=True, name="emseg-prefetch").start()
    return q


# ---------------------------------------------------------------------- losses
def masked_loss(logits, target, kind: str = "bce_dice"):
    """Loss over labelled voxels only (``target == -1`` is ignored).

    logits : (N, C, *S) tensor; target : (N, *S) int64 tensor.
    ``kind``: ``"bce_dice"``, ``"focal"`` (binary, C=1) or ``"ce_dice"`` (C ≥ 2).
    Pseudo-labels (:data:`PSEUDO_BG`, :data:`PSEUDO_FG`, binary models) add a
    weighted BCE term.
    """
    pseudo = target <= PSEUDO_BG
    anchor = _pseudo_loss(logits, target, pseudo) if bool(pseudo.any()) else 0.0
    valid = target >= 0
    n_valid = valid.sum()
    if n_valid == 0:
        return logits.sum() * 0.0 + anchor
    return _labelled_loss(logits, target, valid, n_valid, kind) + anchor


def _pseudo_loss(logits, target, pseudo):
    """PSEUDO_WEIGHT × BCE towards the starting model's confident answers (binary)."""
    import torch.nn.functional as F

    logit = logits[:, 0].float()[pseudo]
    t = (target[pseudo] == PSEUDO_FG).float()
    return PSEUDO_WEIGHT * F.binary_cross_entropy_with_logits(logit, t)


def _labelled_loss(logits, target, valid, n_valid, kind: str):
    """BCE/focal + Dice (binary) or CE + Dice (multi-class) over the labelled voxels."""
    import torch
    import torch.nn.functional as F

    if logits.shape[1] == 1:
        logit = logits[:, 0].float()
        t = (target > 0).float()
        m = valid.float()
        if kind == "focal":
            bce = F.binary_cross_entropy_with_logits(logit, t, reduction="none")
            p_t = torch.exp(-bce)
            return (((1 - p_t) ** 2) * bce * m).sum() / n_valid
        bce = (F.binary_cross_entropy_with_logits(logit, t, reduction="none") * m).sum() / n_valid
        p = torch.sigmoid(logit) * m
        dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + (t * m).sum() + 1)
        return bce + dice
    ce = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none")
    ce = (ce * valid).sum() / n_valid
    prob = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).movedim(-1, 1).float()
    m = valid.unsqueeze(1).float()
    inter = (prob * onehot * m).flatten(2).sum(-1).sum(0)
    denom = ((prob + onehot) * m).flatten(2).sum(-1).sum(0)
    dice = 1 - ((2 * inter + 1) / (denom + 1))[1:].mean()
    return ce + dice


# ------------------------------------------------------------------ validation
def _val_crops(images, targets, config: TrainConfig, sparse: bool):
    """Fixed validation inputs: whole slices (2D) or centred boxes (3D)."""
    rng = np.random.default_rng(config.seed + 1)
    crops = []
    for k, (img, tgt) in enumerate(zip(images, targets, strict=True)):
        if config.dims == 2:
            zs = np.unique(np.linspace(0, img.shape[0] - 1, config.val_slices).round().astype(int))
            if sparse:
                zs = [z for z in range(img.shape[0]) if (tgt[z] >= 0).any()][: config.val_slices]
            for z in zs:
                x, _ = sample_patch(img, tgt, (z, img.shape[1] // 2, img.shape[2] // 2),
                                    img.shape[1:], 2, config.context,
                                    k in config.own_neighbours)
                crops.append((x, tgt[z]))
        else:
            pz, py, px = config.resolved_patch()
            box = (min(img.shape[0], pz * 2), min(img.shape[1], py * 2), min(img.shape[2], px * 2))
            for _ in range(max(1, config.val_slices // 2)):
                s = [int(rng.integers(0, d - b + 1)) for d, b in zip(img.shape, box, strict=True)]
                sl = tuple(slice(a, a + b) for a, b in zip(s, box, strict=True))
                crops.append((img[sl][None], tgt[sl]))
    return crops


def _forward_padded(model, x, device):
    """Run ``model`` on one (C, *S) array padded to its divisor; logits (C, *S)."""
    import torch

    div = model.divisor()
    spatial = x.shape[1:]
    pads = [(0, (-s) % d) for s, d in zip(spatial, div, strict=True)]
    xp = np.pad(x, [(0, 0), *pads], mode="reflect" if min(spatial) > 1 else "edge")
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(xp))[None].to(device))[0]
    return out[(slice(None), *[slice(0, s) for s in spatial])].float().cpu().numpy()


def foreground_iou(logits_list, targets) -> float:
    """Foreground IoU over labelled voxels (binary: logit > 0; multi: argmax > 0)."""
    inter = union = 0
    for logit, t in zip(logits_list, targets, strict=True):
        pred = logit[0] > 0 if logit.shape[0] == 1 else logit.argmax(0) > 0
        valid = t >= 0
        gt = t > 0
        inter += int((pred & gt & valid).sum())
        union += int(((pred | gt) & valid).sum())
    return inter / union if union else 1.0


def set_train_mode(model, freeze_norm: bool = False) -> None:
    """``model.train()``, keeping BatchNorm layers in eval mode when ``freeze_norm``.

    Off by default: fine-tuning a trained model with frozen statistics proved
    fragile (benchmarks/bench_finetune.py), but the option keeps the running
    statistics learnt from dense data when that is wanted.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    model.train()
    if freeze_norm:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def validate(model, crops, device, freeze_norm: bool = False) -> float:
    """Foreground IoU of ``model`` on the validation crops (leaves it in train mode)."""
    model.eval()
    try:
        logits = [_forward_padded(model, x, device) for x, _ in crops]
    finally:
        set_train_mode(model, freeze_norm)
    return foreground_iou(logits, [t for _, t in crops])


# ------------------------------------------------------------------ the loop
def _trainable(model, layers: str) -> list:
    """The parameters to optimise: all, or the decoder only (encoder frozen)."""
    if layers not in ("all", "decoder"):
        raise ValueError(f"train_layers must be 'all' or 'decoder', got {layers!r}")
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(layers == "all" or not name.startswith("down."))
        if p.requires_grad:
            params.append(p)
    return params


def _optimizer(model, config: TrainConfig):
    """AdamW or SGD with momentum over the trainable parameters."""
    import torch

    params = _trainable(model, config.train_layers)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True,
                               weight_decay=config.weight_decay)
    if config.optimizer != "adamw":
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {config.optimizer!r}")
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def pick_device(device: str | None = None) -> str:
    """``device`` or the best available one (:func:`napari_emseg.predict.select_device`)."""
    from .predict import select_device

    return str(select_device(device))


def cpu_bf16_faster(device: str) -> bool:
    """True on a CPU with native bfloat16 instructions (AVX-512 BF16 or AMX).

    There bf16 autocast trains the U-Nets about 2.5× faster than float32 (2 cores,
    benchmarks/bench_adapt.py). Elsewhere oneDNN emulates bf16 and it is 2-3× slower
    than float32 (an AVX-512 Xeon without ``avx512_bf16``: 1.2 against 3.5 steps/s
    for the far recipe's batch), although ``torch`` reports bf16 as supported: the
    CPU flags decide where they can be read (Linux).
    """
    if not device.startswith("cpu"):
        return False
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    import torch

    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return native and "AVX512" in torch.backends.cpu.get_cpu_capability()


def _cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _memory_format(dims: int):
    import torch

    return torch.channels_last if dims == 2 else torch.channels_last_3d


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def resume_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + ".resume.pt")


def _save_resume(path: Path, model, optim, step: int, best: float, history: list,
                 elapsed: float) -> None:
    import torch

    from .io.atomic import atomic_path

    state = {"model": model.state_dict(), "optim": optim.state_dict(), "step": step,
             "best": best, "history": history, "elapsed": elapsed}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _write_log(path: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = list(history[-1].keys())
    from .io.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)


def plot_history(history: list[dict], path: str | os.PathLike) -> Path | None:
    """Write a PNG of loss and validation IoU against step (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history], label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["val_iou"] for h in history], color="tab:orange", label="val IoU")
    ax2.set_ylabel("validation IoU")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def new_model(n_classes: int = 2, config: TrainConfig | None = None, *,
              class_names: list[str] | None = None):
    """A new, untrained U-Net for background + ``n_classes - 1`` classes.

    Parameters
    ----------
    n_classes : int
        Classes including background (2 = binary: one sigmoid output; more:
        softmax over ``n_classes`` outputs).
    config : TrainConfig, optional
        Architecture (dims, context, depth, width, norm, residual, ...), patch,
        normalisation; defaults to ``TrainConfig()``.
    class_names : names of the classes, background first (default generic names)

    Returns
    -------
    UNet with ``.meta`` (classes, activation, context, normalisation, patch;
    no ``"training"`` entry, so fine-tuning treats it as untrained).
    """
    from .models.zoo import build_model

    if n_classes < 2:
        raise ValueError(f"a model needs background and at least one class, got {n_classes}")
    config = config or TrainConfig()
    if class_names:
        config = TrainConfig(**{**asdict(config), "class_names": list(class_names)})
    arch = dict(dims=config.dims, in_channels=2 * config.context + 1 if config.dims == 2 else 1,
                out_channels=1 if n_classes == 2 else n_classes, depth=config.depth,
                width=config.width, norm=config.norm, residual=config.residual,
                dropout=config.dropout, anisotropic_levels=config.anisotropic_levels,
                pool_z=config.pool_z, first_kernel_z=config.first_kernel_z)
    return build_model(arch, _meta_for(config, n_classes, {"name": "new model"}))


def painted_classes(painted: np.ndarray, max_classes: int = TrainConfig.max_classes) -> int:
    """Classes (with background) that painted labels (1 background, 2.. classes) need.

    More than ``max_classes`` foreground classes is refused: such a file is an
    image or instance ids, not painted classes.
    """
    top = int(np.asarray(painted).max())
    if top - 1 > max_classes:
        raise ValueError(f"painted labels go up to {top}, i.e. {top - 1} foreground classes "
                         f"(more than {max_classes}): painted labels are 0 = not painted, "
                         "1 = background, 2.. = classes; is this an image or instance ids?")
    return max(2, top)


def one_class_warning(painted: np.ndarray) -> str | None:
    """Why training on ``painted`` is probably a mistake (one class only), else None."""
    has_background, has_foreground = bool((painted == 1).any()), bool((painted >= 2).any())
    if has_background and not has_foreground:
        return ("only background (1) is painted: the model learns that everything is "
                "background. Paint foreground as 2 (a ground-truth mask where 1 marks "
                "objects must not be used as annotations)")
    if has_foreground and not has_background:
        return ("only foreground (2..) is painted: the model learns that everything is "
                "foreground. Paint some background as 1")
    return None


def _train_loop(model, images, targets, val_crops, config: TrainConfig, *, sparse: bool,
                checkpoint: str | os.PathLike | None, meta: dict, progress, cancel,
                on_log, resume: bool, save_state: bool = True,
                preview: PreviewCallback | None = None,
                refresh: Callable[[float], list | None] | None = None) -> TrainResult:
    """Train ``model`` until its steps, time budget or early stop; keep the best checks.

    ``refresh(seconds)``, called before each step, may return new targets (a list
    like ``targets``): training goes on with them.
    """
    run = _Run(model, config, checkpoint, meta, val_crops, on_log, save_state)
    if resume:
        run.resume()
    sampler = PatchSampler(images, targets, config, sparse)
    sampler.rng = np.random.default_rng(config.seed + run.step)
    stop = threading.Event()
    batches = _prefetch(sampler, stop)
    stopper = _EarlyStop(config.early_stop, config.warmup)
    show = _Preview(preview, config.preview_every, model, config.freeze_norm)
    try:
        while run.step < config.steps and not stopper.stopped and not run.over_budget():
            show(run.elapsed())
            check_cancel(cancel)
            new_targets = refresh(run.elapsed()) if refresh else None
            if new_targets is not None:
                sampler.set_targets(new_targets)
                run.val_crops = _val_crops(images, new_targets, config, sparse)
            stopper.update(run.train_step(batches))
            report(progress, run.step, config.steps)
            last = run.step == config.steps or stopper.stopped or run.over_budget()
            if run.step % config.val_every == 0 or last:
                run.check()
    except Cancelled:
        run.cancelled = True
    finally:
        stop.set()
        run.restore_layout()
    return run.finish()


class _Run:
    """The state of one training run: model, optimiser, best checkpoint, history."""

    def __init__(self, model, config: TrainConfig, checkpoint, meta: dict, val_crops,
                 on_log, save_state: bool):
        import torch

        self.device = pick_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.model, self.config, self.meta, self.val_crops = model, config, meta, val_crops
        self.on_log, self.save_state = on_log, save_state
        model.to(self.device)
        set_train_mode(model, config.freeze_norm)
        self.optim = _optimizer(model, config)
        self.ckpt_path = Path(checkpoint) if checkpoint else None
        self.step, self.best, self.history, self.losses = 0, -1.0, [], []
        self.best_state: dict = {}
        self.cancelled = False
        self.use_amp = config.amp and (self.device.startswith("cuda")
                                       or cpu_bf16_faster(self.device))
        # channels-last is faster on CPU with or without bf16 (3.5 against 2.6 steps/s
        # for 2D, 1.1 against 0.8 for 3D, float32, 2 cores)
        self.layout = _memory_format(model.config["dims"]) if self.device == "cpu" else None
        if self.layout is not None:
            model.to(memory_format=self.layout)
        self.budget = config.minutes * 60 if config.minutes else None
        self.t0 = time.perf_counter()

    def resume(self) -> None:
        """Continue from the checkpoint's ``.resume.pt`` state, when there is one."""
        import torch

        if not (self.ckpt_path and resume_path(self.ckpt_path).exists()):
            return
        if self.ckpt_path.exists():
            from .models.zoo import read_checkpoint

            self.best_state = dict(read_checkpoint(self.ckpt_path)["state_dict"])
        state = torch.load(resume_path(self.ckpt_path), map_location=self.device,
                           weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        self.step, self.best = state["step"], state["best"]
        self.history = list(state["history"])
        self.t0 = time.perf_counter() - float(state["elapsed"])

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return bool(self.budget) and self.elapsed() >= self.budget

    def train_step(self, batches: queue.Queue) -> float:
        """One optimisation step on the next batch; returns its loss."""
        import torch

        cfg = self.config
        frac = max(self.step / cfg.steps, self.elapsed() / self.budget if self.budget else 0.0)
        for g in self.optim.param_groups:
            g["lr"] = cfg.lr * _lr_factor(frac, self.step, cfg.warmup)
        item = batches.get()
        if isinstance(item, Exception):
            raise item
        xb = torch.from_numpy(item[0]).to(self.device, non_blocking=True)
        if self.layout is not None:
            xb = xb.contiguous(memory_format=self.layout)
        tb = torch.from_numpy(item[1]).to(self.device, non_blocking=True)
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                            enabled=self.use_amp):
            loss = masked_loss(self.model(xb), tb, cfg.loss)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        self.losses.append(float(loss.detach()))
        self.step += 1
        return self.losses[-1]

    def check(self) -> None:
        """Validate, log, keep the best model and write the run's files."""
        cfg = self.config
        iou = validate(self.model, self.val_crops, self.device, cfg.freeze_norm)
        rec = {"step": self.step, "seconds": round(self.elapsed(), 1),
               "loss": round(float(np.mean(self.losses)), 5), "val_iou": round(iou, 4),
               "lr": self.optim.param_groups[0]["lr"]}
        self.losses.clear()
        self.history.append(rec)
        if self.on_log:
            self.on_log(rec)
            set_train_mode(self.model, cfg.freeze_norm)  # callbacks may predict
        if iou > self.best or cfg.keep == "last":  # None (auto) resolved before: "best"
            self.save_best(iou)
        if self.ckpt_path:
            _write_log(self.ckpt_path.with_suffix(".csv"), self.history)
        if self.ckpt_path and self.save_state:
            _save_resume(resume_path(self.ckpt_path), self.model, self.optim, self.step,
                         self.best, self.history, self.elapsed())

    def save_best(self, iou: float) -> None:
        """Keep the current weights as the result (in memory and in the checkpoint)."""
        self.best = iou
        self.best_state.update({k: v.detach().cpu().clone()
                                for k, v in self.model.state_dict().items()})
        if not self.ckpt_path:
            return
        from .models.zoo import save_checkpoint

        info = dict(self.meta)
        info["training"] = {**self.meta.get("training", {}), "steps": self.step,
                            "seconds": round(self.elapsed(), 1),
                            "device": _device_name(self.device),
                            "config": _config_dict(self.config),
                            "history": self.history[-200:]}
        info["metrics"] = {**self.meta.get("metrics", {}), "val_iou": round(iou, 4)}
        save_checkpoint(self.model, self.ckpt_path, info)

    def restore_layout(self) -> None:
        import torch

        if self.layout is not None:
            self.model.to(memory_format=torch.contiguous_format)

    def finish(self) -> TrainResult:
        """The best model seen (also in the checkpoint) as a :class:`TrainResult`."""
        if self.best < 0 and self.cancelled and self.ckpt_path and self.ckpt_path.exists():
            self.ckpt_path = None  # nothing of this run was checked: what was there stays
        if self.best < 0:
            self.save_best(validate(self.model, self.val_crops, self.device,
                                    self.config.freeze_norm))
        if self.ckpt_path and self.history:
            plot_history(self.history, self.ckpt_path.with_suffix(".png"))
        if self.best_state:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        self.model.meta = {**getattr(self.model, "meta", {}), **self.meta}
        return TrainResult(model=self.model, checkpoint=self.ckpt_path, best_iou=self.best,
                           history=self.history, steps=self.step, seconds=self.elapsed(),
                           cancelled=self.cancelled)


class _EarlyStop:
    """Stops a run when the smoothed loss has not improved by 1 % for ``patience`` steps."""

    def __init__(self, patience: int, warmup: int, smoothing: float = 0.1):
        self.patience, self.warmup, self.smoothing = patience, warmup, smoothing
        self.ema: float | None = None
        self.best = math.inf
        self.steps = self.since_best = 0
        self.stopped = False

    def update(self, loss: float) -> None:
        """Record one step's loss."""
        self.steps += 1
        if not math.isfinite(loss):
            return
        a = self.smoothing
        self.ema = loss if self.ema is None else (1 - a) * self.ema + a * loss
        if self.ema < self.best * 0.99:
            self.best, self.since_best = self.ema, 0
        else:
            self.since_best += 1
        self.stopped = bool(self.patience) and self.steps > self.warmup + self.patience \
            and self.since_best >= self.patience


class _Preview:
    """Calls ``preview(model, seconds)`` at once, then every ``every`` seconds, in eval mode."""

    def __init__(self, callback: PreviewCallback | None, every: float, model,
                 freeze_norm: bool):
        self.callback, self.every, self.model = callback, max(0.0, every), model
        self.freeze_norm = freeze_norm
        self.next = 0.0

    def __call__(self, elapsed: float) -> None:
        if self.callback is None or elapsed < self.next:
            return
        self.next = elapsed + self.every
        self.model.eval()
        try:
            self.callback(self.model, elapsed)
        finally:
            set_train_mode(self.model, self.freeze_norm)


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"{device}: {platform.processor() or platform.machine()}"


def _config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    d["patch"] = list(config.resolved_patch())
    return d


def _meta_for(config: TrainConfig, n_classes: int, extra: dict | None) -> dict:
    names = config.class_names or (["background", "foreground"] if n_classes <= 2 else
                                   ["background"] + [f"class {i}" for i in range(1, n_classes)])
    return {"context": config.context if config.dims == 2 else 0, "classes": names,
            "activation": "sigmoid" if n_classes <= 2 else "softmax",
            "normalization": dict(config.normalization),
            "patch": list(config.resolved_patch()), **(extra or {})}


def fit(
    images,
    labels,
    config: TrainConfig | None = None,
    *,
    val_images=None,
    val_labels=None,
    checkpoint: str | os.PathLike | None = None,
    ignore_label: int | None = None,
    meta: dict | None = None,
    resume: bool = False,
    init=None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    on_log=None,
) -> TrainResult:
    """Train a U-Net from dense labels (new, or warm-started from ``init``).

    Parameters
    ----------
    images, labels : ndarray (Z, Y, X) or (Y, X), or lists of them
        Raw grey values and dense labels (0 = background, 1.. = classes).
    config : TrainConfig
    val_images, val_labels : optional held-out volumes for validation IoU
        (default: the training volumes).
    checkpoint : path
        Where the best model is written (plus ``.csv`` log, ``.png`` chart and
        ``.resume.pt`` state for ``resume=True``).
    init : UNet, bundled name or checkpoint path, optional
        Start from these weights with a fresh LR schedule; its architecture
        must match ``config`` (dims, context, depth, width, classes).
    progress, cancel, on_log : callbacks ``(step, total)``, ``() -> bool`` and
        ``(record: dict)`` at each validation.
    """
    config = _with_auto(config or TrainConfig(), FIT_LR, FIT_BATCH)
    images, labels = _as_list(images), _as_list(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label volumes")
    labels = [_as_binary_mask(np.asarray(lab), ignore_label, k) for k, lab in enumerate(labels)]
    targets = [dense_targets(lab, ignore_label) for lab in labels]
    for k, (img, tgt) in enumerate(zip(images, targets, strict=True)):
        _check_pair(np.asarray(img), np.asarray(labels[k]), f"volume {k}")
        if (tgt >= 0).sum() == 0:
            raise ValueError(f"volume {k}: labels contain no labelled voxels")
    n_classes = max(2, int(max(t.max() for t in targets)) + 1)
    if n_classes - 1 > config.max_classes:
        raise ValueError(f"labels hold {n_classes - 1} foreground classes (values up to "
                         f"{n_classes - 1}); more than {config.max_classes} needs "
                         "TrainConfig(max_classes=...) (are these instance ids? train on "
                         "labels > 0 for one class)")
    if all(len(np.unique(t[t >= 0])) < 2 for t in targets):
        raise ValueError("labels contain a single class: training from scratch needs "
                         "background and at least one foreground class")
    imgs, tgts = _prepare(images, targets, config)
    if val_images is not None:
        vi, vt = _prepare(_as_list(val_images),
                          [dense_targets(v, ignore_label) for v in _as_list(val_labels)], config)
    else:
        vi, vt = imgs, tgts
    if n_classes > 2 and config.loss != "ce_dice":
        config = TrainConfig(**{**asdict(config), "loss": "ce_dice"})
    model = new_model(n_classes, config)
    if init is not None:
        _warm_start(model, init)
    info = _meta_for(config, n_classes, meta)
    model.meta = {**model.meta, **info}
    return _train_loop(model, imgs, tgts, _val_crops(vi, vt, config, sparse=False), config,
                       sparse=False, checkpoint=checkpoint, meta=info, progress=progress,
                       cancel=cancel, on_log=on_log, resume=resume)


def _as_binary_mask(labels: np.ndarray, ignore_label: int | None, k: int) -> np.ndarray:
    """A {0, v} mask with v > 1 (e.g. 0/255) as {0, 1}, with a warning saying so."""
    values = np.unique(labels[labels != ignore_label] if ignore_label is not None else labels)
    if len(values) == 2 and values[0] == 0 and values[1] > 1:
        warnings.warn(f"volume {k}: labels hold only 0 and {values[1]}: read as a binary mask "
                      f"({values[1]} = foreground)", stacklevel=3)
        out = (labels == values[1]).astype(np.uint8)
        if ignore_label is not None:
            out = np.where(labels == ignore_label, ignore_label, out)
        return out
    return labels


def _with_auto(config: TrainConfig, lr: float, batch_size: int) -> TrainConfig:
    """``config`` with its "auto" (None or 0) lr and batch size set to these."""
    return TrainConfig(**{**asdict(config), "lr": config.lr or lr,
                          "batch_size": config.batch_size or batch_size})


def _warm_start(model, init) -> None:
    """Copy the weights of ``init`` into ``model`` (clear error on a mismatch)."""
    from .models.zoo import CheckpointError, load_model

    source = init if hasattr(init, "config") else load_model(init)
    if dict(source.config) != dict(model.config):
        raise CheckpointError(
            f"cannot start from {getattr(source, 'meta', {}).get('name', 'this model')}: "
            f"its architecture {source.config} differs from the training config "
            f"{model.config}")
    model.load_state_dict(source.state_dict())


def fine_tune(
    model_or_checkpoint,
    image: np.ndarray,
    painted: np.ndarray,
    config: TrainConfig | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    recipe: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    on_log=None,
    preview: PreviewCallback | None = None,
    voxel_size: tuple[float, ...] | None = None,
    strokes: StrokesCallback | None = None,
    alternatives: Sequence[Any] = (),
) -> TrainResult:
    """Fine-tune a model from sparse painted labels (0 unlabeled, 1 background, 2.. class).

    Parameters
    ----------
    model_or_checkpoint : UNet, bundled name or checkpoint path
    image : ndarray (Z, Y, X) or (Y, X)
    painted : integer ndarray, same shape as ``image``
    config : TrainConfig, optional
        Steps, time budget, lr, batch size and patch; ``None`` fields (and the
        whole config when omitted) come from the recipe (:func:`fine_tune_defaults`).
        ``dims``, ``context``, normalisation and architecture come from the model.
    checkpoint : where the fine-tuned model is written.
    recipe : ``"auto"`` (choose by :func:`choose_recipe` from the model's IoU on
        the painted voxels), ``"near"`` or ``"far"``.
    preview : ``(model, seconds) -> None``, called at the start and every
        ``config.preview_every`` seconds (model in eval mode), e.g. to show the
        current prediction of one slice.
    voxel_size : the image's voxel size in nm (ZYX), optional. A 2.5D model
        whose sections would be much thicker than in training learns one
        slice at a time (:func:`~napari_emseg.adapt.context_fits`); an image
        more than 20 % finer or 1.5x coarser than the model's voxel size
        (:func:`~napari_emseg.adapt.scale_fits`, ``TRAIN_FINER_TOLERANCE``) is
        trained at the model's (:func:`~napari_emseg.adapt.to_model_scale`);
        otherwise at its own, and the result records ``voxel_size`` as its
        ``meta["voxel_size_nm"]``. Either way
        :func:`~napari_emseg.adapt.predict_adapted` with the same voxel size
        predicts as the model learnt.
    strokes : ``() -> {z: (Y, X) labels} or None``, polled every
        :data:`STROKES_EVERY` s: slices the user painted again while the run
        goes on (the whole new slice, image coordinates). Training continues
        with them at once (:class:`LiveStrokes`); a log record
        ``{"strokes": painted voxels, "slices": [...], "dropped": voxels with a
        label the model does not have, "classes": n}`` says so.
    alternatives : other starts (UNets, bundled names or paths) for the same
        task (:func:`choose_start`). When the data are far from the model
        (:func:`choose_recipe`), those of its dimensions are measured on the
        painted voxels too, and the run starts from the one that scores best;
        a 3D model on sections too thick for it gives way to the best 2D one.
        The ``recipe`` log record and ``meta["training"]["start_scores"]`` say
        which and why.

    Validation IoU is measured on the painted voxels (there is no held-out data).
    ``result.model.meta["training"]`` records the recipe and the IoU before. A
    UNet given is copied first: it stays as it was, ``result.model`` is trained.
    """
    model = _as_model(_detached(model_or_checkpoint))
    alternatives = [_detached(a) for a in alternatives]
    image, painted = np.asarray(image), np.asarray(painted)
    n_classes = _check_painted(model, image, painted)
    original = painted
    device = config.device if config else None
    start, scores = choose_start(model, alternatives, image, painted, voxel_size=voxel_size,
                                 recipe=recipe, device=device, cancel=cancel)
    model, image, painted, scaled = start.model, start.image, start.painted, start.scaled
    regions, before, shift, chosen = start.regions, start.before, start.shift, start.recipe
    start_info = {"start": start.name, "start_scores": scores} if scores else {}
    if on_log:
        note = describe(scaled)  # resampled, read slice by slice, and why
        on_log({"recipe": chosen, "painted_iou_before": before, "feature_shift": shift,
                **start_info, **({"adaptation": note} if note else {})})
    meta = dict(model.meta)
    if "threshold" in meta:  # tuned for the old weights; re-chosen on the painted voxels
        meta["threshold"] = FINE_TUNED_THRESHOLD
    cfg = _fine_tune_config(model, chosen, config, n_classes, image.shape)
    # a trained binary model keeps its sure answers near the strokes
    anchors = regions if before is not None else None
    imgs, tgts = _prepare([image], [stroke_targets(painted, anchors)], cfg)
    live = LiveStrokes(strokes, original, scaled["resampled"], n_classes,
                       image if image.ndim == 3 else image[None],
                       anchors, on_log) if strokes else None
    meta["training"] = {"fine_tuned_from": meta.get("source", meta.get("name", "model")),
                        "painted_voxels": int((painted > 0).sum()), "recipe": chosen,
                        "painted_iou_before": _rounded(before),
                        "feature_shift": _rounded(shift), **start_info,
                        "voxel_size_nm": list(voxel_size) if voxel_size else None, **scaled,
                        "history_before": list(meta.get("training", {})
                                               .get("history", []))[-20:]}
    meta.pop("source", None)
    if voxel_size and not scaled["resampled"]:  # learnt at the volume's own pixels,
        meta["voxel_size_nm"] = [float(v) for v in voxel_size]  # and previewed there
        model.meta = {**model.meta, "voxel_size_nm": meta["voxel_size_nm"]}
    result = _train_loop(model, imgs, tgts, _val_crops(imgs, tgts, cfg, sparse=True), cfg,
                         sparse=True, checkpoint=checkpoint, meta=meta, progress=progress,
                         cancel=cancel, on_log=on_log, resume=False, save_state=False,
                         preview=preview, refresh=live)
    if live is not None and live.added:
        painted = live.painted
        result.model.meta["training"]["painted_voxels"] = int((painted > 0).sum())
        result.model.meta["training"]["painted_while_training"] = live.added
    # 2D "far" runs only. On the 3D model the strokes' threshold went the wrong way (0.10
    # where 0.5 scored 0.82 and 0.95 scored 0.90; docs/models.md); after a near run on
    # Lucchi++ corrections it chose 0.3 (0.915 on the unpainted slices, about 0.92 at 0.5)
    if n_classes == 2 and not result.cancelled and model.config["dims"] == 2 \
            and chosen == "far":
        _calibrate(result, image, painted, cancel)
    return result


class LiveStrokes:
    """Strokes painted while a fine-tune runs, turned into its new targets.

    Called as ``live(seconds)`` by the training loop; at most every
    :data:`STROKES_EVERY` s it asks ``source()`` for changed slices
    (``{z: (Y, X) labels}``, image coordinates), writes them into its copy of
    the painted labels and returns the new loss targets (a one-item list), or
    None when nothing changed. Labels above the model's classes are dropped;
    pseudo-labels are rebuilt from the start model's ``regions``.
    """

    def __init__(self, source: StrokesCallback, painted: np.ndarray,
                 factors, n_classes: int, image: np.ndarray, regions, on_log=None,
                 every: float | None = None):
        self.source, self.factors, self.n_classes = source, factors, n_classes
        self.user = np.array(painted if painted.ndim == 3 else painted[None], copy=True)
        self.flat = painted.ndim == 2
        self.image, self.regions, self.on_log = image, regions, on_log
        self.every = STROKES_EVERY if every is None else every  # read now: benchmarks set 0
        self.next, self.added = 0.0, 0
        self.painted: np.ndarray | None = None  # the model-scale labels, once changed

    def __call__(self, seconds: float) -> list | None:
        if seconds < self.next:
            return None
        self.next = seconds + self.every
        updates = self.source() or {}
        zs = [int(z) for z in updates if 0 <= int(z) < self.user.shape[0]
              and np.shape(updates[z]) == self.user.shape[1:]]
        if not zs:
            return None
        before, dropped = int((self.user > 0).sum()), 0
        for z in zs:
            new = np.asarray(updates[z])
            bad = (new < 0) | (new > self.n_classes)
            dropped += int(bad.sum())
            self.user[z] = np.where(bad, 0, new)
        self.added = max(0, self.added + int((self.user > 0).sum()) - before)
        return [self._targets(zs, dropped)]

    def _targets(self, zs: list[int], dropped: int) -> np.ndarray:
        from .adapt import resample

        painted = self.user[0] if self.flat else self.user
        if self.factors:
            painted = resample(painted, tuple(self.factors), order=0)
        self.painted = painted
        targets = stroke_targets(painted, self.regions)
        if self.on_log:
            self.on_log({"strokes": int((painted > 0).sum()), "slices": zs,
                         "dropped": dropped, "classes": self.n_classes})
        return _loss_targets(self.image, targets if targets.ndim == 3 else targets[None])


def model_classes(model) -> int:
    """Classes a model tells apart, background included (2 for a one-output binary model)."""
    n_out = int(model.config["out_channels"])
    return 2 if n_out == 1 else n_out


def _check_painted(model, image: np.ndarray, painted: np.ndarray) -> int:
    """Check painted labels against the image and the model; returns the class count."""
    _check_pair(image, painted, "fine-tune")
    if not (painted > 0).any():
        raise ValueError("the annotation layer is empty: paint background (1) and "
                         "foreground (2..) strokes first")
    if painted.min() < 0:
        raise ValueError("painted labels must be >= 0 (0 = unlabeled)")
    n_classes = model_classes(model)
    if int(painted.max()) > n_classes:
        raise ValueError(
            f"painted label {int(painted.max())} needs class {int(painted.max()) - 1}, "
            f"but the model predicts {n_classes - 1} foreground class(es) "
            f"(labels 2..{n_classes} are foreground, 1 is background)"
        )
    return n_classes


def _fine_tune_config(model, recipe: str, config: TrainConfig | None, n_classes: int,
                      shape: tuple[int, ...]) -> TrainConfig:
    """The run's config: the recipe's defaults, ``config``'s explicit fields, the model's."""
    defaults = fine_tune_defaults(model, recipe)
    base = config or defaults
    meta = model.meta
    steps = base.steps
    if base.minutes and recipe == "near" and meta.get("training"):  # a time budget: capped
        steps = min(steps, NEAR_STEPS)
    early_stop = 0 if recipe == "far" and meta.get("training") else base.early_stop
    cfg = TrainConfig(**{**asdict(base), "dims": model.config["dims"], "steps": steps,
                         "early_stop": early_stop, "keep": base.keep or FINE_TUNE_KEEP,
                         "context": int(meta.get("context", 0)),
                         "lr": base.lr or defaults.lr,
                         "batch_size": base.batch_size or defaults.batch_size,
                         "freeze_norm": base.freeze_norm or defaults.freeze_norm,
                         "normalization": dict(meta.get("normalization")
                                               or DEFAULT_NORMALIZATION),
                         "loss": "ce_dice" if n_classes > 2 else base.loss,
                         "patch": base.patch or defaults.patch
                         or _fine_tune_patch(model, meta.get("patch"))})
    return _fit_patch(cfg, shape)


def _detached(model_or_checkpoint):
    """A copy of a UNet (the caller's stays as it was); a name or path as it is."""
    if hasattr(model_or_checkpoint, "config"):
        import copy

        return copy.deepcopy(model_or_checkpoint)
    return model_or_checkpoint


def _as_model(model_or_checkpoint):
    from .models.zoo import load_model

    return (model_or_checkpoint if hasattr(model_or_checkpoint, "config")
            else load_model(model_or_checkpoint))


@dataclass
class Start:
    """A model ready to be fine-tuned, and how it scored on the painted voxels."""

    name: str
    model: Any  # BatchNorm statistics re-estimated when ``recipe`` is "far"
    image: np.ndarray  # at the model's voxel size
    painted: np.ndarray
    scaled: dict  # adapt.to_model_scale's info
    regions: list  # (box, probabilities) around the strokes, from ``model``
    before: float | None  # foreground IoU on the painted voxels, as loaded
    shift: float | None  # adapt.feature_shift
    recipe: str
    score: float | None  # foreground IoU on the painted voxels, ready to train


def measure_start(model, image: np.ndarray, painted: np.ndarray, *,
                  voxel_size: tuple[float, ...] | None = None, recipe: str = "auto",
                  device: str | None = None, cancel=None) -> Start:
    """Measure ``model`` on the strokes, choose its recipe and prepare it.

    Parameters
    ----------
    model : UNet with ``.meta``
    image : ndarray (Z, Y, X) or (Y, X)
    painted : integer ndarray, same shape (0 unlabeled, 1 background, 2.. classes)
    recipe : "auto" (:func:`choose_recipe`), "near" or "far" ("far" re-estimates
        the BatchNorm statistics on ``image``)
    """
    name = str(getattr(model, "meta", {}).get("name", "model"))
    model, image, painted, scaled = to_model_scale(model, image, painted, voxel_size,
                                                   finer_tolerance=TRAIN_FINER_TOLERANCE)
    binary = model.config["out_channels"] == 1
    trained = bool(getattr(model, "meta", {}).get("training"))
    regions = _painted_regions(model, image, painted, cancel=cancel, device=device) \
        if binary and trained else []
    before = _regions_iou(model, painted, regions)
    shift = feature_shift(model, image, device=device) if recipe == "auto" else None
    chosen = choose_recipe(model, before, shift) if recipe == "auto" else recipe
    score = before
    if chosen == "far":
        model = adapt_batchnorm(model, image, device=device, cancel=cancel)
        if binary and before is not None:  # the adapted model's answers anchor the run
            regions = _painted_regions(model, image, painted, cancel=cancel, device=device)
            score = _regions_iou(model, painted, regions)
    return Start(name, model, image, painted, scaled, regions, before, shift, chosen, score)


def choose_start(model, alternatives: Sequence[Any], image: np.ndarray, painted: np.ndarray,
                 *, voxel_size: tuple[float, ...] | None = None,
                 **kwargs) -> tuple[Start, dict[str, float | None]]:
    """The start of a fine-tune: ``model``, or one of ``alternatives`` (same task).

    A 3D model whose sections would be much thicker than in training
    (:func:`~napari_emseg.adapt.sections_fit`) is not even measured when a 2D
    alternative exists: the best-scoring 2D one is taken (its score ``None``
    in the scores). Otherwise :func:`best_start` decides.

    Returns
    -------
    The start, and ``{name: score}`` of the models measured (empty when none was).
    """
    flat = [] if sections_fit(model, section_voxel(model, image, voxel_size)[0]) else [
        a for a in map(_as_model, alternatives)
        if a.config["dims"] == 2 and _same_classes(a, model)]
    if flat:
        starts = [measure_start(a, image, painted, voxel_size=voxel_size, **kwargs)
                  for a in flat]
        best = max(starts, key=lambda s: -1.0 if s.score is None else s.score)
        name = str(model.meta.get("name", "model"))
        return best, {name: None, **{s.name: _rounded(s.score) for s in starts}}
    first = measure_start(model, image, painted, voxel_size=voxel_size, **kwargs)
    return best_start(first, alternatives, image, painted, voxel_size=voxel_size, **kwargs)


def _rounded(score: float | None) -> float | None:
    return None if score is None else round(score, 4)


def best_start(first: Start, alternatives: Sequence[Any], image: np.ndarray,
               painted: np.ndarray, **kwargs) -> tuple[Start, dict[str, float]]:
    """``first``, or an alternative that fits the strokes clearly better.

    Only when ``first`` is "far" from the data: each alternative with the same
    classes and dimensions is measured by :func:`measure_start` (after its own
    recipe's preparation, AdaBN for "far"), and one scoring more than
    :data:`START_MARGIN` above ``first`` on the painted voxels replaces it.

    Returns
    -------
    The start, and ``{name: score}`` of those measured (empty when none was).
    """
    if not alternatives or first.recipe != "far" or first.score is None:
        return first, {}
    best, scores = first, {first.name: _rounded(first.score)}
    for alternative in alternatives:
        model = _as_model(alternative)
        if not _same_task(model, first.model):
            continue
        start = measure_start(model, image, painted, **kwargs)
        if start.score is None:
            continue
        scores[start.name] = _rounded(start.score)
        if start.score > first.score + START_MARGIN and start.score > best.score:
            best = start
    return best, scores


def start_text(start: str, scores: dict[str, float | None]) -> str:
    """``"started from mito-2d-mix instead of mito-2d: it fits your strokes better (IoU on
    the painted voxels 0.41; mito-2d 0.05)"``;
    a model not measured (a 3D model on thick sections) is named as such."""
    def score(name: str) -> str:
        value = scores[name]
        return "not measured: sections too thick for it" if value is None else f"{value:.2f}"

    others = ", ".join(f"{name} {score(name)}" for name in scores if name != start)
    if not start_swapped(start, scores):
        return f"kept {start}: IoU on the painted voxels {score(start)} ({others})"
    return (f"started from {start} instead of {next(iter(scores))}: it fits your strokes better "
            f"(IoU on the painted voxels {score(start)}; {others})")


def start_swapped(start: str, scores: dict[str, float | None]) -> bool:
    """True when a fine-tune started from another model than the one asked for.

    ``scores`` is :func:`choose_start`'s: the model asked for comes first.
    """
    return bool(scores) and start != next(iter(scores))


def _same_task(model, other) -> bool:
    """Same dimensions, outputs and class names."""
    return model.config["dims"] == other.config["dims"] and _same_classes(model, other)


def _same_classes(model, other) -> bool:
    return (model.config["out_channels"] == other.config["out_channels"]
            and model.meta.get("classes") == other.meta.get("classes"))


def choose_recipe(model, painted_iou_before: float | None,
                  shift: float | None = None) -> str:
    """``"near"`` or ``"far"``: how far the user's data is from what the model knows.

    The rule (constants and measurements at :data:`FAR_SHIFT`): an untrained
    model is "far"; a trained one is "far" when the volume's features have
    shifted by :data:`FAR_SHIFT` or more from its BatchNorm statistics (unless
    it already scores :data:`FIT_IOU` or more on the painted voxels), or when
    it scores below :data:`NEAR_IOU` foreground IoU on the painted voxels;
    else "near" (gentle fine-tuning keeps what it knows). Unmeasured values
    (None) do not count.
    """
    if not getattr(model, "meta", {}).get("training"):
        return "far"
    fits = painted_iou_before is not None and painted_iou_before >= FIT_IOU
    if shift is not None and shift >= FAR_SHIFT and not fits:
        return "far"
    if painted_iou_before is not None and painted_iou_before < NEAR_IOU:
        return "far"
    return "near"


def painted_iou(model, image: np.ndarray, painted: np.ndarray, *, cancel=None,
                device: str | None = None) -> float | None:
    """Foreground IoU of ``model`` on the painted voxels, at its own threshold.

    Parameters
    ----------
    model : binary UNet (one sigmoid output); None is returned for multi-class
        or untrained ones
    image : ndarray (Z, Y, X) or (Y, X)
    painted : integer ndarray, same shape (0 unlabeled, 1 background, 2 foreground)
    """
    if model.config["out_channels"] != 1:
        return None
    regions = _painted_regions(model, image, painted, cancel=cancel, device=device)
    return _regions_iou(model, painted, regions)


def _regions_iou(model, painted: np.ndarray, regions) -> float | None:
    """IoU at the model's threshold on the painted voxels of predicted regions."""
    if not regions or not getattr(model, "meta", {}).get("training"):
        return None
    painted = painted if painted.ndim == 3 else painted[None]
    t = float(model.meta.get("threshold", 0.5) or 0.5)
    inter = union = 0
    for box, prob in regions:
        sel = painted[box] > 0
        pred, fg = prob[sel] > t, painted[box][sel] == 2
        inter += int((pred & fg).sum())
        union += int((pred | fg).sum())
    return inter / max(union, 1)


def stroke_targets(painted: np.ndarray, regions) -> np.ndarray:
    """Loss targets of painted labels, with the starting model's sure answers near the
    strokes (:func:`with_pseudo_labels`) when ``regions`` is not None."""
    targets = painted_targets(painted)
    return targets if regions is None else with_pseudo_labels(targets, painted, regions)


def with_pseudo_labels(targets: np.ndarray, painted: np.ndarray, regions) -> np.ndarray:
    """Targets plus the starting model's confident answers on unpainted voxels near strokes.

    Parameters
    ----------
    targets : int64 ndarray, painted targets (-1 = ignore), same shape as ``painted``
    painted : integer ndarray (Z, Y, X) or (Y, X)
    regions : list of (box, probabilities) from the starting model

    Returns
    -------
    A new array: :data:`PSEUDO_FG` / :data:`PSEUDO_BG` where the model said
    foreground / background with at least :data:`PSEUDO_CONFIDENCE` and nothing
    was painted.
    """
    out = targets.copy()
    view, flat = (out, painted) if out.ndim == 3 else (out[None], painted[None])
    for box, prob in regions:
        free = flat[box] == 0
        part = view[box]
        part[free & (prob >= PSEUDO_CONFIDENCE)] = PSEUDO_FG
        part[free & (prob <= 1 - PSEUDO_CONFIDENCE)] = PSEUDO_BG
    return out


def _painted_regions(model, image: np.ndarray, painted: np.ndarray, *, cancel=None,
                     device: str | None = None) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """(box, probabilities) of boxes around the painted voxels (binary models).

    Boxes are (z, y, x) slices of the image made 3D: one per painted slice for a
    2D model (only that slice is predicted), one per run of painted slices for a
    3D model. The grey-value range is the whole image's, as when the whole image
    is predicted.
    """
    from .predict import predict_slice, predict_volume

    image, painted = np.asarray(image), np.asarray(painted)
    if image.ndim == 2:
        image, painted = image[None], painted[None]
    grey = normalization_range(image, model.meta.get("normalization") or DEFAULT_NORMALIZATION)
    if model.config["dims"] == 3:
        return [(box, predict_volume(image[box], model, device=device, cancel=cancel,
                                     normalization=grey))
                for box in _painted_boxes(painted, margin=8)]
    regions = []
    for z in np.flatnonzero((painted > 0).any(axis=(1, 2))):
        box = _painted_boxes(painted[z : z + 1], margin=0)[0]
        box = (slice(z, z + 1), *box[1:])
        prob = predict_slice(image[:, box[1], box[2]], model, int(z), device=device,
                             cancel=cancel, normalization=grey)
        regions.append((box, prob[None]))
    return regions


def _painted_probs(model, image: np.ndarray, painted: np.ndarray, *, cancel=None,
                   device: str | None = None):
    """Probabilities, painted labels and halves (0/1) of the painted voxels, each (N,)."""
    painted3 = np.asarray(painted) if np.ndim(painted) == 3 else np.asarray(painted)[None]
    halves = _checkerboard(painted3.shape)
    probs, labels, ids = [], [], []
    for box, prob in _painted_regions(model, image, painted, cancel=cancel, device=device):
        sel = painted3[box] > 0
        probs.append(prob[sel])
        labels.append(painted3[box][sel])
        ids.append(halves[box][sel])
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(ids)


def _checkerboard(shape: tuple[int, ...], tile: int = HALF_TILE) -> np.ndarray:
    """0/1 halves of a (Z, Y, X) volume: a checkerboard of ``tile``-px squares, alternating in z."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z + y // tile + x // tile) % 2).astype(np.int8)


def _calibrate(result: TrainResult, image, painted, cancel) -> None:
    """Store the threshold chosen on the painted voxels in the model and checkpoint."""
    from .models.zoo import read_checkpoint, save_checkpoint

    try:
        found = painted_threshold(result.model, image, painted, cancel=cancel)
    except Cancelled:
        found = None
    if found is None:
        return
    t, note = found
    info = {"threshold": t, "threshold_source": note}
    result.model.meta = {**result.model.meta, **info}
    if result.checkpoint and Path(result.checkpoint).exists():
        saved = read_checkpoint(result.checkpoint)["meta"]
        save_checkpoint(result.model, result.checkpoint, {**saved, **info})


def threshold_note(meta: dict) -> str:
    """``"threshold 0.35 from painted voxels (…)"`` when fine-tuning chose it, else ``""``."""
    source = meta.get("threshold_source")
    return f"threshold {meta['threshold']:.2f} from {source}" if source else ""


def painted_threshold(model, image: np.ndarray, painted: np.ndarray, *, cancel=None,
                      device: str | None = None) -> tuple[float, str] | None:
    """The probability threshold for a fine-tuned binary model, from the painted voxels.

    Fine-tuning shifts a model's calibration, so the user's strokes may choose
    a new threshold, but not on thin evidence: the painted voxels are split in
    two halves (a checkerboard of :data:`HALF_TILE`-px squares, so most strokes
    fall in both); a threshold chosen on one half must beat 0.5 on the other
    half by :data:`THRESHOLD_MARGIN` IoU, else 0.5 stays; a confirmed one is
    moved halfway back to 0.5 (:data:`THRESHOLD_SHRINK`).

    Parameters
    ----------
    model : binary UNet (one sigmoid output)
    image : ndarray (Z, Y, X) or (Y, X)
    painted : integer ndarray, same shape (0 unlabeled, 1 background, 2 foreground)

    Returns
    -------
    (threshold, note saying how it was chosen), or None when either half has
    fewer than :data:`MIN_CALIBRATION_VOXELS` voxels of either class (0.5 stays).
    """
    prob, labels, half = _painted_probs(model, image, painted, cancel=cancel, device=device)
    return held_out_threshold(prob, labels == 2, half)


def held_out_threshold(prob: np.ndarray, foreground: np.ndarray,
                       half: np.ndarray) -> tuple[float, str] | None:
    """Threshold chosen on half 0 of the voxels, kept only if half 1 confirms it,
    then moved :data:`THRESHOLD_SHRINK` of the way back to 0.5.

    Parameters
    ----------
    prob : float ndarray (N,), probabilities of the painted voxels
    foreground : bool ndarray (N,), their labels
    half : int ndarray (N,), 0 or 1

    Returns
    -------
    (threshold, note), or None when a half has fewer than
    :data:`MIN_CALIBRATION_VOXELS` voxels of either class.
    """
    halves = [half == 0, half == 1]
    for part in halves:
        if min((foreground & part).sum(), (~foreground & part).sum()) < MIN_CALIBRATION_VOXELS:
            return None
    t, _ = best_threshold(prob[halves[0]], foreground[halves[0]])
    check = halves[1]
    iou_t = _iou(prob[check] > t, foreground[check])
    iou_half = _iou(prob[check] > FINE_TUNED_THRESHOLD, foreground[check])
    if t != FINE_TUNED_THRESHOLD and iou_t < iou_half + THRESHOLD_MARGIN:
        t, iou_t = FINE_TUNED_THRESHOLD, iou_half
    note = f"painted voxels (held-out half: IoU {iou_t:.3f} at {t:.2f}, {iou_half:.3f} at 0.50)"
    if t == FINE_TUNED_THRESHOLD:
        return t, note
    taken = round(FINE_TUNED_THRESHOLD + THRESHOLD_SHRINK * (t - FINE_TUNED_THRESHOLD), 3)
    return taken, f"{note}, halfway back to 0.5 (strokes favour the extremes)"


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred & truth).sum() / max((pred | truth).sum(), 1))


def _painted_boxes(painted: np.ndarray, margin: int, pad: int = 32) -> list[tuple[slice, ...]]:
    """Boxes (z, y, x) around runs of painted slices, grown by ``margin`` z and ``pad`` y/x."""
    zs = np.flatnonzero((painted > 0).any(axis=(1, 2)))
    runs = np.split(zs, np.flatnonzero(np.diff(zs) > 2 * margin + 1) + 1)
    boxes = []
    for run in runs:
        ys, xs = np.nonzero((painted[run[0] : run[-1] + 1] > 0).any(axis=0))
        boxes.append((slice(max(0, run[0] - margin), run[-1] + margin + 1),
                      slice(max(0, ys.min() - pad), ys.max() + pad + 1),
                      slice(max(0, xs.min() - pad), xs.max() + pad + 1)))
    return boxes


def best_threshold(prob: np.ndarray, foreground: np.ndarray) -> tuple[float, float]:
    """(threshold, IoU): the threshold in 0.3–0.7 (CALIBRATION_THRESHOLDS) with the best foreground IoU.

    Parameters
    ----------
    prob : float ndarray (N,), probabilities of labelled voxels
    foreground : bool ndarray (N,), their labels

    Ties go to the threshold nearest 0.5.
    """
    best = (FINE_TUNED_THRESHOLD, -1.0)
    for t in sorted(CALIBRATION_THRESHOLDS, key=lambda v: abs(v - 0.5)):
        iou = _iou(prob > t, foreground)
        if iou > best[1]:
            best = (float(t), iou)
    return best


def fine_tune_defaults(model, recipe: str = "near") -> TrainConfig:
    """The recipe's settings: a time budget of :data:`FINE_TUNE_MINUTES` with early stop.

    ``"near"``: at most :data:`NEAR_STEPS` steps of lr :data:`FINE_TUNE_LR` (2D)
    or :data:`FINE_TUNE_LR_3D`, batch 4 (2D) or 2 (3D), the model's training patch. ``"far"``: lr :data:`FAR_LR`
    (a third of it for 3D; BatchNorm statistics re-estimated on the volume
    before, see :func:`fine_tune`), 2D patches of :data:`FAR_PATCH_2D` in
    batches of :data:`FAR_BATCH_2D`. An untrained model gets :data:`SCRATCH_LR`.
    """
    if recipe not in ("near", "far"):
        raise ValueError(f"recipe must be 'auto', 'near' or 'far', got {recipe!r}")
    three_d = model.config["dims"] == 3
    common = dict(steps=FINE_TUNE_MAX_STEPS, minutes=FINE_TUNE_MINUTES,
                  early_stop=FINE_TUNE_EARLY_STOP, warmup=10, val_every=50,
                  keep=FINE_TUNE_KEEP)
    if not getattr(model, "meta", {}).get("training"):
        return TrainConfig(**common, lr=SCRATCH_LR, batch_size=2 if three_d else 4)
    if recipe == "near":
        return TrainConfig(**{**common, "steps": NEAR_STEPS},
                           lr=FINE_TUNE_LR_3D if three_d else FINE_TUNE_LR,
                           batch_size=2 if three_d else 4)
    # far: no early stop, so the learning rate anneals to 0 at the end of the budget
    # (stopped early at 80 s with the rate still high, the last weights scored 0.48
    # where the run had passed 0.56: bench_adapt far, 2026-12-02)
    return TrainConfig(**{**common, "warmup": 20, "early_stop": 0},
                       lr=FAR_LR / 3 if three_d else FAR_LR,
                       batch_size=2 if three_d else FAR_BATCH_2D,
                       patch=None if three_d else FAR_PATCH_2D)


def fine_tune_settings(model, lr: float | None, batch_size: int | None,
                       recipe: str = "near") -> tuple[float, int]:
    """``(lr, batch_size)``, each taken from :func:`fine_tune_defaults` when 0/None ("auto")."""
    defaults = fine_tune_defaults(model, recipe)
    return lr or defaults.lr, batch_size or defaults.batch_size


def _fine_tune_patch(model, trained_patch) -> tuple[int, ...] | None:
    """The model's training patch; for 3D at most :data:`FINE_TUNE_PATCH_3D` (CPU speed)."""
    if model.config["dims"] != 3:
        return tuple(trained_patch) if trained_patch else None
    patch = tuple(trained_patch) if trained_patch else FINE_TUNE_PATCH_3D
    div = model.divisor()
    return tuple(max(d, min(p, q) // d * d)
                 for p, q, d in zip(patch, FINE_TUNE_PATCH_3D, div, strict=True))


def _fit_patch(cfg: TrainConfig, shape: tuple[int, ...]) -> TrainConfig:
    """Shrink the patch for small images (kept a multiple of 16)."""
    spatial = shape[-2:] if cfg.dims == 2 else (shape if len(shape) == 3 else (1, *shape))
    patch = cfg.resolved_patch()
    new = tuple(max(16, min(p, int(math.ceil(s / 16)) * 16)) for p, s in
                zip(patch, spatial[-len(patch):], strict=True))
    if cfg.dims == 3:
        new = (max(4, min(patch[0], spatial[0] + (-spatial[0]) % 4)), *new[1:])
    return TrainConfig(**{**asdict(cfg), "patch": new})


def average_states(states: list[dict]) -> dict:
    """Element-wise mean of model state dicts (stochastic weight averaging).

    Parameters
    ----------
    states : list of state dicts of one architecture (e.g. snapshots of a run).

    Integer buffers (BatchNorm batch counts) are taken from the last state; the
    averaged BatchNorm statistics should be recomputed with :func:`update_norm_stats`.
    """
    if not states:
        raise ValueError("average_states needs at least one state dict")
    keys = set(states[0])
    for k, state in enumerate(states[1:], 1):
        if set(state) != keys:
            raise ValueError(f"state {k} has different parameters than state 0")
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = sum(s[key].detach().float() for s in states) / len(states)
            out[key] = out[key].to(last.dtype)
        else:
            out[key] = last.clone()
    return out


def update_norm_stats(model, images, labels, config: TrainConfig, batches: int = 50,
                      device: str | None = None):
    """Recompute BatchNorm running statistics on training patches, in place.

    Parameters
    ----------
    model : UNet (its weights just averaged, say)
    images, labels : ndarray (Z, Y, X) or lists of them, as for :func:`fit`
    config : TrainConfig giving patch size, batch size, context and augmentation
    batches : number of training batches to average the statistics over

    Returns the model, in eval mode.
    """
    import torch
    from torch.optim.swa_utils import update_bn

    images, labels = _as_list(images), _as_list(labels)
    config = _with_auto(config, FIT_LR, FIT_BATCH)
    imgs, tgts = _prepare(images, [dense_targets(lab) for lab in labels], config)
    sampler = PatchSampler(imgs, tgts, config, sparse=False)
    dev = pick_device(device)
    model.to(dev)
    loader = (torch.from_numpy(sampler.batch()[0]) for _ in range(batches))
    update_bn(loader, model, device=torch.device(dev))
    return model.eval()
