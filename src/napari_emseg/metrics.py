"""How right is a segmentation: IoU/Dice, instance AP, VOI and adapted Rand.

Definitions (all from one sparse contingency table of the two label images,
built by counting id pairs — linear in the number of voxels):

- **IoU / Dice per class** (semantic maps): ``|P∩G| / |P∪G|`` and
  ``2|P∩G| / (|P|+|G|)``; NaN when the class is absent from both.
- **Instance AP at an IoU threshold τ** — one-to-one matching of predicted
  and ground-truth objects with the Hungarian algorithm on their IoU (the
  matching used by the MitoEM challenge evaluation), maximising first the
  number of pairs with IoU >= τ and then their total IoU.  Matched pairs are
  true positives, unmatched predictions false positives, unmatched
  ground-truth objects false negatives.  We report ``precision = TP/(TP+FP)``,
  ``recall = TP/(TP+FN)``, ``f1`` and ``ap = TP/(TP+FP+FN)`` — the
  "average precision" of the DSB 2018 / StarDist evaluation.  The MitoEM
  challenge's own AP additionally ranks predictions by a confidence score
  (COCO style); label images carry no scores, so that variant is not
  computed here.
- **Variation of information** (Meilă 2007; CREMI): ``split = H(pred|gt)``,
  ``merge = H(gt|pred)`` in bits; equals ``skimage.metrics.
  variation_of_information(gt, pred)``.
- **Boundary F1 with a tolerance** (membrane maps; the contour matching of
  the Berkeley boundary benchmark, Martin et al. 2004, by distance instead of
  one-to-one assignment): a predicted boundary pixel counts as correct when
  a true one lies within ``tolerance`` pixels in its slice, and the other way
  round for recall.  ``tolerance=0`` is the plain pixel F1.
- **Adapted Rand error** (SNEMI3D / CREMI): ``1 - F`` of the Rand precision
  (pairs of voxels together in both / together in ``pred``) and recall
  (/ together in ``gt``); voxels whose ground truth is in ``ignore_labels``
  (default 0) are left out, as in ``skimage.metrics.adapted_rand_error``.
  (scikit-image returns the two ratios the other way round as
  ``(precision, recall)``; the error is the same.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from .postprocess import _bincount

__all__ = [
    "adapted_rand_error",
    "boundary_f1",
    "class_scores",
    "contingency",
    "evaluate",
    "instance_ap",
    "variation_of_information",
]


# ----------------------------------------------------------------- helpers
def _check_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} does not match gt shape {g.shape}")
    for name, a in (("pred", p), ("gt", g)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise ValueError(f"{name} must be an integer label image; got dtype {a.dtype}")
        if a.size and np.issubdtype(a.dtype, np.signedinteger) and a.min() < 0:
            raise ValueError(f"{name} must not contain negative labels")
    if p.dtype == np.bool_:
        p = p.view(np.uint8)
    if g.dtype == np.bool_:
        g = g.view(np.uint8)
    return p, g


def _compact(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids present, index of each voxel's id) — 0 is always ids[0]."""
    flat = a.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1_000_000:
        present = _bincount(flat, minlength=top + 1) > 0
        present[0] = True
        ids = np.flatnonzero(present)
        lut = np.arange(ids.size, dtype=np.int32 if ids.size < 2**31 else np.int64)
        full = np.zeros(top + 1, dtype=lut.dtype)
        full[ids] = lut
        return ids, full[flat]
    ids, inv = np.unique(np.concatenate([[0], flat]), return_inverse=True)
    return ids, inv.ravel()[1:]


def contingency(pred, gt) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of two label images (background included).

    Parameters
    ----------
    pred, gt : ndarray of int, same shape

    Returns
    -------
    pred_ids, gt_ids : ndarray
        Sorted labels (both start with 0, present or not).
    rows, cols : ndarray of int64, (k,)
        Indices into ``pred_ids`` and ``gt_ids`` of each overlapping pair.
    counts : ndarray of int64, (k,)
        Voxels shared by each pair.
    """
    p, g = _check_pair(pred, gt)
    pid, pi = _compact(p)
    gid, gi = _compact(g)
    kdtype = np.int32 if pid.size * gid.size < 2**31 else np.int64
    keys = pi.astype(kdtype) * kdtype(gid.size) + gi
    if pid.size * gid.size <= 50_000_000:
        counts = np.bincount(keys, minlength=pid.size * gid.size)
        uniq = np.flatnonzero(counts)
        counts = counts[uniq]
    else:
        uniq, counts = np.unique(keys, return_counts=True)
    uniq = uniq.astype(np.int64, copy=False)
    return pid, gid, uniq // gid.size, uniq % gid.size, counts.astype(np.int64)


def _xlog2x(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float64)
    nz = x > 0
    out[nz] = x[nz] * np.log2(x[nz])
    return out


# ----------------------------------------------------------------- metrics
def class_scores(
    pred, gt, classes: Sequence[int] | None = None
) -> dict[int, dict[str, float]]:
    """IoU and Dice of each class of two semantic label maps.

    Parameters
    ----------
    pred, gt : ndarray of int, same shape
    classes : sequence of int, optional
        Default: every value found in either map.

    Returns
    -------
    dict
        ``{class: {"iou", "dice", "pred_voxels", "gt_voxels"}}``; IoU and Dice
        are NaN for a class absent from both maps.
    """
    pid, gid, rows, cols, counts = contingency(pred, gt)
    psize = np.bincount(rows, weights=counts, minlength=pid.size)
    gsize = np.bincount(cols, weights=counts, minlength=gid.size)
    if classes is None:
        classes = sorted(set(pid[psize > 0].tolist()) | set(gid[gsize > 0].tolist()))
    pdict = dict(zip(pid.tolist(), psize.tolist(), strict=True))
    gdict = dict(zip(gid.tolist(), gsize.tolist(), strict=True))
    inter = {
        (int(pid[r]), int(gid[c])): int(n) for r, c, n in zip(rows, cols, counts, strict=True)
    }
    out: dict[int, dict[str, float]] = {}
    for c in classes:
        c = int(c)
        ps, gs, i = pdict.get(c, 0.0), gdict.get(c, 0.0), inter.get((c, c), 0)
        union = ps + gs - i
        out[c] = {
            "iou": i / union if union else float("nan"),
            "dice": 2 * i / (ps + gs) if ps + gs else float("nan"),
            "pred_voxels": int(ps),
            "gt_voxels": int(gs),
        }
    return out


def instance_ap(
    pred, gt, thresholds: Sequence[float] = (0.5, 0.75)
) -> dict[str, object]:
    """Instance detection scores at IoU thresholds (Hungarian one-to-one matching).

    Parameters
    ----------
    pred, gt : ndarray of int, same shape
        Instance ids, 0 = background.
    thresholds : sequence of float
        IoU thresholds τ.

    Returns
    -------
    dict
        ``{"n_pred", "n_gt", "thresholds": {str(τ): {"tp", "fp", "fn",
        "precision", "recall", "f1", "ap", "mean_matched_iou"}}}`` with
        ``ap = TP / (TP + FP + FN)`` (1.0 when both are empty).
    """
    pid, gid, rows, cols, counts = contingency(pred, gt)
    psize = np.bincount(rows, weights=counts, minlength=pid.size)
    gsize = np.bincount(cols, weights=counts, minlength=gid.size)
    n_pred = int(np.count_nonzero(psize[1:]))
    n_gt = int(np.count_nonzero(gsize[1:]))
    obj = (rows > 0) & (cols > 0)
    r, c, inter = rows[obj], cols[obj], counts[obj].astype(np.float64)
    iou = inter / (psize[r] + gsize[c] - inter)
    result: dict[str, object] = {"n_pred": n_pred, "n_gt": n_gt, "thresholds": {}}
    for t in thresholds:
        t = float(t)
        if not 0.0 < t <= 1.0:
            raise ValueError(f"IoU thresholds must be in (0, 1]; got {t}")
        matched = _hungarian(r, c, iou, t)
        tp = int(matched.size)
        fp, fn = n_pred - tp, n_gt - tp
        denom = tp + fp + fn
        result["thresholds"][str(t)] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else 1.0 * (fn == 0),
            "recall": tp / (tp + fn) if tp + fn else 1.0 * (fp == 0),
            "f1": 2 * tp / (2 * tp + fp + fn) if denom else 1.0,
            "ap": tp / denom if denom else 1.0,
            "mean_matched_iou": float(matched.mean()) if tp else 0.0,
        }
    return result


def _hungarian(r: np.ndarray, c: np.ndarray, iou: np.ndarray, t: float) -> np.ndarray:
    """IoUs of the matched pairs: most pairs with IoU >= t, then highest total IoU."""
    keep = iou >= t
    r, c, iou = r[keep], c[keep], iou[keep]
    if r.size == 0:
        return np.zeros(0)
    ur, ri = np.unique(r, return_inverse=True)
    uc, ci = np.unique(c, return_inverse=True)
    # a bonus larger than any total IoU makes the number of pairs come first
    bonus = min(ur.size, uc.size) + 1.0
    weight = np.zeros((ur.size, uc.size))
    weight[ri, ci] = bonus + iou
    a, b = linear_sum_assignment(weight, maximize=True)
    w = weight[a, b]
    return w[w > 0] - bonus


def variation_of_information(
    pred, gt, *, ignore_labels: Sequence[int] = ()
) -> tuple[float, float]:
    """Split and merge parts of the variation of information, in bits.

    Parameters
    ----------
    pred, gt : ndarray of int, same shape
    ignore_labels : sequence of int
        Ground-truth labels whose voxels are left out.

    Returns
    -------
    split, merge : float
        ``H(pred | gt)`` (over-segmentation) and ``H(gt | pred)``
        (under-segmentation); VOI = split + merge.
    """
    pid, gid, rows, cols, counts = _filtered_table(pred, gt, ignore_labels)
    n = counts.sum()
    if n == 0:
        return 0.0, 0.0
    pij = counts / n
    pp = np.bincount(rows, weights=pij, minlength=pid.size)
    pg = np.bincount(cols, weights=pij, minlength=gid.size)
    h_joint = -_xlog2x(pij).sum()
    split = h_joint + _xlog2x(pg).sum()  # H(P,G) - H(G)
    merge = h_joint + _xlog2x(pp).sum()  # H(P,G) - H(P)
    return max(float(split), 0.0), max(float(merge), 0.0)


def boundary_f1(pred, gt, tolerance: float = 2.0) -> dict[str, float]:
    """Precision, recall and F1 of a boundary map, within ``tolerance`` pixels.

    Parameters
    ----------
    pred, gt : ndarray of bool or int, (Y, X) or (Z, Y, X)
        Boundary (membrane) masks, nonzero = boundary. Stacks are matched slice
        by slice (serial sections: no matching across z).
    tolerance : float
        Largest Euclidean distance, in pixels, between a boundary pixel and its
        match; 0 gives the plain pixel F1.

    Returns
    -------
    dict
        ``{"precision", "recall", "f1"}``; NaN when both maps are empty.
    """
    p, g = _check_pair(pred, gt)
    return _f1_from_hits(_boundary_hits(p > 0, g > 0, tolerance).sum(axis=0))


def _boundary_hits(p: np.ndarray, g: np.ndarray, tolerance: float) -> np.ndarray:
    """Per slice: matched pred pixels, matched gt pixels, pred pixels, gt pixels.

    ``p``, ``g``: bool, (Y, X) or (Z, Y, X). Returns int array (Z, 4).
    """
    from scipy.ndimage import distance_transform_edt

    if p.ndim not in (2, 3):
        raise ValueError(f"boundary_f1 needs 2D or 3D masks; got shape {p.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0; got {tolerance}")
    rows = []
    for ps, gs in zip(p.reshape((-1,) + p.shape[-2:]), g.reshape((-1,) + g.shape[-2:]),
                      strict=True):
        if tolerance == 0:  # a pixel matches only itself
            hit_p = hit_g = int((ps & gs).sum())
        elif ps.any() and gs.any():
            hit_p = int((distance_transform_edt(~gs)[ps] <= tolerance).sum())
            hit_g = int((distance_transform_edt(~ps)[gs] <= tolerance).sum())
        else:
            hit_p = hit_g = 0
        rows.append((hit_p, hit_g, int(ps.sum()), int(gs.sum())))
    return np.asarray(rows, dtype=np.int64)


def _f1_from_hits(counts: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 from ``(hit_p, hit_g, n_p, n_g)``; NaN when both maps are empty."""
    hit_p, hit_g, n_p, n_g = (int(c) for c in counts)
    if n_p + n_g == 0:
        return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    precision = hit_p / n_p if n_p else 0.0
    recall = hit_g / n_g if n_g else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _boundary_summary(p: np.ndarray, g: np.ndarray, tolerance: float,
                      per_slice: bool) -> dict[str, object]:
    near = _boundary_hits(p, g, tolerance)  # one distance transform pair per slice
    exact = _boundary_hits(p, g, 0)
    out: dict[str, object] = {"boundary": {
        "tolerance": float(tolerance), "pixel_error": float((p != g).mean()),
        "pixel_f1": _f1_from_hits(exact.sum(axis=0))["f1"],
        **_f1_from_hits(near.sum(axis=0))}}
    if per_slice and p.ndim == 3:
        out["per_slice"] = [{"z": z, "pixel_f1": _f1_from_hits(exact[z])["f1"],
                             "f1": _f1_from_hits(near[z])["f1"]}
                            for z in range(p.shape[0])]
    return out


def adapted_rand_error(
    pred, gt, *, ignore_labels: Sequence[int] = (0,)
) -> tuple[float, float, float]:
    """Adapted Rand error (SNEMI3D / CREMI) with its precision and recall.

    Parameters
    ----------
    pred, gt : ndarray of int, same shape
    ignore_labels : sequence of int
        Ground-truth labels whose voxels are left out (default: background 0).

    Returns
    -------
    error, precision, recall : float
        ``precision`` = voxel pairs together in both / together in ``pred``,
        ``recall`` = / together in ``gt``; ``error = 1 - F1``.  An empty
        evaluation region gives ``(0.0, 1.0, 1.0)``.
    """
    pid, gid, rows, cols, counts = _filtered_table(pred, gt, ignore_labels)
    c = counts.astype(np.float64)
    n = c.sum()
    if n == 0:
        return 0.0, 1.0, 1.0
    sp = np.bincount(rows, weights=c, minlength=pid.size)
    sg = np.bincount(cols, weights=c, minlength=gid.size)
    both = c @ c - n
    in_pred = sp @ sp - n
    in_gt = sg @ sg - n
    precision = both / in_pred if in_pred else 1.0
    recall = both / in_gt if in_gt else 1.0
    denom = 0.5 * (in_pred + in_gt)
    error = 1.0 - both / denom if denom else 0.0
    return float(error), float(precision), float(recall)


def _filtered_table(pred, gt, ignore_labels: Sequence[int]):
    pid, gid, rows, cols, counts = contingency(pred, gt)
    if len(ignore_labels):
        keep = ~np.isin(gid[cols], np.asarray(list(ignore_labels)))
        rows, cols, counts = rows[keep], cols[keep], counts[keep]
    return pid, gid, rows, cols, counts


# ---------------------------------------------------------------- evaluate
def _instance_summary(pred, gt, thresholds) -> dict[str, object]:
    fg = class_scores(pred != 0, gt != 0, classes=[1])[1]
    ap = instance_ap(pred, gt, thresholds)
    split, merge = variation_of_information(pred, gt)
    are, prec, rec = adapted_rand_error(pred, gt)
    return {
        "foreground": {"iou": fg["iou"], "dice": fg["dice"]},
        "instances": ap,
        "voi": {"split": split, "merge": merge, "total": split + merge},
        "adapted_rand": {"error": are, "precision": prec, "recall": rec},
    }


def _flat(summary: dict[str, object]) -> dict[str, float]:
    """One-level dict of the headline numbers of a summary (for per-slice rows)."""
    row = {
        "iou": summary["foreground"]["iou"],
        "dice": summary["foreground"]["dice"],
        "n_pred": summary["instances"]["n_pred"],
        "n_gt": summary["instances"]["n_gt"],
    }
    for t, s in summary["instances"]["thresholds"].items():
        row[f"ap@{t}"] = s["ap"]
    row["voi_split"] = summary["voi"]["split"]
    row["voi_merge"] = summary["voi"]["merge"]
    row["are"] = summary["adapted_rand"]["error"]
    return row


def evaluate(
    pred,
    gt,
    *,
    thresholds: Sequence[float] = (0.5, 0.75),
    per_slice: bool = False,
    semantic: bool = False,
    boundary: float | None = None,
) -> dict[str, object]:
    """All metrics of a prediction against ground truth, as a JSON-ready dict.

    Parameters
    ----------
    pred, gt : ndarray of int, same shape, (Z, Y, X) or (Y, X)
        Instance ids (or class maps with ``semantic=True``).
    thresholds : sequence of float
        IoU thresholds of the instance AP.
    per_slice : bool
        Also score every z-slice of a 3D volume on its own (2D metrics).
    semantic : bool
        Treat values as classes: per-class IoU/Dice only.
    boundary : float, optional
        Treat nonzero values as a boundary (membrane) map: pixel error, pixel
        F1 and :func:`boundary_f1` within this many pixels, only.

    Returns
    -------
    dict
        Instances: ``{"shape", "foreground": {"iou", "dice"}, "instances":
        instance_ap(...), "voi": {"split", "merge", "total"},
        "adapted_rand": {"error", "precision", "recall"}, ["per_slice": [
        {"z", "iou", "dice", "n_pred", "n_gt", "ap@τ", "voi_split",
        "voi_merge", "are"}, ...]]}``.  Semantic: ``{"shape", "classes":
        {str(class): {"iou", "dice", ...}}, ["per_slice": [{"z", "iou/<c>",
        ...}]]}``.  Boundary: ``{"shape", "boundary": {"tolerance",
        "pixel_error", "pixel_f1", "precision", "recall", "f1"}, ["per_slice":
        [{"z", "pixel_f1", "f1"}, ...]]}``.
    """
    p, g = _check_pair(pred, gt)
    out: dict[str, object] = {"shape": list(p.shape)}
    if boundary is not None:
        if semantic:
            raise ValueError("choose one mode: semantic (classes) or boundary (membrane map)")
        return {**out, **_boundary_summary(p > 0, g > 0, boundary, per_slice)}
    slices = range(p.shape[0]) if per_slice and p.ndim == 3 else range(0)
    if semantic:
        scores = class_scores(p, g)
        out["classes"] = {str(k): v for k, v in scores.items()}
        if per_slice and p.ndim == 3:
            rows = []
            for z in slices:
                sc = class_scores(p[z], g[z], classes=list(scores))
                row: dict[str, float] = {"z": z}
                for k, v in sc.items():
                    row[f"iou/{k}"] = v["iou"]
                    row[f"dice/{k}"] = v["dice"]
                rows.append(row)
            out["per_slice"] = rows
        return out
    out.update(_instance_summary(p, g, thresholds))
    if per_slice and p.ndim == 3:
        out["per_slice"] = [
            {"z": z, **_flat(_instance_summary(p[z], g[z], thresholds))} for z in slices
        ]
    return out
