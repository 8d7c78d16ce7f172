"""The npe2 manifest napari loads is the root napari.yaml, and every command imports."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import yaml

ROOT_MANIFEST = Path(__file__).resolve().parents[1] / "napari.yaml"


def test_installed_manifest_equals_root_file():
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover(include_npe1=False)
    manifest = pm.get_manifest("napari-emseg")
    root = yaml.safe_load(ROOT_MANIFEST.read_text())
    assert manifest.name == root["name"] == "napari-emseg"
    installed_ids = sorted(c.id for c in manifest.contributions.commands)
    assert installed_ids == sorted(c["id"] for c in root["contributions"]["commands"])
    shipped = Path(importlib.import_module("napari_emseg").__file__).parent / "napari.yaml"
    assert yaml.safe_load(shipped.read_text()) == root


def test_every_python_name_imports():
    root = yaml.safe_load(ROOT_MANIFEST.read_text())
    commands = root["contributions"]["commands"]
    assert len(commands) >= 7
    for cmd in commands:
        module, _, attr = cmd["python_name"].partition(":")
        obj = getattr(importlib.import_module(module), attr)
        assert callable(obj), cmd["python_name"]


def test_contributions_reference_known_commands():
    root = yaml.safe_load(ROOT_MANIFEST.read_text())
    ids = {c["id"] for c in root["contributions"]["commands"]}
    for section in ("readers", "writers", "sample_data", "widgets"):
        for item in root["contributions"][section]:
            assert item["command"] in ids, (section, item)


def test_npe2_validate():
    exe = Path(sys.executable).with_name("npe2")
    out = subprocess.run([str(exe), "validate", "napari-emseg"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_reader_patterns_are_the_em_formats_only():
    from napari_emseg import io

    root = yaml.safe_load(ROOT_MANIFEST.read_text())
    (reader,) = root["contributions"]["readers"]
    patterns = reader["filename_patterns"]
    em = io.HDF5_SUFFIXES + io.MRC_SUFFIXES + io.ZARR_SUFFIXES
    assert sorted(patterns) == sorted(f"*{s}" for s in em)
    assert reader["accepts_directories"] is True  # zarr stores and slice folders
    # plain images stay with napari's own reader: no catch-all, no TIFF / PNG / JPEG
    assert not {"*", "*.*"} & set(patterns)
    assert not {f"*{s}" for s in io.SLICE_SUFFIXES} & set(patterns)
