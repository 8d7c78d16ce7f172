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


#: the pipeline without the mitochondria defaults' z-filter and size filter
PLAIN = pp.SegmentSettings(dims=2, zfilter=0, min_size=0, h=2.0)


def test_segment_pipeline_and_tracking():
    vol = np.stack([two_discs()] * 6).astype(np.float32) * 0.8 + 0.1
    vol[3] = 0.1  # the objects vanish for one slice; z-filter repairs it
    result = pp.segment(vol, PLAIN, zfilter=3, track=True)
    lab = result.labels
    assert lab is result.objects and lab.dtype == np.uint32 and lab.max() == 2
    assert lab[:, 32, 30].tolist() == [lab[0, 32, 30]] * 6
    assert result.instances.max() == 2 * 6  # two per slice, ids increasing with z
    assert result.instances[0].max() == 2 and result.instances[5].min() == 0
    lab3 = pp.segment(vol, PLAIN, method="components", dims=3, zfilter=3)
    assert lab3.objects is None and lab3.labels.max() == 1
    # min_size removes a speck; ids stay consecutive
    vol2 = vol.copy()
    vol2[:, 2, 2] = 0.9
    lab_s = pp.segment(vol2, PLAIN, dims=3, method="components", zfilter=3, min_size=10).labels
    assert lab_s.max() == 1 and lab_s[0, 2, 2] == 0
    # 2D image in, 2D labels out
    lab2d = pp.segment(two_discs().astype(np.float32), PLAIN).labels
    assert lab2d.shape == (64, 96) and lab2d.max() == 2


def spindle(nz=13, r_max=12) -> np.ndarray:
    """A spindle along z: discs of radius 2 at both ends, ``r_max`` in the middle."""
    yy, xx = np.mgrid[:40, :40]
    radii = np.round(2 + (r_max - 2) * np.sin(np.linspace(0, np.pi, nz))).astype(int)
    return np.stack([(yy - 20) ** 2 + (xx - 20) ** 2 <= r * r for r in radii])


def test_tracked_objects_are_size_filtered_in_3d_and_instances_follow():
    vol = np.zeros((13, 40, 80), np.float32)
    vol[:, :, :40] = spindle()
    vol[4, 10:13, 60:63] = 1.0  # a 9-voxel fragment on one slice
    tip_area = int(spindle()[0].sum())
    result = pp.segment(vol, PLAIN, track=True, iou_threshold=0.1, min_size=tip_area + 20)
    objects, instances = result.objects, result.instances
    # one object, tips kept: the size is that of the whole 3D object, not of one section
    assert objects.max() == 1
    np.testing.assert_array_equal(objects > 0, np.pad(spindle(), ((0, 0), (0, 0), (0, 40))))
    # the fragment is gone from both; instances cover exactly the objects' voxels
    np.testing.assert_array_equal(instances > 0, objects > 0)
    assert instances.max() == 13 and [int(s.max()) for s in instances] == list(range(1, 14))


def test_settings_defaults_from_model_metadata():
    default = pp.SegmentSettings()
    assert pp.segment_defaults(None) == default == pp.segment_defaults({})
    assert (default.dims, default.zfilter, default.min_size, default.h) == (3, 5, 2000, 4.0)
    assert pp.segment_defaults({"threshold": 0.75}).threshold == 0.75
    tuned = pp.segment_defaults({"threshold": 0.75,
                                 "segment": {"zfilter": 3, "min_size": 500, "dims": 2,
                                             "track": True, "threshold": 0.6}})
    assert tuned == default.updated(zfilter=3, min_size=500, dims=2, track=True, threshold=0.6)
    with pytest.warns(UserWarning, match="colour"):
        assert pp.segment_defaults({"segment": {"colour": "red"}}) == default
    with pytest.raises(ValueError, match="unknown segment setting"):
        default.updated(colour="red")
    with pytest.raises(ValueError, match="track"):
        default.updated(track=True)  # dims 3
    with pytest.raises(ValueError, match="unknown segment setting"):
        pp.segment(np.zeros((2, 4, 4), np.float32), colour="red")


def test_as_probabilities_reads_probabilities_and_refuses_labels_and_raw_em():
    prob = np.linspace(0, 1, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    assert pp.as_probabilities(prob) is prob  # no copy, not modified
    u8 = (prob * 255).astype(np.uint8)
    np.testing.assert_allclose(pp.as_probabilities(u8), u8 / 255.0, atol=1e-7)
    mask = prob > 0.5
    for m in (mask, mask.astype(np.uint8), mask.astype(np.uint16), mask.astype(np.uint8) * 255):
        np.testing.assert_array_equal(pp.as_probabilities(m), mask.astype(np.float32))
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[0, :4], labels[1, 4:] = 1, 7
    for bad in (labels, labels.astype(np.uint16), labels.astype(np.uint32) * 1000):
        with pytest.raises(ValueError, match="label image") as err:
            pp.as_probabilities(bad)
        assert "pass probabilities" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*raw EM"):
        pp.as_probabilities(prob * 200)
    with pytest.raises(ValueError, match="outside"):
        pp.as_probabilities(np.full((2, 2), np.nan, np.float32))
    # class channels: (C, Z, Y, X)
    two = np.stack([prob, 1 - prob])
    np.testing.assert_array_equal(pp.as_probabilities(two, 1), 1 - prob)
    np.testing.assert_array_equal(pp.as_probabilities(two[:1]), prob)
    with pytest.raises(ValueError, match="2 class channels"):
        pp.as_probabilities(two)
    with pytest.raises(ValueError, match="out of range"):
        pp.as_probabilities(two, 2)
    with pytest.raises(ValueError, match="no class axis"):
        pp.as_probabilities(prob, 1)


def test_segment_refuses_a_label_image():
    labels = np.zeros((3, 16, 16), np.uint16)
    labels[:, 2:8, 2:8], labels[:, 9:14, 9:14] = 1, 2
    with pytest.raises(ValueError, match="label image"):
        pp.segment(labels)
    with pytest.raises(ValueError, match="label image"):
        pp.segment(labels.astype(np.uint8))


def test_defaults_on_the_sample_truth_give_its_mitochondria():
    from napari_emseg._sample_data import load_sample

    _, mask = load_sample()
    prob = ndi.gaussian_filter(mask.astype(np.float32), sigma=(0, 2, 2))
    truth = ndi.label(mask > 0)[1]
    assert truth == 5
    assert pp.segment(prob).labels.max() == truth
    tracked = pp.segment(prob, dims=2, track=True)
    assert truth <= tracked.objects.max() <= 2 * truth
    # before: 2D instances with no size filter were counted per slice
    assert pp.segment(prob, PLAIN).labels.max() > 10 * truth


def test_progress_and_cancel():
    from napari_emseg.progress import Cancelled

    calls = []
    pp.segment(np.stack([two_discs()] * 3), progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (1000, 1000)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))
    with pytest.raises(Cancelled):
        pp.segment(np.stack([two_discs()] * 3), cancel=lambda: True)


def test_empty_inputs_and_bad_arguments():
    empty = np.zeros((0, 8, 8), np.float32)
    for out in (
        pp.segment(empty).labels,
        pp.seeded_watershed(empty, dims=3),
        pp.connected_components(empty > 0),
    ):
        assert out.shape == (0, 8, 8) and out.dtype == np.uint32
    assert pp.zfilter(empty).shape == (0, 8, 8)
    blank = np.zeros((2, 8, 8), np.float32)
    assert pp.segment(blank, dims=2, track=True).labels.max() == 0
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
    pp.segment(prob, PLAIN, zfilter=3, opening=1, closing=1, fill=True, min_size=5, track=True)
    pp.segment(prob)
    pp.seeded_watershed(prob, dims=3)
    pp.as_probabilities(prob)
    np.testing.assert_array_equal(prob, before)


def test_fixture_instances_recovered(fixtures_dir):
    tifffile = pytest.importorskip("tifffile")
    from napari_emseg.metrics import instance_ap

    mask = tifffile.imread(fixtures_dir / "lucchi_crop_mask.tif")
    inst = tifffile.imread(fixtures_dir / "lucchi_crop_instances.tif")
    runs = {
        "components 3D": pp.segment(mask, PLAIN, method="components", dims=3),
        "watershed 3D": pp.segment(mask, PLAIN, method="watershed", dims=3),
        # tiny specks (1-24 px, one or two slices) are separate gt objects:
        # no gap bridging and a lenient IoU keep them apart
        "watershed 2D + tracking": pp.segment(
            mask, PLAIN, method="watershed", dims=2, track=True, iou_threshold=0.25, max_gap=0
        ),
    }
    for name, result in runs.items():
        lab = result.labels
        res = instance_ap(lab, inst, thresholds=(0.5,))["thresholds"]["0.5"]
        assert res["ap"] == 1.0, (name, res)
        assert lab.max() == inst.max() == 6


def test_segmentation_counts_what_the_size_filter_removed():
    from napari_emseg.postprocess import segment

    prob = np.zeros((3, 64, 64), np.float32)
    prob[:, 5:25, 5:25] = 0.9  # 1200 voxels
    prob[:, 40:44, 40:44] = 0.9  # 48 voxels
    prob[:, 50:53, 10:13] = 0.9  # 27 voxels
    result = segment(prob, method="components", dims=3, zfilter=0, min_size=100)
    assert result.labels.max() == 1 and result.dropped == 2
    assert result.summary(100) == "1 instances (2 smaller than 100 voxels removed)"
    kept = segment(prob, method="components", dims=3, zfilter=0, min_size=0)
    assert kept.labels.max() == 3 and kept.dropped == 0 and kept.summary() == "3 instances"


# ------------------------------------------------------- settings fitted to thick sections
def short_objects(nz: int = 7) -> np.ndarray:
    """(nz, 64, 96) probabilities: two discs cut by only 2 sections (slices 2-3)."""
    yy, xx = np.mgrid[:64, :96]
    disc = ((yy - 32) ** 2 + (xx - 25) ** 2 < 144) | ((yy - 32) ** 2 + (xx - 70) ** 2 < 144)
    prob = np.full((nz, 64, 96), 0.05, np.float32)
    prob[2:4][:, disc] = 0.95
    return prob


def test_fit_to_sections_divides_the_z_settings_by_the_thickness():
    s = pp.SegmentSettings()
    fitted, note = pp.fit_to_sections(s, 12.5)
    assert (fitted.zfilter, fitted.min_size) == (0, 160)
    assert note == ("sections 12.5× thicker than the settings were tuned for: "
                    "z-filter 5 → off, min size 2000 → 160 voxels")
    assert pp.fit_to_sections(s, 1.9) == (s, "") and pp.fit_to_sections(s, None) == (s, "")
    kept, note = pp.fit_to_sections(s, 12.5, keep=["zfilter"])
    assert (kept.zfilter, kept.min_size) == (5, 160) and "z-filter" not in note
    assert pp.fit_to_sections(s.updated(zfilter=15), 3.0)[0].zfilter == 5  # stays odd
    assert pp.fit_to_sections(s.updated(zfilter=0, min_size=0), 12.5) == (
        s.updated(zfilter=0, min_size=0), "")


def test_thick_sections_keep_objects_the_defaults_erase():
    prob = short_objects()
    assert pp.segment(prob).labels.max() == 0  # z-median 5 and 2000 voxels: both gone
    fitted, note = pp.fit_to_data(pp.SegmentSettings(), prob, voxel_size=(50.0, 4.0, 4.0))
    assert "12.5×" in note
    assert pp.segment(prob, fitted, spacing=(12.5, 1, 1)).labels.max() == 2
    # settings tuned on such sections (the model's voxel size) are left as they are
    meta = {"voxel_size_nm": [50.0, 4.0, 4.0]}
    assert pp.fit_to_data(pp.SegmentSettings(), prob, (50.0, 4.0, 4.0), meta=meta)[1] == ""
    assert pp.tuned_ratio({"voxel_size_nm": [5.0, 5.0]}) == 1.0  # a 2D model: isotropic


def test_section_ratio_from_the_voxel_size_or_estimated(fixtures_dir):
    import tifffile

    mask = tifffile.imread(fixtures_dir / "lucchi_crop_mask.tif").astype(np.float32)
    assert pp.section_ratio(mask, (50.0, 4.0, 4.0)) == 12.5
    assert pp.section_ratio(mask[0]) is None
    isotropic = pp.section_ratio(mask)  # FIB-SEM, 5 nm: smooth maps overstate it
    assert isotropic < pp.ESTIMATED_THICK
    assert pp.fit_to_data(pp.SegmentSettings(), mask)[1] == ""
    every_sixth = pp.section_ratio(mask[::6])  # 30 nm sections
    assert every_sixth > pp.ESTIMATED_THICK
    assert "thicker" in pp.fit_to_data(pp.SegmentSettings(), mask[::6])[1]
