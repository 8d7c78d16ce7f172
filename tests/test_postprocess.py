"""Tests of napari_emseg.postprocess on synthetic volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_emseg import postprocess as pp


def two_discs(shape=(64, 96), r=15, c1=(32, 30), c2=(32, 58)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d1 = (yy - c1[0]) ** 2 + (xx - c1[1]) ** 2 < r**2
    d2 = (yy - c2[0]) ** 2 + (xx - c2[1]) ** 2 < r**2
    assert (d1 & d2).any()  # they overlap: one connected blob
    return d1 | d2


def two_balls(r=9) -> np.ndarray:
    zz, yy, xx = np.mgrid[:30, :30, :50]
    b1 = (zz - 15) ** 2 + (yy - 15) ** 2 + (xx - 16) ** 2 < r**2
    b2 = (zz - 15) ** 2 + (yy - 15) ** 2 + (xx - 32) ** 2 < r**2
    return b1 | b2


@pytest.mark.parametrize("method", ["hmaxima", "peaks", "distance"])
def test_touching_discs_split_into_two(method):
    mask = two_discs()
    assert ndi.label(mask)[1] == 1
    prob = np.where(mask, 0.9, 0.1).astype(np.float32)
    lab = pp.seeded_watershed(prob, 0.5, dims=2, seed_method=method)
    assert lab.dtype == np.uint32 and lab.shape == mask.shape
    assert set(np.unique(lab)) == {0, 1, 2}
    assert lab[32, 30] != lab[32, 58]  # the two centres differ
    np.testing.assert_array_equal(lab > 0, mask)  # foreground untouched
    # each half is on its side of the neck (x = 44)
    assert (lab[:, :40][mask[:, :40]] == lab[32, 30]).all()
    assert (lab[:, 49:][mask[:, 49:]] == lab[32, 58]).all()


def test_touching_balls_split_in_3d_with_spacing():
    mask = two_balls()
    lab = pp.seeded_watershed(mask, dims=3, spacing=(1, 1, 1))
    assert set(np.unique(lab)) == {0, 1, 2}
    assert lab[15, 15, 16] != lab[15, 15, 32]
    # z sampled twice as coarsely (every 2nd slice kept): still two objects
    lab2 = pp.seeded_watershed(mask[::2], dims=3, spacing=(2, 1, 1))
    assert set(np.unique(lab2)) == {0, 1, 2}


def test_watershed_2d_ids_unique_across_stack():
    mask = np.stack([two_discs()] * 3)
    lab = pp.seeded_watershed(mask, dims=2)
    assert lab.max() == 6
    per_slice = [set(np.unique(s)) - {0} for s in lab]
    assert per_slice == [{1, 2}, {3, 4}, {5, 6}]  # ids offset, increasing with z


def test_watershed_boundary_map_and_single_objects():
    mask = two_discs()
    # flood a boundary map with a ridge at x = 44 instead of -distance
    boundary = np.zeros(mask.shape, np.float32)
    boundary[:, 44] = 1.0
    lab = pp.seeded_watershed(mask, dims=2, boundary=boundary)
    assert set(np.unique(lab[:, :44][mask[:, :44]])) == {1}
    assert set(np.unique(lab[:, 45:][mask[:, 45:]])) == {2}
    # a lone disc, and a speck too small to seed, stay single objects
    single = np.zeros((40, 40), bool)
    single[5:25, 5:25] = True
    single[35, 35] = True
    lab = pp.seeded_watershed(single, dims=2)
    assert lab.max() == 2 and lab[35, 35] == 2


def test_connected_components_2d_and_3d():
    m = np.zeros((3, 10, 10), bool)
    m[0, 1:3, 1:3] = True
    m[1, 1:3, 1:3] = True  # same xy: joined in 3D, not in 2D
    m[2, 5:8, 5:8] = True
    m[2, 9, 9] = True
    lab2 = pp.connected_components(m, dims=2)
    lab3 = pp.connected_components(m, dims=3)
    assert lab2.dtype == np.uint32 and lab2.max() == 4
    assert lab3.max() == 3 and lab3[0, 1, 1] == lab3[1, 1, 1]
    assert lab2[0, 1, 1] != lab2[1, 1, 1]
    # diagonal neighbours: separate with faces only, joined with connectivity 2
    d = np.eye(4, dtype=bool)
    assert pp.connected_components(d, dims=2).max() == 4
    assert pp.connected_components(d, dims=2, connectivity=2).max() == 1


def test_threshold_fixed_otsu_and_uint8():
    rng = np.random.default_rng(0)
    prob = np.concatenate([rng.normal(0.2, 0.05, 500), rng.normal(0.8, 0.05, 500)])
    prob = np.clip(prob, 0, 1).astype(np.float32).reshape(10, 100)
    t = pp.otsu_threshold(prob)
    assert 0.35 < t < 0.65
    np.testing.assert_array_equal(pp.threshold(prob, "otsu"), prob > t)
    np.testing.assert_array_equal(pp.threshold(prob, 0.7), prob > 0.7)
    u8 = np.array([[0, 100, 200]], np.uint8)  # 0-255 scale
    np.testing.assert_array_equal(pp.threshold(u8, 0.5), [[False, False, True]])
    with pytest.raises(ValueError, match="threshold"):
        pp.threshold(prob, 1.5)
    with pytest.raises(ValueError, match="threshold"):
        pp.threshold(prob, "mean")


def test_zfilter_matches_scipy_median():
    rng = np.random.default_rng(1)
    prob = rng.random((40, 12, 9)).astype(np.float32)  # > one internal chunk of 16
    before = prob.copy()
    for size in (3, 5):
        expect = ndi.median_filter(prob, size=(size, 1, 1), mode="reflect")
        np.testing.assert_array_equal(pp.zfilter(prob, size, "z"), expect)
        expect_yz = ndi.median_filter(expect, size=(1, size, 1), mode="reflect")
        np.testing.assert_array_equal(pp.zfilter(prob, size, "yz"), expect_yz)
    np.testing.assert_array_equal(prob, before)  # input not mutated
    # a one-slice dropout inside an object is repaired by the z median
    p = np.full((5, 4, 4), 0.9, np.float32)
    p[2] = 0.1
    assert (pp.zfilter(p, 3)[2] == np.float32(0.9)).all()
    with pytest.raises(ValueError, match="odd"):
        pp.zfilter(prob, 4)


def test_fill_holes_open_close():
    m = np.zeros((2, 12, 12), bool)
    m[:, 2:10, 2:10] = True
    m[:, 5:7, 5:7] = False  # a hole in each slice
    filled = pp.fill_holes(m, dims=2)
    assert filled[:, 5:7, 5:7].all() and filled.sum() == 2 * 64
    # a 3D fill only fills cavities enclosed in 3D: this tunnel is open at z ends
    assert not pp.fill_holes(m, dims=3)[:, 5:7, 5:7].any()
    speck = np.zeros((1, 20, 20), bool)
    speck[0, 2:12, 2:12] = True
    speck[0, 16, 16] = True
    opened = pp.open_close(speck, opening=1)
    assert not opened[0, 16, 16] and opened[0, 5, 5]
    gap = np.zeros((1, 20, 20), bool)
    gap[0, 5:15, 3:9] = True
    gap[0, 5:15, 10:16] = True  # a 1-px slit at x=9
    closed = pp.open_close(gap, closing=1)
    assert closed[0, 6:14, 9].all() and closed.sum() == gap.sum() + 8


def test_remove_small_objects_voxels_and_physical():
    lab = np.zeros((4, 10, 10), np.uint32)
    lab[0, :2, :2] = 5  # 4 voxels
    lab[1:4, 5:8, 5:8] = 7  # 27 voxels
    out = pp.remove_small_objects(lab, 10)
    assert set(np.unique(out)) == {0, 7} and out.dtype == np.uint32
    # physical: voxel 2 x 1 x 1 nm -> object 5 is 8 nm^3, object 7 54 nm^3
    out = pp.remove_small_objects(lab, 60, spacing=(2, 1, 1))
    assert out.max() == 0
    out = pp.remove_small_objects(lab, 50, spacing=(2, 1, 1))
    assert set(np.unique(out)) == {0, 7}
    mask_out = pp.remove_small_objects(lab > 0, 10)
    assert mask_out.dtype == bool and mask_out.sum() == 27
    assert lab.max() == 7 and (lab == 5).sum() == 4  # not mutated


def test_relabel_and_bilateral():
    lab = np.array([[0, 9, 9], [4, 0, 100]], np.uint16)
    out = pp.relabel_sequential(lab)
    np.testing.assert_array_equal(out, [[0, 2, 2], [1, 0, 3]])
    assert out.dtype == np.uint32
    step = np.zeros((16, 16), np.float32)
    step[:, 8:] = 1.0
    noisy = step + np.random.default_rng(0).normal(0, 0.05, step.shape).astype(np.float32)
    sm = pp.smooth_bilateral(np.clip(noisy, 0, 1), sigma_color=0.2, sigma_spatial=1.5)
    assert sm.dtype == np.float32 and sm.shape == step.shape
    assert np.abs(sm - step).mean() < np.abs(np.clip(noisy, 0, 1) - step).mean()
    assert sm[:, 9:].min() > 0.7 and sm[:, :7].max() < 0.3  # edge kept


def test_segment_pipeline_and_tracking():
    vol = np.stack([two_discs()] * 6).astype(np.float32) * 0.8 + 0.1
    vol[3] = 0.1  # the objects vanish for one slice; z-filter repairs it
    lab = pp.segment(vol, dims=2, zfilter=3, track=True)
    assert lab.dtype == np.uint32 and lab.max() == 2
    assert lab[:, 32, 30].tolist() == [lab[0, 32, 30]] * 6
    lab3 = pp.segment(vol, method="components", dims=3, zfilter=3)
    assert lab3.max() == 1
    # min_size removes a speck; ids stay consecutive
    vol2 = vol.copy()
    vol2[:, 2, 2] = 0.9
    lab_s = pp.segment(vol2, dims=3, method="components", zfilter=3, min_size=10)
    assert lab_s.max() == 1 and lab_s[0, 2, 2] == 0
    # 2D image in, 2D labels out
    lab2d = pp.segment(two_discs().astype(np.float32))
    assert lab2d.shape == (64, 96) and lab2d.max() == 2


def test_progress_and_cancel():
    from napari_emseg._progress import Cancelled

    calls = []
    pp.segment(np.stack([two_discs()] * 3), progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (1000, 1000)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))
    with pytest.raises(Cancelled):
        pp.segment(np.stack([two_discs()] * 3), cancel=lambda: True)


def test_empty_inputs_and_bad_arguments():
    empty = np.zeros((0, 8, 8), np.float32)
    for out in (
        pp.segment(empty),
        pp.seeded_watershed(empty, dims=3),
        pp.connected_components(empty > 0),
    ):
        assert out.shape == (0, 8, 8) and out.dtype == np.uint32
    assert pp.zfilter(empty).shape == (0, 8, 8)
    blank = np.zeros((2, 8, 8), np.float32)
    assert pp.segment(blank, track=True).max() == 0
    with pytest.raises(ValueError, match="boundary shape"):
        pp.seeded_watershed(blank, boundary=np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match="dims"):
        pp.segment(blank, dims=4)
    with pytest.raises(ValueError, match="track"):
        pp.segment(blank, dims=3, track=True)
    with pytest.raises(ValueError, match="seed_method"):
        pp.seeded_watershed(blank, seed_method="magic")
    with pytest.raises(ValueError, match="dtype"):
        pp.threshold(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="spacing"):
        pp.seeded_watershed(blank, dims=3, spacing=(1, 1))


def test_inputs_not_mutated():
    prob = np.where(np.stack([two_discs()] * 2), 0.9, 0.1).astype(np.float32)
    before = prob.copy()
    pp.segment(prob, zfilter=3, opening=1, closing=1, fill=True, min_size=5, track=True)
    pp.seeded_watershed(prob, dims=3)
    np.testing.assert_array_equal(prob, before)


def test_fixture_instances_recovered(fixtures_dir):
    tifffile = pytest.importorskip("tifffile")
    from napari_emseg.metrics import instance_ap

    mask = tifffile.imread(fixtures_dir / "lucchi_crop_mask.tif")
    inst = tifffile.imread(fixtures_dir / "lucchi_crop_instances.tif")
    runs = {
        "components 3D": pp.segment(mask, method="components", dims=3),
        "watershed 3D": pp.segment(mask, method="watershed", dims=3),
        # tiny specks (1-24 px, one or two slices) are separate gt objects:
        # no gap bridging and a lenient IoU keep them apart
        "watershed 2D + tracking": pp.segment(
            mask, method="watershed", dims=2, track=True, iou_threshold=0.25, max_gap=0
        ),
    }
    for name, lab in runs.items():
        res = instance_ap(lab, inst, thresholds=(0.5,))["thresholds"]["0.5"]
        assert res["ap"] == 1.0, (name, res)
        assert lab.max() == inst.max() == 6
