"""Bad input to ``emseg``: a one-line error and exit code 2, and no file harmed.

Every test feeds one mistake and checks the exit code, the message and that
the input (and any file that was there) is byte for byte unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
torch = pytest.importorskip("torch")

from napari_emseg import cli, io  # noqa: E402
from napari_emseg.cli.common import check_output, cli_words  # noqa: E402
from napari_emseg.models import zoo  # noqa: E402
from napari_emseg.models.unet import UNet  # noqa: E402


def digest(path: Path) -> dict[str, str]:
    """SHA-256 of a file, or of every file under a folder (by relative name)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def fails(argv: list[str], capsys) -> str:
    """Run ``emseg argv``; assert exit code 2 and a one-line error; return it."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def parse_fails(argv: list[str], capsys) -> str:
    """Run ``emseg argv``; assert argparse rejects it (exit 2); return its error line."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = UNet(dims=2, in_channels=1, out_channels=1, depth=2, width=4).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    zoo.save_checkpoint(model, path, {"name": "tiny", "patch": [32, 32]})
    return path


@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "a.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (2, 32, 32), dtype=np.uint8))
    return path


def predict(src, out, checkpoint, *extra) -> list[str]:
    return ["predict", str(src), str(out), "--model", str(checkpoint), "--quiet",
            "--device", "cpu", *extra]


# ----------------------------------------------------------- outputs vs inputs
def test_predict_onto_its_input_is_refused(image, checkpoint, capsys):
    before = digest(image)
    for extra in ([], ["--overwrite"]):
        line = fails(predict(image, image, checkpoint, *extra), capsys)
        assert "is the input" in line
    assert digest(image) == before


def test_predict_zarr_onto_itself_is_refused(tmp_path, checkpoint, capsys):
    src = tmp_path / "a.zarr"
    io.write_volume(src, np.full((2, 32, 32), 7, np.uint8))
    before = digest(src)
    line = fails(predict(src, src, checkpoint, "--overwrite"), capsys)
    assert "is the input" in line
    line = fails(predict(src, src, checkpoint, "--blockwise"), capsys)
    assert "is the input" in line
    assert digest(src) == before


def test_predict_through_a_symlink_to_the_input_is_refused(image, tmp_path, checkpoint,
                                                           capsys):
    link = tmp_path / "link.tif"
    link.symlink_to(image)
    before = digest(image)
    line = fails(predict(image, link, checkpoint, "--overwrite"), capsys)
    assert "is the input" in line
    assert digest(image) == before and link.is_symlink()


def test_predict_into_the_input_folder_is_refused(tmp_path, checkpoint, capsys):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(2):
        tifffile.imwrite(folder / f"z{z}.tif", np.full((32, 32), z, np.uint8))
    before = digest(folder)
    line = fails(predict(folder, folder / "prob.tif", checkpoint), capsys)
    assert "inside the input folder" in line
    assert digest(folder) == before


def test_predict_never_replaces_a_foreign_folder(image, tmp_path, checkpoint, capsys):
    folder = tmp_path / "d.tif"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    foreign = tmp_path / "theirs.zarr"  # a zarr store without our marker
    import zarr

    zarr.open_array(str(foreign), mode="w", shape=(2, 32, 32), dtype="uint8")[:] = 3
    before = {**digest(folder), **digest(foreign)}
    for out in (folder, foreign):
        line = fails(predict(image, out, checkpoint, "--overwrite"), capsys)
        assert "did not write" in line and "never replaced" in line
    line = fails(predict(image, foreign, checkpoint, "--blockwise", "--overwrite"), capsys)
    assert "did not write" in line
    assert {**digest(folder), **digest(foreign)} == before


def test_an_existing_output_needs_overwrite(image, tmp_path, checkpoint, capsys):
    for name in ("old.tif", "old.zarr"):
        out = tmp_path / name
        io.write_volume(out, np.zeros((2, 32, 32), np.float32))
        before = digest(out)
        line = fails(predict(image, out, checkpoint), capsys)
        assert "exists; pass --overwrite" in line
        assert digest(out) == before
        assert cli.main(predict(image, out, checkpoint, "--overwrite")) == 0
        assert digest(out) != before  # our own output is replaced when asked
        assert io.read_volume(out).shape == (2, 32, 32)


def test_train_onto_an_input_is_refused(image, tmp_path, checkpoint, capsys):
    labels = tmp_path / "lab.tif"
    tifffile.imwrite(labels, np.ones((2, 32, 32), np.uint8))
    ckpt = tmp_path / "ft.pt"
    ckpt.write_bytes(checkpoint.read_bytes())
    before = {**digest(image), **digest(labels), **digest(ckpt)}
    for out, extra in ((image, []), (labels, ["--overwrite"]), (ckpt, ["--from", str(ckpt)])):
        line = fails(["train", str(image), str(labels), str(out), "--steps", "1", *extra],
                     capsys)
        assert "is the input" in line
    line = fails(["train", str(image), str(labels), str(ckpt), "--steps", "1"], capsys)
    assert "exists; pass --overwrite" in line
    assert {**digest(image), **digest(labels), **digest(ckpt)} == before


def test_check_output_allows_a_new_path_and_resume(tmp_path):
    out = tmp_path / "new.zarr"
    assert check_output(out, [None, "mito-2d"]) == out
    io.write_volume(out, np.zeros((2, 4, 4), np.uint8))
    assert check_output(out, [], resume=True) == out  # blockwise resumes our own store
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output(out, [])


def test_outer_output_holding_the_input_is_refused(tmp_path):
    outer = tmp_path / "outer.zarr"
    io.write_volume(outer, np.zeros((2, 4, 4), np.uint8))
    inner = outer / "raw.tif"
    tifffile.imwrite(inner, np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="lies inside"):
        check_output(outer, [inner], overwrite=True)


def test_segment_and_evaluate_onto_their_inputs_are_refused(tmp_path, capsys):
    prob = tmp_path / "p.tif"
    tifffile.imwrite(prob, np.full((2, 16, 16), 0.9, np.float32))
    gt = tmp_path / "gt.tif"
    tifffile.imwrite(gt, np.ones((2, 16, 16), np.uint16))
    before = {**digest(prob), **digest(gt)}
    assert "is the input" in fails(["segment", str(prob), str(prob), "--quiet"], capsys)
    line = fails(["evaluate", str(prob), str(gt), "--json", str(gt)], capsys)
    assert "is the input" in line
    assert {**digest(prob), **digest(gt)} == before


# ----------------------------------------------------------- numbers at parse time
BAD_OPTIONS = [
    (["predict", "a.tif", "b.tif", "--patch", "0,64"], "--patch", "integers >= 1"),
    (["predict", "a.tif", "b.tif", "--patch", "big"], "--patch", "integers >= 1"),
    (["predict", "a.tif", "b.tif", "--overlap", "1"], "--overlap", "[0, 1)"),
    (["predict", "a.tif", "b.tif", "--overlap", "nan"], "--overlap", "[0, 1)"),
    (["predict", "a.tif", "b.tif", "--batch-size", "0"], "--batch-size", "positive integer"),
    (["predict", "a.tif", "b.tif", "--block", "0,512,512"], "--block", "integers >= 1"),
    (["predict", "a.tif", "b.tif", "--halo", "-1"], "--halo", "integers >= 0"),
    (["predict", "a.tif", "b.tif", "--workers", "0"], "--workers", "positive integer"),
    (["predict", "a.tif", "b.tif", "--scheduler-timeout", "-5"], "--scheduler-timeout", "> 0"),
    (["predict", "a.tif", "b.tif", "--tta", "99"], "--tta", "4 (flips)"),
    (["predict", "a.tif", "b.tif", "--voxel-size", "0,5,5"], "--voxel-size", "> 0 in nm"),
    (["predict", "a.tif", "b.tif", "--device", "foo"], "--device", "cuda, cuda:N, mps or cpu"),
    (["train", "i", "l", "o.pt", "--steps", "0"], "--steps", "positive integer"),
    (["train", "i", "l", "o.pt", "--steps", "-3"], "--steps", "positive integer"),
    (["train", "i", "l", "o.pt", "--epochs", "-1"], "--epochs", "positive integer"),
    (["train", "i", "l", "o.pt", "--minutes", "-1"], "--minutes", "> 0"),
    (["train", "i", "l", "o.pt", "--width", "0"], "--width", "positive integer"),
    (["train", "i", "l", "o.pt", "--depth", "0"], "--depth", "positive integer"),
    (["train", "i", "l", "o.pt", "--batch-size", "0"], "--batch-size", "positive integer"),
    (["train", "i", "l", "o.pt", "--lr", "0"], "--lr", "> 0"),
    (["train", "i", "l", "o.pt", "--context", "-1"], "--context", ">= 0"),
    (["train", "i", "l", "o.pt", "--patch", "64"], "--patch", "2 or 3 integers"),
    (["train", "i", "l", "o.pt", "--device", "gpu"], "--device", "cuda, cuda:N, mps or cpu"),
    (["demo", "--device", "foo"], "--device", "cuda, cuda:N, mps or cpu"),
    (["demo", "--tta", "-1"], "--tta", "4 (flips)"),
    (["segment", "p.tif", "o.tif", "--threshold", "high"], "--threshold", "'otsu'"),
    (["segment", "p.tif", "o.tif", "--threshold", "1.5"], "--threshold", "[0, 1]"),
    (["segment", "p.tif", "o.tif", "--zfilter", "-1"], "--zfilter", ">= 0"),
    (["segment", "p.tif", "o.tif", "--min-size", "-5"], "--min-size", ">= 0"),
    (["segment", "p.tif", "o.tif", "--min-distance", "0"], "--min-distance", "> 0"),
    (["segment", "p.tif", "o.tif", "--h", "-2"], "--h", "> 0"),
    (["segment", "p.tif", "o.tif", "--iou", "2"], "--iou", "[0, 1]"),
    (["segment", "p.tif", "o.tif", "--min-slices", "0"], "--min-slices", "positive integer"),
    (["segment", "p.tif", "o.tif", "--channel", "-1"], "--channel", ">= 0"),
    (["segment", "p.tif", "o.tif", "--device", "gpu"], "--device", "cuda, cuda:N, mps or cpu"),
    (["evaluate", "a.tif", "b.tif", "--thresholds", "0.5", "1.5"], "--thresholds", "[0, 1]"),
    (["evaluate", "a.tif", "b.tif", "--detection", "-1"], "--detection", ">= 0"),
    (["evaluate", "a.tif", "b.tif", "--boundary", "-1"], "--boundary", ">= 0"),
    (["evaluate", "a.tif", "b.tif", "--spacing", "0", "4", "4"], "--spacing", "> 0"),
]


@pytest.mark.parametrize(("argv", "flag", "words"), BAD_OPTIONS,
                         ids=[f"{a[0]} {a[-2]} {a[-1]}" for a, _, _ in BAD_OPTIONS])
def test_bad_numbers_are_argparse_errors(argv, flag, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = parse_fails(argv, capsys)
    assert f"argument {flag}:" in line and words in line
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_steps_and_epochs_exclude_each_other(capsys):
    line = parse_fails(["train", "i", "l", "o.pt", "--steps", "5", "--epochs", "2"], capsys)
    assert "not allowed with argument" in line


def test_unavailable_cuda_is_an_argparse_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = parse_fails(["predict", "a.tif", "b.tif", "--device", "cuda:1"], capsys)
    assert "cuda:1 is not available" in line


# ----------------------------------------------------------- errors, not tracebacks
def test_corrupt_resume_state_is_a_clean_error(image, tmp_path, capsys):
    labels = tmp_path / "lab.tif"
    tifffile.imwrite(labels, np.ones((2, 32, 32), np.uint8))
    state = tmp_path / "run.resume.pt"
    state.write_bytes(b"not a torch file")
    before = digest(state)
    line = fails(["train", str(image), str(labels), str(tmp_path / "run.pt"), "--resume",
                  "--steps", "1"], capsys)
    assert "--resume" in line and "corrupt" in line and "delete it" in line
    assert digest(state) == before and not (tmp_path / "run.pt").exists()


@pytest.mark.parametrize("error", [MemoryError("Unable to allocate 40.0 GiB"),
                                   torch.cuda.OutOfMemoryError("CUDA out of memory")])
def test_out_of_memory_says_how_much_and_suggests_blockwise(image, tmp_path, checkpoint,
                                                             monkeypatch, capsys, error):
    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr("napari_emseg.cli.predict.predict_adapted", explode)
    out = tmp_path / "prob.tif"
    line = fails(predict(image, out, checkpoint), capsys)
    assert "out of memory" in line and "(2, 32, 32) uint8" in line
    assert "GiB" in line and "--blockwise" in line
    assert not out.exists()


def test_out_of_memory_in_training_suggests_a_crop(image, tmp_path, monkeypatch, capsys):
    def explode(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr("napari_emseg.cli.train.fit", explode)
    labels = tmp_path / "lab.tif"
    tifffile.imwrite(labels, np.ones((2, 32, 32), np.uint8))
    line = fails(["train", str(image), str(labels), str(tmp_path / "o.pt")], capsys)
    assert "out of memory" in line and "GiB" in line and "crop" in line


def test_engine_messages_name_flags(image, tmp_path, checkpoint, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise FileExistsError("x.zarr exists; pass overwrite=True to replace it")

    monkeypatch.setattr("napari_emseg.cli.blockwise.predict_blockwise", refuse)
    line = fails(predict(image, tmp_path / "x.zarr", checkpoint, "--blockwise"), capsys)
    assert "--overwrite" in line and "overwrite=True" not in line
    assert cli_words("use device='cpu'") == "use --device cpu"


def test_adaptation_is_not_silently_dropped_blockwise(image, tmp_path, checkpoint, capsys):
    line = fails(predict(image, tmp_path / "x.zarr", checkpoint, "--blockwise", "--adapt"),
                 capsys)
    assert "--adapt is not available with --blockwise" in line
    assert not (tmp_path / "x.zarr").exists()


def test_a_closed_pipe_ends_quietly(tmp_path):
    """``emseg evaluate … | head``: no "Broken pipe" error lines when head has gone."""
    import subprocess
    import sys

    a = np.zeros((2, 32, 32), np.uint16)
    a[:, 4:12, 4:12], a[:, 20:28, 20:28] = 1, 2
    tifffile.imwrite(tmp_path / "a.tif", a)
    code = ("import sys; from napari_emseg.cli import main; sys.stdout.close = lambda: None\n"
            "import os; r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
            f"sys.exit(main(['evaluate', {str(tmp_path / 'a.tif')!r}, "
            f"{str(tmp_path / 'a.tif')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 141, run.stderr
    assert "Broken pipe" not in run.stderr and "error" not in run.stderr
