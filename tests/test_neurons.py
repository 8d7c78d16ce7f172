"""Tests of napari_emseg.neurons on synthetic Voronoi "cells" with drawn membranes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_emseg.neurons import segment_neurons
from napari_emseg.progress import Cancelled


# ------------------------------------------------------------------ helpers
def voronoi(centres: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Cell ids 1..n: each pixel belongs to its nearest centre."""
    grids = np.indices(shape, dtype=np.float32)
    d2 = np.stack([sum((g - c[i]) ** 2 for i, g in enumerate(grids)) for c in centres])
    return (np.argmin(d2, axis=0) + 1).astype(np.uint32)


def membranes(cells: np.ndarray) -> np.ndarray:
    """Pixels with a face neighbour in another cell (lines 2 px wide)."""
    m = np.zeros(cells.shape, bool)
    for ax in range(cells.ndim):
        diff = np.diff(cells, axis=ax) != 0
        lo = [slice(None)] * cells.ndim
        hi = list(lo)
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        m[tuple(lo)] |= diff
        m[tuple(hi)] |= diff
    return m


def boundary_map(membrane: np.ndarray, sigma: tuple[float, ...]) -> np.ndarray:
    """Membrane probabilities: 0.9 on membranes, 0.1 inside, blurred."""
    prob = np.where(membrane, 0.9, 0.1).astype(np.float32)
    return ndi.gaussian_filter(prob, sigma)


def cell_stack(nz: int = 5, vanish: tuple[int, int] | None = None):
    """Nine Voronoi cells drifting slowly through z: (true ids, boundary probabilities).

    ``vanish=(z, k)``: cell k is missing from section z (drawn as membrane).
    """
    rng = np.random.default_rng(0)
    centres = np.array([(16 + 32 * i, 16 + 32 * j) for i in range(3) for j in range(3)], float)
    centres += rng.uniform(-6, 6, centres.shape)
    drift = rng.uniform(-1, 1, centres.shape)  # pixels per section
    cells, masks = [], []
    for z in range(nz):
        c = voronoi(centres + z * drift, (96, 96))
        m = membranes(c)
        if vanish is not None and z == vanish[0]:
            m |= c == vanish[1]
            c = np.where(c == vanish[1], 0, c)
        cells.append(c)
        masks.append(m)
    return np.stack(cells), boundary_map(np.stack(masks), (0, 1, 1))


def core_pairs(truth: np.ndarray, labels: np.ndarray, prob: np.ndarray) -> set[tuple[int, int]]:
    """(true id, predicted id) pairs over the cell cores (away from the membranes)."""
    core = (truth > 0) & ~ndi.binary_dilation(prob > 0.3)
    return {(int(a), int(b)) for a, b in zip(truth[core], labels[core], strict=True)}


# -------------------------------------------------------------------- tests
def test_every_cell_recovered_and_linked_through_z():
    truth, prob = cell_stack()
    before = prob.copy()
    labels = segment_neurons(prob)
    np.testing.assert_array_equal(prob, before)  # input untouched
    assert labels.shape == prob.shape and labels.dtype == np.uint32
    assert labels.min() >= 1  # membranes too are given to a cell
    pairs = core_pairs(truth, labels, prob)
    # one predicted id per true cell for the whole stack, and the other way round
    assert len(pairs) == 9
    assert {a for a, _ in pairs} == set(range(1, 10))
    assert {b for _, b in pairs} == set(range(1, 10))
    for z in range(truth.shape[0]):  # ids constant along z: the same pairs in every section
        assert core_pairs(truth[z], labels[z], prob[z]) == pairs


def test_without_tracking_ids_are_unique_per_section():
    truth, prob = cell_stack(nz=3)
    labels = segment_neurons(prob, track=False)
    assert labels.max() == 27
    ids = [set(np.unique(labels[z]).tolist()) for z in range(3)]
    assert ids == [set(range(1, 10)), set(range(10, 19)), set(range(19, 28))]
    for z in range(3):
        pairs = core_pairs(truth[z], labels[z], prob[z])
        assert len(pairs) == 9 and len({b for _, b in pairs}) == 9


def test_cell_missing_for_one_section_is_bridged_with_max_gap_1():
    truth, prob = cell_stack(vanish=(2, 5))

    def id_of_cell5(labels, z):
        return int(np.bincount(labels[z][truth[z] == 5]).argmax())

    bridged = segment_neurons(prob, max_gap=1)
    assert bridged.max() == 9
    assert id_of_cell5(bridged, 1) == id_of_cell5(bridged, 3)
    assert len(np.unique(bridged[2])) == 8  # the cell is gone from section 2
    broken = segment_neurons(prob, max_gap=0)
    assert broken.max() == 10  # the cell comes back under a new id
    assert id_of_cell5(broken, 1) != id_of_cell5(broken, 3)


def test_fragments_below_min_size_are_merged_into_their_neighbour():
    truth, prob = cell_stack(nz=1)
    yy, xx = np.mgrid[:96, :96]
    cy, cx = ndi.center_of_mass(truth[0] == 5)
    ring = np.abs(np.hypot(yy - cy, xx - cx) - 6) < 1  # a small closed membrane circle
    p = np.maximum(prob[0], np.where(ring, 0.9, 0.0)).astype(np.float32)
    inside = np.hypot(yy - cy, xx - cx) < 5
    kept = segment_neurons(p, h=4, min_size=0)
    assert kept.max() == 10 and len(np.unique(kept[inside])) == 1
    assert kept[int(cy), int(cx)] != kept[int(cy), int(cx) + 12]  # own fragment
    merged = segment_neurons(p, h=4, min_size=200)
    assert merged.max() == 9
    assert merged[int(cy), int(cx)] == merged[int(cy), int(cx) + 12]  # joined its cell


def test_2d_input_gives_2d_labels():
    truth, prob = cell_stack(nz=1)
    labels = segment_neurons(prob[0])
    assert labels.shape == (96, 96) and labels.max() == 9
    assert len(core_pairs(truth[0], labels, prob[0])) == 9


def test_3d_watershed_with_anisotropic_spacing():
    rng = np.random.default_rng(1)
    centres = rng.uniform(6, 42, (6, 3))
    iso = voronoi(centres, (48, 48, 48))
    truth = iso[::2]  # sections twice as thick as the pixels: spacing (2, 1, 1)
    prob = boundary_map(membranes(truth), (0.5, 1, 1))
    labels = segment_neurons(prob, dims=3, spacing=(2.0, 1.0, 1.0))
    assert labels.shape == truth.shape and labels.max() == 6
    pairs = core_pairs(truth, labels, prob)
    assert len(pairs) == 6
    assert {a for a, _ in pairs} == set(range(1, 7)) and len({b for _, b in pairs}) == 6
    # read as isotropic, the distances (and h) shrink along z: two cells merge
    assert segment_neurons(prob, dims=3).max() == 5


def test_uint8_and_bool_boundary_maps():
    truth, prob = cell_stack(nz=2)
    as_float = segment_neurons(prob)
    np.testing.assert_array_equal(segment_neurons((prob * 255).round().astype(np.uint8)),
                                  as_float)
    mask = segment_neurons(prob > 0.5)  # a bool membrane mask
    assert len(core_pairs(truth, mask, prob)) == 9


def test_progress_and_cancel():
    _, prob = cell_stack(nz=3)
    calls = []
    segment_neurons(prob, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (1000, 1000)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))
    with pytest.raises(Cancelled):
        segment_neurons(prob, cancel=lambda: True)


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (np.arange(2 * 8 * 8, dtype=np.uint32).reshape(2, 8, 8), {}, "label image"),
        (np.full((2, 8, 8), 3.0, np.float32), {}, "outside"),
        (np.zeros((1, 2, 8, 8), np.float32), {}, "2D"),
        (np.zeros((8, 8), np.float32), {"dims": 3}, "dims=3"),
        (np.zeros((2, 8, 8), np.float32), {"dims": 4}, "dims"),
        (np.zeros((2, 8, 8), np.float32), {"threshold": 0.0}, "threshold"),
        (np.zeros((2, 8, 8), np.float32), {"h": -1}, ">= 0"),
        (np.zeros((2, 8, 8), np.float32), {"iou": 1.5}, "iou"),
    ],
)
def test_bad_input_is_refused_clearly(data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        segment_neurons(data, **kwargs)


def test_blank_sections():
    prob = np.zeros((2, 16, 16), np.float32)
    prob[1] = 1.0  # all membrane: no cell
    labels = segment_neurons(prob)
    assert (labels[0] == 1).all() and not labels[1].any()


def test_engine_imports_no_gui_and_no_torch():
    code = ("import sys, napari_emseg.neurons; "
            "print(sorted(m for m in ('torch', 'napari', 'qtpy', 'magicgui') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
