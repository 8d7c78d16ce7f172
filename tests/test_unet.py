"""U-Net shapes for 2D, 2.5D, 3D and anisotropic 3D."""

from __future__ import annotations

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
