"""Tiled prediction: exactness with pointwise predictors, blending, TTA, callbacks, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_emseg._normalize import normalize  # noqa: E402
from napari_emseg.models import zoo  # noqa: E402
from napari_emseg.models.unet import UNet  # noqa: E402
from napari_emseg.predict import predict_slice, predict_volume, select_device  # noqa: E402
from napari_emseg.progress import Cancelled  # noqa: E402

RNG = np.random.default_rng(42)


def identity(x):
    return x


def n_windows(size: int, patch: int, overlap: float) -> int:
    """Windows per axis, computed independently of the implementation."""
    if size <= patch:
        return 1
    step = max(1, int(patch * (1 - overlap)))
    return math.ceil((size - patch) / step) + 1


class Divisible(torch.nn.Module):
    """2 * x; fails unless every spatial size is a multiple of ``div``."""

    def __init__(self, div):
        super().__init__()
        self.div = tuple(div)

    def divisor(self):
        return self.div

    def forward(self, x):
        assert all(s % d == 0 for s, d in zip(x.shape[2:], self.div, strict=True)), x.shape
        return 2 * x


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [
        ((3, 50, 70), 32, 0.25),
        ((2, 64, 64), 32, 0.0),
        ((2, 41, 97), (16, 24), 0.5),
        ((1, 17, 23), 64, 0.25),  # smaller than the patch
        ((4, 33, 20), (32, 8), 0.9),
        ((45, 61), 32, 0.25),  # a single 2D image
    ],
)
def test_identity_2d_reproduces_input(shape, patch, overlap):
    vol = RNG.random(shape, dtype=np.float32) * 100
    before = vol.copy()
    out = predict_volume(vol, identity, patch=patch, overlap=overlap, activation="none",
                         device="cpu")
    assert out.shape == vol.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, vol, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(vol, before)  # input untouched


@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [
        ((6, 40, 50), (4, 16, 16), 0.25),
        ((5, 33, 21), (8, 16, 16), 0.5),  # thinner than the patch in z
        ((2, 9, 11), (16, 32, 32), 0.25),  # smaller than the patch everywhere
        ((20, 17, 19), (7, 9, 5), 0.3),
    ],
)
def test_identity_3d_reproduces_input(shape, patch, overlap):
    vol = RNG.integers(0, 255, shape).astype(np.uint8)
    out = predict_volume(vol, identity, patch=patch, overlap=overlap, activation="none",
                         dims=3, device="cpu")
    assert out.shape == vol.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, vol.astype(np.float32), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_divisor_padding_with_odd_volume(dims):
    # the model only accepts multiples of its divisor: odd sizes must be padded
    div = (8, 8) if dims == 2 else (4, 8, 8)
    vol = RNG.random((3, 13, 21), dtype=np.float32)
    patch = (16, 16) if dims == 2 else (4, 16, 16)
    out = predict_volume(vol, Divisible(div), patch=patch, dims=dims, activation="none",
                         normalization={"mode": "none"}, device="cpu")
    np.testing.assert_allclose(out, 2 * vol, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("nz", "context"), [(5, 1), (3, 2), (2, 1), (1, 1)])
def test_context_25d_known_weights(nz, context):
    """A 1x1 conv over the 2c+1 input slices equals the same sum over reflected z."""
    k = 2 * context + 1
    conv = torch.nn.Conv2d(k, 1, 1)
    weights = np.arange(1, k + 1, dtype=np.float32)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weights).view(1, k, 1, 1))
        conv.bias.fill_(0.5)
    vol = RNG.random((nz, 30, 37), dtype=np.float32)
    out = predict_volume(vol, conv, patch=16, overlap=0.25, context=context,
                         activation="none", device="cpu")
    padded = np.pad(vol, ((context, context), (0, 0), (0, 0)), mode="reflect")
    expected = sum(weights[i] * padded[i : i + nz] for i in range(k)) + 0.5
    assert out.shape == vol.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_multichannel_3d_pointwise_conv():
    conv = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, 3.0]))
    vol = RNG.random((4, 20, 24), dtype=np.float32)
    out = predict_volume(vol, conv, dims=3, patch=(4, 16, 16), activation="none",
                         device="cpu")
    assert out.shape == (2, 4, 20, 24)
    np.testing.assert_allclose(out[0], 2 * vol, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], 3 - vol, rtol=1e-5, atol=1e-5)


def test_softmax_returns_foreground_classes():
    def logits(x):  # three classes: 0, x, 2x
        return torch.cat([torch.zeros_like(x), x, 2 * x], dim=1)

    vol = RNG.random((2, 20, 20), dtype=np.float32)
    out = predict_volume(vol, logits, activation="softmax", patch=16, device="cpu")
    e = np.exp(np.stack([np.zeros_like(vol), vol, 2 * vol]))
    soft = e / e.sum(0)
    assert out.shape == (2, 2, 20, 20)
    np.testing.assert_allclose(out, soft[1:], rtol=1e-5, atol=1e-6)
    # sigmoid with one channel: ZYX
    out = predict_volume(vol, identity, activation="sigmoid", patch=16, device="cpu")
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-vol)), rtol=1e-5, atol=1e-6)


def test_dask_input_matches_numpy():
    da = pytest.importorskip("dask.array")
    vol = RNG.random((3, 40, 40), dtype=np.float32)
    lazy = da.from_array(vol, chunks=(1, 20, 20))
    out = predict_volume(lazy, identity, patch=16, activation="none", device="cpu")
    np.testing.assert_allclose(out, vol, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- real models


def _tiny_unet(dims, norm="batch", seed=0, **kw):
    torch.manual_seed(seed)
    model = UNet(dims=dims, in_channels=1, out_channels=1, depth=2, width=4, norm=norm, **kw)
    if norm == "batch":  # non-trivial running statistics, so eval BN really matters
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


# GroupNorm/InstanceNorm use per-input statistics, so a tile differs from the
# whole image by design; eval-mode BatchNorm (and no norm) are tile-invariant.
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_tiled_unet_2d_matches_whole_image(norm):
    model = _tiny_unet(2, norm)
    vol = RNG.normal(size=(2, 96, 112)).astype(np.float32)
    with torch.no_grad():
        whole = torch.sigmoid(model(torch.from_numpy(vol[:, None]))).numpy()[:, 0]
    tiled = predict_volume(vol, model, patch=48, overlap=0.5, device="cpu")
    assert tiled.shape == vol.shape
    diff = np.abs(tiled - whole)[:, 8:-8, 8:-8]
    assert diff.max() < 0.02, diff.max()
    assert diff.mean() < 2e-3, diff.mean()


def test_tiled_unet_3d_matches_whole_volume():
    model = _tiny_unet(3, "batch")
    vol = RNG.normal(size=(16, 48, 48)).astype(np.float32)
    with torch.no_grad():
        whole = torch.sigmoid(model(torch.from_numpy(vol[None, None]))).numpy()[0, 0]
    tiled = predict_volume(vol, model, patch=(8, 32, 32), overlap=0.5, device="cpu")
    diff = np.abs(tiled - whole)[4:-4, 8:-8, 8:-8]
    assert diff.max() < 0.02, diff.max()


def test_model_meta_normalization_is_applied():
    model = _tiny_unet(2)
    model.meta = {**zoo.DEFAULT_META, "normalization": {"mode": "minmax"}}
    vol = RNG.integers(10, 200, (2, 32, 32)).astype(np.uint8)
    norm = normalize(vol, {"mode": "minmax"})
    with torch.no_grad():
        whole = torch.sigmoid(model(torch.from_numpy(norm[:, None]))).numpy()[:, 0]
    out = predict_volume(vol, model, patch=32, device="cpu")  # one tile per slice: exact
    np.testing.assert_allclose(out, whole, atol=1e-5)


def test_callers_module_is_not_changed():
    model = _tiny_unet(2).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    predict_volume(RNG.random((2, 32, 32), dtype=np.float32), model, patch=16, device="cpu")
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
        assert v.is_contiguous()


def test_changed_weights_are_used_on_the_next_call():
    # the tuned copy of a module is cached; in-place weight updates must invalidate it
    conv = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(0.0)
    vol = RNG.random((1, 16, 16), dtype=np.float32)
    kw = dict(patch=16, activation="none", device="cpu")
    np.testing.assert_allclose(predict_volume(vol, conv, **kw), vol, rtol=1e-6)
    with torch.no_grad():
        conv.weight.mul_(3.0)
    np.testing.assert_allclose(predict_volume(vol, conv, **kw), 3 * vol, rtol=1e-6)
    conv.load_state_dict({"weight": torch.full((1, 1, 1, 1), -1.0), "bias": torch.ones(1)})
    np.testing.assert_allclose(predict_volume(vol, conv, **kw), 1 - vol, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- TTA


def _symmetric_conv(dims):
    """A smoothing conv whose kernel is invariant to flips and 90° YX rotations."""
    k1 = torch.tensor([1.0, 2.0, 1.0])
    if dims == 2:
        conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
        kernel = torch.outer(k1, k1)
    else:
        conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
        kernel = k1[:, None, None] * k1[None, :, None] * k1[None, None, :]
    with torch.no_grad():
        conv.weight.copy_((kernel / kernel.sum())[None, None])
    return conv


@pytest.mark.parametrize(("dims", "patch"), [(2, (16, 24)), (3, (4, 16, 16))])
def test_tta_with_equivariant_predictor_changes_nothing(dims, patch):
    conv = _symmetric_conv(dims)
    vol = RNG.random((5, 37, 29), dtype=np.float32)
    kw = dict(dims=dims, patch=patch, activation="none", device="cpu")
    plain = predict_volume(vol, conv, **kw)
    tta = predict_volume(vol, conv, tta=True, **kw)
    np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-6)


def test_tta_averages_in_probability_space():
    # predictor: logit = x + (fixed ramp along x); under the 8 flips/rot90 the
    # ramp visits each of the 4 orientations twice, so the answer is known
    vol = np.zeros((1, 16, 16), np.float32)
    ramp = torch.linspace(-3, 3, 16)

    def pred(x):
        return x + ramp.view(1, 1, 1, -1).to(x.dtype)

    out = predict_volume(vol, pred, patch=16, tta=True, device="cpu")
    r = np.linspace(-3, 3, 16, dtype=np.float32)
    sig = 1 / (1 + np.exp(-r))
    # inverse transforms map the ramp to +x, -x, +y, -y (twice each)
    expected = (sig[None, :] + sig[None, ::-1] + sig[:, None] + sig[::-1, None]) / 4
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-6)


def test_tta_subset_uses_the_first_flips():
    # the x-ramp under the first 4 variants (identity, y-flip, x-flip, both):
    # twice +x and twice -x, so the answer is the mean of the two orientations
    vol = np.zeros((1, 16, 16), np.float32)
    ramp = torch.linspace(-3, 3, 16)

    def pred(x):
        return x + ramp.view(1, 1, 1, -1).to(x.dtype)

    out = predict_volume(vol, pred, patch=16, tta=4, device="cpu")
    sig = 1 / (1 + np.exp(-np.linspace(-3, 3, 16, dtype=np.float32)))
    expected = np.broadcast_to((sig + sig[::-1]) / 2, (16, 16))
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-6)
    for bad in (9, 2.5, -1):
        with pytest.raises(ValueError, match="tta"):
            predict_volume(vol, pred, patch=16, tta=bad, device="cpu")


# --------------------------------------------------------------------------- callbacks


def test_progress_counts_add_up():
    vol = RNG.random((3, 50, 70), dtype=np.float32)
    calls = []
    predict_volume(vol, identity, patch=32, overlap=0.25, batch_size=4, activation="none",
                   device="cpu", progress=lambda d, t: calls.append((d, t)))
    total = 3 * n_windows(50, 32, 0.25) * n_windows(70, 32, 0.25)
    assert total == 18
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert len(calls) == 1 + math.ceil(total / 4)  # one call per batch (plus the start)


def test_progress_3d_total():
    vol = RNG.random((10, 20, 30), dtype=np.float32)
    calls = []
    predict_volume(vol, identity, dims=3, patch=(4, 16, 16), overlap=0.5, batch_size=3,
                   activation="none", device="cpu", progress=lambda d, t: calls.append(d))
    total = n_windows(10, 4, 0.5) * n_windows(20, 16, 0.5) * n_windows(30, 16, 0.5)
    assert calls[-1] == total


def test_cancel_stops_within_one_batch():
    seen = []

    def counting(x):
        seen.append(x.shape[0])
        return x

    checks = []

    def cancel():
        checks.append(1)
        return len(checks) > 2  # allow two batches

    vol = RNG.random((4, 64, 64), dtype=np.float32)
    with pytest.raises(Cancelled):
        predict_volume(vol, counting, patch=32, batch_size=2, activation="none",
                       device="cpu", cancel=cancel)
    assert len(seen) == 2  # 16 tiles in 8 batches; stopped after the second


def test_cancel_before_start_runs_nothing():
    seen = []
    with pytest.raises(Cancelled):
        predict_volume(RNG.random((2, 32, 32)), lambda x: seen.append(1) or x,
                       activation="none", patch=16, device="cpu", cancel=lambda: True)
    assert not seen


def test_out_of_memory_halves_the_batch():
    sizes = []

    def picky(x):
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("fake OOM")
        return x

    vol = RNG.random((4, 32, 32), dtype=np.float32)
    out = predict_volume(vol, picky, patch=16, overlap=0.0, batch_size=8,
                         activation="none", device="cpu")
    np.testing.assert_allclose(out, vol, rtol=1e-5, atol=1e-6)
    assert sizes[:3] == [8, 4, 2] and set(sizes[2:]) == {2}

    def always(x):
        raise torch.OutOfMemoryError("fake OOM")

    with pytest.raises(MemoryError, match="one tile"):
        predict_volume(vol, always, patch=16, batch_size=4, device="cpu")


# --------------------------------------------------------------------------- predict_slice


def test_predict_slice_matches_volume_25d():
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)
    vol = RNG.random((6, 40, 30), dtype=np.float32)
    kw = dict(context=1, activation="sigmoid", patch=16, device="cpu")
    full = predict_volume(vol, conv, **kw)
    for z in (0, 3, -1):
        sl = predict_slice(vol, conv, z, **kw)
        assert sl.shape == (40, 30)
        np.testing.assert_allclose(sl, full[z], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        predict_slice(vol, conv, 6, **kw)


def test_predict_slice_3d_model():
    conv = _symmetric_conv(3)
    vol = RNG.random((12, 20, 20), dtype=np.float32)
    sl = predict_slice(vol, conv, 5, dims=3, patch=(4, 20, 20), activation="none",
                       device="cpu")
    full = predict_volume(vol, conv, dims=3, patch=(12, 20, 20), activation="none",
                          device="cpu")
    # a 3-tap smoothing in z only needs its neighbours: equal away from the slab ends
    np.testing.assert_allclose(sl, full[5], rtol=1e-5, atol=1e-5)


def test_predict_planes_averages_the_three_sectionings():
    from napari_emseg.predict import predict_planes

    vol = RNG.random((10, 12, 14), dtype=np.float32)
    # a ramp along y only: each plane sees it along a different tile axis
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 2, 1], w[0, 0, 0, 1] = 1.0, -1.0  # d/dy in the section
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    conv.weight.data = w
    kw = dict(activation="none", patch=16, device="cpu", normalization=(0.0, 1.0))
    out = predict_planes(vol, conv, **kw)
    assert out.shape == vol.shape and out.dtype == np.float32
    zyx = predict_volume(vol, conv, **kw)
    yzx = predict_volume(vol.transpose(1, 0, 2), conv, **kw).transpose(1, 0, 2)
    xzy = predict_volume(vol.transpose(2, 0, 1), conv, **kw).transpose(1, 2, 0)
    np.testing.assert_allclose(out, (zyx + yzx + xzy) / 3, rtol=1e-5, atol=1e-5)
    assert not np.allclose(zyx, yzx)  # the views differ: the averaging is not trivial
    np.testing.assert_allclose(predict_planes(vol, conv, planes=["zyx"], **kw), zyx,
                               rtol=1e-6, atol=1e-6)


def test_predict_planes_pads_sections_for_the_unet_divisor():
    from napari_emseg.predict import predict_planes

    model = _tiny_unet(2)
    vol = RNG.random((5, 21, 22), dtype=np.float32)  # xz/yz sections are 5 px tall
    out = predict_planes(vol, model, device="cpu", normalization=(0.0, 1.0))
    assert out.shape == vol.shape and np.isfinite(out).all()
    yzx = predict_volume(vol.transpose(1, 0, 2), model, device="cpu",
                         normalization=(0.0, 1.0)).transpose(1, 0, 2)
    assert not np.allclose(out, yzx)


def test_predict_planes_refuses_models_that_read_several_slices():
    from napari_emseg.predict import predict_planes

    vol = RNG.random((6, 16, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="context 0"):
        predict_planes(vol, torch.nn.Conv2d(3, 1, 1), context=1, device="cpu")
    with pytest.raises(ValueError, match="planes from"):
        predict_planes(vol, torch.nn.Conv2d(1, 1, 1), planes=["xy"], device="cpu")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("volume", "match"),
    [
        (np.zeros((2, 3, 8, 8), np.float32), "4D"),
        (np.zeros((64, 64, 3), np.uint8), "RGB"),
        (np.zeros((0, 8, 8), np.float32), "empty"),
        (np.array([["a", "b"], ["c", "d"]]), "real numbers"),
        (np.zeros((4, 4), np.complex64), "real numbers"),
        (np.zeros(10, np.float32), "1D"),
    ],
)
def test_bad_volumes_give_clear_errors(volume, match):
    with pytest.raises(ValueError, match=match):
        predict_volume(volume, identity, device="cpu")


def test_bad_arguments_give_clear_errors():
    vol = np.zeros((2, 16, 16), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        predict_volume(vol, identity, overlap=1.0, device="cpu")
    with pytest.raises(ValueError, match="patch"):
        predict_volume(vol, identity, patch=(4, 16, 16), device="cpu")
    with pytest.raises(ValueError, match="activation"):
        predict_volume(vol, identity, activation="relu", device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        predict_volume(vol, identity, batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="does not match its input"):
        predict_volume(vol, lambda x: x[..., :4], patch=16, device="cpu")
    with pytest.raises(ValueError, match="input channels"):
        predict_volume(vol, _tiny_unet(2), context=1, device="cpu")
    with pytest.raises(ValueError, match="callable"):
        predict_volume(vol, 42, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")
    assert select_device("cpu").type == "cpu"


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    model = _tiny_unet(2)
    path = zoo.save_checkpoint(model, tmp_path / "tiny.pt",
                               {"normalization": {"mode": "minmax"}, "patch": [32, 32]})
    loaded = zoo.load_model(path)
    assert loaded.meta["patch"] == [32, 32] and not loaded.training
    vol = RNG.integers(0, 255, (2, 40, 40)).astype(np.uint8)
    model.meta = dict(loaded.meta)
    a = predict_volume(vol, model, device="cpu")
    b = predict_volume(vol, loaded, device="cpu")
    c = predict_volume(vol, str(path), device="cpu")  # a path loads the checkpoint
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    path = zoo.save_checkpoint(_tiny_unet(2), tmp_path / "a.pt")
    ckpt = torch.load(path, weights_only=True)
    other = UNet(dims=2, depth=3, width=8)
    ckpt["state_dict"] = other.state_dict()  # weights of another architecture
    del ckpt["meta"]["weights_sha256"]  # as in a checkpoint saved before hashes
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(zoo.CheckpointError, match=r"unexpected|missing|shape"):
        zoo.load_model(tmp_path / "bad.pt")
    with pytest.raises(zoo.CheckpointError):
        predict_volume(np.zeros((1, 16, 16), np.float32), str(tmp_path / "bad.pt"))


def test_checkpoint_loading_never_runs_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "napari-emseg", "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(zoo.CheckpointError, match="not a readable checkpoint"):
        zoo.load_model(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(zoo.CheckpointError):
        zoo.load_model(tmp_path / "junk.pt")
