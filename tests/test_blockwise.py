"""Blockwise (out-of-core) prediction, labelling and tracking, zarr to zarr."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
from scipy import ndimage as ndi

zarr = pytest.importorskip("zarr")
torch = pytest.importorskip("torch")

from napari_emseg.blockwise import (  # noqa: E402
    block_grid,
    connect_client,
    label_blockwise,
    predict_blockwise,
    track_blockwise,
)
from napari_emseg.blockwise.grid import block_core  # noqa: E402
from napari_emseg.blockwise.resume import DONE_DIR  # noqa: E402
from napari_emseg.predict import predict_volume  # noqa: E402
from napari_emseg.progress import Cancelled  # noqa: E402

SHAPE = (20, 96, 96)
BLOCK = (8, 48, 48)  # 3 x 2 x 2 = 12 blocks, the last z block partial
N_BLOCKS = 12


def pointwise(x):
    """A cheap per-voxel "model": logits = 4x - 2 (sigmoid(0.5 * 4 - 2) = 0.5)."""
    return x * 4.0 - 2.0


class CountingModel:
    """Pointwise 3D callable that counts its calls (one call per block, see below)."""

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return x * 4.0 - 2.0


# a 3D patch larger than any block + halo: exactly one tile, one call per block
ONE_CALL = dict(dims=3, patch=(64, 128, 128), normalization=(0.0, 255.0))


def bijective(a: np.ndarray, b: np.ndarray) -> bool:
    """Same partition: background matches background and ids map one-to-one."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = ndi.gaussian_filter(rng.random(SHAPE), 3)
    return np.round(255 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """Random blobs (float32 probabilities) that cross many block faces."""
    rng = np.random.default_rng(1)
    smooth = ndi.gaussian_filter(rng.random(SHAPE), 2)
    return ((smooth - smooth.min()) / np.ptp(smooth)).astype(np.float32)


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        yield client


# --------------------------------------------------------------------------- geometry


def test_block_grid_covers_volume():
    grid = block_grid(SHAPE, BLOCK)
    assert len(grid) == N_BLOCKS
    hits = np.zeros(SHAPE, np.int32)
    for index in grid:
        hits[block_core(index, SHAPE, BLOCK)] += 1
    assert (hits == 1).all()


# --------------------------------------------------------------------------- prediction


def test_pointwise_equals_in_memory_and_formula(tmp_path, volume):
    out = predict_blockwise(volume, tmp_path / "p.zarr", pointwise, block_shape=BLOCK,
                            halo=(0, 8, 8), dims=2, normalization={"mode": "minmax"})
    assert out.shape == SHAPE and out.dtype == np.float32
    assert tuple(out.chunks) == BLOCK
    ref = predict_volume(volume, pointwise, dims=2, normalization={"mode": "minmax"})
    np.testing.assert_allclose(out[:], ref, atol=1e-6)
    # independent: sigmoid(4 * (v - min) / (max - min) - 2)
    v = volume.astype(np.float64)
    x = (v - v.min()) / (v.max() - v.min())
    np.testing.assert_allclose(out[:], 1 / (1 + np.exp(-(4 * x - 2))), atol=1e-5)


def test_normalisation_is_global_not_per_block(tmp_path):
    # left half dark, right half bright: per-block min-max would give each block 0..1
    vol = np.zeros(SHAPE, np.uint8)
    vol[..., 48:] = 200
    vol[..., :48] = 100
    out = predict_blockwise(vol, tmp_path / "g.zarr", pointwise, block_shape=BLOCK,
                            halo=0, dims=2, normalization={"mode": "minmax"})[:]
    sig = 1 / (1 + np.exp(-np.array([-2.0, 2.0])))
    np.testing.assert_allclose(out[..., :48], sig[0], atol=1e-6)
    np.testing.assert_allclose(out[..., 48:], sig[1], atol=1e-6)


def test_tiny_unet_close_to_in_memory(tmp_path, volume):
    from napari_emseg.models.unet import UNet

    torch.manual_seed(0)
    net = UNet(dims=2, depth=2, width=4).eval()
    volume = volume[:10]  # 2 x 2 x 2 blocks, the last z block partial
    out = predict_blockwise(volume, tmp_path / "u.zarr", net, block_shape=BLOCK,
                            halo=(0, 16, 16), patch=32)[:]
    ref = predict_volume(volume, net, patch=32)
    assert out.shape == ref.shape
    err = np.abs(out - ref)
    assert err.mean() < 2e-3 and err.max() < 0.05
    assert not np.allclose(ref, ref.mean(), atol=1e-3)  # the net does not output a constant


def test_path_source_and_uint8_target(tmp_path, volume):
    src = tmp_path / "raw.zarr"
    zarr.open_array(str(src), mode="w", shape=SHAPE, chunks=(4, 32, 32),
                    dtype=np.uint8)[:] = volume
    out = predict_blockwise(str(src), tmp_path / "p8.zarr", pointwise, block_shape=BLOCK,
                            halo=0, dims=2, normalization=(0, 255), dtype="uint8")
    assert out.dtype == np.uint8
    expect = np.round(255 / (1 + np.exp(-(4 * volume.astype(np.float64) / 255 - 2))))
    assert np.abs(out[:].astype(int) - expect).max() <= 1


def test_cancel_then_resume_computes_only_missing_blocks(tmp_path, volume):
    target = tmp_path / "r.zarr"
    ref = predict_volume(volume, pointwise, **ONE_CALL)

    model = CountingModel()
    # a new target costs one extra call: a bare callable is probed for its channel count
    with pytest.raises(Cancelled):
        predict_blockwise(volume, target, model, block_shape=BLOCK, halo=(2, 8, 8),
                          cancel=lambda: model.calls >= 6, **ONE_CALL)
    assert model.calls == 6
    assert len(os.listdir(target / DONE_DIR)) == 5

    seen = []
    model2 = CountingModel()
    out = predict_blockwise(volume, target, model2, block_shape=BLOCK, halo=(2, 8, 8),
                            progress=lambda d, t: seen.append((d, t)), **ONE_CALL)
    assert model2.calls == N_BLOCKS - 5
    assert seen[0] == (5, N_BLOCKS) and seen[-1] == (N_BLOCKS, N_BLOCKS)
    np.testing.assert_allclose(out[:], ref, atol=1e-6)

    # complete: a third run computes nothing
    model3 = CountingModel()
    predict_blockwise(volume, target, model3, block_shape=BLOCK, halo=(2, 8, 8), **ONE_CALL)
    assert model3.calls == 0


def test_crash_then_resume(tmp_path, volume):
    target = tmp_path / "c.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_blockwise(volume, target, CountingModel(fail_after=7), block_shape=BLOCK,
                          halo=0, **ONE_CALL)
    model = CountingModel()
    out = predict_blockwise(volume, target, model, block_shape=BLOCK, halo=0, **ONE_CALL)
    assert model.calls == N_BLOCKS - 6  # 7 calls = the channel probe + 6 blocks
    np.testing.assert_allclose(out[:], predict_volume(volume, pointwise, **ONE_CALL),
                               atol=1e-6)


def test_threads_give_same_result(tmp_path, volume):
    a = predict_blockwise(volume, tmp_path / "a.zarr", pointwise, block_shape=BLOCK, halo=0,
                          **ONE_CALL)[:]
    b = predict_blockwise(volume, tmp_path / "b.zarr", pointwise, block_shape=BLOCK, halo=0,
                          workers=2, **ONE_CALL)[:]
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- bad inputs


def test_target_with_wrong_shape_or_dtype(tmp_path, volume):
    bad = tmp_path / "bad.zarr"
    zarr.open_array(str(bad), mode="w", shape=(5, 5, 5), dtype=np.float32)[:] = 7
    with pytest.raises(ValueError, match=r"shape \(5, 5, 5\)"):
        predict_blockwise(volume, bad, pointwise, block_shape=BLOCK, halo=0, **ONE_CALL)
    bad2 = tmp_path / "bad2.zarr"
    zarr.open_array(str(bad2), mode="w", shape=SHAPE, dtype=np.uint16)[:] = 7
    with pytest.raises(ValueError, match="dtype"):
        predict_blockwise(volume, bad2, pointwise, block_shape=BLOCK, halo=0, **ONE_CALL)
    # nothing was touched
    assert (zarr.open_array(str(bad), mode="r")[:] == 7).all()
    assert (zarr.open_array(str(bad2), mode="r")[:] == 7).all()


def test_existing_target_not_overwritten_without_overwrite(tmp_path, volume):
    other = tmp_path / "other.zarr"
    zarr.open_array(str(other), mode="w", shape=SHAPE, dtype=np.float32)[:] = 3
    with pytest.raises(FileExistsError, match="overwrite=True"):
        predict_blockwise(volume, other, pointwise, block_shape=BLOCK, halo=0, **ONE_CALL)
    assert (zarr.open_array(str(other), mode="r")[:] == 3).all()
    out = predict_blockwise(volume, other, pointwise, block_shape=BLOCK, halo=0,
                            overwrite=True, **ONE_CALL)
    assert out[:].max() < 1

    # same target, different settings: refuse to mix two runs
    with pytest.raises(ValueError, match="block_shape"):
        predict_blockwise(volume, other, pointwise, block_shape=(4, 48, 48), halo=0,
                          **ONE_CALL)

    labels = tmp_path / "labels.zarr"
    zarr.open_array(str(labels), mode="w", shape=SHAPE, dtype=np.uint32)[:] = 1
    with pytest.raises(FileExistsError):
        label_blockwise(np.zeros(SHAPE, np.float32), labels, block_shape=BLOCK)
    assert (zarr.open_array(str(labels), mode="r")[:] == 1).all()


def test_block_smaller_than_halo(tmp_path, volume):
    with pytest.raises(ValueError, match="larger than the halo"):
        predict_blockwise(volume, tmp_path / "h.zarr", pointwise, block_shape=BLOCK,
                          halo=(0, 48, 8), **ONE_CALL)
    with pytest.raises(ValueError, match="larger than the halo"):
        label_blockwise(np.zeros(SHAPE, np.float32), tmp_path / "hl.zarr",
                        method="watershed", block_shape=BLOCK, halo=(8, 8, 8))
    with pytest.raises(ValueError, match="context"):
        predict_blockwise(volume, tmp_path / "c.zarr", pointwise, block_shape=BLOCK,
                          halo=(1, 8, 8), dims=2, context=2, normalization=(0, 255))
    assert not (tmp_path / "h.zarr").exists() and not (tmp_path / "hl.zarr").exists()


def test_unreachable_scheduler(tmp_path, volume):
    with pytest.raises(ConnectionError, match="cannot reach the dask scheduler"):
        connect_client("tcp://127.0.0.1:1", timeout=2)
    with pytest.raises(ValueError, match="invalid dask scheduler address"):
        connect_client("nonsense://", timeout=1)


def test_bad_source_and_target_names(tmp_path):
    with pytest.raises(ValueError, match="3D"):
        predict_blockwise(np.zeros((32, 32), np.uint8), tmp_path / "x.zarr", pointwise)
    with pytest.raises(ValueError, match=".zarr"):
        predict_blockwise(np.zeros(SHAPE, np.uint8), tmp_path / "x.tif", pointwise)


# --------------------------------------------------------------------------- labelling


@pytest.mark.parametrize("connectivity", [1, 3])
def test_components_equal_scipy_label(tmp_path, blobs, connectivity):
    mask = blobs > 0.5
    ref, n = ndi.label(mask, ndi.generate_binary_structure(3, connectivity))
    assert n > 5
    out = label_blockwise(blobs, tmp_path / "l.zarr", threshold=0.5, block_shape=BLOCK,
                          connectivity=connectivity)
    lab = out[:]
    assert lab.dtype == np.uint32
    assert int(lab.max()) == n and set(np.unique(lab)) == set(range(n + 1))
    assert bijective(lab, ref)
    # the stitching was needed: some objects span several blocks
    spans = [len({tuple(np.array(c) // BLOCK) for c in zip(*np.nonzero(ref == i), strict=True)})
             for i in range(1, n + 1)]
    assert max(spans) > 1


def test_components_2d_per_slice(tmp_path, blobs):
    from napari_emseg.postprocess import connected_components

    ref = connected_components(blobs > 0.5, dims=2)
    lab = label_blockwise(blobs, tmp_path / "l2.zarr", block_shape=BLOCK, dims=2,
                          workers=2)[:]
    assert bijective(lab, ref)


def test_watershed_2d_matches_in_memory(tmp_path, blobs):
    from napari_emseg.postprocess import seeded_watershed

    blobs = blobs[:10]
    ref = seeded_watershed(blobs, 0.5, dims=2)
    lab = label_blockwise(blobs, tmp_path / "w2.zarr", method="watershed", dims=2,
                          block_shape=BLOCK, halo=(0, 24, 24))[:]
    assert np.array_equal(lab > 0, ref > 0)
    # ~900 objects; the flood order inside a block can break rare ties differently
    pairs = np.unique(np.stack([lab[lab > 0], ref[ref > 0]], axis=1), axis=0)
    splits = len(pairs) - len(np.unique(pairs[:, 1]))
    merges = len(pairs) - len(np.unique(pairs[:, 0]))
    assert ref.max() > 300 and splits + merges <= 0.01 * ref.max()


def test_watershed_3d_stitches_objects_across_faces(tmp_path):
    # four balls centred on block corners/faces: every ball is cut by a face
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    prob = np.zeros(SHAPE, np.float32)
    for cz, cy, cx in [(8, 48, 48), (16, 20, 48), (8, 70, 20), (4, 75, 75)]:
        prob[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = 1.0
    ref = ndi.label(prob > 0.5)[0]
    lab = label_blockwise(prob, tmp_path / "w3.zarr", method="watershed", dims=3,
                          block_shape=BLOCK, halo=(4, 16, 16))[:]
    assert int(lab.max()) == 4
    assert bijective(lab, ref)
    # without the overlap stitching (threshold 1 is never met on cut balls) they stay split
    split = label_blockwise(prob, tmp_path / "w3b.zarr", method="watershed", dims=3,
                            block_shape=BLOCK, halo=(4, 16, 16), stitch_threshold=1.0)[:]
    assert int(split.max()) >= 4


def test_components_on_cluster(tmp_path, blobs, volume, cluster_client):
    ref, n = ndi.label(blobs > 0.5)
    lab = label_blockwise(blobs, tmp_path / "dl.zarr", block_shape=BLOCK,
                          client=cluster_client)[:]
    assert int(lab.max()) == n and bijective(lab, ref)

    # prediction on the cluster: a path source read by the workers, a pickled callable
    src = tmp_path / "raw.zarr"
    zarr.open_array(str(src), mode="w", shape=SHAPE, chunks=BLOCK, dtype=np.uint8)[:] = volume
    out = predict_blockwise(str(src), tmp_path / "dp.zarr", pointwise, block_shape=BLOCK,
                            halo=(0, 8, 8), dims=2, normalization={"mode": "minmax"},
                            client=cluster_client)
    ref_p = predict_volume(volume, pointwise, dims=2, normalization={"mode": "minmax"})
    np.testing.assert_allclose(out[:], ref_p, atol=1e-6)


def test_unet_checkpoint_shipped_to_cluster(tmp_path, volume, cluster_client):
    from napari_emseg.models.unet import UNet

    torch.manual_seed(1)
    net = UNet(dims=2, depth=2, width=4)
    net.meta = {"normalization": {"mode": "fixed", "low": 0, "high": 255}, "patch": [32, 32]}
    volume = volume[:10]
    local = predict_blockwise(volume, tmp_path / "ul.zarr", net, block_shape=BLOCK,
                              halo=(0, 16, 16))[:]
    remote = predict_blockwise(volume, tmp_path / "ur.zarr", net, block_shape=BLOCK,
                               halo=(0, 16, 16), client=cluster_client)[:]
    np.testing.assert_allclose(local, remote, atol=1e-5)
    assert net.training  # the caller's module is left as it was


# --------------------------------------------------------------------------- tracking / CLI


def test_track_blockwise_matches_track_slices(tmp_path, blobs):
    from napari_emseg.postprocess import connected_components
    from napari_emseg.tracking import track_slices

    per_slice = connected_components(blobs > 0.5, dims=2)
    src = tmp_path / "inst.zarr"
    zarr.open_array(str(src), mode="w", shape=SHAPE, chunks=(8, 96, 96),
                    dtype=np.uint32)[:] = per_slice
    out = track_blockwise(src, tmp_path / "t.zarr", iou_threshold=0.3)
    np.testing.assert_array_equal(out[:], track_slices(per_slice, iou_threshold=0.3))


def test_cli_helpers(tmp_path, blobs, capsys):
    from napari_emseg.cli.blockwise import add_blockwise_arguments, run_blockwise_segment

    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--overwrite", action="store_true")  # an existing option is kept
    add_blockwise_arguments(parser)
    prob = tmp_path / "prob.zarr"
    zarr.open_array(str(prob), mode="w", shape=SHAPE, dtype=np.float32)[:] = blobs
    out = tmp_path / "lab.zarr"
    args = parser.parse_args([str(prob), str(out), "--blockwise", "--block", "8,48,48"])
    assert args.blockwise and args.block == (8, 48, 48) and args.scheduler is None
    args.method, args.dims, args.threshold, args.quiet = "components", 3, "0.5", True
    assert run_blockwise_segment(args) == 0
    assert bijective(zarr.open_array(str(out), mode="r")[:], ndi.label(blobs > 0.5)[0])
    assert "objects" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_blockwise_segment(args)
    args.scheduler, args.scheduler_timeout, args.overwrite = "tcp://127.0.0.1:1", 1.0, True
    with pytest.raises(ConnectionError):
        run_blockwise_segment(args)
