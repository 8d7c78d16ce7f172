"""Tests of ``emseg segment`` and ``emseg evaluate``."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")

from napari_emseg.cli import main  # noqa: E402


def discs_stack(nz=4) -> np.ndarray:
    yy, xx = np.mgrid[:64, :96]
    m = ((yy - 32) ** 2 + (xx - 30) ** 2 < 225) | ((yy - 32) ** 2 + (xx - 58) ** 2 < 225)
    return np.stack([m] * nz)


def read_labels(path):
    from napari_emseg.io import read_volume

    return np.asarray(read_volume(path))


def test_segment_watershed_tracked(tmp_path, capsys):
    prob = np.where(discs_stack(), 0.9, 0.1).astype(np.float32)
    src, out = tmp_path / "prob.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, prob)
    rc = main(["segment", str(src), str(out), "--dims", "2", "--track", "--zfilter", "3", "--quiet"])
    assert rc == 0
    lab = read_labels(out)
    assert lab.shape == prob.shape and lab.max() == 2
    assert len({int(lab[z, 32, 30]) for z in range(4)}) == 1  # one id through z
    assert "2 objects" in capsys.readouterr().out


def test_segment_components_uint8_and_otsu(tmp_path):
    prob = (np.where(discs_stack(), 0.8, 0.2) * 255).astype(np.uint8)
    src, out = tmp_path / "prob.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, prob)
    assert main(["segment", str(src), str(out), "--method", "components", "--dims", "3",
                 "--threshold", "otsu", "--quiet"]) == 0  # fmt: skip
    assert read_labels(out).max() == 1


def test_segment_with_model_calls_predict(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from napari_emseg.models import zoo

    raw = (discs_stack() * 200 + 20).astype(np.uint8)  # "EM" volume
    seen = {}
    reads = []
    real_read = zoo.read_checkpoint
    monkeypatch.setattr(zoo, "read_checkpoint", lambda p: reads.append(p) or real_read(p))

    def fake_predict_volume(volume, model, **kw):
        seen["model"], seen["shape"] = model, np.shape(volume)
        return (np.asarray(volume) > 100).astype(np.float32)

    fake = types.ModuleType("napari_emseg.predict")
    fake.predict_volume = fake_predict_volume
    monkeypatch.setitem(sys.modules, "napari_emseg.predict", fake)
    src, out = tmp_path / "raw.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, raw)
    assert main(["segment", str(src), str(out), "--model", "mito-2d", "--quiet"]) == 0
    assert seen["shape"] == raw.shape and seen["model"].meta["name"] == "mito-2d"
    assert reads == ["mito-2d"]  # the checkpoint is read once (threshold + prediction)
    assert read_labels(out).max() == 2 * 4  # 2D instances, not tracked


@pytest.mark.parametrize(("extra", "objects"), [([], 0), (["--threshold", "0.5"], 8)])
def test_segment_with_model_uses_its_tuned_threshold(tmp_path, monkeypatch, extra, objects):
    pytest.importorskip("torch")
    from napari_emseg.models import zoo

    model = zoo.build_model(dict(dims=2, depth=2, width=4), {"threshold": 0.7})
    ckpt = zoo.save_checkpoint(model, tmp_path / "tuned.pt")
    fake = types.ModuleType("napari_emseg.predict")
    fake.predict_volume = lambda volume, model, **kw: np.where(
        np.asarray(volume) > 100, 0.6, 0.1).astype(np.float32)  # below 0.7, above 0.5
    monkeypatch.setitem(sys.modules, "napari_emseg.predict", fake)
    src, out = tmp_path / "raw.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, (discs_stack() * 200 + 20).astype(np.uint8))
    assert main(["segment", str(src), str(out), "--model", str(ckpt), "--quiet", *extra]) == 0
    assert read_labels(out).max() == objects


def test_segment_rejects_raw_em_without_model(tmp_path, capsys):
    src = tmp_path / "raw.tif"
    tifffile.imwrite(src, np.full((2, 8, 8), 3.5, np.float32))
    assert main(["segment", str(src), str(tmp_path / "o.tif")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "missing.tif"), str(tmp_path / "o.tif")]) == 2
    assert main(["segment", str(src), str(tmp_path / "o.tif"), "--threshold", "high"]) == 2


def test_evaluate_table_and_json(tmp_path, capsys, fixtures_dir):
    gt_path = fixtures_dir / "lucchi_crop_instances.tif"
    mask_path = fixtures_dir / "lucchi_crop_mask.tif"
    seg = tmp_path / "seg.tif"
    assert main(["segment", str(mask_path), str(seg), "--method", "components", "--dims", "3",
                 "--quiet"]) == 0  # fmt: skip
    report = tmp_path / "m" / "metrics.json"
    capsys.readouterr()
    assert main(["evaluate", str(seg), str(gt_path), "--json", str(report), "--per-slice"]) == 0
    text = capsys.readouterr().out
    assert "objects: pred 6, gt 6" in text and "VOI" in text and "per slice" in text
    data = json.loads(report.read_text())
    assert data["instances"]["thresholds"]["0.5"]["ap"] == 1.0
    assert data["instances"]["thresholds"]["0.75"]["ap"] == 1.0
    assert data["adapted_rand"]["error"] == pytest.approx(0.0, abs=1e-12)
    assert len(data["per_slice"]) == 16


def test_evaluate_semantic_and_shape_mismatch(tmp_path, capsys):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    gt = np.zeros((2, 8, 8), np.uint8)
    gt[:, :4] = 1
    pred = np.zeros((2, 8, 8), np.uint8)
    pred[:, :2] = 1
    tifffile.imwrite(a, pred)
    tifffile.imwrite(b, gt)
    assert main(["evaluate", str(a), str(b), "--semantic"]) == 0
    out = capsys.readouterr().out
    assert "0.5000" in out  # class 1 IoU = 16 / 32
    tifffile.imwrite(b, np.zeros((2, 8, 9), np.uint8))
    assert main(["evaluate", str(a), str(b)]) == 2
    assert "shape" in capsys.readouterr().err


def test_evaluate_boundary_map(tmp_path, capsys):
    gt = np.zeros((2, 32, 32), np.uint8)
    gt[:, 16, :] = 1  # one membrane line per slice
    pred = np.roll(gt, 1, axis=1)  # one pixel off
    a, b, report = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "m.json"
    tifffile.imwrite(a, pred)
    tifffile.imwrite(b, gt)
    assert main(["evaluate", str(a), str(b), "--boundary", "2", "--per-slice",
                 "--json", str(report)]) == 0
    assert "boundary F1 within 2 px 1.0000" in capsys.readouterr().out
    data = json.loads(report.read_text())["boundary"]
    assert data["pixel_f1"] == 0.0 and data["f1"] == 1.0
    assert data["pixel_error"] == pytest.approx(2 * 64 / 2048)  # 32 missed + 32 extra a slice
    assert main(["evaluate", str(a), str(b), "--boundary", "-1"]) == 2
    assert "tolerance" in capsys.readouterr().err
