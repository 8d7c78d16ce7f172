"""npe2 sample data: a Lucchi++ crop (EM image + mitochondria ground truth).

The crop (z 140:164, y 32:352, x 256:576 of the Lucchi++ training volume,
24 × 320 × 320 voxels) ships inside the package in ``data/``; see
``data/README.md`` for provenance and credits, and ``scripts/make_sample.py``
to rebuild it.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from typing import Any

import numpy as np

#: Voxel size of Lucchi++ (≈ 5 nm isotropic FIB-SEM), in nanometres, ZYX.
SAMPLE_SCALE = (5.0, 5.0, 5.0)
IMAGE_FILE = "lucchi_sample_image.tif"
MASK_FILE = "lucchi_sample_mask.tif"


def _read(name: str) -> np.ndarray:
    import tifffile

    with as_file(files("napari_emseg") / "data" / name) as path:
        return tifffile.imread(path)


def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """Load the bundled Lucchi++ crop.

    Returns
    -------
    image : numpy.ndarray, shape (24, 320, 320), uint8
        EM grey values.
    mask : numpy.ndarray, shape (24, 320, 320), uint8
        Mitochondria ground truth: 1 = mitochondrion, 0 = background.
    """
    return _read(IMAGE_FILE), _read(MASK_FILE)


def lucchi_sample() -> list[tuple[Any, dict, str]]:
    """npe2 sample data: the EM image and its ground-truth mitochondria labels."""
    image, mask = load_sample()
    return [
        (image, {"name": "Lucchi++ EM", "scale": SAMPLE_SCALE}, "image"),
        (
            mask.astype(np.uint32),
            {"name": "Lucchi++ mitochondria (ground truth)", "scale": SAMPLE_SCALE},
            "labels",
        ),
    ]
