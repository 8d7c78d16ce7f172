"""``emseg train`` writes checkpoints that load, from dense and painted labels."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

pytest.importorskip("torch")

from napari_emseg.cli import main  # noqa: E402
from napari_emseg.models.zoo import load_model  # noqa: E402
from napari_emseg.train import threshold_note  # noqa: E402

TINY = ["--steps", "4", "--patch", "64,64", "--width", "4", "--depth", "2",
        "--batch-size", "2"]


@pytest.fixture
def crop_files(fixtures_dir):
    return fixtures_dir / "lucchi_crop_image.tif", fixtures_dir / "lucchi_crop_mask.tif"


def test_train_dense_then_fine_tune_painted(crop_files, tmp_path, capsys):
    image, mask = crop_files
    out = tmp_path / "dense.pt"
    assert main(["train", str(image), str(mask), str(out), *TINY]) == 0
    model = load_model(out)
    assert model.config["width"] == 4 and model.meta["training"]["steps"] == 4
    painted = np.zeros(tifffile.imread(mask).shape, np.uint8)
    painted[2, :, :10] = 1
    painted[2, :, 60:70] = 2
    tifffile.imwrite(tmp_path / "painted.tif", painted)
    out2 = tmp_path / "ft.pt"
    assert main(["train", str(image), str(tmp_path / "painted.tif"), str(out2), "--from",
                 str(out), "--painted", "--steps", "3", "--patch", "64,64"]) == 0
    tuned = load_model(out2)
    assert tuned.meta["training"]["painted_voxels"] == int((painted > 0).sum())
    from napari_emseg.train import fine_tune_defaults

    # --from: LR and batch of the recipe the gap rule chose (none given on the command line)
    training = tuned.meta["training"]
    recipe = fine_tune_defaults(load_model(out), training["recipe"])
    assert training["config"]["lr"] == recipe.lr
    assert training["config"]["batch_size"] == recipe.batch_size
    assert training["config"]["steps"] == 3  # --steps given: no time budget
    assert training["config"]["minutes"] is None
    printed = capsys.readouterr().out
    assert "checkpoint" in printed
    note = threshold_note(tuned.meta)  # only when the strokes confirmed a new threshold
    assert note in printed if note else "from painted voxels" not in printed


def test_train_reports_clear_errors(crop_files, tmp_path, capsys):
    image, _ = crop_files
    empty = tmp_path / "empty.tif"
    tifffile.imwrite(empty, np.zeros((16, 128, 128), np.uint8))
    assert main(["train", str(image), str(empty), str(tmp_path / "x.pt"), *TINY]) == 2
    assert "single class" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.tif"), str(empty), str(tmp_path / "y.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()


def _parsed(*argv: str):
    from napari_emseg.cli import build_parser
    from napari_emseg.cli.train import train_config

    return train_config(build_parser().parse_args(["train", "i.tif", "l.tif", "o.pt", *argv]))


def test_steps_epochs_and_minutes_map_to_the_config():
    assert _parsed("--steps", "7").steps == 7
    assert _parsed("--epochs", "2").steps == 200
    timed = _parsed("--minutes", "0.5")
    assert timed.minutes == 0.5 and timed.steps >= 10**9  # the budget decides
    assert _parsed().steps == 500  # the engine's default
    assert _parsed("--patch", "32x64").patch == (32, 64)


def test_train_help_describes_every_option_and_shows_defaults(capsys):
    from napari_emseg.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 16)" in text and "(default: 4)" in text  # --width, --depth
    assert "mito-2d" in text  # --from lists the bundled models


def test_painted_labels_with_two_classes_train_a_new_three_class_model(crop_files, tmp_path):
    image, _ = crop_files
    shape = tifffile.imread(image).shape
    painted = np.zeros(shape, np.uint8)
    painted[1, :, :8] = 1
    painted[1, :, 30:38] = 2
    painted[1, :, 60:68] = 3
    tifffile.imwrite(tmp_path / "painted.tif", painted)
    out = tmp_path / "three.pt"
    assert main(["train", str(image), str(tmp_path / "painted.tif"), str(out), "--painted",
                 "--steps", "2", "--patch", "64,64", "--width", "4", "--depth", "2"]) == 0
    model = load_model(out)
    assert model.config["out_channels"] == 3 and model.meta["activation"] == "softmax"


def test_from_a_bundled_model_offers_its_relatives_unless_keep_start(crop_files, tmp_path,
                                                                      monkeypatch):
    from napari_emseg.cli import train as cli_train
    from napari_emseg.models.zoo import list_models

    if "mito-2d-mix" not in list_models():
        pytest.skip("bundled weights not installed")
    image, mask = crop_files
    seen = []

    def fake_fine_tune(model, *args, alternatives=(), **kwargs):
        seen.append((model.meta["name"], list(alternatives)))
        raise SystemExit(0)  # stop before training: only the call is checked

    monkeypatch.setattr(cli_train, "fine_tune", fake_fine_tune)
    for extra in ([], ["--keep-start"]):
        with pytest.raises(SystemExit):
            main(["train", str(image), str(mask), str(tmp_path / "x.pt"), "--from",
                  "mito-2d", *extra])
    assert seen == [("mito-2d", ["mito-3d", "mito-2d-mix", "mito-2d-dr"]), ("mito-2d", [])]


def test_labels_that_do_not_fit_are_named_before_training(crop_files, tmp_path, capsys):
    image, mask = crop_files
    base = tmp_path / "dense.pt"
    assert main(["train", str(image), str(mask), str(base), *TINY]) == 0
    capsys.readouterr()
    painted = np.zeros(tifffile.imread(mask).shape, np.uint8)
    painted[2, :, :10], painted[2, :, 60:70] = 1, 2
    tifffile.imwrite(tmp_path / "painted.tif", painted)
    # painted strokes given as dense labels: the message points to --painted
    assert main(["train", str(image), str(tmp_path / "painted.tif"), str(tmp_path / "a.pt"),
                 "--from", str(base), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "values up to 2" in err and "1 foreground class" in err and "--painted" in err
    assert not (tmp_path / "a.pt").exists()
    # the image as its own painted labels: refused, not a 250-class U-Net
    assert main(["train", str(image), str(image), str(tmp_path / "b.pt"), "--painted",
                 *TINY]) == 2
    assert "image or instance ids" in capsys.readouterr().err
    # only background painted: trained (as asked) with the Train dock's warning
    tifffile.imwrite(tmp_path / "bg.tif", (painted == 1).astype(np.uint8))
    assert main(["train", str(image), str(tmp_path / "bg.tif"), str(tmp_path / "c.pt"),
                 "--from", str(base), "--painted", "--steps", "1"]) == 0
    assert "warning: only background (1) is painted" in capsys.readouterr().err


def test_fine_tune_learns_at_the_voxel_size_predict_uses(crop_files, tmp_path):
    image, mask = crop_files
    base = tmp_path / "dense.pt"
    assert main(["train", str(image), str(mask), str(base), *TINY]) == 0
    painted = np.zeros(tifffile.imread(mask).shape, np.uint8)
    painted[2, :, :10], painted[2, :, 60:70] = 1, 2
    tifffile.imwrite(tmp_path / "painted.tif", painted)
    out = tmp_path / "ft.pt"
    # the tiny model records no voxel size: the given one is recorded, nothing resampled
    assert main(["train", str(image), str(tmp_path / "painted.tif"), str(out), "--from",
                 str(base), "--painted", "--steps", "1", "--voxel-size", "50,4,4"]) == 0
    assert load_model(out).meta["training"]["voxel_size_nm"] == [50.0, 4.0, 4.0]
    assert main(["train", str(image), str(tmp_path / "painted.tif"), str(out), "--from",
                 str(base), "--painted", "--steps", "1", "--voxel-size", "4,4",
                 "--overwrite"]) == 2  # a 3D volume needs 3 values
