"""Training and fine-tuning: it learns, ignores unlabeled pixels, checkpoints, cancels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tifffile

torch = pytest.importorskip("torch")

from napari_emseg.models.zoo import CheckpointError, build_model, load_model  # noqa: E402
from napari_emseg.train import (  # noqa: E402
    TrainConfig,
    fine_tune,
    fit,
    masked_loss,
    painted_targets,
)

TINY = dict(dims=2, depth=3, width=8, patch=(64, 64), batch_size=8, elastic_p=0.0,
            val_slices=4, threads=2)


@pytest.fixture(scope="module")
def crop(fixtures_dir):
    img = tifffile.imread(fixtures_dir / "lucchi_crop_image.tif")
    mask = tifffile.imread(fixtures_dir / "lucchi_crop_mask.tif")
    return img, mask


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    return float((pred & gt).sum() / max((pred | gt).sum(), 1))


def _predict(model, img: np.ndarray) -> np.ndarray:
    """Whole-slice logits of a 2D model, computed independently of train.validate."""
    lo, hi = np.percentile(img, [1, 99.8])
    x = torch.from_numpy(((img - lo) / (hi - lo)).astype(np.float32))[:, None]
    with torch.no_grad():
        return model.eval()(x)[:, 0].numpy()


@pytest.mark.slow
def test_tiny_unet_learns_mitochondria(crop, tmp_path):
    img, mask = crop
    cfg = TrainConfig(**TINY, steps=150, lr=5e-3, val_every=50, warmup=10)
    res = fit(img, mask, cfg, checkpoint=tmp_path / "m.pt")
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    iou = _iou(_predict(res.model, img) > 0, mask > 0)
    all_foreground = _iou(np.ones(mask.shape, bool), mask > 0)  # 0.23
    assert iou > max(0.5, 2 * all_foreground), iou
    reloaded = load_model(tmp_path / "m.pt")
    assert reloaded.meta["metrics"]["val_iou"] == pytest.approx(res.best_iou, abs=1e-3)
    assert (tmp_path / "m.csv").read_text().startswith("step,")


def test_masked_loss_ignores_unlabeled_pixels():
    logits = torch.randn(1, 1, 4, 4, requires_grad=True)
    target = torch.tensor(painted_targets(np.array([[[0, 1, 2, 0]] * 4])))
    masked_loss(logits, target).backward()
    grad = logits.grad[0, 0]
    assert torch.all(grad[:, 0] == 0) and torch.all(grad[:, 3] == 0)
    assert torch.all(grad[:, 1] != 0) and torch.all(grad[:, 2] != 0)
    multi = torch.randn(1, 3, 4, 4, requires_grad=True)
    masked_loss(multi, target, "ce_dice").backward()
    assert torch.all(multi.grad[0, :, :, 0] == 0)


@pytest.mark.slow
def test_only_background_painted_never_creates_foreground(crop):
    """Unpainted voxels (0) must not act as foreground: the model stays all background."""
    img, _ = crop
    model = build_model(dict(dims=2, depth=3, width=8))
    with torch.no_grad():
        model.head.bias.fill_(-4.0)  # starts predicting background everywhere
    painted = np.zeros(img.shape, np.uint8)
    painted[:, 40:60, :] = 1  # background strokes only; the rest unlabeled
    assert not (_predict(model, img) > 0).any()
    cfg = TrainConfig(steps=30, lr=5e-3, batch_size=4, patch=(64, 64), val_every=10,
                      warmup=1, threads=2)
    res = fine_tune(model, img, painted, cfg)
    assert res.steps == 30
    assert not (_predict(res.model, img) > 0).any()


def test_fine_tune_writes_loadable_checkpoint_with_history(crop, tmp_path):
    img, mask = crop
    model = build_model(dict(dims=2, depth=3, width=8), {"context": 0})
    painted = np.zeros(img.shape, np.uint8)
    painted[4, ::8, :] = 1 + (mask[4, ::8, :] > 0)
    cfg = TrainConfig(steps=12, batch_size=2, patch=(64, 64), val_every=6, threads=2)
    res = fine_tune(model, img, painted, cfg, checkpoint=tmp_path / "ft.pt")
    loaded = load_model(tmp_path / "ft.pt")
    assert loaded.meta["training"]["painted_voxels"] == int((painted > 0).sum())
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), res.model.eval()(x), atol=1e-5)
    assert not (tmp_path / "ft.resume.pt").exists()


def test_fine_tune_leaves_the_given_model_as_it_was(crop):
    img, mask = crop
    model = build_model(dict(dims=2, depth=3, width=8), {"context": 0, "name": "given"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta = copy.deepcopy(model.meta)
    painted = np.zeros(img.shape, np.uint8)
    painted[4, ::8, :] = 1 + (mask[4, ::8, :] > 0)
    cfg = TrainConfig(steps=4, batch_size=2, patch=(64, 64), val_every=2, threads=2)
    res = fine_tune(model, img, painted, cfg, recipe="far", voxel_size=(5.0, 5.0, 5.0))
    assert res.model is not model and model.meta == meta
    for key, value in model.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(value, before[key])
    assert any(not torch.equal(v, before[k]) for k, v in res.model.state_dict().items())


@pytest.mark.parametrize(
    ("painted_fn", "message"),
    [
        (lambda m: np.zeros_like(m), "empty"),
        (lambda m: np.full(m.shape[1:], 1, np.uint8), "shape"),
        (lambda m: np.where(m > 0, 3, 1).astype(np.uint8), "class"),
    ],
)
def test_fine_tune_bad_annotations(crop, painted_fn, message):
    img, mask = crop
    model = build_model(dict(dims=2, depth=2, width=4))
    with pytest.raises(ValueError, match=message):
        fine_tune(model, img, painted_fn(mask), TrainConfig(steps=1))


def test_fit_rejects_single_class_and_shape_mismatch(crop):
    img, mask = crop
    with pytest.raises(ValueError, match="single class"):
        fit(img, np.zeros_like(mask), TrainConfig(steps=1))
    with pytest.raises(ValueError, match="shape"):
        fit(img, mask[:-1], TrainConfig(steps=1))


def test_cancel_keeps_a_valid_checkpoint(crop, tmp_path):
    img, mask = crop
    calls = []
    cfg = TrainConfig(**{**TINY, "batch_size": 2}, steps=500, val_every=1000)
    res = fit(img, mask, cfg, checkpoint=tmp_path / "c.pt",
              progress=lambda d, t: calls.append(d), cancel=lambda: len(calls) >= 3)
    assert res.cancelled and res.steps == 3
    assert load_model(tmp_path / "c.pt").config["width"] == 8


def test_resume_continues_the_step_count(crop, tmp_path):
    img, mask = crop
    cfg = TrainConfig(**{**TINY, "batch_size": 2}, steps=4, val_every=2)
    fit(img, mask, cfg, checkpoint=tmp_path / "r.pt")
    cfg.steps = 6
    res = fit(img, mask, cfg, checkpoint=tmp_path / "r.pt", resume=True)
    assert [h["step"] for h in res.history] == [2, 4, 6]


def test_incompatible_checkpoint_is_named(tmp_path):
    from napari_emseg.models.zoo import save_checkpoint

    model = build_model(dict(dims=2, depth=2, width=4))
    path = save_checkpoint(model, tmp_path / "a.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["width"] = 8
    torch.save(ckpt, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(tmp_path / "b.pt")
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(tmp_path / "c.pt")


def test_checkpoint_metadata_is_stored_as_plain_types(tmp_path):
    from pathlib import Path

    from napari_emseg.models.zoo import save_checkpoint

    model = build_model(dict(dims=2, depth=2, width=4))
    meta = {"torch": torch.__version__, "path": Path("/x"), "iou": np.float32(0.5),
            "steps": np.int64(3), "shape": (1, 2)}
    save_checkpoint(model, tmp_path / "m.pt", meta)
    loaded = load_model(tmp_path / "m.pt").meta  # torch.load(weights_only=True) inside
    assert loaded["torch"] == str(torch.__version__) and type(loaded["torch"]) is str
    assert loaded["path"] == str(Path("/x")) and loaded["shape"] == [1, 2]
    assert loaded["iou"] == 0.5 and type(loaded["steps"]) is int


def test_freeze_norm_keeps_batchnorm_statistics(crop):
    img, mask = crop
    painted = np.where(mask > 0, 2, 1).astype(np.uint8)
    for freeze in (True, False):
        model = build_model(dict(dims=2, depth=2, width=4),
                            {"training": {"steps": 10}, "threshold": 0.8})
        with torch.no_grad():
            model.down[0].norm1.running_mean.fill_(0.3)
        cfg = TrainConfig(steps=3, batch_size=2, patch=(64, 64), val_every=3, threads=2,
                          freeze_norm=freeze)
        res = fine_tune(model, img, painted, cfg, recipe="near")  # "far" re-estimates them
        kept = bool(torch.all(res.model.down[0].norm1.running_mean == 0.3))
        assert kept is freeze
        # the tuned 0.8 no longer applies; a near run keeps 0.5 (only far runs choose one)
        assert res.model.meta["threshold"] == 0.5 and "threshold_source" not in res.model.meta


def test_fine_tune_defaults_to_a_small_learning_rate_for_trained_models():
    from napari_emseg.train import FINE_TUNE_LR, FINE_TUNE_LR_3D, fine_tune_defaults

    trained = build_model(dict(dims=2, depth=2, width=4), {"training": {"steps": 10}})
    fresh = build_model(dict(dims=2, depth=2, width=4))
    trained_3d = build_model(dict(dims=3, depth=2, width=4), {"training": {"steps": 10}})
    assert fine_tune_defaults(trained).lr == FINE_TUNE_LR
    assert fine_tune_defaults(fresh).lr > 5 * FINE_TUNE_LR
    assert fine_tune_defaults(trained_3d).lr == FINE_TUNE_LR_3D < FINE_TUNE_LR
    assert fine_tune_defaults(trained).freeze_norm is False


@pytest.mark.slow
def test_decoder_only_training_keeps_the_encoder(crop):
    img, mask = crop
    model = build_model(dict(dims=2, depth=3, width=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(dims=2, depth=3, width=4, steps=3, batch_size=2, patch=(64, 64),
                      val_every=3, threads=2, train_layers="decoder", lr=1e-2, warmup=0)
    res = fine_tune(model, img, np.where(mask > 0, 2, 1).astype(np.uint8), cfg)
    after = res.model.state_dict()
    weights = [k for k in after if k.endswith("weight")]
    assert all(torch.equal(after[k], before[k]) for k in weights if k.startswith("down."))
    assert any(not torch.equal(after[k], before[k]) for k in weights if k.startswith("up"))
    with pytest.raises(ValueError, match="train_layers"):
        fine_tune(model, img, np.where(mask > 0, 2, 1).astype(np.uint8),
                  TrainConfig(steps=1, train_layers="middle"))
    with pytest.raises(ValueError, match="optimizer"):
        fine_tune(model, img, np.where(mask > 0, 2, 1).astype(np.uint8),
                  TrainConfig(steps=1, optimizer="lbfgs"))


def test_fit_warm_starts_from_a_checkpoint(crop, tmp_path):
    from napari_emseg.models.zoo import save_checkpoint

    img, mask = crop
    cfg = TrainConfig(**TINY, steps=1, val_every=1, lr=1e-12, warmup=0, optimizer="sgd")
    source = build_model(dict(dims=2, depth=3, width=8), {"training": {"steps": 5}})
    save_checkpoint(source, tmp_path / "src.pt", source.meta)
    res = fit(img, mask, cfg, init=tmp_path / "src.pt")
    for k, v in source.state_dict().items():
        if k.endswith("weight"):  # one SGD step at lr 1e-12 leaves the weights where they were
            torch.testing.assert_close(res.model.state_dict()[k], v, atol=1e-6, rtol=0)
    wrong = TrainConfig(**{**TINY, "width": 4}, steps=1)
    with pytest.raises(CheckpointError, match="architecture"):
        fit(img, mask, wrong, init=tmp_path / "src.pt")


def test_average_states_is_the_elementwise_mean():
    from napari_emseg.train import average_states

    a = build_model(dict(dims=2, depth=2, width=4)).state_dict()
    b = build_model(dict(dims=2, depth=2, width=4)).state_dict()
    b = {k: (v + 2.0 if v.is_floating_point() else v + 7) for k, v in b.items()}
    avg = average_states([a, b])
    key = "down.0.conv1.weight"
    torch.testing.assert_close(avg[key], (a[key] + b[key]) / 2)
    counts = [k for k in avg if k.endswith("num_batches_tracked")]
    assert counts and all(torch.equal(avg[k], b[k]) for k in counts)  # from the last state
    with pytest.raises(ValueError, match="at least one"):
        average_states([])
    with pytest.raises(ValueError, match="different parameters"):
        average_states([a, {key: a[key]}])


def test_update_norm_stats_replaces_stale_batchnorm_statistics(crop):
    from napari_emseg.train import update_norm_stats

    img, mask = crop
    model = build_model(dict(dims=2, depth=2, width=4))
    norm = model.down[0].norm1
    with torch.no_grad():
        norm.running_mean.fill_(50.0)
        norm.running_var.fill_(1e-4)
    seen = []
    hook = model.down[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    cfg = TrainConfig(dims=2, depth=2, width=4, patch=(64, 64), batch_size=4, elastic_p=0.0)
    update_norm_stats(model, img, mask, cfg, batches=20)
    hook.remove()
    assert not model.training and len(seen) == 20
    acts = torch.cat(seen).transpose(0, 1).flatten(1)  # (channels, samples)
    torch.testing.assert_close(norm.running_mean, acts.mean(1), atol=1e-4, rtol=1e-4)
    assert torch.all(norm.running_var > 1e-3)


def test_best_threshold_separates_the_labelled_voxels():
    from napari_emseg.train import best_threshold

    rng = np.random.default_rng(0)
    fg = rng.random(2000) < 0.3
    prob = np.where(fg, rng.uniform(0.4, 0.8, 2000), rng.uniform(0.0, 0.3, 2000))
    t, iou = best_threshold(prob, fg)
    assert t == 0.4 and iou == 1.0  # 0.3 and 0.35 separate as well; ties go towards 0.5
    # the separation (0.1) lies below the allowed 0.3-0.7: none helps, 0.5 stays
    low = np.where(fg, rng.uniform(0.12, 0.25, 2000), rng.uniform(0.0, 0.08, 2000))
    t, iou = best_threshold(low, fg)
    assert t == 0.5 and iou == 0.0
    assert best_threshold(np.full(10, 0.5), np.zeros(10, bool))[0] == 0.5  # tie -> 0.5


def test_painted_boxes_cover_runs_of_painted_slices():
    from napari_emseg.train import _painted_boxes

    painted = np.zeros((30, 100, 100), np.uint8)
    painted[3, 40:50, 10:20] = 1
    painted[4, 60, 70] = 2
    painted[20, 5, 5] = 1
    boxes = _painted_boxes(painted, margin=1, pad=4)
    assert boxes == [(slice(2, 6), slice(36, 65), slice(6, 75)),
                     (slice(19, 22), slice(1, 10), slice(1, 10))]


@pytest.fixture(scope="module")
def fine_tuned(crop, tmp_path_factory):
    """A tiny model fine-tuned on strokes of every other slice, and its strokes."""
    img, mask = crop
    model = build_model(dict(dims=2, depth=3, width=8), {"context": 0, "threshold": 0.9,
                                                         "training": {"steps": 1}})
    painted = np.zeros(img.shape, np.uint8)
    painted[::2, ::6, :] = 1 + (mask[::2, ::6, :] > 0)
    cfg = TrainConfig(steps=30, batch_size=4, patch=(64, 64), val_every=15, lr=3e-3,
                      warmup=3, threads=2)
    path = tmp_path_factory.mktemp("ft") / "ft.pt"
    return fine_tune(model, img, painted, cfg, checkpoint=path, recipe="far"), painted


@pytest.mark.slow
def test_fine_tune_chooses_the_threshold_on_the_painted_voxels(crop, fine_tuned):
    from napari_emseg.predict import predict_volume
    from napari_emseg.train import CALIBRATION_THRESHOLDS, THRESHOLD_SHRINK

    img, _ = crop
    res, painted = fine_tuned
    t = res.model.meta["threshold"]
    assert t != 0.9 and load_model(res.checkpoint).meta["threshold"] == t
    # independently: the whole image predicted, IoU of the painted voxels per threshold
    prob = predict_volume(img, res.model)[painted > 0]
    fg = painted[painted > 0] == 2
    ious = {c: _iou(prob > c, fg) for c in CALIBRATION_THRESHOLDS}
    # another threshold than 0.5 only where the held-out half confirmed one, halfway to it
    chosen = 0.5 + (t - 0.5) / THRESHOLD_SHRINK
    assert t == 0.5 or (round(chosen, 3) in CALIBRATION_THRESHOLDS
                        and ious[round(chosen, 3)] > ious[0.5])
    assert "held-out half" in res.model.meta["threshold_source"]


def test_held_out_threshold_needs_the_other_half_to_agree():
    from napari_emseg.train import THRESHOLD_SHRINK, held_out_threshold

    rng = np.random.default_rng(0)
    fg = rng.random(4000) < 0.3
    half = (np.arange(4000) % 2).astype(np.int8)
    shifted = np.where(fg, 0.4, 0.1) + rng.normal(0, 0.02, 4000)  # separates at ~0.25
    t, note = held_out_threshold(shifted, fg, half)
    # 0.3 (the lowest tried) confirmed, then taken halfway back to 0.5
    assert t == pytest.approx(0.5 + THRESHOLD_SHRINK * (0.3 - 0.5))
    assert "IoU 1.000 at 0.30" in note and "halfway back to 0.5" in note
    # half 0 separates at 0.25, half 1 only at 0.5: half 1 does not confirm 0.25
    odd = np.where(fg, np.where(half == 0, 0.4, 0.7), np.where(half == 0, 0.1, 0.3))
    assert held_out_threshold(odd, fg, half)[0] == 0.5
    # too few voxels of a class in one half: no choice
    assert held_out_threshold(shifted, fg & (half == 0), half) is None


def test_fine_tune_keeps_the_default_threshold_without_both_classes(crop):
    from napari_emseg.train import FINE_TUNED_THRESHOLD

    img, _ = crop
    model = build_model(dict(dims=2, depth=2, width=4), {"threshold": 0.9,
                                                         "training": {"steps": 1}})
    painted = np.zeros(img.shape, np.uint8)
    painted[2, :, :] = 1
    painted[2, 60, 60:70] = 2  # 10 foreground voxels: too few to choose a threshold
    cfg = TrainConfig(steps=2, batch_size=2, patch=(64, 64), val_every=2, threads=2)
    res = fine_tune(model, img, painted, cfg)
    assert res.model.meta["threshold"] == FINE_TUNED_THRESHOLD
    assert "threshold_source" not in res.model.meta


def test_fine_tuning_a_3d_model_uses_a_small_default_patch(crop, tmp_path):
    from napari_emseg.train import FINE_TUNE_PATCH_3D, fine_tune_defaults

    img, mask = crop
    model = build_model(dict(dims=3, depth=2, width=4), {"patch": [16, 160, 160],
                                                         "threshold": 0.8})
    assert fine_tune_defaults(model).batch_size == 2
    painted = np.zeros(img.shape, np.uint8)
    painted[4:6, ::6, :] = 1 + (mask[4:6, ::6, :] > 0)
    cfg = TrainConfig(steps=1, batch_size=1, val_every=1, threads=2)
    fine_tune(model, img, painted, cfg, checkpoint=tmp_path / "ft3.pt")
    trained = load_model(tmp_path / "ft3.pt").meta["training"]["config"]["patch"]
    assert tuple(trained) == (8, 128, 128)
    assert load_model(tmp_path / "ft3.pt").meta["threshold"] == 0.5  # not chosen in 3D
    assert FINE_TUNE_PATCH_3D == (8, 128, 128)


# ------------------------------------------------- the gap rule and the time budget
def test_choose_recipe_on_constructed_cases():
    from napari_emseg.train import FAR_SHIFT, FIT_IOU, NEAR_IOU, choose_recipe

    trained = build_model(dict(dims=2, depth=2, width=4), {"training": {"steps": 9}})
    untrained = build_model(dict(dims=2, depth=2, width=4))
    assert choose_recipe(untrained, 0.95, 0.0) == "far"  # nothing to keep
    assert choose_recipe(trained, 0.9, FAR_SHIFT / 2) == "near"
    assert choose_recipe(trained, 0.5, FAR_SHIFT * 1.5) == "far"  # other data statistics
    assert choose_recipe(trained, FIT_IOU, FAR_SHIFT * 1.5) == "near"  # ... but it fits
    assert choose_recipe(trained, None, FAR_SHIFT * 1.5) == "far"
    assert choose_recipe(trained, NEAR_IOU / 2, FAR_SHIFT / 2) == "far"  # fails on strokes
    # correction strokes sit where the model is wrong: a middling IoU stays near
    assert choose_recipe(trained, 0.44, FAR_SHIFT / 2) == "near"
    assert choose_recipe(trained, None, None) == "near"


def _constant_model(foreground: bool, classes=("background", "mitochondria"), name="m"):
    """A trained-looking binary model that says foreground (or background) everywhere."""
    model = build_model(dict(dims=2, depth=2, width=4),
                        {"training": {"steps": 9}, "classes": list(classes), "name": name})
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(8.0 if foreground else -8.0)
    return model.eval()


def _fg_bg_strokes(shape, fg_rows=2, bg_rows=2):
    painted = np.zeros(shape, np.uint8)
    painted[1, 10 : 10 + fg_rows, :] = 2
    painted[1, 40 : 40 + bg_rows, :] = 1
    return painted


def test_best_start_takes_an_alternative_only_when_clearly_better(crop, monkeypatch):
    from napari_emseg import train as train_module
    from napari_emseg.train import START_MARGIN, best_start, measure_start

    img = crop[0][:3]
    painted = _fg_bg_strokes(img.shape)  # half of the painted voxels are foreground
    blind = measure_start(_constant_model(False, name="blind"), img, painted, recipe="far")
    assert blind.score == 0.0 and blind.recipe == "far"
    seeing = _constant_model(True, name="seeing")
    other_task = _constant_model(True, classes=("background", "membrane"), name="membranes")
    start, scores = best_start(blind, [other_task, seeing], img, painted, recipe="far")
    assert start.name == "seeing" and start.model is not seeing  # AdaBN on a copy
    assert scores == {"blind": 0.0, "seeing": 0.5}  # other task: not measured
    # near: the chosen model is kept without measuring the others
    near = measure_start(_constant_model(True, name="near"), img, painted, recipe="near")
    assert best_start(near, [seeing], img, painted, recipe="far") == (near, {})
    # an alternative less than START_MARGIN better does not replace the first
    monkeypatch.setattr(train_module, "START_MARGIN", 0.6)
    start, scores = best_start(blind, [seeing], img, painted, recipe="far")
    assert start is blind and scores == {"blind": 0.0, "seeing": 0.5}
    assert START_MARGIN < 0.5


def test_a_3d_start_on_thick_sections_gives_way_to_a_2d_model(crop):
    from napari_emseg.train import choose_start, start_swapped, start_text

    img = crop[0][:3]
    painted = _fg_bg_strokes(img.shape)
    cube = build_model(dict(dims=3, depth=2, width=4),
                       {"training": {"steps": 9}, "name": "cube", "voxel_size_nm": [5, 5, 5],
                        "classes": ["background", "mitochondria"]})
    flat = [_constant_model(False, name="blind"), _constant_model(True, name="seeing")]
    start, scores = choose_start(cube, flat, img, painted, voxel_size=(50.0, 5.0, 5.0),
                                 recipe="far")
    assert start.name == "seeing" and start.model.config["dims"] == 2
    assert scores == {"cube": None, "blind": 0.0, "seeing": 0.5}
    assert "cube not measured: sections too thick" in start_text(start.name, scores)
    assert start_swapped(start.name, scores) and not start_swapped("cube", scores)
    # sections as thick as in training: the 3D model is measured and kept (alternatives
    # of other dimensions are never measured against it)
    start, scores = choose_start(cube, flat, img, painted, voxel_size=(5.0, 5.0, 5.0),
                                 recipe="near")
    assert start.name == "cube" and scores == {}
    assert not start_swapped(start.name, scores)


def test_fine_tune_starts_from_the_alternative_and_says_so(crop, tmp_path):
    img = crop[0][:3]
    painted = _fg_bg_strokes(img.shape)
    records = []
    cfg = TrainConfig(steps=1, batch_size=2, patch=(64, 64), val_every=1, threads=2)
    res = fine_tune(_constant_model(False, name="blind"), img, painted, cfg,
                    alternatives=[_constant_model(True, name="seeing")],
                    on_log=records.append, checkpoint=tmp_path / "ft.pt")
    assert records[0]["start"] == "seeing"
    assert records[0]["start_scores"] == {"blind": 0.0, "seeing": 0.5}
    training = load_model(tmp_path / "ft.pt").meta["training"]
    assert training["start"] == "seeing" and training["start_scores"]["seeing"] == 0.5
    assert res.model.meta["name"] == "seeing"


def test_related_models_are_bundled_ones_of_the_same_task(tmp_path):
    from napari_emseg.models.zoo import list_models, related_models

    if "mito-2d" not in list_models():
        pytest.skip("bundled weights not installed")
    assert related_models("mito-2d") == ["mito-3d", "mito-2d-mix", "mito-2d-dr"]
    assert related_models("mito-3d") == ["mito-2d", "mito-2d-mix", "mito-2d-dr"]
    assert related_models("membrane-2d") == []  # no other membrane model
    assert related_models(str(tmp_path / "mine.pt")) == []  # a user's own: never swapped


def test_fine_tune_records_the_recipe_and_its_measurements(crop):
    img, mask = crop
    model = build_model(dict(dims=2, depth=2, width=4),
                        {"training": {"steps": 9}, "normalization": {"mode": "percentile"}})
    painted = np.zeros(img.shape, np.uint8)
    painted[3, ::6, :] = 1 + (mask[3, ::6, :] > 0)
    records = []
    cfg = TrainConfig(steps=2, batch_size=2, patch=(64, 64), val_every=2, threads=2)
    res = fine_tune(model, img, painted, cfg, on_log=records.append)
    first = records[0]
    assert set(first) == {"recipe", "painted_iou_before", "feature_shift"}  # no alternatives
    training = res.model.meta["training"]
    assert training["recipe"] == first["recipe"] in ("near", "far")
    assert training["feature_shift"] == pytest.approx(first["feature_shift"], abs=1e-4)


def test_pseudo_labels_fill_only_confident_unpainted_voxels():
    from napari_emseg.train import PSEUDO_BG, PSEUDO_FG, with_pseudo_labels

    painted = np.zeros((2, 4, 4), np.uint8)
    painted[0, 0, 0] = 2
    targets = painted.astype(np.int64) - 1
    prob = np.full((1, 4, 4), 0.5, np.float32)
    prob[0, 1, :] = 0.97
    prob[0, 2, :] = 0.02
    prob[0, 0, 0] = 0.01  # painted: the stroke wins
    out = with_pseudo_labels(targets, painted, [((slice(0, 1), slice(0, 4), slice(0, 4)),
                                                 prob)])
    assert out[0, 0, 0] == 1 and (out[0, 1] == PSEUDO_FG).all()
    assert (out[0, 2] == PSEUDO_BG).all() and (out[0, 3] == -1).all()
    assert (out[1] == -1).all() and (targets[0, 1] == -1).all()  # input untouched


def test_pseudo_labels_add_a_weighted_term_to_the_loss():
    from napari_emseg.train import PSEUDO_FG, PSEUDO_WEIGHT, masked_loss

    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[-1, -1], [PSEUDO_FG, -1]]])
    expected = PSEUDO_WEIGHT * float(np.log(2.0))  # BCE of logit 0 towards 1
    assert float(masked_loss(logits, target)) == pytest.approx(expected, rel=1e-5)


def test_early_stop_waits_for_a_plateau():
    from napari_emseg.train import _EarlyStop

    falling = _EarlyStop(patience=5, warmup=2)
    for k in range(40):
        falling.update(1.0 / (k + 1))
    assert not falling.stopped
    flat = _EarlyStop(patience=5, warmup=2)
    steps = 0
    while not flat.stopped and steps < 100:
        flat.update(0.5)
        steps += 1
    assert flat.stopped and steps == 2 + 5 + 1


class _FakeClock:
    """``time.perf_counter`` that moves only when told (one second a training step)."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


def _fake_time(monkeypatch):
    import napari_emseg.train as train_module

    clock = _FakeClock()

    class FakeTime:
        perf_counter = staticmethod(clock.perf_counter)

    monkeypatch.setattr(train_module, "time", FakeTime)
    return clock


def test_time_budget_stops_within_one_step(crop, monkeypatch):
    img, mask = crop
    clock = _fake_time(monkeypatch)
    model = build_model(dict(dims=2, depth=2, width=4))

    def step_done(done, total):
        clock.now += 1.0

    painted = np.zeros(img.shape, np.uint8)
    painted[2, ::5, :] = 1 + (mask[2, ::5, :] > 0)
    cfg = TrainConfig(steps=1000, minutes=7 / 60, batch_size=2, patch=(64, 64),
                      val_every=1000, threads=2, early_stop=0)
    res = fine_tune(model, img, painted, cfg, progress=step_done)
    assert res.steps == 7  # the 7th step ends at the 7 s budget


def test_preview_fires_on_schedule_and_stops_on_cancel(crop, monkeypatch):
    img, mask = crop
    clock = _fake_time(monkeypatch)
    model = build_model(dict(dims=2, depth=2, width=4))
    calls = []

    def preview(m, seconds):
        assert not m.training  # shown in eval mode
        calls.append(seconds)

    def step_done(done, total):
        clock.now += 4.0

    painted = np.zeros(img.shape, np.uint8)
    painted[2, ::5, :] = 1 + (mask[2, ::5, :] > 0)
    cfg = TrainConfig(steps=1000, batch_size=2, patch=(64, 64), val_every=1000, threads=2,
                      preview_every=10.0)
    res = fine_tune(model, img, painted, cfg, progress=step_done, preview=preview,
                    cancel=lambda: len(calls) >= 4)
    assert calls == [0.0, 12.0, 24.0, 36.0]  # at the start, then the first step after 10 s
    assert res.cancelled and res.steps == 9


def test_fine_tune_trains_at_the_models_voxel_size(crop):
    img, mask = crop
    model = build_model(dict(dims=2, in_channels=3, depth=2, width=4),
                        {"context": 1, "training": {"steps": 9},
                         "voxel_size_nm": [5.0, 5.0, 5.0]})
    painted = np.zeros(img.shape, np.uint8)
    painted[3, ::6, :] = 1 + (mask[3, ::6, :] > 0)
    cfg = TrainConfig(steps=2, batch_size=2, patch=(64, 64), val_every=2, threads=2)
    logs = []
    res = fine_tune(model, img, painted, cfg, recipe="near", voxel_size=(50.0, 10.0, 10.0),
                    on_log=logs.append)
    said = next(rec["adaptation"] for rec in logs if "recipe" in rec)
    assert "resampled to the model's voxel size" in said and "without its neighbours" in said
    training = res.model.meta["training"]
    assert training["resampled"] == [1.0, 2.0, 2.0]  # 10 nm pixels seen at 5 nm
    assert training["context_collapsed"] and res.model.config["in_channels"] == 1
    logs.clear()
    plain = fine_tune(model, img, painted, cfg, recipe="near", on_log=logs.append)
    assert not any("adaptation" in rec for rec in logs)  # nothing changed: nothing said
    assert plain.model.meta["training"]["resampled"] is None
    assert plain.model.config["in_channels"] == 3


def test_new_model_one_builder_for_every_class_count():
    from napari_emseg.train import new_model, painted_classes

    binary = new_model(2, TrainConfig(depth=2, width=4))
    assert binary.config["out_channels"] == 1 and binary.meta["activation"] == "sigmoid"
    painted = np.zeros((2, 8, 8), np.uint8)
    painted[0, 0, :3] = (1, 2, 3)  # background and two classes
    three = new_model(painted_classes(painted), TrainConfig(depth=2, width=4, context=1))
    assert three.config["out_channels"] == 3 and three.meta["activation"] == "softmax"
    assert three.config["in_channels"] == 3 and three.meta["context"] == 1
    assert not three.meta.get("training")  # fine-tuning treats it as untrained
    with pytest.raises(ValueError, match="at least one class"):
        new_model(1)


def test_a_time_budgeted_near_run_is_a_capped_nudge():
    from napari_emseg.train import NEAR_STEPS, _fine_tune_config, fine_tune_defaults

    trained = build_model(dict(dims=2, depth=2, width=4), {"training": {"steps": 9}})
    shape = (4, 64, 64)
    budget = TrainConfig(steps=10**6, minutes=2.0)
    assert _fine_tune_config(trained, "near", budget, 2, shape).steps == NEAR_STEPS
    assert fine_tune_defaults(trained, "near").steps == NEAR_STEPS
    assert _fine_tune_config(trained, "far", budget, 2, shape).steps == 10**6
    # steps the caller asked for, without a time budget, are kept
    assert _fine_tune_config(trained, "near", TrainConfig(steps=500), 2, shape).steps == 500


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_returns_the_best_or_the_last_checked_weights(crop, tmp_path, keep):
    img, mask = crop
    cfg = TrainConfig(**TINY, steps=6, lr=5e-2, val_every=2, warmup=0, keep=keep)
    res = fit(img, mask, cfg, checkpoint=tmp_path / "m.pt")
    ious = [h["val_iou"] for h in res.history]
    assert len(ious) == 3
    assert res.best_iou == pytest.approx(max(ious) if keep == "best" else ious[-1], abs=1e-4)
    saved = load_model(tmp_path / "m.pt").state_dict()
    for name, value in res.model.state_dict().items():  # the file holds the returned weights
        assert torch.equal(saved[name].cpu(), value.cpu()), name


def test_fine_tune_defaults_return_the_last_weights():
    from napari_emseg.train import FINE_TUNE_KEEP, fine_tune_defaults

    model = load_model("mito-2d")
    assert FINE_TUNE_KEEP == "last"
    assert {fine_tune_defaults(model, r).keep for r in ("near", "far")} == {"last"}
    # far runs use their whole budget: the rate anneals to 0 before the last weights
    assert fine_tune_defaults(model, "far").early_stop == 0


def test_fine_tune_keeps_last_weights_and_far_runs_skip_early_stop_even_with_a_config():
    """The dock and the CLI pass their own config: the recipe still decides these two."""
    from napari_emseg.train import FINE_TUNE_EARLY_STOP, _fine_tune_config

    model = load_model("mito-2d")
    given = TrainConfig(minutes=2.0, early_stop=FINE_TUNE_EARLY_STOP)
    far = _fine_tune_config(model, "far", given, 2, (4, 256, 256))
    near = _fine_tune_config(model, "near", given, 2, (4, 256, 256))
    assert (far.keep, far.early_stop) == ("last", 0)
    assert (near.keep, near.early_stop) == ("last", FINE_TUNE_EARLY_STOP)
    assert _fine_tune_config(model, "far", TrainConfig(keep="best"), 2, (4, 256, 256)).keep \
        == "best"


def test_own_neighbours_feeds_each_slice_as_its_own_context():
    from napari_emseg._augment import sample_patch
    from napari_emseg.train import PatchSampler, TrainConfig, _val_crops

    rng = np.random.default_rng(0)
    thick = rng.random((5, 40, 40)).astype(np.float32)  # sections far apart
    thin = rng.random((5, 40, 40)).astype(np.float32)
    target = np.zeros((5, 40, 40), np.int64)
    x, t = sample_patch(thick, target, (2, 20, 20), (16, 16), 2, 1, own_neighbours=True)
    assert x.shape == (3, 16, 16)
    for channel in x:
        np.testing.assert_array_equal(channel, thick[2, 12:28, 12:28])
    x, _ = sample_patch(thin, target, (2, 20, 20), (16, 16), 2, 1)
    np.testing.assert_array_equal(x[0], thin[1, 12:28, 12:28])  # real neighbours

    cfg = TrainConfig(dims=2, context=1, patch=(16, 16), batch_size=6, val_slices=2,
                      own_neighbours=(1,), elastic_p=0.0)
    crops = _val_crops([thin, thick], [target, target], cfg, sparse=False)
    thin_crop, thick_crop = crops[1][0], crops[2][0]  # z 4 of thin, z 0 of thick
    assert not np.array_equal(thin_crop[0], thin_crop[1])
    assert all(np.array_equal(c, thick[0]) for c in thick_crop)
    # the sampler passes the flag per volume (augmentation off to compare exactly)
    import napari_emseg.train as train_module

    real = train_module.augment
    train_module.augment = lambda x, t, *a, **k: (x, t)
    try:
        flat = TrainConfig(**{**cfg.__dict__, "own_neighbours": (0, 1)})
        xs, _ = PatchSampler([thin, thick], [target, target], flat, sparse=False).batch()
        plain = TrainConfig(**{**cfg.__dict__, "own_neighbours": ()})
        ys, _ = PatchSampler([thin, thick], [target, target], plain, sparse=False).batch()
    finally:
        train_module.augment = real
    assert all(np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2]) for x in xs)
    assert not any(np.array_equal(y[0], y[1]) for y in ys)


def test_bf16_only_on_cpus_with_native_bf16(tmp_path, monkeypatch):
    """Emulated bf16 is slower than float32: the CPU flags decide, not torch's report."""
    from napari_emseg import train

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n")
    assert train._cpu_flags(str(info)) == {"fpu", "sse", "avx2", "avx512f", "avx512bw",
                                           "avx512_vnni"}
    assert train._cpu_flags(str(tmp_path / "missing")) is None
    monkeypatch.setattr(train, "_cpu_flags", lambda: {"avx512f", "avx512bw"})
    assert not train.cpu_bf16_faster("cpu")
    monkeypatch.setattr(train, "_cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert train.cpu_bf16_faster("cpu")
    assert not train.cpu_bf16_faster("cuda:0")


# ------------------------------------------------ strokes painted while training
def test_live_strokes_merge_new_slices_into_the_targets():
    from napari_emseg.train import LiveStrokes

    painted = np.zeros((3, 8, 8), np.uint8)
    painted[0, 0, :] = 1
    new = np.zeros((8, 8), np.uint8)
    new[2, :] = 2
    new[3, 0] = 7  # no such class: dropped
    calls, records = [], []

    def source():
        calls.append(1)
        return {1: new, 9: new, 2: np.ones((4, 4), np.uint8)}  # z 9, bad shape: ignored

    live = LiveStrokes(source, painted, None, 2, np.zeros((3, 8, 8), np.uint8), None,
                       records.append, every=5.0)
    targets = live(0.0)
    assert targets is not None and targets[0].shape == (3, 8, 8)
    assert (targets[0][1, 2] == 1).all() and targets[0][1, 3, 0] == -1
    assert (targets[0][0, 0] == 0).all()  # the first strokes stay
    assert live.added == 8
    assert records == [{"strokes": 16, "slices": [1], "dropped": 1, "classes": 2}]
    assert live(4.9) is None and len(calls) == 1  # not asked again before `every`
    assert painted[1].max() == 0  # the caller's array is not changed


def test_live_strokes_poll_as_often_as_strokes_every_says_at_construction(monkeypatch):
    from napari_emseg import train

    calls = []
    painted = np.zeros((2, 8, 8), np.uint8)

    def source():
        calls.append(1)
        return {}

    monkeypatch.setattr(train, "STROKES_EVERY", 0.0)  # what bench_loop_seeds does
    live = train.LiveStrokes(source, painted, None, 2, np.zeros((2, 8, 8), np.uint8), None)
    for seconds in (0.0, 0.01, 0.02):
        live(seconds)
    assert len(calls) == 3  # every step
    monkeypatch.setattr(train, "STROKES_EVERY", 2.0)
    calls.clear()
    live = train.LiveStrokes(source, painted, None, 2, np.zeros((2, 8, 8), np.uint8), None)
    for seconds in (0.0, 0.01, 1.9, 2.0):
        live(seconds)
    assert len(calls) == 2  # at 0 s and 2 s


def test_live_strokes_follow_the_resampling_and_keep_2d():
    from napari_emseg.train import LiveStrokes

    painted = np.zeros((2, 8, 8), np.uint8)
    stroke = np.zeros((8, 8), np.uint8)
    stroke[:, :4] = 2
    live = LiveStrokes(lambda: {0: stroke}, painted, (1.0, 2.0, 2.0), 2,
                       np.zeros((2, 16, 16), np.uint8), None)
    targets = live(0.0)[0]
    assert targets.shape == (2, 16, 16)
    assert (targets[0][:, :8] == 1).all() and (targets[0][:, 8:] == -1).all()
    flat = LiveStrokes(lambda: {0: stroke}, np.zeros((8, 8), np.uint8), None, 2,
                       np.zeros((1, 8, 8), np.uint8), None)
    assert flat(0.0)[0].shape == (1, 8, 8) and flat.painted.shape == (8, 8)


def test_fine_tune_trains_on_strokes_painted_while_it_runs(crop):
    img, mask = crop
    model = build_model(dict(dims=2, depth=2, width=4), {"normalization": {"mode": "percentile"}})
    painted = np.zeros(img.shape, np.uint8)
    painted[3, ::6, :] = 1 + (mask[3, ::6, :] > 0)
    later = np.where(mask[9] > 0, 2, 1).astype(np.uint8)
    sent = []

    def source():
        if sent:
            return None
        sent.append(9)
        return {9: later}

    records = []
    cfg = TrainConfig(steps=4, batch_size=2, patch=(64, 64), val_every=2, threads=2)
    res = fine_tune(model, img, painted, cfg, on_log=records.append, strokes=source)
    assert sent == [9]
    assert {"strokes": int((painted > 0).sum()) + later.size, "slices": [9], "dropped": 0,
            "classes": 2} in records
    training = res.model.meta["training"]
    assert training["painted_while_training"] == later.size
    assert training["painted_voxels"] == int((painted > 0).sum()) + later.size


def test_stroke_feed_reports_changed_slices_once_painted():
    from napari_emseg.workflows import StrokeFeed

    layer = np.zeros((3, 4, 4), np.uint8)
    start = layer.copy()
    now = {"t": 0.0}
    feed = StrokeFeed(lambda: layer, start, every=1.0, clock=lambda: now["t"])
    layer[2, 1, 1] = 2
    assert feed.changes() is None  # nothing said it was painted
    feed.touch("event")
    out = feed.changes()
    assert list(out) == [2] and out[2][1, 1] == 2
    layer[2, 1, 1] = 2  # no new change
    layer[0, 0, 0] = 1
    feed.touch()
    assert feed.changes() is None  # asked again too soon: kept for later
    now["t"] = 1.5
    feed.touch()
    assert list(feed.changes()) == [0]
    assert start.max() == 0  # the run's own labels are never written
    flat = np.zeros((4, 4), np.uint8)
    feed2 = StrokeFeed(lambda: flat, flat.copy())
    flat[0, 0] = 2
    feed2.touch()
    assert list(feed2.changes()) == [0]


def test_painting_checks_name_one_class_and_image_like_labels():
    from napari_emseg.train import one_class_warning, painted_classes

    assert "background (1)" in one_class_warning(np.array([0, 1, 1]))
    assert "foreground" in one_class_warning(np.array([0, 2]))
    assert one_class_warning(np.array([0, 1, 2])) is None
    assert painted_classes(np.array([0, 1])) == 2 and painted_classes(np.array([0, 1, 3])) == 3
    with pytest.raises(ValueError, match="up to 253.*image or instance ids"):
        painted_classes(np.array([0, 1, 253]))


def test_a_fine_tune_learns_slightly_finer_pixels_as_they_are_and_records_them(crop):
    """4 nm pixels for a 5 nm model: trained unresampled, the result says 4 nm."""
    import torch

    from napari_emseg.adapt import voxel_scale
    from napari_emseg.models import zoo
    from napari_emseg.train import TrainConfig, fine_tune

    def model():  # fine_tune trains (and relabels) the model it is given
        torch.manual_seed(0)
        return zoo.build_model(dict(dims=2, in_channels=1, out_channels=1, depth=2, width=4),
                               {"name": "tiny", "patch": [64, 64], "voxel_size_nm": [5, 5, 5],
                                "training": {"steps": 1}})

    img = crop[0][:3]
    painted = _fg_bg_strokes(img.shape)
    cfg = TrainConfig(steps=1, batch_size=2, patch=(64, 64), minutes=None)
    assert voxel_scale((5, 4, 4), (5, 5, 5)) == (1.0, 0.8, 0.8)  # prediction would resample
    seen = []  # the previews see the model at the scale it learns at
    res = fine_tune(model(), img, painted, cfg, recipe="near", voxel_size=(5.0, 4.0, 4.0),
                    preview=lambda net, _s: seen.append(list(net.meta["voxel_size_nm"])))
    assert seen and all(v == [5.0, 4.0, 4.0] for v in seen)
    assert res.model.meta["training"]["resampled"] is None
    assert res.model.meta["voxel_size_nm"] == [5.0, 4.0, 4.0]
    assert voxel_scale((5, 4, 4), tuple(res.model.meta["voxel_size_nm"])) is None
    res = fine_tune(model(), img, painted, cfg, recipe="near", voxel_size=(5.0, 2.0, 2.0))
    assert res.model.meta["training"]["resampled"] == [1.0, 0.4, 0.4]
    assert res.model.meta["voxel_size_nm"] == [5, 5, 5]  # learnt at the model's


def test_rescale_zooms_image_and_targets_together_and_keeps_the_size():
    from napari_emseg._augment import randomize, rescale

    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2 < 100)  # radius 10
    x = np.where(disc, 0.2, 0.8).astype(np.float32)[None]
    t = disc.astype(np.int64)
    t[0, :] = -1  # ignored pixels stay ignored, never become a class value
    for factor, area in ((1.4, 1.4**2), (0.7, 0.7**2)):
        zx, zt = rescale(x, t, factor)
        assert zx.shape == x.shape and zt.shape == t.shape
        assert set(np.unique(zt)) <= {-1, 0, 1}
        assert abs((zt == 1).sum() / disc.sum() - area) < 0.12 * area
        assert ((zx[0] < 0.5) != (zt == 1)).mean() < 0.005  # aligned (edges may differ)
    rng = np.random.default_rng(0)
    for _ in range(20):  # the whole randomization keeps shapes, dtypes and labels
        rx, rt = randomize(x, t, rng)
        assert rx.shape == x.shape and rx.dtype == np.float32 and rt.shape == t.shape
        assert set(np.unique(rt)) <= {-1, 0, 1}
