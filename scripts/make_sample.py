"""Reproduce the Lucchi++ sample crop shipped in ``src/napari_emseg/data``.

Usage::

    python scripts/make_sample.py [DATA_DIR]

``DATA_DIR`` defaults to ``../shared/data`` (or ``$EMSEG_DATA``) and must hold
``lucchi_pp_train_image.tif`` and ``lucchi_pp_train_mask.tif``. The crop is
z 140:164 (slices held back from training the bundled models, so the demo runs
on data the models have not seen), y 32:352, x 256:576: 24 x 320 x 320 voxels,
five mitochondria, under 2 MB compressed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "src" / "napari_emseg" / "data"
CROP = (slice(140, 164), slice(32, 352), slice(256, 576))


def main(argv: list[str]) -> int:
    default = os.environ.get("EMSEG_DATA") or REPO.parent / "shared" / "data"
    data = Path(argv[0]) if argv else Path(default)
    image = tifffile.imread(data / "lucchi_pp_train_image.tif")[CROP]
    mask = tifffile.imread(data / "lucchi_pp_train_mask.tif")[CROP]
    assert image.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    OUT.mkdir(parents=True, exist_ok=True)
    kwargs = {"compression": "zlib", "compressionargs": {"level": 9},
              "metadata": {"axes": "ZYX"}}
    tifffile.imwrite(OUT / "lucchi_sample_image.tif", image, predictor=True, **kwargs)
    tifffile.imwrite(OUT / "lucchi_sample_mask.tif", mask.astype(np.uint8), **kwargs)
    total = 0
    for name in ("lucchi_sample_image.tif", "lucchi_sample_mask.tif"):
        size = (OUT / name).stat().st_size
        total += size
        print(f"{OUT / name}: {size:,} bytes")
    print(f"shape {image.shape}, mask foreground {mask.mean():.4f}, total {total:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
