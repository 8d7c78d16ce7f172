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


@pytest.mark.parametrize("name", ["mito-2d", "mito-3d", "membrane-2d"])
def test_recipe_builds_a_model(tb, name):
    from napari_emseg.train import TrainConfig, _make_model

    cfg = TrainConfig(**tb.RECIPES[name]["config"])
    model = _make_model(cfg, 1)
    assert model.config["dims"] == cfg.dims
    div = model.divisor()
    assert all(p % d == 0 for p, d in zip(cfg.resolved_patch(), div, strict=True))


def test_mito_3d_recipe_matches_the_inflated_mito_2d(tb):
    """The 3D recipe must accept the inflated 2D model as its warm start."""
    from napari_emseg.models.unet import UNet, inflate_2d
    from napari_emseg.models.zoo import build_model
    from napari_emseg.train import TrainConfig, _make_model, _warm_start

    recipe = tb.RECIPES["mito-3d"]
    source = tb.RECIPES[recipe["inflate"]]["config"]
    net2 = build_model(UNet(dims=2, in_channels=2 * source["context"] + 1,
                            depth=source["depth"], width=source["width"],
                            residual=source["residual"], norm=source["norm"]).config)
    net2.meta = {"name": recipe["inflate"]}
    target = _make_model(TrainConfig(**recipe["config"]), 1)
    _warm_start(target, inflate_2d(net2))  # raises on an architecture mismatch
    for key, value in net2.state_dict().items():
        if value.ndim == 1:  # norm parameters carried over unchanged
            assert np.array_equal(target.state_dict()[key].numpy(), value.numpy())


def test_choose_postprocess_picks_the_threshold_that_fits(tb):
    rng = np.random.default_rng(0)
    gt = np.zeros((4, 32, 32), bool)
    gt[:, 8:24, 8:24] = True
    prob = np.where(gt, 0.72, 0.5) + rng.normal(0, 0.02, gt.shape)
    size, t, iou = tb.choose_postprocess(prob, gt)
    assert size == 1 and 0.55 <= t <= 0.65 and iou == pytest.approx(1.0)


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
