"""Tests of napari_emseg.tracking.track_slices on synthetic stacks."""

from __future__ import annotations

import numpy as np
import pytest

from napari_emseg.tracking import match_slices, slice_overlaps, track_slices


def square(shape, y, x, r, value, out=None):
    out = np.zeros(shape, np.uint32) if out is None else out
    out[max(y - r, 0) : y + r, max(x - r, 0) : x + r] = value
    return out


def tube(nz=20, gap=None, ids_per_slice="repeat"):
    """A square tube through the stack; slice-local ids (a new id every slice)."""
    lab = np.zeros((nz, 32, 32), np.uint32)
    for z in range(nz):
        if z != gap:
            lab[z, 10:20, 10:20] = 1 if ids_per_slice == "repeat" else 100 + 7 * z
    return lab


@pytest.mark.parametrize("ids", ["repeat", "unique"])
def test_tube_through_20_slices_is_one_object(ids):
    lab = tube(ids_per_slice=ids)
    out = track_slices(lab)
    assert out.dtype == np.uint32 and out.shape == lab.shape
    assert set(np.unique(out)) == {0, 1}
    np.testing.assert_array_equal(out > 0, lab > 0)


def test_gap_bridged_with_max_gap_1_split_with_0():
    lab = tube(gap=7, ids_per_slice="unique")
    bridged = track_slices(lab, max_gap=1)
    assert set(np.unique(bridged)) == {0, 1}
    split = track_slices(lab, max_gap=0)
    assert set(np.unique(split)) == {0, 1, 2}
    assert (split[:7][lab[:7] > 0] == 1).all() and (split[8:][lab[8:] > 0] == 2).all()
    # a two-slice gap needs max_gap=2
    lab2 = lab.copy()
    lab2[8] = 0
    assert track_slices(lab2, max_gap=1).max() == 2
    assert track_slices(lab2, max_gap=2).max() == 1


def test_one_slice_speck_removed_by_min_slices():
    lab = tube(nz=6)
    lab[3, 2:4, 2:4] = 5  # a speck on one slice only
    assert track_slices(lab, min_slices=1).max() == 2
    out = track_slices(lab, min_slices=2)
    assert out.max() == 1 and out[3, 2, 2] == 0
    assert track_slices(lab, min_slices=7).max() == 0  # the tube spans 6


def test_moving_objects_keep_ids_and_do_not_swap():
    nz, shape = 12, (40, 80)
    lab = np.zeros((nz,) + shape, np.uint32)
    for z in range(nz):
        # two objects drift 1 px per slice in opposite directions; local ids
        # alternate so that an id-based shortcut would swap them
        a, b = (1, 2) if z % 2 == 0 else (2, 1)
        square(shape, 20, 15 + z, 6, a, lab[z])
        square(shape, 20, 65 - z, 6, b, lab[z])
    out = track_slices(lab, iou_threshold=0.5)
    assert out.max() == 2
    left = {int(out[z, 20, 15 + z]) for z in range(nz)}
    right = {int(out[z, 20, 65 - z]) for z in range(nz)}
    assert len(left) == 1 and len(right) == 1 and left != right
    # fast motion (IoU with the previous slice below the threshold) breaks tracks
    fast = np.zeros((3,) + shape, np.uint32)
    for z in range(3):
        square(shape, 20, 10 + 10 * z, 6, 1, fast[z])
    assert track_slices(fast, iou_threshold=0.3).max() == 3


def test_splitting_object_larger_part_keeps_id():
    lab = np.zeros((4, 30, 40), np.uint32)
    lab[:2, 10:20, 5:35] = 1  # one wide object
    lab[2:, 10:20, 5:24] = 1  # splits: a big part
    lab[2:, 10:20, 26:35] = 2  # and a small part
    out = track_slices(lab)
    # IoU(big, whole) = 190/300 > IoU(small, whole) = 90/300: big part continues
    assert out[3, 15, 10] == out[0, 15, 10] == 1
    assert out[3, 15, 30] == 2 and out.max() == 2


def test_hungarian_resolves_competition():
    # object A in slice 0 overlaps both B1 and B2 in slice 1; C overlaps only B1:
    # greedy (A->B1) would leave C unmatched, Hungarian gives A->B2, C->B1
    rows = np.array([0, 0, 1])  # A, A, C
    cols = np.array([0, 1, 0])  # B1, B2, B1
    iou = np.array([0.6, 0.5, 0.55])
    r, c = match_slices(rows, cols, iou, 0.3)
    assert dict(zip(r.tolist(), c.tolist(), strict=True)) == {0: 1, 1: 0}


def test_slice_overlaps_counts_pairs():
    a = np.array([[1, 1, 0], [2, 2, 2]], np.int32)
    b = np.array([[1, 0, 0], [1, 2, 2]], np.int32)
    rows, cols, counts = slice_overlaps(a, b)
    got = {(int(r), int(c)): int(n) for r, c, n in zip(rows, cols, counts, strict=True)}
    assert got == {(0, 0): 1, (1, 0): 1, (1, 1): 2}


def test_streaming_out_array_and_lazy_input():
    da = pytest.importorskip("dask.array")
    lab = tube(gap=4, ids_per_slice="unique")
    expect = track_slices(lab)

    class SliceOnly:
        """Array-like that only supports .shape, .dtype and [z]; counts reads."""

        def __init__(self, arr):
            self.arr, self.shape, self.dtype, self.reads = arr, arr.shape, arr.dtype, 0

        def __getitem__(self, z):
            assert isinstance(z, int)
            self.reads += 1
            return self.arr[z]

    src = SliceOnly(lab)
    out = np.full(lab.shape, 99, np.uint32)
    res = track_slices(src, out=out)
    assert res is out
    np.testing.assert_array_equal(out, expect)
    assert src.reads == 2 * lab.shape[0]  # two streaming passes
    np.testing.assert_array_equal(track_slices(da.from_array(lab, chunks=(1, 32, 32))), expect)


def test_progress_cancel_empty_and_errors():
    from napari_emseg.progress import Cancelled

    lab = tube(nz=5)
    before = lab.copy()
    calls = []
    track_slices(lab, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (10, 10) and len(calls) == 10
    np.testing.assert_array_equal(lab, before)
    with pytest.raises(Cancelled):
        track_slices(lab, cancel=lambda: True)
    empty = track_slices(np.zeros((0, 4, 4), np.uint16))
    assert empty.shape == (0, 4, 4) and empty.dtype == np.uint32
    assert track_slices(np.zeros((3, 4, 4), np.uint16)).max() == 0
    with pytest.raises(ValueError, match="3D"):
        track_slices(np.zeros((4, 4), np.uint32))
    with pytest.raises(ValueError, match="iou_threshold"):
        track_slices(lab, iou_threshold=0)
    with pytest.raises(ValueError, match="out shape"):
        track_slices(lab, out=np.zeros((5, 4, 4), np.uint32))
    with pytest.raises(ValueError, match="integer"):
        track_slices(lab.astype(np.float32))
