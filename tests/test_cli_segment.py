"""Tests of ``emseg segment`` and ``emseg evaluate``."""

from __future__ import annotations

import json
import sys

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


def fake_predict(monkeypatch, predict) -> None:
    """Make ``emseg segment --model`` predict with ``predict(volume, model, **kw)``."""
    def adapted(volume, model, *, voxel_size=None, on_info=None, **kw):
        return predict(volume, model, **kw), {}

    monkeypatch.setattr("napari_emseg.cli.segment.predict_adapted", adapted)


def test_segment_with_model_calls_predict_and_uses_its_settings(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from napari_emseg.models import zoo
    from napari_emseg.postprocess import segment, segment_defaults

    raw = (discs_stack(nz=8) * 200 + 20).astype(np.uint8)  # "EM" volume
    seen = {}
    reads = []
    real_read = zoo.read_checkpoint
    monkeypatch.setattr(zoo, "read_checkpoint", lambda p: reads.append(p) or real_read(p))

    def predict_volume(volume, model, **kw):
        seen["model"], seen["shape"] = model, np.shape(volume)
        return (np.asarray(volume) > 100).astype(np.float32)

    fake_predict(monkeypatch, predict_volume)
    src, out = tmp_path / "raw.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, raw)
    assert main(["segment", str(src), str(out), "--model", "mito-2d", "--quiet"]) == 0
    assert seen["shape"] == raw.shape and seen["model"].meta["name"] == "mito-2d"
    assert reads == ["mito-2d"]  # the checkpoint is read once (settings + prediction)
    expected = segment((raw > 100).astype(np.float32), segment_defaults(seen["model"].meta))
    np.testing.assert_array_equal(read_labels(out), expected.labels)
    assert read_labels(out).max() == 1  # 3D by default: one object, not 2 per slice


def test_segment_takes_the_model_settings_and_flags_win(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from napari_emseg.models import zoo
    from napari_emseg.postprocess import segment

    meta = {"threshold": 0.7, "segment": {"dims": 2, "track": True, "zfilter": 0,
                                          "min_size": 100, "h": 3.0}}
    ckpt = zoo.save_checkpoint(zoo.build_model(dict(dims=2, depth=2, width=4), meta),
                               tmp_path / "tuned.pt")
    prob = np.where(discs_stack(), 0.8, 0.1).astype(np.float32)
    fake_predict(monkeypatch, lambda volume, model, **kw: prob)
    src, out = tmp_path / "raw.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, (discs_stack() * 200 + 20).astype(np.uint8))
    assert main(["segment", str(src), str(out), "--model", str(ckpt)]) == 0
    assert "threshold 0.7 (tuned for" in capsys.readouterr().err
    expected = segment(prob, dims=2, track=True, zfilter=0, min_size=100, h=3.0,
                       threshold=0.7).labels
    np.testing.assert_array_equal(read_labels(out), expected)
    assert expected.max() == 2  # two discs, each one id through z
    # given flags replace the model's: --dims 3 also turns its tracking off
    assert main(["segment", str(src), str(out), "--model", str(ckpt), "--dims", "3",
                 "--min-size", "5000", "--quiet", "--overwrite"]) == 0  # fmt: skip
    np.testing.assert_array_equal(read_labels(out), segment(
        prob, dims=3, zfilter=0, min_size=5000, h=3.0, threshold=0.7).labels)


@pytest.mark.parametrize(("extra", "objects"), [([], 0), (["--threshold", "0.5"], 8)])
def test_segment_with_model_uses_its_tuned_threshold(tmp_path, monkeypatch, extra, objects):
    pytest.importorskip("torch")
    from napari_emseg.models import zoo

    model = zoo.build_model(dict(dims=2, depth=2, width=4), {"threshold": 0.7})
    ckpt = zoo.save_checkpoint(model, tmp_path / "tuned.pt")
    fake_predict(monkeypatch, lambda volume, model, **kw: np.where(
        np.asarray(volume) > 100, 0.6, 0.1).astype(np.float32))  # below 0.7, above 0.5
    src, out = tmp_path / "raw.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, (discs_stack() * 200 + 20).astype(np.uint8))
    assert main(["segment", str(src), str(out), "--model", str(ckpt), "--quiet", "--dims", "2",
                 "--min-size", "0", *extra]) == 0  # fmt: skip
    assert read_labels(out).max() == objects


def test_segment_rejects_raw_em_without_model(tmp_path, capsys):
    src = tmp_path / "raw.tif"
    tifffile.imwrite(src, np.full((2, 8, 8), 3.5, np.float32))
    assert main(["segment", str(src), str(tmp_path / "o.tif")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "missing.tif"), str(tmp_path / "o.tif")]) == 2
    with pytest.raises(SystemExit) as info:  # refused at parse time
        main(["segment", str(src), str(tmp_path / "o.tif"), "--threshold", "high"])
    assert info.value.code == 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_segment_refuses_a_label_image(tmp_path, capsys, dtype):
    labels = np.zeros((4, 64, 96), dtype)
    labels[discs_stack()] = 1
    labels[:, 40:, :] *= 3  # ids 1 and 3
    src, out = tmp_path / "labels.tif", tmp_path / "o.tif"
    tifffile.imwrite(src, labels)
    assert main(["segment", str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "label image" in err and "pass probabilities" in err and err.count("\n") == 1
    assert not out.exists()


def test_segment_track_implies_2d_and_channel_picks_a_class(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from napari_emseg.models.zoo import model_info
    from napari_emseg.postprocess import segment, segment_defaults

    prob = np.where(discs_stack(nz=6), 0.9, 0.1).astype(np.float32)
    fake_predict(monkeypatch, lambda volume, model, **kw: np.stack([1 - prob, prob]))
    src, out = tmp_path / "raw.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, (discs_stack(nz=6) * 200 + 20).astype(np.uint8))
    run = ["segment", str(src), str(out), "--model", "mito-2d", "--quiet", "--threshold", "0.5"]
    assert main(run) == 2
    assert "2 class channels" in capsys.readouterr().err
    assert main([*run, "--channel", "1", "--track"]) == 0
    settings = segment_defaults(model_info("mito-2d"))
    np.testing.assert_array_equal(
        read_labels(out), segment(prob, settings, dims=2, track=True, threshold=0.5).labels)
    assert main([*run, "--channel", "1", "--dims", "3", "--track"]) == 2
    assert "--dims 2" in capsys.readouterr().err


def test_readme_examples_on_the_sample_give_its_mitochondria(tmp_path, capsys):
    """``emseg segment probs.tif instances.tif [--method watershed --dims 2 --track]``."""
    from scipy import ndimage as ndi

    from napari_emseg._sample_data import SAMPLE_SCALE, load_sample
    from napari_emseg.io import write_volume

    _, mask = load_sample()  # 5 mitochondria
    prob = ndi.gaussian_filter(mask.astype(np.float32), sigma=(0, 2, 2))
    src, out = tmp_path / "probs.tif", tmp_path / "instances.tif"
    write_volume(src, prob, voxel_size=SAMPLE_SCALE)
    assert main(["segment", str(src), str(out), "--quiet"]) == 0
    assert read_labels(out).max() == 5
    assert main(["segment", str(src), str(out), "--method", "watershed", "--dims", "2",
                 "--track", "--quiet", "--overwrite"]) == 0  # fmt: skip
    assert 5 <= read_labels(out).max() <= 10
    sizes = np.bincount(read_labels(out).ravel())[1:]
    assert sizes.min() >= 2000


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
                 "--quiet", "--overwrite"]) == 0  # fmt: skip
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
    fake_predict(monkeypatch, lambda volume, model, **kw: prob)
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


def test_segment_keeps_the_input_voxel_size(tmp_path):
    from napari_emseg.io import read_voxel_size, write_volume

    prob = np.where(discs_stack(), 0.9, 0.1).astype(np.float32)
    src, out = tmp_path / "prob.tif", tmp_path / "labels.zarr"
    write_volume(src, prob, voxel_size=(40.0, 4.0, 4.0))
    assert main(["segment", str(src), str(out), "--dims", "2", "--quiet"]) == 0
    assert read_voxel_size(out) == (40.0, 4.0, 4.0)


def test_segment_min_distance_is_never_truncated(tmp_path, capsys):
    prob = np.where(discs_stack(), 0.9, 0.1).astype(np.float32)
    src, out = tmp_path / "prob.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, prob)
    assert main(["segment", str(src), str(out), "--min-distance", "2.5", "--quiet"]) == 2
    assert "--min-distance must be a whole number of pixels, got 2.5" in capsys.readouterr().err
    assert not out.exists()
    assert main(["segment", str(src), str(out), "--min-distance", "3", "--seed-method", "peaks",
                 "--quiet"]) == 0  # fmt: skip


def test_evaluate_json_needs_overwrite(tmp_path, capsys):
    a, report = tmp_path / "a.tif", tmp_path / "m.json"
    tifffile.imwrite(a, discs_stack().astype(np.uint16))
    report.write_text("mine")
    assert main(["evaluate", str(a), str(a), "--json", str(report)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert report.read_text() == "mine"
    assert main(["evaluate", str(a), str(a), "--json", str(report), "--overwrite"]) == 0
    assert json.loads(report.read_text())["foreground"]["iou"] == 1.0


@pytest.mark.parametrize("command", ["", "predict", "train", "segment", "evaluate", "demo"])
def test_help_of_every_command_through_python_m(command):
    import subprocess

    argv = [sys.executable, "-m", "napari_emseg.cli", *([command] if command else []), "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: emseg") and not done.stderr


def test_blockwise_names_the_steps_it_skips(tmp_path, capsys):
    import tifffile

    src = tmp_path / "prob.tif"
    tifffile.imwrite(src, discs_stack().astype(np.float32))
    out = tmp_path / "labels.zarr"
    assert main(["segment", str(src), str(out), "--blockwise", "--block", "4,64,64"]) == 0
    err = capsys.readouterr().err
    assert "skips the z-median filter 5, size filter (2000 voxels)" in err
    assert main(["segment", str(src), str(tmp_path / "b.zarr"), "--blockwise", "--zfilter",
                 "0", "--min-size", "0", "--block", "4,64,64"]) == 0
    assert "skips" not in capsys.readouterr().err


def test_segment_with_model_predicts_as_emseg_predict_does(tmp_path, capsys):
    """Same probabilities as ``emseg predict`` (voxel size, resampling), then segmented."""
    torch = pytest.importorskip("torch")
    from napari_emseg.models import zoo

    torch.manual_seed(0)
    model = zoo.build_model(dict(dims=2, in_channels=1, out_channels=1, depth=2, width=4),
                            {"name": "tiny", "patch": [64, 64], "voxel_size_nm": [10, 10, 10]})
    ckpt = zoo.save_checkpoint(model, tmp_path / "tiny10nm.pt")
    raw = (discs_stack(nz=3) * 150 + 40).astype(np.uint8)
    src = tmp_path / "raw.tif"
    tifffile.imwrite(src, raw)
    common = ["--voxel-size", "10,5,5"]
    assert main(["predict", str(src), str(tmp_path / "p.tif"), "--model", str(ckpt),
                 "--quiet", *common]) == 0
    assert main(["segment", str(tmp_path / "p.tif"), str(tmp_path / "a.tif"),
                 "--threshold", "0.5", "--min-size", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["segment", str(src), str(tmp_path / "b.tif"), "--model", str(ckpt),
                 "--threshold", "0.5", "--min-size", "0", *common]) == 0
    assert "resampled to the model's voxel size" in capsys.readouterr().err
    np.testing.assert_array_equal(read_labels(tmp_path / "b.tif"), read_labels(tmp_path / "a.tif"))
    # probabilities given with --model: predicted as asked, with a warning
    assert main(["segment", str(tmp_path / "p.tif"), str(tmp_path / "c.tif"), "--model",
                 str(ckpt), "--min-size", "0"]) == 0
    assert "like probabilities" in capsys.readouterr().err


def test_segment_says_what_the_size_filter_removed(tmp_path, capsys):
    prob = np.zeros((3, 64, 96), np.float32)
    prob[:, 5:25, 5:25] = 0.9
    prob[:, 40:44, 40:44] = 0.9
    src = tmp_path / "p.tif"
    tifffile.imwrite(src, prob)
    assert main(["segment", str(src), str(tmp_path / "l.tif"), "--method", "components",
                 "--dims", "3", "--zfilter", "0", "--min-size", "100", "--quiet"]) == 0
    assert "1 objects (1 smaller ones removed by --min-size 100)" in capsys.readouterr().out
    assert main(["segment", str(src), str(tmp_path / "m.tif"), "--method", "components",
                 "--dims", "3", "--zfilter", "0", "--min-size", "5000", "--quiet"]) == 0
    assert ("0 objects (2 smaller ones removed by --min-size 5000; lower it to keep them)"
            in capsys.readouterr().out)


def test_segment_fits_the_defaults_to_thick_sections_unless_given(tmp_path, capsys):
    from napari_emseg.io import write_volume
    from test_postprocess import short_objects

    src = tmp_path / "p.tif"
    write_volume(src, short_objects(), voxel_size=(50.0, 4.0, 4.0))
    assert main(["segment", str(src), str(tmp_path / "a.tif")]) == 0
    out = capsys.readouterr()
    assert "z-filter 5 → off, min size 2000 → 160 voxels" in out.err
    assert "2 objects" in out.out and read_labels(tmp_path / "a.tif").max() == 2
    # a value given stays: a z-median of 5 sections erases the 2-section objects
    assert main(["segment", str(src), str(tmp_path / "b.tif"), "--zfilter", "5"]) == 0
    out = capsys.readouterr()
    assert "min size 2000 → 160 voxels" in out.err and "z-filter" not in out.err
    assert read_labels(tmp_path / "b.tif").max() == 0
