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
  ``(precision, recall)``; the error is the same.)  No ground-truth voxel
  left to score gives NaN ("n/a"), not a perfect score.
- **V_rand and V_info** (ISBI 2012; Arganda-Carreras et al. 2015,
  Front. Neuroanat. 9:142), foreground-restricted: only voxels where ``gt``
  is nonzero count, and voxels that are background (0) in ``pred`` count as
  singletons (each its own object).  With ``p_ij`` the joint distribution and
  ``s_i``, ``t_j`` its marginals over ``pred`` and ``gt``:
  ``V_rand_split = Σp_ij² / Σt_j²``, ``V_rand_merge = Σp_ij² / Σs_i²``,
  ``V_rand = Σp_ij² / (½Σs_i² + ½Σt_j²)``; ``V_info_split = I(S;T) / H(S)``,
  ``V_info_merge = I(S;T) / H(T)``, ``V_info = I / (½H(S) + ½H(T))``.
  1 is perfect.  ``V_rand`` counts voxel pairs with replacement, so it is
  close to, not exactly, ``1 - adapted Rand error``.
- **Detection of synaptic sites** (objects = the nonzero ids): a true site
  is found when a predicted object overlaps it or comes within
  ``max_distance`` (nearest voxels, in the units of ``spacing``), and a
  predicted object is correct when it is that close to a true site;
  precision, recall and F1 of those counts (not one-to-one: one prediction
  may find two nearby sites).  CREMI-style mean distances: mean distance of
  the predicted voxels to the nearest true site voxel, and of the true
  voxels to the nearest predicted one.
- **Binary masks as instances**: where instances are scored, a label image
  holding only 0 and 1 is split into its connected components (face
  connectivity, in 3D for a stack) and the result says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .postprocess import bincount, connected_components
from .tracking import match_slices

__all__ = [
    "adapted_rand_error",
    "boundary_f1",
    "class_scores",
    "contingency",
    "detection_scores",
    "evaluate",
    "foreground_restricted_scores",
    "instance_ap",
    "segmentation_scores",
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
        present = bincount(flat, minlength=top + 1) > 0
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
    mr, mc = match_slices(r, c, iou, t, most_pairs=True)
    lookup = dict(zip(zip(r.tolist(), c.tolist(), strict=True), iou.tolist(), strict=True))
    return np.array([lookup[(a, b)] for a, b in zip(mr.tolist(), mc.tolist(), strict=True)])


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
        evaluation region (no ground truth left) gives NaN for all three.
    """
    pid, gid, rows, cols, counts = _filtered_table(pred, gt, ignore_labels)
    c = counts.astype(np.float64)
    n = c.sum()
    if n == 0:
        return float("nan"), float("nan"), float("nan")
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


def _ratio(num: float, den: float) -> float:
    """``num / den``, 1.0 when ``den`` is 0 (nothing to split or merge)."""
    return float(num / den) if den > 0 else 1.0


def foreground_restricted_scores(pred, gt) -> dict[str, dict[str, float | None]]:
    """ISBI 2012 foreground-restricted Rand and information scores (V_rand, V_info).

    Parameters
    ----------
    pred, gt : ndarray of int, same shape
        Only voxels with ``gt != 0`` count; ``pred == 0`` voxels are singletons.

    Returns
    -------
    dict
        ``{"v_rand": {"score", "split", "merge"}, "v_info": {"score", "split",
        "merge"}}``, each in [0, 1] (1 = perfect); None when ``gt`` has no
        foreground.
    """
    pid, gid, rows, cols, counts = _filtered_table(pred, gt, (0,))
    n = float(counts.sum())
    if n == 0:
        none = {"score": None, "split": None, "merge": None}
        return {"v_rand": dict(none), "v_info": dict(none)}
    p = counts / n
    single = pid[rows] == 0  # pred background: every voxel its own object
    p_obj = p[~single]
    s = np.bincount(rows[~single], weights=p_obj, minlength=pid.size)
    t = np.bincount(cols, weights=p, minlength=gid.size)
    n_single = float(counts[single].sum())
    sum_p2 = float(p_obj @ p_obj) + n_single / n**2
    sum_s2 = float(s @ s) + n_single / n**2
    sum_t2 = float(t @ t)
    h_single = n_single / n * np.log2(n)  # n_single voxels, each with -p log p at p = 1/n
    h_s = float(-_xlog2x(s).sum() + h_single)
    h_t = float(-_xlog2x(t).sum())
    h_st = float(-_xlog2x(p_obj).sum() + h_single)
    info = max(h_s + h_t - h_st, 0.0)
    return {
        "v_rand": {"score": sum_p2 / (0.5 * sum_s2 + 0.5 * sum_t2),
                   "split": sum_p2 / sum_t2, "merge": sum_p2 / sum_s2},
        "v_info": {"score": _ratio(info, 0.5 * h_s + 0.5 * h_t),
                   "split": _ratio(info, h_s), "merge": _ratio(info, h_t)},
    }


def segmentation_scores(pred, gt) -> dict[str, object]:
    """Neuron segmentation scores restricted to the ground-truth foreground.

    VOI (``ignore_labels=(0,)``), adapted Rand error and
    :func:`foreground_restricted_scores`, as CREMI and ISBI 2012 report them.

    Parameters
    ----------
    pred, gt : ndarray of int, same shape
        Object ids; ``gt == 0`` (e.g. membranes, unlabelled) is left out.

    Returns
    -------
    dict
        ``{"n_pred", "n_gt", "voi": {"split", "merge", "total"},
        "adapted_rand": {"error", "precision", "recall"}, "v_rand": {...},
        "v_info": {...}}``; every score None when ``gt`` is empty.
    """
    p, g = _check_pair(pred, gt)
    fg = g != 0
    out: dict[str, object] = {"n_pred": _count_ids(p[fg]), "n_gt": _count_ids(g)}
    if not fg.any():
        out["voi"] = {"split": None, "merge": None, "total": None}
    else:
        split, merge = variation_of_information(p, g, ignore_labels=(0,))
        out["voi"] = {"split": split, "merge": merge, "total": split + merge}
    out["adapted_rand"] = _rand_dict(p, g)
    out.update(foreground_restricted_scores(p, g))
    return out


def _count_ids(a: np.ndarray) -> int:
    """Number of distinct nonzero ids."""
    return int(np.count_nonzero(bincount(a.ravel(), minlength=1)[1:])) if a.size else 0


def _rand_dict(p: np.ndarray, g: np.ndarray) -> dict[str, float | None]:
    """Adapted Rand error, precision and recall; None ("n/a") when ``gt`` is empty."""
    are, prec, rec = adapted_rand_error(p, g)
    if np.isnan(are):
        return {"error": None, "precision": None, "recall": None}
    return {"error": are, "precision": prec, "recall": rec}


def _spacing_of(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(v) for v in spacing)
    if len(sp) == 3 and ndim == 2:
        sp = sp[1:]
    if len(sp) != ndim or any(not np.isfinite(v) or v <= 0 for v in sp):
        raise ValueError(f"spacing needs {ndim} positive values; got {spacing}")
    return sp


def _distance_to(mask: np.ndarray, sampling: tuple[float, ...]) -> np.ndarray | None:
    """Distance of every voxel to the nearest voxel of ``mask``; None when it is empty."""
    from scipy.ndimage import distance_transform_edt

    if not mask.any():
        return None
    return distance_transform_edt(~mask, sampling=sampling)


def _objects_within(labels: np.ndarray, dist: np.ndarray | None,
                    max_distance: float) -> tuple[int, int]:
    """(objects of ``labels`` whose nearest voxel lies within max_distance, all objects)."""
    from scipy.ndimage import minimum

    ids = np.flatnonzero(bincount(labels.ravel(), minlength=1))
    ids = ids[ids > 0]
    if ids.size == 0 or dist is None:
        return 0, int(ids.size)
    nearest = np.asarray(minimum(dist, labels=labels, index=ids))
    return int((nearest <= max_distance).sum()), int(ids.size)


def detection_scores(
    pred, gt, *, max_distance: float, spacing: Sequence[float] | None = None
) -> dict[str, float | int | None]:
    """Object-level detection scores and mean distances (synaptic sites).

    Parameters
    ----------
    pred, gt : ndarray of int or bool, same shape, (Y, X) or (Z, Y, X)
        Objects = nonzero ids (a 0/1 mask is split into connected components).
    max_distance : float
        A site counts as found when a predicted object overlaps it or its
        nearest voxel lies within this distance (units of ``spacing``, e.g. nm).
    spacing : sequence of float, optional
        Voxel size per axis (z, y, x); default 1 (distances in voxels).

    Returns
    -------
    dict
        ``{"max_distance", "n_pred", "n_gt", "found" (true sites found),
        "correct" (predicted objects near a site), "precision" = correct /
        n_pred, "recall" = found / n_gt, "f1", "mean_distance_pred_to_gt",
        "mean_distance_gt_to_pred"}``; a ratio or mean is None where its
        denominator is empty (F1 is 0 when only one side is empty).
    """
    p, g = _check_pair(pred, gt)
    if p.ndim not in (2, 3):
        raise ValueError(f"detection needs 2D or 3D label images; got shape {p.shape}")
    if not max_distance >= 0:
        raise ValueError(f"max_distance must be >= 0; got {max_distance}")
    sampling = _spacing_of(spacing, p.ndim)
    p, g = _instances(p), _instances(g)
    to_gt, to_pred = _distance_to(g > 0, sampling), _distance_to(p > 0, sampling)
    correct, n_pred = _objects_within(p, to_gt, max_distance)
    found, n_gt = _objects_within(g, to_pred, max_distance)
    precision = correct / n_pred if n_pred else None
    recall = found / n_gt if n_gt else None
    if precision is None or recall is None:
        f1 = None if precision is None and recall is None else 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    both = to_gt is not None and to_pred is not None
    return {
        "max_distance": float(max_distance), "n_pred": n_pred, "n_gt": n_gt,
        "found": found, "correct": correct,
        "precision": precision, "recall": recall, "f1": f1,
        "mean_distance_pred_to_gt": float(to_gt[p > 0].mean()) if both else None,
        "mean_distance_gt_to_pred": float(to_pred[g > 0].mean()) if both else None,
    }


def _is_binary(a: np.ndarray) -> bool:
    """True for a bool array or integers holding only 0 and 1 (with some 1)."""
    return a.dtype == np.bool_ or (a.size > 0 and int(a.max()) == 1)


def _instances(a: np.ndarray) -> np.ndarray:
    """Ids as they are, or the connected components of a 0/1 mask."""
    if not _is_binary(a):
        return a
    return connected_components(a, dims=3, connectivity=1)


# ---------------------------------------------------------------- evaluate
def _instance_summary(pred, gt, thresholds) -> dict[str, object]:
    fg = class_scores(pred != 0, gt != 0, classes=[1])[1]
    ap = instance_ap(pred, gt, thresholds)
    split, merge = variation_of_information(pred, gt)
    return {
        "foreground": {"iou": fg["iou"], "dice": fg["dice"]},
        "instances": ap,
        "voi": {"split": split, "merge": merge, "total": split + merge},
        "adapted_rand": _rand_dict(pred, gt),
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


def _segmentation_row(scores: dict[str, object]) -> dict[str, float | None]:
    """Headline numbers of :func:`segmentation_scores` for a per-slice row."""
    return {"voi_split": scores["voi"]["split"], "voi_merge": scores["voi"]["merge"],
            "are": scores["adapted_rand"]["error"], "v_rand": scores["v_rand"]["score"],
            "v_info": scores["v_info"]["score"]}


def _mean_rows(rows: list[dict]) -> dict[str, float | None]:
    """Mean of each column over the rows where it is defined (ISBI-style slice average)."""
    out: dict[str, float | None] = {}
    for key in rows[0]:
        if key == "z":
            continue
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def _split_binary(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Binary masks split into connected components, with a note for each."""
    notes = []
    out = []
    for name, a in (("prediction", p), ("ground truth", g)):
        if _is_binary(a):
            a = _instances(a)
            where = "3D" if a.ndim == 3 else "2D"
            notes.append(f"{name} is a binary mask: split into {int(a.max())} connected "
                         f"components ({where}, face connectivity)")
        out.append(a)
    return out[0], out[1], notes


def evaluate(
    pred,
    gt,
    *,
    thresholds: Sequence[float] = (0.5, 0.75),
    per_slice: bool = False,
    semantic: bool = False,
    boundary: float | None = None,
    segmentation: bool = False,
    detection: float | None = None,
    spacing: Sequence[float] | None = None,
) -> dict[str, object]:
    """All metrics of a prediction against ground truth, as a JSON-ready dict.

    Parameters
    ----------
    pred, gt : ndarray of int, same shape, (Z, Y, X) or (Y, X)
        Instance ids (or class maps with ``semantic=True``).  In the instance,
        segmentation and detection modes a 0/1 mask is split into connected
        components and ``"notes"`` says so.
    thresholds : sequence of float
        IoU thresholds of the instance AP.
    per_slice : bool
        Also score every z-slice of a 3D volume on its own (2D metrics).
    semantic : bool
        Treat values as classes: per-class IoU/Dice only.
    boundary : float, optional
        Treat nonzero values as a boundary (membrane) map: pixel error, pixel
        F1 and :func:`boundary_f1` within this many pixels, only.
    segmentation : bool
        Neurons: :func:`segmentation_scores` (VOI, adapted Rand, V_rand,
        V_info on the ground-truth foreground), only.
    detection : float, optional
        Synaptic sites: :func:`detection_scores` with this ``max_distance``
        (units of ``spacing``), only.
    spacing : sequence of float, optional
        Voxel size (z, y, x) for ``detection``; default 1.

    Returns
    -------
    dict
        Instances: ``{"shape", "foreground": {"iou", "dice"}, "instances":
        instance_ap(...), "voi": {"split", "merge", "total"},
        "adapted_rand": {"error", "precision", "recall"} (None when ``gt`` is
        empty), ["notes": [...]], ["per_slice": [{"z", "iou", "dice",
        "n_pred", "n_gt", "ap@τ", "voi_split", "voi_merge", "are"}, ...]]}``.
        Semantic: ``{"shape", "classes": {str(class): {"iou", "dice", ...}},
        ["per_slice": [{"z", "iou/<c>", ...}]]}``.  Boundary: ``{"shape",
        "boundary": {"tolerance", "pixel_error", "pixel_f1", "precision",
        "recall", "f1"}, ["per_slice": [{"z", "pixel_f1", "f1"}, ...]]}``.
        Segmentation: ``{"shape", "segmentation": segmentation_scores(...),
        ["per_slice": [{"z", "voi_split", "voi_merge", "are", "v_rand",
        "v_info"}, ...], "slice_mean": {...}]}``.  Detection: ``{"shape",
        "detection": detection_scores(...)}``.
    """
    p, g = _check_pair(pred, gt)
    out: dict[str, object] = {"shape": list(p.shape)}
    modes = [name for name, on in (("semantic", semantic), ("boundary", boundary is not None),
                                   ("segmentation", segmentation),
                                   ("detection", detection is not None)) if on]
    if len(modes) > 1:
        raise ValueError(f"choose one mode, not {' and '.join(modes)}: semantic (classes), "
                         "boundary (membrane map), segmentation (neurons) or detection (sites)")
    if boundary is not None:
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
    p, g, notes = _split_binary(p, g)
    if notes:
        out["notes"] = notes
    if detection is not None:
        out["detection"] = detection_scores(p, g, max_distance=detection, spacing=spacing)
        return out
    if segmentation:
        out["segmentation"] = segmentation_scores(p, g)
        if slices:
            rows = [{"z": z, **_segmentation_row(segmentation_scores(p[z], g[z]))}
                    for z in slices]
            out["per_slice"] = rows
            out["slice_mean"] = _mean_rows(rows)
        return out
    out.update(_instance_summary(p, g, thresholds))
    if slices:
        out["per_slice"] = [
            {"z": z, **_flat(_instance_summary(p[z], g[z], thresholds))} for z in slices
        ]
    return out
