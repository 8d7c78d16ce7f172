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
    assert all(math.isnan(v) for v in M.adapted_rand_error(e, e))  # n/a, not perfect
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


# ------------------------------------------------- neurons: V_rand / V_info
def test_v_rand_v_info_clean_split_hand_computed():
    gt = np.array([1, 1, 1, 1])
    pred = np.array([1, 1, 2, 2])  # one cell cut in two halves
    r = M.foreground_restricted_scores(pred, gt)
    # p = (1/2, 1/2): sum p^2 = 1/2, sum s^2 = 1/2, sum t^2 = 1
    assert r["v_rand"]["split"] == pytest.approx(0.5)
    assert r["v_rand"]["merge"] == pytest.approx(1.0)
    assert r["v_rand"]["score"] == pytest.approx(0.5 / (0.25 + 0.5))
    # H(S) = 1 bit, H(T) = 0, I = 0: nothing merged, all information split
    assert r["v_info"]["split"] == pytest.approx(0.0)
    assert r["v_info"]["merge"] == pytest.approx(1.0)
    assert r["v_info"]["score"] == pytest.approx(0.0)
    perfect = M.foreground_restricted_scores(pred * 3, pred)
    assert all(v == pytest.approx(1.0) for k in perfect for v in perfect[k].values())


def test_v_rand_v_info_with_backgrounds_hand_computed():
    gt = np.array([0, 1, 1, 1, 2, 2])  # first voxel: gt background, left out
    pred = np.array([5, 5, 5, 0, 7, 7])  # fourth voxel: pred background, a singleton
    r = M.foreground_restricted_scores(pred, gt)
    # 5 voxels; joint cells (5,1): 2, singleton: 1, (7,2): 2
    sum_p2 = (4 + 1 + 4) / 25
    sum_s2 = (4 + 1 + 4) / 25
    sum_t2 = (9 + 4) / 25
    assert r["v_rand"]["split"] == pytest.approx(sum_p2 / sum_t2)  # 9/13
    assert r["v_rand"]["merge"] == pytest.approx(sum_p2 / sum_s2)  # 1
    assert r["v_rand"]["score"] == pytest.approx(sum_p2 / (0.5 * sum_s2 + 0.5 * sum_t2))  # 9/11
    h_s = -(2 * 0.4 * math.log2(0.4) + 0.2 * math.log2(0.2))
    h_t = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    info = h_s + h_t - h_s  # every pred object lies in one gt object: H(S,T) = H(S)
    assert r["v_info"]["split"] == pytest.approx(info / h_s)
    assert r["v_info"]["merge"] == pytest.approx(1.0)
    assert r["v_info"]["score"] == pytest.approx(info / (0.5 * h_s + 0.5 * h_t))


def test_v_scores_merge_hand_computed():
    gt = np.array([[1, 1, 2], [2, 3, 3]])
    pred = np.ones((2, 3), np.uint8)  # everything merged into one object
    r = M.foreground_restricted_scores(pred, gt)
    # t = (1/3, 1/3, 1/3), s = (1): sum p^2 = sum t^2 = 1/3, sum s^2 = 1
    assert r["v_rand"]["split"] == pytest.approx(1.0)
    assert r["v_rand"]["merge"] == pytest.approx(1 / 3)
    assert r["v_rand"]["score"] == pytest.approx((1 / 3) / (0.5 + 1 / 6))
    assert r["v_info"]["merge"] == pytest.approx(0.0) and r["v_info"]["split"] == 1.0


def test_segmentation_scores_ignore_gt_background():
    gt = np.array([[0, 1, 1], [0, 2, 2]])
    pred = np.array([[9, 1, 1], [9, 2, 3]])
    s = M.segmentation_scores(pred, gt)
    assert (s["n_pred"], s["n_gt"]) == (3, 2)  # id 9 only covers gt background
    # on the 4 foreground voxels: gt (1,1,2,2), pred (1,1,2,3)
    assert s["voi"]["split"] == pytest.approx(0.5)  # H(pred|gt) = 1/2 * 1 bit
    assert s["voi"]["merge"] == pytest.approx(0.0)
    # adapted Rand: pairs together in both 2 + 0 = 2 (ordered: 2*1 + 0), in pred 2, in gt 4
    assert s["adapted_rand"]["precision"] == pytest.approx(1.0)
    assert s["adapted_rand"]["recall"] == pytest.approx(2 / 4)
    assert s["adapted_rand"]["error"] == pytest.approx(1 - 2 * 2 / (2 + 4))
    # V_rand: sum p^2 = (4 + 1 + 1)/16, sum s^2 = same, sum t^2 = 8/16
    assert s["v_rand"]["score"] == pytest.approx((6 / 16) / (0.5 * 6 / 16 + 0.5 * 8 / 16))
    empty = M.segmentation_scores(pred, np.zeros_like(gt))
    assert empty["adapted_rand"]["error"] is None and empty["v_rand"]["score"] is None
    assert empty["voi"]["total"] is None


def test_evaluate_segmentation_mode_per_slice():
    gt = np.zeros((2, 4, 4), np.uint16)
    gt[:, :, :2], gt[:, :, 2:] = 1, 2
    pred = gt.astype(np.uint32)
    pred[1, :, 2:] = 1  # slice 1: the two cells merged
    out = M.evaluate(pred, gt, segmentation=True, per_slice=True)
    assert set(out) == {"shape", "segmentation", "per_slice", "slice_mean"}
    rows = out["per_slice"]
    assert rows[0]["v_rand"] == pytest.approx(1.0) and rows[0]["are"] == pytest.approx(0.0)
    assert rows[1]["v_rand"] == pytest.approx(0.5 / (0.5 + 0.25))  # sum t^2 = 1/2, s^2 = 1
    assert rows[1]["voi_merge"] == pytest.approx(1.0) and rows[1]["v_info"] == 0.0
    assert out["slice_mean"]["v_rand"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="one mode"):
        M.evaluate(pred, gt, segmentation=True, detection=2.0)


def test_evaluate_empty_ground_truth_reports_rand_as_na():
    pred = np.zeros((4, 4), np.uint32)
    pred[1:3, 1:3] = 5
    out = M.evaluate(pred, np.zeros((4, 4), np.uint8))
    assert out["adapted_rand"] == {"error": None, "precision": None, "recall": None}
    assert out["instances"]["thresholds"]["0.5"]["ap"] == 0.0


def test_evaluate_splits_a_binary_ground_truth_into_components():
    gt = np.zeros((1, 10, 10), np.uint8)
    gt[0, 1:4, 1:4] = 1
    gt[0, 6:9, 6:9] = 1  # two objects, one value
    pred = np.zeros((1, 10, 10), np.uint32)
    pred[0, 1:4, 1:4] = 3
    pred[0, 6:9, 6:9] = 8
    out = M.evaluate(pred, gt)
    assert out["instances"]["n_gt"] == 2
    assert out["instances"]["thresholds"]["0.75"]["ap"] == 1.0
    assert out["notes"] == [
        "ground truth is a binary mask: split into 2 connected components (3D, face connectivity)"
    ]
    assert "notes" not in M.evaluate(pred, pred)


# ------------------------------------------------ detection of synaptic sites
def _sites():
    """Three true sites and three predictions on 2 x 40 x 40 voxels of 50 x 4 x 4 nm."""
    gt = np.zeros((2, 40, 40), np.uint16)
    gt[0, 2:5, 2:5] = 1  # A: a 3 x 3 blob
    gt[0, 20, 20] = 2  # B: a point
    gt[0, 37, 37] = 3  # C: a point nobody finds
    pred = np.zeros((2, 40, 40), np.uint16)
    pred[0, 3, 3] = 1  # inside A
    pred[1, 20, 22] = 2  # next section, 2 px off B: hypot(50, 8) nm
    pred[0, 37, 2] = 3  # far from everything
    return pred, gt


def test_detection_scores_hand_computed():
    pred, gt = _sites()
    d_b = math.hypot(50, 8)  # P2 <-> B
    d_p3 = math.hypot(17 * 4, 18 * 4)  # P3 -> B, its nearest site
    d_c = math.sqrt(50**2 + 17**2 * 16 + 15**2 * 16)  # C -> P2, its nearest prediction
    r = M.detection_scores(pred, gt, max_distance=60, spacing=(50, 4, 4))
    assert (r["n_pred"], r["n_gt"], r["correct"], r["found"]) == (3, 3, 2, 2)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["mean_distance_pred_to_gt"] == pytest.approx((0 + d_b + d_p3) / 3)
    # A's 9 voxels lie 0 (1), 4 (4) and 4*sqrt(2) (4) nm from P1
    a_sum = 4 * 4 + 4 * 4 * math.sqrt(2)
    assert r["mean_distance_gt_to_pred"] == pytest.approx((a_sum + d_b + d_c) / 11)
    wide = M.detection_scores(pred, gt, max_distance=100, spacing=(50, 4, 4))
    assert d_p3 < 100 < d_c
    assert (wide["correct"], wide["found"]) == (3, 2)
    assert wide["f1"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    # in voxels (no spacing) P2 is 1.0 * hypot(1, 2) from B
    vox = M.detection_scores(pred, gt, max_distance=math.hypot(1, 2))
    assert (vox["correct"], vox["found"]) == (2, 2)


def test_detection_blobs_masks_and_empty_sides():
    gt = np.zeros((30, 30), bool)
    gt[2:6, 2:6] = gt[20:25, 20:25] = True  # a mask: two sites
    pred = np.zeros((30, 30), np.uint32)
    pred[4:8, 4:8] = 7  # overlaps the first site
    r = M.detection_scores(pred, gt, max_distance=0)
    assert (r["n_gt"], r["found"], r["correct"]) == (2, 1, 1)
    assert (r["precision"], r["recall"]) == (1.0, 0.5)
    none = M.detection_scores(np.zeros_like(pred), gt, max_distance=5)
    assert none["precision"] is None and none["recall"] == 0.0 and none["f1"] == 0.0
    assert none["mean_distance_pred_to_gt"] is None
    both = M.detection_scores(np.zeros_like(pred), np.zeros_like(gt), max_distance=5)
    assert both["f1"] is None and both["recall"] is None
    with pytest.raises(ValueError, match="max_distance"):
        M.detection_scores(pred, gt, max_distance=-1)
    out = M.evaluate(pred, gt.astype(np.uint8), detection=0)
    assert out["detection"]["n_gt"] == 2 and "binary" in out["notes"][0]
