"""``emseg demo`` runs end to end and writes its outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

pytest.importorskip("torch")

from napari_emseg._sample_data import SAMPLE_SCALE, load_sample  # noqa: E402
from napari_emseg.cli import main  # noqa: E402
from napari_emseg.io.voxel import read_voxel_size  # noqa: E402
from napari_emseg.models.zoo import build_model, list_models, save_checkpoint  # noqa: E402


def test_demo_writes_labels_probabilities_and_overview(tmp_path, capsys):
    model = build_model(dict(dims=2, in_channels=3, depth=2, width=4), {"context": 1})
    ckpt = save_checkpoint(model, tmp_path / "tiny.pt")
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(ckpt), "--out", str(out)]) == 0
    image, _ = load_sample()
    labels = tifffile.imread(out / "instances.tif")
    prob = tifffile.imread(out / "probabilities.tif")
    assert labels.shape == prob.shape == image.shape
    assert read_voxel_size(out / "instances.tif") == read_voxel_size(out / "probabilities.tif") \
        == SAMPLE_SCALE
    assert prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objects"] == len(np.unique(labels)) - 1
    assert (out / "overview.png").stat().st_size > 10_000
    assert str(out.resolve()) in capsys.readouterr().out


@pytest.mark.skipif("mito-2d" not in list_models(), reason="bundled mito-2d not trained yet")
def test_demo_with_bundled_model_finds_mitochondria(tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["scores_vs_ground_truth"]["foreground"]["iou"] > 0.6


def test_demo_unknown_model_is_a_clean_error(tmp_path, capsys):
    assert main(["demo", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_demo_show_without_a_display_is_one_line(tmp_path, monkeypatch, capsys):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    out = tmp_path / "demo"
    assert main(["demo", "--show", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--show needs a display" in err and "DISPLAY" in err
    assert not out.exists()  # nothing was computed or written
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert main(["demo", "--show", "--out", str(out)]) == 2
    assert "QT_QPA_PLATFORM=offscreen" in capsys.readouterr().err


def test_demo_keeps_earlier_results_without_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}')
    assert main(["demo", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
