"""Command line: ``emseg predict|train|segment|evaluate|demo``.

One module per sub-command, each with a ``register(subparsers)`` function;
the argument types and checks they share live in :mod:`.common`, the
``--blockwise`` options in :mod:`.blockwise`.  Building the parser imports
neither torch nor napari.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import demo, evaluate, predict, segment, train
from .common import HelpFormatter, cli_words

__all__ = ["build_parser", "main"]

SUBCOMMANDS = (predict, train, segment, evaluate, demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``emseg`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="emseg", description="Segment electron-microscopy volumes (napari-emseg)."
    )
    parser.add_argument("--version", action="version", version=f"napari-emseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter  # every --help shows the defaults
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``emseg`` script; returns the exit code.

    Errors the user can fix (``ValueError``, ``OSError``, ``MemoryError``)
    become one line on stderr and exit code 2; bad options exit through
    argparse (``SystemExit(2)``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("emseg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `emseg evaluate … | head`: the reader has gone
        _silence_stdout()
        return 141
    except (ValueError, OSError, MemoryError) as exc:
        print(f"emseg {args.command}: error: {cli_words(str(exc))}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Send what is left of stdout to /dev/null (no second error when Python flushes it)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. captured in tests)
        pass
