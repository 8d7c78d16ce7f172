"""Tests of napari_emseg.metrics against hand-computed values and scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage import metrics as skm

from napari_emseg import metrics as M


def test_class_scores_hand_computed():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 2]])
    s = M.class_scores(pred, gt)
    # class 1: pred 3 px, gt 2 px, both 2 -> IoU 2/3, Dice 4/5
    assert s[1]["iou"] == pytest.approx(2 / 3) and s[1]["dice"] == pytest.approx(0.8)
    # class 2: pred 2, gt 3, both 2 -> IoU 2/3
    assert s[2]["iou"] == pytest.approx(2 / 3)
    # class 0: pred 3, gt 3, both 2 -> IoU 2/4
    assert s[0]["iou"] == pytest.approx(0.5) and s[0]["gt_voxels"] == 3
    absent = M.class_scores(pred, gt, classes=[7])[7]
    assert math.isnan(absent["iou"]) and math.isnan(absent["dice"])


def test_instance_ap_hand_computed():
    gt = np.zeros((10, 10), np.uint16)
    gt[0:4, 0:4] = 1  # 16 px
    gt[6:10, 6:10] = 2  # 16 px
    gt[0:2, 8:10] = 3  # 4 px, missed
    pred = np.zeros((10, 10), np.uint32)
    pred[0:4, 0:3] = 7  # 12 px inside gt 1: IoU 12/16 = 0.75
    pred[6:10, 7:10] = 9  # 12 px inside gt 2: IoU 0.75
    pred[5, 0:3] = 4  # false positive
    r = M.instance_ap(pred, gt, thresholds=(0.5, 0.75, 0.8))
    assert r["n_pred"] == 3 and r["n_gt"] == 3
    t5 = r["thresholds"]["0.5"]
    assert (t5["tp"], t5["fp"], t5["fn"]) == (2, 1, 1)
    assert t5["ap"] == pytest.approx(2 / 4)  # TP / (TP + FP + FN)
    assert t5["precision"] == pytest.approx(2 / 3) and t5["recall"] == pytest.approx(2 / 3)
    assert t5["mean_matched_iou"] == pytest.approx(0.75)
    assert r["thresholds"]["0.75"]["tp"] == 2  # IoU exactly 0.75 counts
    t8 = r["thresholds"]["0.8"]
    assert (t8["tp"], t8["fp"], t8["fn"], t8["ap"]) == (0, 3, 3, 0.0)


def test_instance_ap_one_to_one_matching():
    # one big prediction covering two gt objects: only one can be matched
    gt = np.zeros((4, 10), np.uint8)
    gt[:, 0:5] = 1
    gt[:, 5:10] = 2
    pred = np.ones((4, 10), np.uint8)
    # IoU with each gt object is 20/40 = 0.5
    r = M.instance_ap(pred, gt, thresholds=(0.6,))["thresholds"]["0.6"]
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 2)
    r = M.instance_ap(pred, gt, thresholds=(0.5,))["thresholds"]["0.5"]
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 1)
    # Hungarian maximises the number of matches at low thresholds
    gt2 = np.array([[1, 1, 1, 2, 2, 0]])
    pred2 = np.array([[5, 5, 6, 6, 6, 6]])
    # IoU(5,1)=2/3, IoU(6,1)=1/6, IoU(6,2)=2/4: best = 5-1 and 6-2
    r = M.instance_ap(pred2, gt2, thresholds=(0.1,))["thresholds"]["0.1"]
    assert r["tp"] == 2 and r["mean_matched_iou"] == pytest.approx((2 / 3 + 0.5) / 2)
    empty = M.instance_ap(np.zeros((3, 3), int), np.zeros((3, 3), int))
    assert empty["thresholds"]["0.5"]["ap"] == 1.0


def test_voi_hand_computed():
    gt = np.array([1, 1, 1, 1])
    pred = np.array([1, 1, 2, 2])  # a clean 50/50 split
    split, merge = M.variation_of_information(pred, gt)
    assert split == pytest.approx(1.0) and merge == pytest.approx(0.0)  # 1 bit
    split, merge = M.variation_of_information(gt, pred)  # roles swapped: a merge
    assert split == pytest.approx(0.0) and merge == pytest.approx(1.0)
    assert M.variation_of_information(pred, pred) == pytest.approx((0.0, 0.0))


def test_adapted_rand_hand_computed():
    gt = np.array([1, 1, 1, 1])
    pred = np.array([1, 1, 2, 2])
    # pairs together in gt: 4*3=12 (ordered), in pred: 2+2=4, in both: 4
    err, prec, rec = M.adapted_rand_error(pred, gt)
    assert prec == pytest.approx(4 / 4) and rec == pytest.approx(4 / 12)
    assert err == pytest.approx(1 - 2 * 4 / (4 + 12))
    assert M.adapted_rand_error(gt, gt)[0] == pytest.approx(0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voi_and_rand_match_skimage(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 6, (5, 12, 12)).astype(np.uint16)
    pred = (gt + (rng.random(gt.shape) < 0.2) * rng.integers(1, 4, gt.shape)).astype(np.uint32)
    split, merge = M.variation_of_information(pred, gt)
    sk = skm.variation_of_information(gt, pred)  # (H(pred|gt), H(gt|pred))
    assert (split, merge) == pytest.approx(tuple(sk))
    sk_ign = skm.variation_of_information(gt, pred, ignore_labels=[0])
    assert M.variation_of_information(pred, gt, ignore_labels=[0]) == pytest.approx(tuple(sk_ign))
    err, prec, rec = M.adapted_rand_error(pred, gt)
    sk_err, sk_a, sk_b = skm.adapted_rand_error(gt, pred)
    assert err == pytest.approx(sk_err)
    # scikit-image's second value divides by the pairs within gt, the third by
    # those within pred: our (precision, recall) are its (third, second)
    assert (prec, rec) == pytest.approx((sk_b, sk_a))
    err0 = M.adapted_rand_error(pred, gt, ignore_labels=())[0]
    assert err0 == pytest.approx(skm.adapted_rand_error(gt, pred, ignore_labels=())[0])


def test_evaluate_volume_and_per_slice():
    gt = np.zeros((3, 10, 10), np.uint16)
    gt[:, 2:6, 2:6] = 1
    pred = gt.astype(np.uint32) * 4
    pred[2] = 0  # last slice missed
    res = M.evaluate(pred, gt, per_slice=True)
    assert res["shape"] == [3, 10, 10]
    assert res["foreground"]["iou"] == pytest.approx(2 / 3)
    assert res["instances"]["thresholds"]["0.5"]["ap"] == 1.0  # IoU 2/3 >= .5
    assert res["instances"]["thresholds"]["0.75"]["ap"] == 0.0
    rows = res["per_slice"]
    assert [r["z"] for r in rows] == [0, 1, 2]
    assert rows[0]["ap@0.5"] == 1.0 and rows[0]["are"] == pytest.approx(0.0)
    assert rows[2]["ap@0.5"] == 0.0 and rows[2]["iou"] == 0.0
    assert res["voi"]["total"] == pytest.approx(res["voi"]["split"] + res["voi"]["merge"])
    sem = M.evaluate(pred > 0, gt > 0, semantic=True, per_slice=True)
    assert sem["classes"]["1"]["iou"] == pytest.approx(2 / 3)
    assert sem["per_slice"][2]["iou/1"] == 0.0
    import json

    json.dumps(res)  # JSON-ready


def test_inputs_checked_and_not_mutated():
    a = np.array([[1, 2], [0, 2]], np.uint32)
    before = a.copy()
    M.evaluate(a, a)
    np.testing.assert_array_equal(a, before)
    with pytest.raises(ValueError, match="shape"):
        M.instance_ap(a, np.zeros((3, 2), np.uint32))
    with pytest.raises(ValueError, match="integer"):
        M.variation_of_information(a.astype(float), a)
    with pytest.raises(ValueError, match="negative"):
        M.adapted_rand_error(np.array([-1, 0]), np.array([0, 0]))
    e = np.zeros((0, 4), np.uint32)
    assert M.adapted_rand_error(e, e) == (0.0, 1.0, 1.0)
    assert M.variation_of_information(e, e) == (0.0, 0.0)


def test_fixture_identical_labels_score_perfect(fixtures_dir):
    tifffile = pytest.importorskip("tifffile")
    inst = tifffile.imread(fixtures_dir / "lucchi_crop_instances.tif")
    # relabelled copy (ids permuted) must still be perfect
    perm = np.array([0, 6, 5, 4, 3, 2, 1], np.uint32)[inst]
    res = M.evaluate(perm, inst)
    assert res["instances"]["thresholds"]["0.75"]["ap"] == 1.0
    assert res["voi"]["total"] == pytest.approx(0.0, abs=1e-12)
    assert res["adapted_rand"]["error"] == pytest.approx(0.0, abs=1e-12)


def test_boundary_f1_tolerance():
    gt = np.zeros((2, 40, 40), bool)
    gt[:, 20, 5:35] = True  # a horizontal membrane in each slice
    near = np.roll(gt, 1, axis=1)  # one pixel off
    far = np.roll(gt, 4, axis=1)  # four pixels off
    assert M.boundary_f1(gt, gt)["f1"] == 1.0
    assert M.boundary_f1(near, gt, tolerance=0)["f1"] == 0.0  # strict pixel F1
    assert M.boundary_f1(near, gt, tolerance=2)["f1"] == 1.0
    assert M.boundary_f1(far, gt, tolerance=2)["f1"] == 0.0
    # plain pixel F1 equals the Dice of the boundary class
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 32, 32)) > 0.7
    dice = M.class_scores(a.astype(np.uint8), b.astype(np.uint8), classes=[1])[1]["dice"]
    assert M.boundary_f1(a, b, tolerance=0)["f1"] == pytest.approx(dice)


def test_boundary_f1_partial_and_empty():
    gt = np.zeros((30, 30), bool)
    gt[10, :] = True
    pred = gt.copy()
    pred[:, 20] = True  # 30 true + 29 extra pixels, of which 2 lie within 2 px of gt
    r = M.boundary_f1(pred, gt, tolerance=2)
    assert r["recall"] == 1.0
    assert r["precision"] == pytest.approx((30 + 4) / 59)
    assert M.boundary_f1(np.zeros_like(gt), gt)["f1"] == 0.0
    assert math.isnan(M.boundary_f1(np.zeros_like(gt), np.zeros_like(gt))["f1"])
    with pytest.raises(ValueError, match="2D or 3D"):
        M.boundary_f1(np.zeros(5, bool), np.zeros(5, bool))


def test_evaluate_boundary_mode_per_slice():
    gt = np.zeros((3, 20, 20), np.uint8)
    gt[:, 10, :] = 1
    pred = gt.copy()
    pred[2] = np.roll(gt[2], 5, axis=0)  # last slice far off
    out = M.evaluate(pred, gt, boundary=1, per_slice=True)
    assert set(out) == {"shape", "boundary", "per_slice"}
    assert out["boundary"]["f1"] == pytest.approx(2 / 3)
    assert [row["f1"] for row in out["per_slice"]] == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="one mode"):
        M.evaluate(pred, gt, boundary=1, semantic=True)
