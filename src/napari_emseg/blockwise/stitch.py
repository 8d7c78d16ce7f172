"""Stitching labelled blocks: id pairs across block faces, merged with a union-find.

Each block holds local ids 1..n; ``offsets[b] + local id`` is unique over the
volume.  Two ids of neighbouring blocks are merged when they touch across the
face (connected components) or overlap enough around it (watershed, from the
halo planes each block saved).  :func:`merge_lut` turns the pairs into one
lookup table global id → final id 1..N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as graph_components

from .grid import block_core, block_name

__all__ = [
    "FACES_DIR",
    "block_offsets",
    "component_pairs",
    "merge_lut",
    "save_faces",
    "watershed_pairs",
]

FACES_DIR = ".emseg_faces"


def block_offsets(counts: dict, grid: list) -> tuple[np.ndarray, int]:
    """(offsets, total): ids of block ``b`` become ``offsets[b] + 1 .. offsets[b] + n_b``."""
    n_per = np.array([counts[i] for i in grid], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_per)[:-1]]).astype(np.int64)
    return offsets, int(n_per.sum())


def save_faces(target: str | Path, index, full: np.ndarray, inner, lut: np.ndarray,
               stitch_axes) -> None:
    """Save the halo planes next to a block's core, as the block's local ids.

    ``full`` holds the labels of the block plus its halo, ``inner`` the core's
    position inside it and ``lut`` the map to local ids.
    """
    faces = Path(target) / FACES_DIR
    for ax in stitch_axes:
        for side, pos in (("lo", inner[ax].start - 1), ("hi", inner[ax].stop)):
            if 0 <= pos < full.shape[ax]:
                sl = list(inner)
                sl[ax] = pos
                np.save(faces / f"{block_name(index)}_{ax}_{side}.npy", lut[full[tuple(sl)]])


def _global_plane(arr, sl, grid_counts, block, offsets) -> np.ndarray:
    """Labels of a (possibly multi-block) region as global ids (local id + block offset)."""
    lab = np.asarray(arr[sl]).astype(np.int64)
    starts = [s.start for s in sl]
    bidx = np.ix_(*[(np.arange(st, st + n) // b) for st, n, b in
                    zip(starts, lab.shape, block, strict=True)])
    flat = np.ravel_multi_index(bidx, grid_counts)
    fg = lab > 0
    lab[fg] += offsets[np.broadcast_to(flat, lab.shape)[fg]]
    return lab


def component_pairs(arr, index, shape, block, grid_counts, offsets, structure) -> list:
    """Global id pairs touching across the + faces of one block (connected components)."""
    core = block_core(index, shape, block)
    shifts = np.argwhere(structure) - 1
    pairs = []
    for ax in range(3):
        e = core[ax].stop
        sh = shifts[shifts[:, ax] == 1]
        if e >= shape[ax] or not len(sh):
            continue
        a_sl = list(core)
        a_sl[ax] = slice(e - 1, e)
        a = _global_plane(arr, tuple(a_sl), grid_counts, block, offsets)
        b_sl, pad = _wider_next_plane(core, shape, ax)
        b = np.pad(_global_plane(arr, b_sl, grid_counts, block, offsets), pad)
        for d in sh:
            sl = tuple(slice(0, 1) if o == ax else slice(1 + d[o], 1 + d[o] + a.shape[o])
                       for o in range(3))
            bs = b[sl]
            both = (a > 0) & (bs > 0)
            if both.any():
                pairs.append(np.stack([a[both], bs[both]], axis=1))
    return pairs


def _wider_next_plane(core, shape, ax: int) -> tuple[tuple[slice, ...], list]:
    """The plane after the core along ``ax``, one voxel wider on the other axes
    (neighbours along edges and corners), and the zero padding where it was clipped
    at the volume border."""
    e = core[ax].stop
    b_sl, pad = list(core), []
    for o in range(3):
        if o == ax:
            b_sl[o] = slice(e, e + 1)
            pad.append((0, 0))
        else:
            lo, hi = max(0, core[o].start - 1), min(shape[o], core[o].stop + 1)
            b_sl[o] = slice(lo, hi)
            pad.append((1 - (core[o].start - lo), 1 - (hi - core[o].stop)))
    return tuple(b_sl), pad


def watershed_pairs(arr, target: Path, index, shape, block, grid_counts, offsets,
                    stitch_axes, stitch_threshold: float) -> list:
    """Global id pairs whose overlap across a + face has IoU >= ``stitch_threshold``."""
    core = block_core(index, shape, block)
    faces = target / FACES_DIR
    b_flat = np.ravel_multi_index(index, grid_counts)
    pairs = []
    for ax in stitch_axes:
        e = core[ax].stop
        if e >= shape[ax]:
            continue
        nb = list(index)
        nb[ax] += 1
        n_flat = np.ravel_multi_index(tuple(nb), grid_counts)
        f_hi = faces / f"{block_name(index)}_{ax}_hi.npy"
        f_lo = faces / f"{block_name(nb)}_{ax}_lo.npy"
        if not (f_hi.exists() and f_lo.exists()):
            continue  # halo 0 along this axis: nothing to compare
        sl_e, sl_e1 = list(core), list(core)
        sl_e[ax], sl_e1[ax] = e, e - 1
        # plane e: this block's halo vs the neighbour's core; plane e-1: the reverse
        u = np.concatenate([np.load(f_hi).ravel(), np.asarray(arr[tuple(sl_e1)]).ravel()])
        v = np.concatenate([np.asarray(arr[tuple(sl_e)]).ravel(), np.load(f_lo).ravel()])
        uu, vv = _overlapping_ids(u.astype(np.int64), v.astype(np.int64), stitch_threshold)
        if uu.size:
            pairs.append(np.stack([uu + offsets[b_flat], vv + offsets[n_flat]], axis=1))
    return pairs


def _overlapping_ids(u: np.ndarray, v: np.ndarray,
                     threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Local id pairs (u id, v id) of two label vectors whose IoU is >= ``threshold``."""
    su = np.bincount(u)
    sv = np.bincount(v)
    both = (u > 0) & (v > 0)
    if not both.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    key = u[both] * (int(v.max()) + 1) + v[both]
    keys, inter = np.unique(key, return_counts=True)
    uu, vv = keys // (int(v.max()) + 1), keys % (int(v.max()) + 1)
    iou = inter / (su[uu] + sv[vv] - inter)
    ok = iou >= threshold
    return uu[ok], vv[ok]


def merge_lut(pairs: list, n_total: int) -> np.ndarray:
    """Union-find over id pairs → lookup table global id → final id 1..M (0 stays 0)."""
    root = np.arange(n_total + 1, dtype=np.int64)
    if pairs:
        p = np.unique(np.concatenate(pairs), axis=0)
        nodes, inv = np.unique(p, return_inverse=True)
        inv = inv.reshape(p.shape)
        g = coo_matrix((np.ones(len(p), np.int8), (inv[:, 0], inv[:, 1])),
                       shape=(nodes.size, nodes.size))
        _, comp = graph_components(g, directed=False)
        smallest = np.full(comp.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(smallest, comp, nodes)
        root[nodes] = smallest[comp]
    # roots are the smallest id of each group: ranks keep the order of first appearance
    _, final = np.unique(root, return_inverse=True)
    if final.max(initial=0) > np.iinfo(np.uint32).max:
        raise ValueError(f"{final.max()} objects do not fit uint32 labels")
    return final.astype(np.uint32)
