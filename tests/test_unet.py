"""U-Net shapes for 2D, 2.5D, 3D and anisotropic 3D."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_emseg.models.unet import UNet  # noqa: E402


@pytest.mark.parametrize(
    ("kw", "shape"),
    [
        (dict(dims=2, depth=3, width=4), (2, 1, 32, 48)),
        (dict(dims=2, in_channels=3, out_channels=2, depth=4, width=4, residual=True),
         (1, 3, 64, 64)),
        (dict(dims=3, depth=3, width=4, norm="group"), (1, 1, 8, 16, 16)),
        (dict(dims=3, depth=3, width=4, anisotropic_levels=1, norm="instance"),
         (1, 1, 4, 16, 16)),
    ],
)
def test_output_shape(kw, shape):
    net = UNet(**kw).eval()
    out = net(torch.zeros(shape))
    assert out.shape == (shape[0], kw.get("out_channels", 1), *shape[2:])


def test_divisor_reflects_anisotropic_pooling():
    assert UNet(dims=2, depth=4).divisor() == (8, 8)
    assert UNet(dims=3, depth=4, anisotropic_levels=1).divisor() == (4, 8, 8)
    assert UNet(dims=3, depth=3, anisotropic_levels=2).divisor() == (1, 4, 4)


def test_anisotropic_levels_use_flat_kernels():
    net = UNet(dims=3, depth=3, width=4, anisotropic_levels=1)
    assert tuple(net.down[0].conv1.kernel_size) == (1, 3, 3)
    assert tuple(net.down[1].conv1.kernel_size) == (3, 3, 3)


@pytest.mark.parametrize("kw", [dict(dims=4), dict(depth=0), dict(dims=2, anisotropic_levels=1),
                                dict(norm="layer")])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        UNet(**kw)


def test_pool_z_false_keeps_full_z_resolution():
    net = UNet(dims=3, depth=3, width=4, pool_z=False).eval()
    assert net.divisor() == (1, 4, 4)
    assert net(torch.zeros(1, 1, 5, 16, 16)).shape == (1, 1, 5, 16, 16)


def test_first_kernel_z_sets_the_first_convolution_and_its_projection():
    net = UNet(dims=3, depth=2, width=4, residual=True, anisotropic_levels=1, first_kernel_z=3)
    assert tuple(net.down[0].conv1.kernel_size) == (3, 3, 3)
    assert tuple(net.down[0].conv2.kernel_size) == (1, 3, 3)
    assert tuple(net.down[0].skip.kernel_size) == (3, 1, 1)
    with pytest.raises(ValueError, match="first_kernel_z"):
        UNet(dims=3, first_kernel_z=2)


def _random_2d(in_channels: int) -> UNet:
    torch.manual_seed(0)
    net = UNet(dims=2, in_channels=in_channels, depth=3, width=4, residual=True)
    for mod in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    net.meta = {"name": "toy", "context": in_channels // 2, "threshold": 0.6,
                "metrics": {"val_iou": 0.9}}
    return net.eval()


@pytest.mark.parametrize(("in_channels", "anisotropic"), [(3, 0), (3, 1), (1, 0), (5, 2)])
def test_inflate_2d_computes_the_2d_model_slice_by_slice(in_channels, anisotropic):
    from napari_emseg.models.unet import inflate_2d

    net2 = _random_2d(in_channels)
    net3 = inflate_2d(net2, anisotropic).eval()
    c = in_channels // 2
    vol = torch.randn(1, 1, 9, 24, 32)
    with torch.no_grad():
        out3 = net3(vol)[0, 0]
        stacks = torch.stack([vol[0, 0, z - c : z + c + 1] for z in range(c, 9 - c)])
        out2 = net2(stacks)[:, 0]
    assert out3.shape == (9, 24, 32)
    torch.testing.assert_close(out3[c : 9 - c], out2, atol=1e-5, rtol=1e-5)
    assert net3.config["dims"] == 3 and net3.config["pool_z"] is False
    assert net3.meta["context"] == 0 and net3.meta["inflated_from"] == "toy"
    assert net3.meta["threshold"] == 0.6 and "metrics" not in net3.meta


def test_inflated_model_round_trips_and_predicts_like_the_2d_model(tmp_path):
    from napari_emseg.models.unet import inflate_2d
    from napari_emseg.models.zoo import load_model, save_checkpoint
    from napari_emseg.predict import predict_volume

    net2 = _random_2d(3)
    net2.meta.update(dims=2, activation="sigmoid", patch=[32, 32])
    net3 = inflate_2d(net2)
    net3.meta["patch"] = [8, 32, 32]
    loaded = load_model(save_checkpoint(net3, tmp_path / "m3.pt"))
    assert loaded.config == net3.config
    vol = np.random.default_rng(1).integers(0, 255, (8, 32, 32)).astype(np.uint8)
    p2 = predict_volume(vol, net2)
    p3 = predict_volume(vol, loaded)
    np.testing.assert_allclose(p3[1:-1], p2[1:-1], atol=1e-4)


def test_inflate_2d_rejects_3d_models():
    from napari_emseg.models.unet import inflate_2d

    with pytest.raises(ValueError, match="2D model"):
        inflate_2d(UNet(dims=3, depth=2, width=4))
