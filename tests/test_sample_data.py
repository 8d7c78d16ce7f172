"""Bundled Lucchi++ sample crop."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import tifffile

from napari_emseg._sample_data import load_sample, lucchi_sample


def test_sample_files_are_small_and_shipped_in_package():
    data = files("napari_emseg") / "data"
    sizes = [(data / n).stat().st_size if hasattr(data / n, "stat") else
             len((data / n).read_bytes()) for n in
             ("lucchi_sample_image.tif", "lucchi_sample_mask.tif")]
    assert sum(sizes) <= 2_000_000
    assert (data / "README.md").read_text().count("Casser") >= 1


def test_load_sample_contents():
    image, mask = load_sample()
    assert image.shape == mask.shape == (24, 320, 320)
    assert image.dtype == np.uint8 and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}
    assert 0.02 < mask.mean() < 0.3
    assert image.std() > 10  # real EM texture, not a constant
    # mitochondria are darker than the rest in Lucchi++ EM
    assert image[mask == 1].mean() < image[mask == 0].mean() - 10


def test_sample_matches_source_crop(data_dir):
    image, mask = load_sample()
    crop = (slice(140, 164), slice(32, 352), slice(256, 576))
    src_mask = tifffile.imread(data_dir / "lucchi_pp_train_mask.tif", key=range(140, 164))
    np.testing.assert_array_equal(mask, src_mask[:, crop[1], crop[2]])
    with tifffile.TiffFile(data_dir / "lucchi_pp_train_image.tif") as tif:
        first = tif.pages[140].asarray()
    np.testing.assert_array_equal(image[0], first[32:352, 256:576])


def test_lucchi_sample_layers():
    layers = lucchi_sample()
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    (image, image_meta, _), (labels, labels_meta, _) = layers
    assert image_meta["name"] == "Lucchi++ EM"
    assert "ground truth" in labels_meta["name"]
    assert labels.dtype == np.uint32 and labels.shape == image.shape
    assert image_meta["scale"] == labels_meta["scale"]
    assert np.unique(labels).tolist() == [0, 1]
