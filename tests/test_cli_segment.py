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


# ------------------------------------------------------ neurons from membranes
def test_segment_from_membranes_equals_the_engine(tmp_path, capsys):
    from napari_emseg.neurons import segment_neurons
    from test_neurons import cell_stack, core_pairs

    truth, prob = cell_stack()
    src, out = tmp_path / "membranes.tif", tmp_path / "neurites.tif"
    tifffile.imwrite(src, prob)
    assert main(["segment", str(src), str(out), "--from-membranes", "--quiet"]) == 0
    assert "9 neurites" in capsys.readouterr().out
    lab = read_labels(out)
    np.testing.assert_array_equal(lab, segment_neurons(prob))
    assert len(core_pairs(truth, lab, prob)) == 9  # one id per cell through z

    assert main(["segment", str(src), str(out), "--from-membranes", "--no-track", "--h", "4",
                 "--min-distance", "3", "--min-size", "20", "--threshold", "0.5",
                 "--quiet"]) == 0  # fmt: skip
    expected = segment_neurons(prob, track=False, h=4, min_distance=3, min_size=20,
                               threshold=0.5)
    np.testing.assert_array_equal(read_labels(out), expected)
    assert read_labels(out).max() == 45  # 9 cells x 5 sections, not linked


def test_segment_from_membranes_with_model_keeps_the_engine_threshold(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from napari_emseg.models.zoo import model_info
    from napari_emseg.neurons import segment_neurons
    from test_neurons import cell_stack

    _, prob = cell_stack(nz=3)
    fake = types.ModuleType("napari_emseg.predict")
    fake.predict_volume = lambda volume, model, **kw: prob
    monkeypatch.setitem(sys.modules, "napari_emseg.predict", fake)
    src, out = tmp_path / "raw.tif", tmp_path / "neurites.tif"
    tifffile.imwrite(src, (prob * 200).astype(np.uint8))
    assert main(["segment", str(src), str(out), "--from-membranes", "--model", "membrane-2d",
                 "--quiet"]) == 0  # fmt: skip
    # the model's threshold is tuned for membrane pixels, not for cell interiors
    assert model_info("membrane-2d")["threshold"] != 0.6
    np.testing.assert_array_equal(read_labels(out), segment_neurons(prob))


def test_segment_from_membranes_refuses_what_it_would_ignore(tmp_path, capsys):
    src = tmp_path / "prob.tif"
    tifffile.imwrite(src, np.full((2, 8, 8), 0.2, np.float32))
    out = str(tmp_path / "o.tif")
    assert main(["segment", str(src), out, "--from-membranes", "--zfilter", "3"]) == 2
    assert "--zfilter" in capsys.readouterr().err
    assert main(["segment", str(src), out, "--from-membranes", "--blockwise"]) == 2
    assert "--blockwise" in capsys.readouterr().err
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, np.arange(2 * 8 * 8, dtype=np.uint16).reshape(2, 8, 8) * 10)
    assert main(["segment", str(labels), out, "--from-membranes"]) == 2
    assert "integer" in capsys.readouterr().err


def test_evaluate_segmentation_prints_voi_rand_and_isbi_scores(tmp_path, capsys):
    gt = np.zeros((2, 6, 6), np.uint16)
    gt[:, :, :3], gt[:, :, 3:] = 1, 2
    pred = gt.astype(np.uint32)
    pred[1, :, 3:] = 1  # slice 1: the two cells merged
    a, b, report = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "m.json"
    tifffile.imwrite(a, pred)
    tifffile.imwrite(b, gt)
    assert main(["evaluate", str(a), str(b), "--segmentation", "--per-slice",
                 "--json", str(report)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    for word in ("VOI split", "adapted Rand error", "V_rand", "V_info", "mean"):
        assert word in text
    data = json.loads(report.read_text())
    seg = data["segmentation"]
    # whole volume: s = (3/4, 1/4), t = (1/2, 1/2); joint (1,1) 1/2, (1,2) 1/4, (2,2) 1/4
    sum_p2, sum_s2, sum_t2 = 0.25 + 2 / 16, 9 / 16 + 1 / 16, 0.5
    assert seg["v_rand"]["score"] == pytest.approx(sum_p2 / (0.5 * sum_s2 + 0.5 * sum_t2))
    assert data["per_slice"][0]["v_rand"] == pytest.approx(1.0)


def test_evaluate_detection_in_nm(tmp_path, capsys):
    from test_metrics import _sites

    pred, gt = _sites()
    a, b, report = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "m.json"
    tifffile.imwrite(a, pred)
    tifffile.imwrite(b, gt)
    assert main(["evaluate", str(a), str(b), "--detection", "60", "--spacing", "50", "4", "4",
                 "--json", str(report)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "found within 60 nm: 2 of gt, 2 of pred" in text
    assert "F1 0.6667" in text
    data = json.loads(report.read_text())
    assert data["unit"] == "nm" and data["spacing"] == [50.0, 4.0, 4.0]
    assert data["detection"]["recall"] == pytest.approx(2 / 3)
    assert main(["evaluate", str(a), str(b), "--detection", "60"]) == 0
    captured = capsys.readouterr()
    assert "distances in voxels" in captured.err and "voxels" in captured.out


def test_evaluate_binary_mask_ground_truth_is_split_and_said(tmp_path, capsys, fixtures_dir):
    inst = fixtures_dir / "lucchi_crop_instances.tif"
    mask = fixtures_dir / "lucchi_crop_mask.tif"
    report = tmp_path / "m.json"
    assert main(["evaluate", str(inst), str(mask), "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "ground truth is a binary mask: split into 6 connected components" in text
    assert "objects: pred 6, gt 6" in text
    data = json.loads(report.read_text())
    assert data["instances"]["thresholds"]["0.75"]["ap"] == 1.0
    assert data["notes"] and data["adapted_rand"]["error"] == pytest.approx(0.0, abs=1e-12)


def test_evaluate_empty_ground_truth_rand_is_na(tmp_path, capsys):
    a, b, report = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "m.json"
    pred = np.zeros((2, 8, 8), np.uint16)
    pred[:, 2:5, 2:5] = 3
    tifffile.imwrite(a, pred)
    tifffile.imwrite(b, np.zeros((2, 8, 8), np.uint16))
    assert main(["evaluate", str(a), str(b), "--json", str(report)]) == 0
    assert "adapted Rand error n/a" in capsys.readouterr().out
    assert json.loads(report.read_text())["adapted_rand"]["error"] is None
