"""Importing the package (and the CLI parser) stays light: no torch, no Qt."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "napari", "qtpy", "PyQt5", "PySide2", "PySide6")


def _loaded_after(code: str) -> list[str]:
    probe = (
        f"import sys; {code}; "
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_import_package_is_light():
    assert _loaded_after("import napari_emseg") == []


def test_cli_parser_is_light():
    assert _loaded_after("from napari_emseg.cli import build_parser; build_parser()") == []


def test_engine_modules_import_no_qt():
    code = ("import napari_emseg.io, napari_emseg.postprocess, napari_emseg.tracking, "
            "napari_emseg.metrics, napari_emseg.train, napari_emseg.predict, "
            "napari_emseg.models.zoo")
    loaded = _loaded_after(code)
    assert not [m for m in loaded if m != "torch"], loaded
