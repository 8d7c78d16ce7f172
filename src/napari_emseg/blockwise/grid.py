"""The block grid: block indices, core and halo slices, and the halo rule."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

__all__ = [
    "DEFAULT_BLOCK",
    "block_core",
    "block_grid",
    "block_name",
    "block_outer",
    "check_block_halo",
    "clip_block",
    "grid_counts",
]

Shape3 = tuple[int, int, int]
Slices = tuple[slice, ...]

DEFAULT_BLOCK = (64, 512, 512)


def clip_block(block: Sequence[int], shape: Sequence[int]) -> Shape3:
    """The block shape, no larger than the volume along any axis."""
    clipped = (min(b, s) for b, s in zip(block, shape, strict=True))
    return tuple(clipped)  # type: ignore[return-value]


def block_grid(shape: Sequence[int], block_shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """Indices ``(iz, iy, ix)`` of the blocks covering ``shape``, in C order."""
    return list(itertools.product(*(range(c) for c in grid_counts(shape, block_shape))))


def grid_counts(shape: Sequence[int], block: Sequence[int]) -> Shape3:
    """Number of blocks along each axis."""
    counts = (-(-int(s) // int(b)) for s, b in zip(shape, block, strict=True))
    return tuple(counts)  # type: ignore[return-value]


def block_core(index, shape, block) -> Slices:
    """The slices of block ``index`` (clipped at the volume border)."""
    return tuple(
        slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(index, block, shape, strict=True)
    )


def block_outer(core: Slices, shape, halo) -> tuple[Slices, Slices]:
    """The core grown by the halo (clipped), and the core's position inside it."""
    outer, inner = [], []
    for c, s, h in zip(core, shape, halo, strict=True):
        a, b = max(0, c.start - h), min(s, c.stop + h)
        outer.append(slice(a, b))
        inner.append(slice(c.start - a, c.stop - a))
    return tuple(outer), tuple(inner)


def block_name(index) -> str:
    """``"iz_iy_ix"``: a block's name in marker and face file names."""
    return "_".join(str(int(i)) for i in index)


def check_block_halo(shape, block, halo, context: int = 0) -> Shape3:
    """Validate the halo rule; returns the halo (0 on axes that are not split).

    Along every axis split into several blocks the block must be larger than
    the halo, and a 2.5D model's z halo must cover its ``context``.
    """
    if any(b < 1 for b in block):
        raise ValueError(f"block_shape values must be >= 1, got {tuple(block)}")
    if any(h < 0 for h in halo):
        raise ValueError(f"halo values must be >= 0, got {tuple(halo)}")
    out = []
    for ax, (s, b, h) in enumerate(zip(shape, block, halo, strict=True)):
        if s <= b:  # one block along this axis: no neighbour, no halo needed
            out.append(0)
            continue
        if b <= h:
            raise ValueError(
                f"block_shape {tuple(block)} must be larger than the halo {tuple(halo)} "
                f"along every split axis (axis {'zyx'[ax]}: block {b} <= halo {h}); "
                "use larger blocks or a smaller halo"
            )
        out.append(h)
    if context and shape[0] > block[0] and out[0] < context:
        raise ValueError(
            f"the model reads {context} neighbouring slices on each side (2.5D context) "
            f"but the z halo is {halo[0]}; use a z halo >= {context}"
        )
    return tuple(out)  # type: ignore[return-value]
