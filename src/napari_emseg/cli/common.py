"""Pieces shared by the ``emseg`` sub-commands.

* argparse ``type=`` functions that reject bad numbers at parse time with a
  one-line message naming the flag (:func:`positive_int`, :func:`shape`, ...);
* :func:`check_output`: an output never replaces an input, an existing output
  only with ``--overwrite``, and a folder only when it is a zarr we wrote;
* :func:`memory_guard`: out-of-memory as a one-line error saying how much
  memory the volume needs;
* :func:`resolve_threshold`: ``--threshold``, else the model's tuned one;
* :class:`HelpFormatter`: ``--help`` shows the defaults.

Imports neither torch nor napari at module level (the parser is built on
every call).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .._shapes import parse_shape
from ..io import is_emseg_zarr
from ..models.zoo import list_models, model_info
from ..postprocess import SegmentSettings, segment_defaults

__all__ = [
    "HelpFormatter",
    "check_output",
    "cli_words",
    "device",
    "fraction",
    "memory_guard",
    "model_help",
    "non_negative_float",
    "non_negative_int",
    "parse_threshold",
    "positive_float",
    "positive_int",
    "probability",
    "resolve_threshold",
    "shape",
    "threshold",
    "tta_count",
    "voxel_size",
]

DEVICE_CHOICES = "cuda, cuda:N, mps or cpu"
BLOCKWISE_HINT = "run it with --blockwise (OUT.zarr) to process it block by block"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with ``(default: X)`` after each option that has a real default.

    Flags (default False) and options without a default (None) get no suffix;
    their help text says what happens when they are left out.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        unset = action.default is None or action.default is False  # not 0: that is a value
        if unset or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


# ----------------------------------------------------------------- numbers
def _number(text: str, kind: type, what: str) -> int | float:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _checked(text: str, kind: type, what: str, ok) -> Any:
    """``text`` as ``kind`` when ``ok(value)``, else an argparse error saying ``what``."""
    value = _number(text, kind, what)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _checked(text, int, "a positive integer", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _checked(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _checked(text, float, "a number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _checked(text, float, "a number >= 0", lambda v: v >= 0)


def probability(text: str) -> float:
    """A number in [0, 1]."""
    return _checked(text, float, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def fraction(text: str) -> float:
    """A number in [0, 1) (e.g. a tile overlap)."""
    value = _number(text, float, "a number in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def tta_count(text: str) -> int:
    """Test-time augmentation variants: 0 (off) to 16."""
    value = _number(text, int, "0 (off), 4 (flips) or 8 (flips and rotations)")
    if not 0 <= value <= 16:
        raise argparse.ArgumentTypeError(
            f"must be 0 (off), 4 (flips) or 8 (flips and rotations; up to 16 in 3D), "
            f"got {text!r}")
    return value


# ----------------------------------------------------------------- threshold
def parse_threshold(value: float | str) -> float | str:
    """A foreground threshold: ``'otsu'`` or a number in [0, 1].

    Raises
    ------
    ValueError
        Anything else, with a message naming ``--threshold``.
    """
    if str(value).strip().lower() == "otsu":
        return "otsu"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--threshold must be a number in [0, 1] or 'otsu', got {value!r}") \
            from None
    if not 0.0 <= number <= 1.0:  # NaN fails too
        raise ValueError(f"--threshold must be a number in [0, 1] or 'otsu', got {value!r}")
    return number


def threshold(text: str) -> float | str:
    """argparse type for ``--threshold``: a number in [0, 1] or 'otsu'."""
    try:
        return parse_threshold(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number in [0, 1] or 'otsu', got {text!r}") from None


def resolve_threshold(args: argparse.Namespace, meta: dict | None = None) -> float | str:
    """``--threshold``, else the ``--model``'s tuned threshold, else the default.

    Parameters
    ----------
    args : the parsed options (``threshold``, ``model``, ``quiet`` are read
        when present)
    meta : the loaded model's metadata (else the checkpoint is read for it)
    """
    if getattr(args, "threshold", None) is not None:
        return parse_threshold(args.threshold)
    if getattr(args, "model", None):
        value = segment_defaults(meta or model_info(args.model)).threshold
        if not getattr(args, "quiet", False):
            print(f"threshold {value:g} (tuned for {args.model})", file=sys.stderr)
        return value
    return SegmentSettings().threshold


# ----------------------------------------------------------------- shapes
def _split(text: str) -> list[str]:
    """'32,128,128', '32x128x128' or '32 128 128' → ['32', '128', '128']."""
    return [v for v in re.split(r"[,x\s]+", text.strip().lower()) if v]


def shape(lengths: int | Sequence[int] = (2, 3), minimum: int = 1,
          name: str = "shape") -> Callable[[str], tuple[int, ...]]:
    """argparse type for 'a,b,c' sizes, parsed by :func:`~napari_emseg._shapes.parse_shape`.

    ``lengths`` values ('x' and spaces separate them too), each >= ``minimum``;
    with one length (``3``) a single value stands for all axes ('64' → (64, 64, 64)).
    """

    def parse(text: str) -> tuple[int, ...]:
        try:
            return parse_shape(text, lengths, "value", minimum=minimum)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value ")) from None

    parse.__name__ = name
    return parse


def voxel_size(text: str) -> tuple[float, ...]:
    """'Z,Y,X' (or 'Y,X') voxel size in nm, every value > 0."""
    what = "2 or 3 numbers > 0 in nm separated by commas (e.g. 30,5,5)"
    try:
        values = tuple(float(v) for v in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if len(values) not in (2, 3) or not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return values


def add_voxel_size(parser: argparse.ArgumentParser, what: str) -> None:
    """``--voxel-size Z,Y,X`` for the volume named ``what``."""
    parser.add_argument("--voxel-size", type=voxel_size, default=None, metavar="Z,Y,X",
                        help=f"voxel size of {what} in nm (default: from the file's metadata)")


def voxel_size_of(args: argparse.Namespace, path: str, ndim: int,
                  key: str | None = None) -> tuple[float, ...] | None:
    """``--voxel-size``, else the metadata of ``path``; ``ndim`` values (nm) or None."""
    from ..io import read_voxel_size

    given = getattr(args, "voxel_size", None)
    if given is None:
        return read_voxel_size(path, key=key, ndim=ndim)
    if len(given) < ndim:
        raise ValueError(f"--voxel-size needs {ndim} values (Z,Y,X) for a {ndim}D volume, "
                         f"got {len(given)}")
    return tuple(given[-ndim:])


def tell_adaptation(command: str, info: dict) -> None:
    """Say on stderr what the adaptation does, before the prediction runs."""
    from ..adapt import describe

    note = describe(info)
    if note:
        print(f"emseg {command}: {note}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- device
def device(text: str) -> str | None:
    """'cuda', 'cuda:N', 'mps' or 'cpu' (checked against this machine); 'auto' → None."""
    value = text.strip().lower()
    if value == "auto":
        return None
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}: choose {DEVICE_CHOICES} (or leave it out for the best one)")
    if value != "cpu":
        _check_available(value)
    return value


def _check_available(value: str) -> None:
    import torch

    if value.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA"
            raise argparse.ArgumentTypeError(
                f"{value} is not available ({have} on this machine): choose another of "
                f"{DEVICE_CHOICES}")
    backend = getattr(torch.backends, "mps", None)
    if value == "mps" and not (backend is not None and backend.is_available()):
        raise argparse.ArgumentTypeError(
            f"mps is not available on this machine: choose another of {DEVICE_CHOICES}")


def model_help(what: str = "model") -> str:
    """Help text for a model option, listing the bundled models."""
    names = ", ".join(list_models()) or "none installed"
    return f"{what}: a bundled model name ({names}) or a checkpoint file (.pt)"


# ----------------------------------------------------------------- outputs
def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def _same(out: Path, src: Path) -> bool:
    if out.resolve() == src.resolve():
        return True
    try:
        return out.exists() and os.path.samefile(out, src)  # hard links
    except OSError:
        return False


def check_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                 overwrite: bool = False, *, resume: bool = False,
                 name: str = "OUT") -> Path:
    """Refuse an output that would harm an input or replace something unasked.

    Parameters
    ----------
    output : the path a command will write
    inputs : paths it reads (``None`` and names that are not files are skipped)
    overwrite : ``--overwrite`` was given: an existing file or napari-emseg zarr
        may be replaced
    resume : an existing napari-emseg zarr is reused (blockwise resume)
    name : how messages call the output (``OUT``, ``--json``)

    Returns
    -------
    pathlib.Path
        ``output`` as a path.

    Raises
    ------
    ValueError
        ``output`` is an input (also through a symlink or hard link), lies
        inside an input folder, or holds an input.
    FileExistsError
        ``output`` exists and is not to be replaced: without ``--overwrite``,
        or a folder that is not a zarr napari-emseg wrote (never replaced).
    """
    out = Path(output).expanduser()
    target = out.resolve()
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        src = Path(given).expanduser()
        if _same(out, src):
            raise ValueError(f"{name} {out} is the input {given}: writing it would destroy "
                             "the input; choose another output name")
        if _inside(src.resolve(), target):
            raise ValueError(f"the input {given} lies inside {name} {out}: replacing {out} "
                             "would delete it; choose another output name")
        if src.is_dir() and _inside(target, src.resolve()):
            raise ValueError(f"{name} {out} lies inside the input folder {given}: "
                             "choose an output outside it")
    if not os.path.lexists(out):
        return out
    if out.is_dir() and not is_emseg_zarr(out):
        raise FileExistsError(f"{name} {out} is an existing folder that napari-emseg did not "
                              "write; it is never replaced: choose another output name")
    if not (overwrite or (resume and out.is_dir())):
        raise FileExistsError(f"{name} {out} exists; pass --overwrite to replace it")
    return out


# ----------------------------------------------------------------- messages
#: Python argument names in engine messages → the flags a CLI user types.
_CLI_WORDS = {
    "overwrite=True": "--overwrite",
    "device='cpu'": "--device cpu",
    "amp=False": "--no-amp",
}


def cli_words(message: str) -> str:
    """``message`` with Python argument names replaced by CLI flags."""
    for py, flag in _CLI_WORDS.items():
        message = message.replace(py, flag)
    return message


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's out-of-memory error (without importing torch)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


@contextmanager
def memory_guard(shape: Sequence[int], dtype, *, bytes_per_voxel: int = 8,
                 hint: str = BLOCKWISE_HINT) -> Iterator[None]:
    """Turn out-of-memory inside the block into one ``MemoryError`` line.

    The message gives the memory the volume needs: its own bytes plus
    ``bytes_per_voxel`` per voxel of work arrays (8: float32 probabilities and
    their weights), and ``hint``.
    """
    try:
        yield
    except Exception as exc:  # MemoryError is an Exception; so is torch's OOM
        if not _is_out_of_memory(exc):
            raise
        voxels = math.prod(int(n) for n in shape)
        need = voxels * (np.dtype(dtype).itemsize + bytes_per_voxel)
        cause = str(exc).splitlines()[0] if str(exc) else "allocation failed"
        raise MemoryError(f"out of memory ({cause}): a {tuple(shape)} {np.dtype(dtype)} volume "
                          f"needs about {_gib(need)} here; {hint}") from None
