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


def _imagej_tif(path, image, voxel):
    """An ImageJ TIFF with voxel size ``voxel`` (Z, Y, X) in nm, as Fiji writes it."""
    tifffile.imwrite(path, image, imagej=True, resolution=(1 / voxel[2], 1 / voxel[1]),
                     metadata={"spacing": voxel[0], "unit": "nm", "axes": "ZYX"})
    assert io.read_voxel_size(path) == voxel
    return path


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_predict_keeps_the_voxel_size(tmp_path, checkpoint, image, suffix):
    pytest.importorskip("zarr")
    src = _imagej_tif(tmp_path / "in.tif", image[:2, :64, :64], (40.0, 6.0, 6.0))
    out = tmp_path / f"prob{suffix}"
    assert cli.main(["predict", str(src), str(out), "--model", str(checkpoint), "--quiet",
                     "--device", "cpu"]) == 0
    assert io.read_voxel_size(out) == (40.0, 6.0, 6.0)
    given = tmp_path / f"given{suffix}"
    assert cli.main(["predict", str(src), str(given), "--model", str(checkpoint), "--quiet",
                     "--device", "cpu", "--voxel-size", "30,5,5"]) == 0
    assert io.read_voxel_size(given) == (30.0, 5.0, 5.0)


def test_predict_tta_count_matches_the_api(tmp_path, checkpoint, image):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image[:1, :64, :64])
    out = tmp_path / "p.tif"
    assert cli.main(["predict", str(src), str(out), "--model", str(checkpoint), "--quiet",
                     "--device", "cpu", "--tta", "4"]) == 0
    expected = predict_volume(image[:1, :64, :64], zoo.load_model(checkpoint), tta=4,
                              device="cpu")
    np.testing.assert_allclose(tifffile.imread(out), expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def fine_checkpoint(tmp_path_factory):
    """A 2D model trained at 5 nm pixels (its card says so)."""
    torch.manual_seed(4)
    model = UNet(dims=2, in_channels=1, out_channels=1, depth=2, width=4, norm="batch").eval()
    path = tmp_path_factory.mktemp("ckpt") / "fine.pt"
    zoo.save_checkpoint(model, path, {"name": "fine", "patch": [32, 32],
                                      "voxel_size_nm": [5.0, 5.0, 5.0]})
    return path


def test_predict_resamples_to_the_models_voxel_size(tmp_path, fine_checkpoint, image, capsys):
    src = _imagej_tif(tmp_path / "in.tif", image[:2, :32, :48], (30.0, 10.0, 10.0))
    out = tmp_path / "p.tif"
    assert cli.main(["predict", str(src), str(out), "--model", str(fine_checkpoint),
                     "--quiet", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "resampled to the model's voxel size (zoom 1×2×2)" in err
    assert tifffile.imread(out).shape == (2, 32, 48)  # back at the input's shape
    plain = tmp_path / "plain.tif"
    assert cli.main(["predict", str(src), str(plain), "--model", str(fine_checkpoint),
                     "--quiet", "--device", "cpu", "--no-resample"]) == 0
    assert "resampled" not in capsys.readouterr().err
    expected = predict_volume(image[:2, :32, :48], zoo.load_model(fine_checkpoint),
                              device="cpu")
    np.testing.assert_allclose(tifffile.imread(plain), expected, rtol=0, atol=1e-6)


def test_predict_adapt_reestimates_batchnorm(tmp_path, checkpoint, image, capsys):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, (image[:2, :64, :64] // 2 + 100).astype(np.uint8))  # other contrast
    plain, adapted = tmp_path / "plain.tif", tmp_path / "adapted.tif"
    base = ["--model", str(checkpoint), "--quiet", "--device", "cpu"]
    assert cli.main(["predict", str(src), str(plain), *base]) == 0
    assert "BatchNorm" not in capsys.readouterr().err
    assert cli.main(["predict", str(src), str(adapted), *base, "--adapt"]) == 0
    assert "BatchNorm statistics re-estimated on this volume" in capsys.readouterr().err
    assert not np.allclose(tifffile.imread(plain), tifffile.imread(adapted))


def test_predict_help_shows_defaults_and_bundled_models(capsys):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.25)" in text and "(default: mito-2d)" in text
    for name in zoo.list_models():
        assert name in text
    for flag in ("--adapt", "--voxel-size", "--no-resample", "--overwrite", "--tta [N]"):
        assert flag in text


def test_predict_blockwise_takes_shapes_and_resumes(tmp_path, checkpoint, image, capsys):
    pytest.importorskip("zarr")
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image[:2, :64, :64])
    out = tmp_path / "p.zarr"
    argv = ["predict", str(src), str(out), "--model", str(checkpoint), "--quiet", "--device",
            "cpu", "--blockwise", "--block", "2x32x32", "--halo", "0,8,8"]
    assert cli.main(argv) == 0
    first = np.asarray(io.read_volume(out))
    assert first.shape == (2, 64, 64)
    assert cli.main(argv) == 0  # an unfinished or finished OUT of ours is resumed, not refused
    np.testing.assert_array_equal(np.asarray(io.read_volume(out)), first)
    assert "written to" in capsys.readouterr().out


def test_predict_planes_flag_averages_three_sectionings(tmp_path, checkpoint, image, capsys):
    from napari_emseg.predict import predict_planes

    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image)
    out = tmp_path / "planes.tif"
    assert cli.main(["predict", str(src), str(out), "--model", str(checkpoint), "--planes",
                     "--device", "cpu", "--quiet"]) == 0
    expected = predict_planes(image, zoo.load_model(checkpoint), device="cpu")
    np.testing.assert_allclose(tifffile.imread(out), expected, atol=1e-5)
    assert cli.main(["predict", str(src), str(tmp_path / "x.tif"), "--model",
                     str(checkpoint), "--planes", "--adapt", "--quiet"]) == 2
    assert "--planes cannot be combined with --adapt" in capsys.readouterr().err


def test_predict_warns_of_a_3d_model_on_thick_sections_before_it_runs(tmp_path, image,
                                                                      capsys):
    torch.manual_seed(0)
    cube = UNet(dims=3, in_channels=1, out_channels=1, depth=2, width=4, norm="batch").eval()
    ckpt = tmp_path / "cube.pt"
    zoo.save_checkpoint(cube, ckpt, {"name": "cube", "patch": [8, 64, 64],
                                     "voxel_size_nm": [5.0, 5.0, 5.0]})
    src = _imagej_tif(tmp_path / "in.tif", image[:2, :32, :32], (25.0, 5.0, 5.0))
    assert cli.main(["predict", str(src), str(tmp_path / "p.tif"), "--model", str(ckpt),
                     "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    warning = err.index("emseg predict: warning: the sections are much thicker")
    assert warning < err.index("tiles")  # said before the prediction's progress
    assert err.count("much thicker") == 1


def test_a_checkpoint_is_named_by_its_file_and_its_start():
    from napari_emseg.cli.predict import model_label

    assert model_label("mito-2d", {"name": "mito-2d"}) == "mito-2d"
    tuned = {"name": "mito-2d-mix", "training": {"fine_tuned_from": "mito-2d-mix"}}
    assert model_label("/runs/ft.pt", tuned) == "ft.pt (fine-tuned from mito-2d-mix)"
    assert model_label("new.pt", {"name": "new model", "training": {"steps": 4}}) == "new.pt"
