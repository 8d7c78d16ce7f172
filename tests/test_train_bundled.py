"""scripts/train_bundled.py: recipes build the models they claim, and the
post-processing choice is made on the data it is given."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_bundled.py"


@pytest.fixture(scope="module")
def tb():
    spec = importlib.util.spec_from_file_location("train_bundled", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["synapse-2d", "neuron-boundary"])
def test_warm_started_recipes_accept_their_bundled_start(tb, name):
    from napari_emseg.train import TrainConfig, _warm_start, new_model

    recipe = tb.RECIPES[name]
    _warm_start(new_model(len(recipe["classes"]), TrainConfig(**recipe["config"])),
                tb.WEIGHTS / f"{recipe['init']}.pt")  # raises on an architecture mismatch


@pytest.mark.parametrize("name", ["mito-2d", "mito-3d", "membrane-2d", "synapse-2d",
                                  "neuron-boundary"])
def test_recipe_builds_a_model(tb, name):
    from napari_emseg.train import TrainConfig, new_model

    cfg = TrainConfig(**tb.RECIPES[name]["config"])
    model = new_model(2, cfg)
    assert model.config["dims"] == cfg.dims
    div = model.divisor()
    assert all(p % d == 0 for p, d in zip(cfg.resolved_patch(), div, strict=True))


def test_mito_3d_recipe_matches_the_inflated_mito_2d(tb):
    """The 3D recipe must accept the inflated 2D model as its warm start."""
    from napari_emseg.models.unet import UNet, inflate_2d
    from napari_emseg.models.zoo import build_model
    from napari_emseg.train import TrainConfig, _warm_start, new_model

    recipe = tb.RECIPES["mito-3d"]
    source = tb.RECIPES[recipe["inflate"]]["config"]
    net2 = build_model(UNet(dims=2, in_channels=2 * source["context"] + 1,
                            depth=source["depth"], width=source["width"],
                            residual=source["residual"], norm=source["norm"]).config)
    net2.meta = {"name": recipe["inflate"]}
    target = new_model(2, TrainConfig(**recipe["config"]))
    _warm_start(target, inflate_2d(net2))  # raises on an architecture mismatch
    for key, value in net2.state_dict().items():
        if value.ndim == 1:  # norm parameters carried over unchanged
            assert np.array_equal(target.state_dict()[key].numpy(), value.numpy())


def test_choose_postprocess_picks_the_threshold_that_fits(tb):
    rng = np.random.default_rng(0)
    gt = np.zeros((4, 32, 32), bool)
    gt[:, 8:24, 8:24] = True
    prob = np.where(gt, 0.72, 0.5) + rng.normal(0, 0.02, gt.shape)
    size, t, iou = tb.choose_postprocess([prob], [gt])
    assert size == 1 and 0.55 <= t <= 0.65 and iou == pytest.approx(1.0)


def test_choose_postprocess_pools_the_volumes(tb):
    """One threshold for two volumes: the one that fits both, not either alone."""
    gt = np.zeros((2, 16, 16), bool)
    gt[:, 4:12, 4:12] = True
    low = np.where(gt, 0.45, 0.1)   # needs a threshold below 0.45
    high = np.where(gt, 0.9, 0.35)  # needs one of 0.35 or above
    _, t, iou = tb.choose_postprocess([low, high], [gt, gt])
    assert 0.35 <= t < 0.45 and iou == pytest.approx(1.0)
    _, t_low, _ = tb.choose_postprocess([low], [gt])
    assert t_low < 0.35


def test_split_lists_each_volume_with_binary_masks(tb, monkeypatch, tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((20, 8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "am.tif", np.full((20, 8, 8), 7, np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((10, 8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "bm.tif", np.zeros((10, 8, 8), np.uint8))
    monkeypatch.setattr(tb, "DATA", tmp_path)
    monkeypatch.setitem(tb.RECIPES, "two", dict(data=[("a.tif", "am.tif", 0.15),
                                                      ("b.tif", "bm.tif", 3)]))
    ti, tm, vi, vm, cuts = tb.split("two")
    assert cuts == [17, 7]
    assert [v.shape[0] for v in vi] == [3, 3]
    assert tm[0].dtype == np.uint8 and set(np.unique(tm[0])) == {1}


def test_warm_start_record_keeps_the_chain_of_runs(tb, tmp_path):
    from napari_emseg.models.zoo import build_model, save_checkpoint

    first = save_checkpoint(build_model(dict(dims=2, depth=2, width=4),
                                        {"training": {"steps": 30, "seconds": 60.0}}),
                            tmp_path / "first.pt")
    record = tb._warm_start_record(first)
    assert record["file"] == "first.pt" and record["steps"] == 30
    assert "warm_start" not in record
    second = save_checkpoint(build_model(dict(dims=2, depth=2, width=4),
                                         {"training": {"steps": 20}, "warm_start": record}),
                             tmp_path / "second.pt")
    chain = tb._warm_start_record(second)
    assert chain["steps"] == 20 and chain["warm_start"] == record


def test_boundary_scores_for_membrane_maps(tb):
    gt = np.zeros((2, 32, 32), bool)
    gt[:, 16, :] = True
    pred = np.roll(gt, 1, axis=1)  # every membrane pixel one row off
    res = tb._boundary_scores(pred, gt, tb.RECIPES["membrane-2d"]["boundary_tolerance"])
    assert res["val_boundary_f1_2px"] == 1.0
    assert res["val_pixel_error"] == pytest.approx(2 * 32 / 1024)


def test_seed_reaches_the_training_config(tb, monkeypatch, tmp_path):
    import napari_emseg.train as train_module

    seen = {}

    def fake_fit(images, labels, cfg, **kwargs):
        seen["seed"] = cfg.seed
        return train_module.TrainResult(model=None, checkpoint=None, best_iou=0.0,
                                        history=[], steps=0, seconds=0.0)

    small = np.zeros((2, 64, 64), np.uint8)
    monkeypatch.setattr(tb, "split", lambda name: ([small], [small], [small], [small], [2]))
    monkeypatch.setattr(tb, "run_dir", lambda name: tmp_path / name)
    monkeypatch.setattr(train_module, "fit", fake_fit)
    tb.main(["membrane-2d", "--minutes", "1", "--seed", "3"])
    assert seen == {"seed": 3}


def test_boundaries_2d_mark_both_sides_of_each_change_in_plane(tb):
    ids = np.ones((2, 4, 6), np.uint32)
    ids[:, :, 3:] = 2          # two cells side by side
    ids[1] = 3                 # a change along z only: not a boundary of a section
    ids[0, 0, 0] = 0           # unassigned: boundary
    b = tb.boundaries_2d(ids)
    assert b.dtype == np.uint8
    assert b[0, :, 2:4].all() and not b[0, 2:, [0, 1, 4, 5]].any()
    assert b[0, 0, 0] == b[0, 0, 1] == b[0, 1, 0] == 1  # id 0 differs from its neighbours
    assert not b[1].any()


def test_split_never_trains_on_held_back_slices_in_any_view(tb, tmp_path, monkeypatch):
    import tifffile

    from napari_emseg.predict import PLANES

    z = np.arange(10, dtype=np.uint8)[:, None, None]
    tifffile.imwrite(tmp_path / "img.tif", np.broadcast_to(z, (10, 6, 6)).copy())
    tifffile.imwrite(tmp_path / "ids.tif", np.broadcast_to(z.astype(np.uint32) + 1,
                                                          (10, 6, 6)).copy())
    monkeypatch.setattr(tb, "DATA", tmp_path)
    monkeypatch.setitem(tb.RECIPES, "toy", {"data": [
        ("img.tif", "ids.tif", 3, {"boundaries": True, "view": v}) for v in PLANES]})
    ti, tm, vi, vm, cuts = tb.split("toy")
    assert cuts == [7, 7, 7]
    assert [t.shape for t in ti] == [(7, 6, 6), (6, 7, 6), (6, 7, 6)]
    for t in ti:
        assert t.max() == 6  # grey value = z: slices 7-9 never appear
    assert all(v.shape == (3, 6, 6) and v.min() == 7 for v in vi)
    assert not tm[0].any() and tm[1].any()  # xz sections cross the z changes


def test_detection_per_section_counts_2d_objects_and_drops_small_ones(tb):
    gt = np.zeros((2, 40, 40), np.uint16)
    gt[0, 5:10, 5:10], gt[0, 25:30, 25:30], gt[1, 5:10, 5:10] = 1, 2, 1
    pred = np.zeros(gt.shape, bool)
    pred[0, 6:9, 6:9] = True        # overlaps site 1
    pred[0, 30:32, 28:30] = True    # 1 px below site 2: found within 2 px
    pred[1, 30:39, 30:39] = True    # far from everything: a false detection
    pred[1, 0:1, 39:40] = True      # one pixel: removed by min_size 2
    s = tb.detection_per_section(pred, gt, 2, 2.0, (1.0, 1.0))
    assert (s["n_pred"], s["n_gt"], s["found"], s["correct"]) == (3, 3, 2, 2)
    assert s["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["recall"] == pytest.approx(2 / 3, abs=1e-4)
