"""``emseg predict`` end to end with a tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tifffile = pytest.importorskip("tifffile")

from napari_emseg import cli, io  # noqa: E402
from napari_emseg.models import zoo  # noqa: E402
from napari_emseg.models.unet import UNet  # noqa: E402
from napari_emseg.predict import predict_volume  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    model = UNet(dims=2, in_channels=1, out_channels=1, depth=2, width=4, norm="batch").eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    zoo.save_checkpoint(model, path, {"name": "tiny", "patch": [64, 64],
                                      "normalization": {"mode": "percentile", "low": 1,
                                                        "high": 99}})
    return path


@pytest.fixture()
def image(fixtures_dir):
    return tifffile.imread(fixtures_dir / "isbi_crop_image.tif")  # (4, 128, 128) uint8


def test_predict_tiff_matches_predict_volume(tmp_path, fixtures_dir, checkpoint, image, capsys):
    out = tmp_path / "prob.tif"
    rc = cli.main(["predict", str(fixtures_dir / "isbi_crop_image.tif"), str(out),
                   "--model", str(checkpoint), "--patch", "64,64", "--overlap", "0.5",
                   "--device", "cpu"])
    assert rc == 0
    written = tifffile.imread(out)
    expected = predict_volume(image, zoo.load_model(checkpoint), patch=(64, 64), overlap=0.5,
                              device="cpu")
    assert written.shape == image.shape == (4, 128, 128)
    assert written.dtype == np.float32
    np.testing.assert_allclose(written, expected, rtol=0, atol=1e-6)
    assert 0 <= written.min() and written.max() <= 1
    err = capsys.readouterr().err
    n_tiles = 4 * 3 * 3  # 128 px with 64-px tiles every 32 px: 3 x 3 per slice
    assert f"{n_tiles}/{n_tiles} tiles" in err and "100%" in err


def test_predict_uint8_zarr_and_tta(tmp_path, checkpoint, image):
    pytest.importorskip("zarr")
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image[:2, :64, :96])
    out = tmp_path / "prob.zarr"
    rc = cli.main(["predict", str(src), str(out), "--model", str(checkpoint), "--uint8",
                   "--tta", "--batch-size", "3", "--quiet", "--device", "cpu"])
    assert rc == 0
    written = np.asarray(io.read_volume(out))
    prob = predict_volume(image[:2, :64, :96], zoo.load_model(checkpoint), tta=True,
                          device="cpu")
    assert written.dtype == np.uint8 and written.shape == (2, 64, 96)
    assert np.abs(written.astype(int) - np.rint(prob * 255).astype(int)).max() <= 1


def test_predict_errors_are_clean(tmp_path, checkpoint, fixtures_dir, capsys):
    src = str(fixtures_dir / "isbi_crop_image.tif")
    assert cli.main(["predict", src, str(tmp_path / "out.png"), "--model",
                     str(checkpoint)]) == 2
    assert ".tif, .tiff or .zarr" in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path / "missing.tif"), str(tmp_path / "o.tif"),
                     "--model", str(checkpoint)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["predict", src, str(tmp_path / "o.tif"), "--model", "no-such-model"]) == 2
    assert "no bundled model" in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()
    with pytest.raises(SystemExit):
        cli.main(["predict", src, str(tmp_path / "o.tif"), "--patch", "big"])
    with pytest.raises(SystemExit):
        cli.main(["predict", src, str(tmp_path / "o.tif"), "--overlap", "1.5"])


def test_predict_is_registered():
    parser = cli.build_parser()
    args = parser.parse_args(["predict", "a.tif", "b.tif"])
    assert args.model == "mito-2d" and args.overlap == 0.25 and args.patch is None
    assert callable(args.func)
