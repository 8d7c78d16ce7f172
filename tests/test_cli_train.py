"""``emseg train`` writes checkpoints that load, from dense and painted labels."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

pytest.importorskip("torch")

from napari_emseg.cli import main  # noqa: E402
from napari_emseg.models.zoo import load_model  # noqa: E402

TINY = ["--steps", "4", "--patch", "64,64", "--width", "4", "--depth", "2",
        "--batch-size", "2"]


@pytest.fixture
def crop_files(fixtures_dir):
    return fixtures_dir / "lucchi_crop_image.tif", fixtures_dir / "lucchi_crop_mask.tif"


def test_train_dense_then_fine_tune_painted(crop_files, tmp_path, capsys):
    image, mask = crop_files
    out = tmp_path / "dense.pt"
    assert main(["train", str(image), str(mask), str(out), *TINY]) == 0
    model = load_model(out)
    assert model.config["width"] == 4 and model.meta["training"]["steps"] == 4
    painted = np.zeros(tifffile.imread(mask).shape, np.uint8)
    painted[2, :, :10] = 1
    painted[2, :, 60:70] = 2
    tifffile.imwrite(tmp_path / "painted.tif", painted)
    out2 = tmp_path / "ft.pt"
    assert main(["train", str(image), str(tmp_path / "painted.tif"), str(out2), "--from",
                 str(out), "--painted", "--steps", "3", "--patch", "64,64"]) == 0
    tuned = load_model(out2)
    assert tuned.meta["training"]["painted_voxels"] == int((painted > 0).sum())
    from napari_emseg.train import FINE_TUNE_LR

    used = tuned.meta["training"]["config"]
    assert used["lr"] == FINE_TUNE_LR  # --from: the fine-tuning rate of a 2D model
    assert used["batch_size"] == 4  # and its fine-tuning batch
    printed = capsys.readouterr().out
    assert "checkpoint" in printed
    assert f"threshold {tuned.meta['threshold']:.2f} from painted voxels" in printed


def test_train_reports_clear_errors(crop_files, tmp_path, capsys):
    image, _ = crop_files
    empty = tmp_path / "empty.tif"
    tifffile.imwrite(empty, np.zeros((16, 128, 128), np.uint8))
    assert main(["train", str(image), str(empty), str(tmp_path / "x.pt"), *TINY]) == 2
    assert "single class" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.tif"), str(empty), str(tmp_path / "y.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()
