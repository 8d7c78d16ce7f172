"""Command line: ``emseg predict|train|segment|evaluate|demo``.

Each sub-command lives in its own ``_cli_*`` module with a ``register``
function; heavy imports happen inside the command functions.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("_cli_predict", "_cli_train", "_cli_segment", "_cli_demo")


def build_parser() -> argparse.ArgumentParser:
    """The ``emseg`` argument parser with every available sub-command."""
    from . import __version__
    from ._cli_common import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="emseg", description="Segment electron-microscopy volumes (napari-emseg)."
    )
    parser.add_argument("--version", action="version", version=f"napari-emseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"napari_emseg.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"napari_emseg.{name}":
                continue
            raise
        module.register(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter  # every --help shows the defaults
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``emseg`` script; returns the exit code."""
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
    except (ValueError, OSError, MemoryError) as exc:
        from ._cli_common import cli_words

        print(f"emseg {args.command}: error: {cli_words(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
