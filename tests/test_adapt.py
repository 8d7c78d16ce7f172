"""Label-free adaptation: AdaBN, feature shift, voxel-size matching, 2.5D context."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_emseg.adapt import (  # noqa: E402
    adapt_batchnorm,
    context_fits,
    describe,
    feature_shift,
    predict_adapted,
    resample,
    voxel_scale,
)
from napari_emseg.models.unet import collapse_context  # noqa: E402
from napari_emseg.models.zoo import build_model  # noqa: E402

FIXED = {"mode": "fixed", "low": 0.0, "high": 255.0}


def _model(context: int = 0, **meta):
    model = build_model(dict(dims=2, in_channels=2 * context + 1, depth=2, width=4),
                        {"context": context, "normalization": FIXED,
                         "training": {"steps": 1}, **meta})
    return model.eval()


def _volume(seed: int = 0, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(100, 20, (6, 64, 64)) * scale + offset, 0, 255).astype(np.float32)


def test_adabn_changes_only_batchnorm_statistics():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adapt_batchnorm(model, _volume(offset=60), tiles=4, tile=64)
    after = adapted.state_dict()
    for key, value in before.items():
        if "running_" in key:
            assert not torch.equal(after[key], value), key  # re-estimated
        elif "num_batches" not in key:
            assert torch.equal(after[key], value), key  # weights untouched
    # the input model is not modified
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert adapted.meta["adapted"]["tiles"] == 4 and not adapted.training


def test_adabn_statistics_are_those_of_the_new_volume():
    model = _model()
    adapted = adapt_batchnorm(model, _volume(offset=60), tiles=4, tile=64)
    first = adapted.down[0].norm1
    # an independent estimate: the first convolution's output on the same tiles
    from napari_emseg.adapt import _tiles

    x = torch.from_numpy(np.stack(_tiles(_volume(offset=60), model, 64, 4, 0)))  # /255
    with torch.no_grad():
        out = model.down[0].conv1(x.float())
    assert torch.allclose(first.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-4)


def test_feature_shift_separates_seen_from_unseen_data():
    model = _model()
    seen = _volume(seed=1)
    model = adapt_batchnorm(model, seen, tiles=6, tile=64)  # "trained" on this kind of data
    near = feature_shift(model, _volume(seed=2), tiles=4, tile=64)
    far = feature_shift(model, _volume(seed=2, scale=0.4, offset=120), tiles=4, tile=64)
    assert near < 0.1 < far


def test_feature_shift_is_none_without_batchnorm():
    model = build_model(dict(dims=2, depth=2, width=4, norm="group"),
                        {"normalization": FIXED})
    assert feature_shift(model, _volume(), tiles=2, tile=64) is None


def test_voxel_scale_resamples_finer_pixels_early_and_coarser_ones_late():
    assert voxel_scale((5, 5, 5), (5, 5, 5)) is None
    assert voxel_scale((5, 4.9, 4.9), (5, 5, 5)) is None  # 2 % finer: fits
    assert voxel_scale((5, 4.6, 4.6), (5, 5, 5)) == (1.0, 0.92, 0.92)  # 8 % finer
    assert voxel_scale((5, 7, 7), (5, 5, 5)) is None  # 1.4x coarser: fits
    assert voxel_scale((5, 7, 4), (5, 5, 5)) == (1.0, 1.4, 0.8)  # one axis off: both
    assert voxel_scale((50, 10, 10), (5, 5, 5)) == (1.0, 2.0, 2.0)  # 2D model: z kept
    assert voxel_scale((50, 10, 10), (5, 5, 5), dims=3) == (10.0, 2.0, 2.0)
    assert voxel_scale(None, (5, 5, 5)) is None and voxel_scale((5, 5), None) is None
    assert voxel_scale((8, 8), (5, 5, 5)) == (1.0, 1.6, 1.6)


def test_resample_round_trip_keeps_shape_and_label_alignment():
    labels = np.zeros((4, 60, 90), np.uint16)
    labels[:, 10:30, 20:50] = 7
    big = resample(labels, (1.0, 2.0, 2.0), order=0)
    assert big.shape == (4, 120, 180) and big.dtype == np.uint16
    assert set(np.unique(big)) == {0, 7}
    back = resample(big, shape=labels.shape, order=0)
    assert back.shape == labels.shape
    assert (back == labels).mean() > 0.99  # same place, up to a boundary pixel
    ys, xs = np.nonzero(back[0] == 7)
    assert abs(ys.mean() - 19.5) < 1 and abs(xs.mean() - 34.5) < 1


def test_collapse_context_equals_feeding_the_slice_as_its_own_neighbours():
    model = _model(context=1)
    flat = collapse_context(model)
    assert flat.config["in_channels"] == 1 and flat.meta["context"] == 0
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x.repeat(1, 3, 1, 1)), flat(x), atol=1e-5)


def test_context_fits_compares_section_thickness():
    model = _model(context=1, voxel_size_nm=[5.0, 5.0, 5.0])
    assert context_fits(model, (5.0, 5.0, 5.0))
    assert not context_fits(model, (50.0, 4.0, 4.0))
    assert context_fits(model, None) and context_fits(_model(), (50.0, 4.0, 4.0))


def test_sections_fit_compares_a_3d_models_section_thickness():
    from napari_emseg.adapt import sections_fit

    cube = build_model(dict(dims=3, depth=2, width=4), {"voxel_size_nm": [5.0, 5.0, 5.0]})
    assert sections_fit(cube, (5.0, 5.0, 5.0)) and sections_fit(cube, (10.0, 5.0, 5.0))
    assert not sections_fit(cube, (50.0, 4.0, 4.0))
    assert sections_fit(cube, None) and sections_fit(cube, (4.0, 4.0))
    assert sections_fit(_model(voxel_size_nm=[5.0, 5.0, 5.0]), (50.0, 4.0, 4.0))  # 2D


def test_predict_adapted_resamples_and_collapses_and_says_so():
    model = _model(context=1, voxel_size_nm=[5.0, 5.0, 5.0])
    image = _volume()
    prob, info = predict_adapted(image, model, voxel_size=(50.0, 10.0, 10.0), adapt=True)
    assert prob.shape == image.shape and prob.dtype == np.float32
    assert info == {"adapted": True, "resampled": [1.0, 2.0, 2.0], "context_collapsed": True,
                    "sections_fit": True, "z_step_px": None}
    text = describe(info)
    assert "voxel size" in text and "without its neighbours" in text and "BatchNorm" in text
    assert "warning" not in text
    plain, info = predict_adapted(image, model)
    assert info == {"adapted": False, "resampled": None, "context_collapsed": False,
                    "sections_fit": True, "z_step_px": None}  # noise: no estimate
    assert describe(info) == "" and plain.shape == image.shape


def test_predict_adapted_warns_of_a_3d_model_on_thick_sections():
    cube = build_model(dict(dims=3, depth=2, width=4),
                       {"voxel_size_nm": [5.0, 5.0, 5.0], "normalization": FIXED}).eval()
    image = _volume()[:3, :32, :32]
    prob, info = predict_adapted(image, cube, voxel_size=(25.0, 5.0, 5.0))
    assert prob.shape == image.shape and info["resampled"] == [5.0, 1.0, 1.0]
    assert info["sections_fit"] is False
    assert describe(info).startswith("warning: the sections are much thicker")


def test_thick_sections_name_the_bundled_one_slice_models():
    from napari_emseg.models.zoo import list_models, load_model

    if "mito-2d-mix" not in list_models():
        pytest.skip("bundled weights not installed")
    image = _volume()[:3, :48, :48]
    for name in ("mito-2d", "mito-3d"):
        _, info = predict_adapted(image, load_model(name), voxel_size=(50.0, 5.0, 5.0))
        assert info["serial_models"] == ["mito-2d-mix", "mito-2d-dr"]
        assert describe(info).endswith("for serial sections try mito-2d-mix or mito-2d-dr "
                                       "(they read one slice at a time)")
    _, info = predict_adapted(image, load_model("mito-2d"), voxel_size=(5.0, 5.0, 5.0))
    assert "serial_models" not in info


def test_preview_slice_is_predicted_at_the_model_scale():
    from napari_emseg.adapt import predict_slice_adapted

    model = _model(voxel_size_nm=[5.0, 5.0, 5.0])
    image = _volume()
    full, info = predict_adapted(image, model, voxel_size=(5.0, 10.0, 10.0))
    assert info["resampled"] == [1.0, 2.0, 2.0]
    for z in (0, 3):
        sl = predict_slice_adapted(image, model, z, voxel_size=(5.0, 10.0, 10.0))
        assert sl.shape == image.shape[1:]
        np.testing.assert_allclose(sl, full[z], atol=1e-4)  # same as the volume path
    # voxel sizes within the tolerance: the plain slice prediction
    from napari_emseg.predict import predict_slice

    np.testing.assert_array_equal(predict_slice_adapted(image, model, 2, voxel_size=(5, 5, 5)),
                                  predict_slice(image, model, 2))


def test_z_step_tells_fib_sem_slices_from_serial_sections(fixtures_dir):
    import tifffile

    from napari_emseg.adapt import z_step_pixels

    fib = tifffile.imread(fixtures_dir / "lucchi_crop_image.tif")  # 5 nm isotropic
    sstem = tifffile.imread(fixtures_dir / "isbi_crop_image.tif")  # 4x4x50 nm
    assert 0.5 < z_step_pixels(fib) < 1.6
    assert z_step_pixels(sstem) > 4
    # a smooth volume stretched along z: twice the stretch, about twice the step
    rng = np.random.default_rng(0)
    from scipy import ndimage as ndi

    smooth = ndi.gaussian_filter(rng.normal(size=(40, 96, 96)), 3)
    one, three = z_step_pixels(smooth), z_step_pixels(smooth[::3])
    assert 0.6 < one < 1.5 and 2.2 < three / one < 3.8
    assert z_step_pixels(fib[:1]) is None and z_step_pixels(_volume()) is None  # noise


def test_unknown_voxel_size_on_serial_sections_predicts_slice_by_slice(fixtures_dir):
    import tifffile

    sstem = tifffile.imread(fixtures_dir / "isbi_crop_image.tif").astype(np.float32)
    fib = tifffile.imread(fixtures_dir / "lucchi_crop_image.tif")[:4].astype(np.float32)
    model = _model(context=1, voxel_size_nm=[5.0, 5.0, 5.0])
    prob, info = predict_adapted(sstem, model)
    assert info["context_collapsed"] and info["z_step_px"] > 4 and info["resampled"] is None
    np.testing.assert_allclose(prob, predict_adapted(sstem, model,
                                                     voxel_size=(50.0, 5.0, 5.0))[0], atol=1e-6)
    assert describe(info).startswith("voxel size unknown: adjacent slices differ as much as")
    _, info = predict_adapted(fib, model)  # FIB-SEM: its neighbours are used
    assert not info["context_collapsed"] and info["z_step_px"] < 2
    _, info = predict_adapted(sstem, model, voxel_size=(5.0, 5.0, 5.0))  # said: obeyed
    assert not info["context_collapsed"] and info["z_step_px"] is None


def test_one_slice_preview_reads_serial_sections_as_the_whole_volume_does(fixtures_dir):
    import tifffile

    from napari_emseg.adapt import predict_slice_adapted
    from napari_emseg.workflows import predict_image

    sstem = tifffile.imread(fixtures_dir / "isbi_crop_image.tif").astype(np.float32)
    model = _model(context=1, voxel_size_nm=[5.0, 5.0, 5.0])
    volume, info = predict_adapted(sstem, model)  # voxel size unknown: estimated thick
    assert info["context_collapsed"]
    one = predict_slice_adapted(sstem, model, 2)
    np.testing.assert_allclose(one, volume[2], atol=1e-5)
    shown, _thr, _note = predict_image(sstem, model=model, z=2)  # the Predict dock's path
    np.testing.assert_allclose(shown, volume[2], atol=1e-5)
    stated = predict_slice_adapted(sstem, model, 2, voxel_size=(5.0, 5.0, 5.0))
    assert np.abs(stated - volume[2]).max() > 1e-4  # neighbours used when told FIB-SEM


def test_live_preview_works_out_the_sections_once(fixtures_dir, tmp_path, monkeypatch):
    """A fine-tune's previews of a 2.5D model without a voxel size estimate the z step
    once, not at every refresh; each still shows the slice as predicted alone."""
    import tifffile

    from napari_emseg import adapt
    from napari_emseg.models.zoo import save_checkpoint
    from napari_emseg.workflows import train_from_strokes

    fib = tifffile.imread(fixtures_dir / "lucchi_crop_image.tif")[:6, :64, :64]
    mask = tifffile.imread(fixtures_dir / "lucchi_crop_mask.tif")[:6, :64, :64] > 0
    painted = np.zeros(fib.shape, np.uint8)
    painted[2, ::4] = np.where(mask[2, ::4], 2, 1)
    source = save_checkpoint(_model(context=1, voxel_size_nm=[5.0, 5.0, 5.0]),
                             tmp_path / "start.pt")
    calls = []
    real = adapt.z_step_pixels
    monkeypatch.setattr(adapt, "z_step_pixels", lambda v, **kw: calls.append(1) or real(v, **kw))

    def run(preview: bool) -> list[dict]:
        shown: list[dict] = []
        calls.clear()
        train_from_strokes(fib, painted, source=str(source), checkpoint=tmp_path / "out.pt",
                           config={"steps": 6, "preview_every": 0.0}, patch=(64,),
                           preview=preview, focus=lambda: 2, switch_start=False,
                           log=lambda rec: shown.append(rec) if "preview" in rec else None)
        return shown

    run(preview=False)
    without = len(calls)
    shown = run(preview=True)
    assert len(shown) >= 6 and all(rec["preview"].shape == (64, 64) for rec in shown)
    assert len(calls) == without + 1
