"""Sizes per axis (patch, block, halo, chunks) from text, an int or a sequence.

One parser for the engine, the CLI and the napari widgets, so that all of
them accept the same forms and refuse bad input with the same message.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["parse_shape"]


def parse_shape(value, lengths: int | Sequence[int], what: str = "shape", *,
                minimum: int = 1) -> tuple[int, ...]:
    """Sizes per axis from ``"8,64,64"``, ``"8x64x64"``, ``"8 64 64"``, an int or ints.

    Parameters
    ----------
    value : str, int or sequence of ints
    lengths : how many values are allowed: one number (then a single value
        stands for every axis: ``64`` → ``(64, 64, 64)``) or several.
    what : the name used in the error message
    minimum : the smallest allowed value

    Raises
    ------
    ValueError
        One line naming ``what``, the forms allowed and what was wrong.
    """
    counts = (lengths,) if isinstance(lengths, int) else tuple(lengths)
    values, problem = _values(value)
    if problem is None and len(values) == 1 and len(counts) == 1:
        values = values * counts[0]
    if problem is None and len(values) not in counts:
        problem = f"{len(values)} value{'' if len(values) == 1 else 's'}"
    if problem is None and min(values) < minimum:
        problem = f"{min(values)} is below {minimum}"
    if problem is not None:
        raise ValueError(f"{what} must be {_expected(counts, minimum)}, got {value!r} "
                         f"({problem})")
    return values


def _values(value) -> tuple[tuple[int, ...], str | None]:
    """The integers of ``value`` and None, or () and what is wrong with one of them."""
    if isinstance(value, str):
        items = [v for v in re.split(r"[,x\s]+", value.strip().lower()) if v]
    else:
        items = [value] if np.ndim(value) == 0 else list(value)
    out = []
    for item in items:
        number = _integer(item)
        if number is None:
            return (), f"{item!r} is not an integer"
        out.append(number)
    return tuple(out), None if out else "no values"


def _integer(item) -> int | None:
    """``item`` as an int, or None when it is not a whole number."""
    try:
        number = int(item)
    except (TypeError, ValueError):
        return None
    return number if isinstance(item, str) or number == item else None


def _expected(counts: tuple[int, ...], minimum: int) -> str:
    """``"an integer or 3 integers >= 1 (e.g. '64,64,64')"`` and the like."""
    if len(counts) == 1:
        how_many = f"an integer or {counts[0]} integers"
    else:
        how_many = f"{', '.join(map(str, counts[:-1]))} or {counts[-1]} integers"
    example = ",".join(["64"] * max(counts))
    return f"{how_many} >= {minimum} (e.g. '{example}')"
