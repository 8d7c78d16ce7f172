"""Patch sampling and augmentation for training (numpy only, no torch).

Arrays inside a sample are channels-first: ``(C, Y, X)`` for 2D / 2.5D and
``(C, Z, Y, X)`` for 3D; targets are ``(Y, X)`` / ``(Z, Y, X)`` int64 with
``-1`` = ignore.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def crop_reflect(volume: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """Crop ``volume[start:start+size]`` mirror-padding what lies outside.

    Parameters
    ----------
    volume : ndarray, (Z, Y, X)
    start, size : tuple of int, one per axis (start may be negative).
    """
    src, pads = [], []
    for s, n, dim in zip(start, size, volume.shape, strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, max(hi, lo)))
        pads.append((lo - s, s + n - max(hi, lo)))
    out = volume[tuple(src)]
    if any(p != (0, 0) for p in pads):
        mode = "reflect" if all(d > 1 for d in out.shape) else "edge"
        if out.size == 0:
            raise ValueError("crop lies entirely outside the volume")
        out = _pad_repeated(out, pads, mode)
    return out


def _pad_repeated(arr: np.ndarray, pads: list[tuple[int, int]], mode: str) -> np.ndarray:
    """``np.pad`` that also works when a pad exceeds the axis length (reflect)."""
    while any(p[0] > 0 or p[1] > 0 for p in pads):
        step = []
        for (a, b), dim in zip(pads, arr.shape, strict=True):
            lim = dim - 1 if mode == "reflect" else max(a, b)
            step.append((min(a, max(lim, 0)), min(b, max(lim, 0))))
        if all(s == (0, 0) for s in step):
            step = pads
            mode = "edge"
        arr = np.pad(arr, step, mode=mode)
        pads = [(a - s0, b - s1) for (a, b), (s0, s1) in zip(pads, step, strict=True)]
    return arr


def sample_patch(
    image: np.ndarray,
    target: np.ndarray,
    centre: tuple[int, int, int],
    patch: tuple[int, ...],
    dims: int,
    context: int,
    own_neighbours: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop an input patch and its target around ``centre`` (z, y, x).

    Returns ``(x, t)``: ``x`` (2c+1, Y, X) for 2D or (1, Z, Y, X) for 3D,
    ``t`` (Y, X) or (Z, Y, X). ``own_neighbours``: 2.5D context made of the
    slice itself (sections too thick for the model's context).
    """
    z, y, x = centre
    if dims == 2:
        py, px = patch
        start = (z - context, y - py // 2, x - px // 2)
        if own_neighbours:
            xs = crop_reflect(image, (z, *start[1:]), (1, py, px))
            xs = np.repeat(xs, 2 * context + 1, axis=0)
        else:
            xs = crop_reflect(image, start, (2 * context + 1, py, px))
        ts = crop_reflect(target, (z, start[1], start[2]), (1, py, px))[0]
        return xs, ts
    pz, py, px = patch
    start = (z - pz // 2, y - py // 2, x - px // 2)
    return crop_reflect(image, start, patch)[None], crop_reflect(target, start, patch)


def flip_rotate(x: np.ndarray, t: np.ndarray, rng: np.random.Generator, dims: int):
    """Random flips of every spatial axis and a random rot90 in YX."""
    nsp = t.ndim
    for ax in range(nsp):
        if rng.random() < 0.5:
            x = np.flip(x, axis=ax + 1)
            t = np.flip(t, axis=ax)
    k = int(rng.integers(4))
    if k and x.shape[-1] == x.shape[-2]:
        x = np.rot90(x, k, axes=(-2, -1))
        t = np.rot90(t, k, axes=(-2, -1))
    return x, t


def intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, gamma, Gaussian and uniform noise (x in ~[0, 1])."""
    x = x.astype(np.float32, copy=True)
    if rng.random() < 0.8:
        x = x * rng.uniform(0.75, 1.25) + rng.uniform(-0.15, 0.15)
    if rng.random() < 0.3:
        g = rng.uniform(0.7, 1.5)
        x = np.clip(x, 0, None) ** g
    if rng.random() < 0.3:
        x = x + rng.normal(0, rng.uniform(0.01, 0.08), x.shape).astype(np.float32)
    if rng.random() < 0.1:
        x = x + rng.uniform(-0.05, 0.05, x.shape).astype(np.float32)
    return x


def elastic(x: np.ndarray, t: np.ndarray, rng: np.random.Generator, alpha: float = 12.0,
            grid: int = 32):
    """Smooth random elastic deformation in YX (same field for every slice)."""
    ny, nx = t.shape[-2:]
    gy, gx = max(2, ny // grid), max(2, nx // grid)
    coarse = rng.normal(0, alpha, (2, gy, gx)).astype(np.float32)
    field = [ndi.zoom(c, (ny / gy, nx / gx), order=3)[:ny, :nx] for c in coarse]
    yy, xx = np.meshgrid(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32),
                         indexing="ij")
    coords = [yy + field[0], xx + field[1]]

    def warp(img: np.ndarray, order: int) -> np.ndarray:
        flat = img.reshape(-1, ny, nx)
        out = [ndi.map_coordinates(s, coords, order=order, mode="mirror") for s in flat]
        return np.stack(out).reshape(img.shape)

    return warp(x, 1), warp(t, 0)


def rescale(x: np.ndarray, t: np.ndarray, factor: float):
    """Zoom the sample in YX by ``factor`` and cut or mirror-pad it back to its size.

    ``factor`` > 1: objects look larger (finer pixels). Linear for the image,
    nearest for the targets, so ``-1`` (ignore) stays ``-1``.
    """
    ny, nx = t.shape[-2:]
    lead_x, lead_t = (1,) * (x.ndim - 2), (1,) * (t.ndim - 2)
    zx = ndi.zoom(x, (*lead_x, factor, factor), order=1, mode="mirror")
    zt = ndi.zoom(t, (*lead_t, factor, factor), order=0, mode="mirror")
    return _fit_yx(zx, ny, nx), _fit_yx(zt, ny, nx)


def _fit_yx(a: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Centre crop or reflect-pad the last two axes of ``a`` to (ny, nx)."""
    for axis, n in ((-2, ny), (-1, nx)):
        m = a.shape[axis]
        if m > n:
            a = np.take(a, np.arange((m - n) // 2, (m - n) // 2 + n), axis=axis)
        elif m < n:
            pad = [(0, 0)] * a.ndim
            pad[axis] = ((n - m) // 2, n - m - (n - m) // 2)
            a = np.pad(a, pad, mode="reflect" if m > 1 else "edge")
    return a


def randomize(x: np.ndarray, t: np.ndarray, rng: np.random.Generator):
    """Domain randomization on top of :func:`augment`: what differs between microscopes.

    Pixel size (zoom 0.7-1.4, p 0.5), blur (Gaussian in YX, sigma 0.5-1.5, p 0.25),
    wider contrast (x0.5-1.5) and gamma (0.5-2) ranges (p 0.5 each).
    """
    if rng.random() < 0.5:
        x, t = rescale(x, t, float(np.exp(rng.uniform(np.log(0.7), np.log(1.4)))))
    x = x.astype(np.float32, copy=True)
    if rng.random() < 0.25:
        sigma = rng.uniform(0.5, 1.5)
        x = ndi.gaussian_filter(x, (0,) * (x.ndim - 2) + (sigma, sigma))
    if rng.random() < 0.5:
        mean = float(x.mean())
        x = (x - mean) * rng.uniform(0.5, 1.5) + mean
    if rng.random() < 0.5:
        x = np.clip(x, 0, None) ** rng.uniform(0.5, 2.0)
    return x, t


def augment(x: np.ndarray, t: np.ndarray, rng: np.random.Generator, dims: int,
            elastic_p: float = 0.25, strong: bool = False):
    """The full training augmentation for one sample (returns new arrays).

    ``strong``: :func:`randomize` first (pixel size, blur, contrast), for a model
    meant to start well on other microscopes.
    """
    x, t = flip_rotate(x, t, rng, dims)
    if strong:
        x, t = randomize(np.ascontiguousarray(x), np.ascontiguousarray(t), rng)
    if elastic_p and rng.random() < elastic_p:
        x, t = elastic(np.ascontiguousarray(x), np.ascontiguousarray(t), rng)
    x = intensity(x, rng)
    return np.ascontiguousarray(x), np.ascontiguousarray(t)
