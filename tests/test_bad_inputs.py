"""Bad inputs are reported or repaired, never silently passed on ("nothing lost, no traps").

One test (or a few) per trap: NaN/Inf voxels, blockwise resume over damaged
chunks, damaged checkpoints, named pipes, temporaries of killed writes,
labels that lost their scale, and the reader's file patterns.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_emseg import io
from napari_emseg._normalize import normalization_range
from napari_emseg._reader import get_reader
from napari_emseg._writer import layer_voxel_size, write_labels
from napari_emseg.io.atomic import HOST, atomic_path, clean_stale

RNG = np.random.default_rng(7)


def pointwise(x):
    """logits = 4x - 2: the output is an exact function of the normalised input."""
    return x * 4.0 - 2.0


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _dead_pid() -> int:
    """The id of a process that has just exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- NaN / Inf voxels


def test_normalisation_range_ignores_nan_and_inf():
    vol = RNG.random((4, 30, 30)).astype(np.float32) * 100
    bad = vol.copy()
    bad[0, 0, 0], bad[1, 1, 1], bad[2, 2, 2] = np.nan, np.inf, -np.inf
    finite = bad[np.isfinite(bad)]
    assert normalization_range(bad, {"mode": "minmax"}) == (float(finite.min()),
                                                             float(finite.max()))
    lo, hi = normalization_range(bad, None)
    np.testing.assert_allclose([lo, hi], np.percentile(finite, [1, 99.8]), rtol=1e-5)
    with pytest.raises(ValueError, match="no finite grey values"):
        normalization_range(np.full((2, 4, 4), np.nan, np.float32), None)


def test_nan_voxels_are_reported_and_treated_as_low_value():
    pytest.importorskip("torch")
    from napari_emseg.predict import predict_volume

    vol = RNG.random((3, 40, 48)).astype(np.float32)
    vol[1, 10, 10], vol[2, 0, 5] = np.nan, np.inf
    before = vol.copy()
    with pytest.warns(UserWarning, match="2 NaN/Inf voxel"):
        out = predict_volume(vol, pointwise, dims=2, normalization={"mode": "minmax"})
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(vol, before)  # input untouched (NaN included)
    # expected: the bad voxels behave as the finite minimum (normalised to 0)
    finite = vol[np.isfinite(vol)]
    x = (np.where(np.isfinite(vol), vol, finite.min()) - finite.min()) / np.ptp(finite)
    np.testing.assert_allclose(out, _sigmoid(4 * x - 2), atol=1e-5)
    assert out[1, 10, 10] == pytest.approx(_sigmoid(-2.0), abs=1e-6)


def test_prediction_with_nan_output_is_an_error():
    pytest.importorskip("torch")
    from napari_emseg.predict import predict_volume

    vol = RNG.random((2, 32, 32)).astype(np.float32)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        predict_volume(vol, lambda x: x * float("nan"), dims=2)


# --------------------------------------------------------------------------- blockwise resume

SHAPE, BLOCK = (16, 64, 64), (8, 32, 32)  # 2 x 2 x 2 blocks
ONE_CALL = dict(dims=3, patch=(32, 64, 64), normalization=(0.0, 255.0), halo=0)


class Counting:
    """Pointwise 3D model counting its calls (one call per block)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x * 4.0 - 2.0


def _chunk(target: Path, index) -> Path:
    """The chunk file of a block (zarr v3 ``c/z/y/x`` or v2 ``z.y.x``)."""
    v3 = target / "c" / Path(*map(str, index))
    return v3 if v3.exists() else target / ".".join(map(str, index))


def test_resume_recomputes_deleted_and_corrupt_chunks(tmp_path):
    pytest.importorskip("torch")
    from napari_emseg.blockwise import predict_blockwise
    from napari_emseg.blockwise.resume import DONE_DIR

    vol = RNG.integers(0, 256, SHAPE).astype(np.uint8)
    target = tmp_path / "p.zarr"
    first = predict_blockwise(vol, target, Counting(), block_shape=BLOCK, **ONE_CALL)[:]
    marker = (target / DONE_DIR / "0_0_0").read_text()
    assert len(marker) == 64 and int(marker, 16) >= 0  # a SHA-256 in hex

    _chunk(target, (0, 1, 0)).unlink()  # a deleted chunk reads back as zeros
    chunk = _chunk(target, (1, 1, 1))
    raw = bytearray(chunk.read_bytes())
    for i in range(8, len(raw), 7):
        raw[i] ^= 0xFF
    chunk.write_bytes(bytes(raw))  # a corrupt chunk
    (target / DONE_DIR / "1_0_1").write_text("")  # an old, empty marker

    model = Counting()
    with pytest.warns(UserWarning, match="3 finished block") as record:
        out = predict_blockwise(vol, target, model, block_shape=BLOCK, **ONE_CALL)[:]
    assert record[0].filename == __file__  # the warning points at the caller
    assert model.calls == 3
    np.testing.assert_array_equal(out, first)  # bit-identical to the first run

    again = Counting()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything verifies now: no warning
        predict_blockwise(vol, target, again, block_shape=BLOCK, **ONE_CALL)
    assert again.calls == 0


# --------------------------------------------------------------------------- checkpoints


def _flip_weight_bytes(path: Path, n: int = 2000) -> None:
    """Flip ``n`` bytes inside the largest tensor record of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    start = info.header_offset
    name_len, extra_len = struct.unpack("<HH", raw[start + 26:start + 30])
    data = start + 30 + name_len + extra_len
    assert info.file_size > 2 * n
    for i in range(data, data + 2 * n, 2):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def _tiny_checkpoint(tmp_path: Path) -> Path:
    import torch

    from napari_emseg.models import zoo
    from napari_emseg.models.unet import UNet

    torch.manual_seed(0)
    return zoo.save_checkpoint(UNet(dims=2, depth=2, width=8).eval(), tmp_path / "tiny.pt")


def test_corrupted_checkpoint_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from napari_emseg.models import zoo

    path = _tiny_checkpoint(tmp_path)
    meta = zoo.model_info(path)
    assert meta["weights_sha256"] == zoo.weights_sha256(
        torch.load(path, weights_only=True)["state_dict"])
    _flip_weight_bytes(path)
    raw = torch.load(path, weights_only=True)  # torch itself loads it silently
    assert zoo.weights_sha256(raw["state_dict"]) != meta["weights_sha256"]
    with pytest.raises(zoo.CheckpointError, match="corrupt: its weights do not match"):
        zoo.load_model(path)


def test_checkpoint_without_hash_still_loads(tmp_path):
    torch = pytest.importorskip("torch")
    from napari_emseg.models import zoo

    path = _tiny_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["meta"]["weights_sha256"]  # saved before checkpoints carried a hash
    torch.save(ckpt, tmp_path / "old.pt")
    model = zoo.load_model(tmp_path / "old.pt")
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[key], value)
    resaved = zoo.save_checkpoint(model, tmp_path / "new.pt")  # re-saving adds the hash
    assert zoo.model_info(resaved)["weights_sha256"] == zoo.weights_sha256(ckpt["state_dict"])


# --------------------------------------------------------------------------- named pipes


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
@pytest.mark.parametrize("name", ["stack.tif", "data.h5", "noext"])
def test_named_pipe_is_not_read(tmp_path, name):
    pipe = tmp_path / name
    os.mkfifo(pipe)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(get_reader(str(pipe))), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "get_reader blocked on a named pipe"
    assert result == [None]
    with pytest.raises(ValueError, match="not a regular file"):
        io.read_volume(pipe)


# --------------------------------------------------------------------------- killed writes

KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    from napari_emseg.io.atomic import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_bytes(b"x" * 1_000_000)
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_temporary_of_killed_write_is_removed_by_next_write(tmp_path):
    target = tmp_path / "labels.tif"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], check=False)
    assert proc.returncode != 0
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".labels.tif.")]
    assert len(left) == 1 and left[0].stat().st_size == 1_000_000
    labels = np.arange(2 * 8 * 8, dtype=np.uint16).reshape(2, 8, 8)
    io.write_labels(target, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]
    np.testing.assert_array_equal(io.read_volume(target), labels)


def test_only_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.tif.{HOST}-{dead}-abcd1234.tmp.tif"
    keep = [
        tmp_path / f".other.tif.{HOST}-{dead}-abcd1234.tmp.tif",  # another target
        tmp_path / f".out.tif.{HOST}-{live}-abcd1234.tmp.tif",  # a live writer
        tmp_path / f".out.tif.0badc0de-{dead}-abcd1234.tmp.tif",  # another machine
        tmp_path / f".out.tif.tif.{HOST}-{dead}-abcd1234.tmp.tif",  # target out.tif.tif
    ]
    for p in [stale, *keep]:
        p.write_bytes(b"partial")
    with atomic_path(tmp_path / "out.tif") as tmp:
        tmp.write_bytes(b"new")
    assert not stale.exists()
    assert all(p.exists() for p in keep)
    assert (tmp_path / "out.tif").read_bytes() == b"new"


def test_folder_lost_between_renames_is_restored(tmp_path):
    old = tmp_path / f".seg.zarr.{HOST}-{_dead_pid()}-old"
    old.mkdir()
    (old / "zarr.json").write_text("{}")
    assert clean_stale(tmp_path / "seg.zarr") == [old]
    assert (tmp_path / "seg.zarr" / "zarr.json").read_text() == "{}"
    assert not old.exists()


# --------------------------------------------------------------------------- labels keep scale


@pytest.mark.parametrize("name", ["out.tif", "out.zarr", "2d.tiff"])
def test_saved_labels_reopen_as_labels_at_their_scale(tmp_path, name):
    labels = np.zeros((3, 12, 14), np.uint32)
    labels[1, 2:6, 3:9] = 5
    scale = [30.0, 4.5, 4.5]
    if name.startswith("2d"):
        labels, scale = labels[1], scale[1:]
    meta = {"name": "cells", "scale": scale, "units": ["nanometer"] * len(scale)}
    written = write_labels(str(tmp_path / name), labels, meta)
    data, layer_meta, kind = get_reader(written[0])(written[0])[0]
    assert kind == "labels"  # although "out" names no label
    assert tuple(layer_meta["scale"]) == tuple(scale) and layer_meta["units"] == "nm"
    np.testing.assert_array_equal(np.asarray(data), labels)


def test_tiff_labels_carry_standard_resolution_tags(tmp_path):
    path = io.write_labels(tmp_path / "l.tif", np.ones((2, 4, 4), np.uint8),
                           voxel_size=(40, 8, 5))
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        assert tags["ResolutionUnit"].value == 3  # centimetre
        xnum, xden = tags["XResolution"].value
        ynum, yden = tags["YResolution"].value
    assert xnum / xden == pytest.approx(1e7 / 5) and ynum / yden == pytest.approx(1e7 / 8)
    assert io.read_voxel_size(path) == (40.0, 8.0, 5.0)


def test_unscaled_labels_stay_unscaled_and_bad_sizes_are_refused(tmp_path):
    path = io.write_labels(tmp_path / "plain.zarr", np.ones((2, 4, 4), np.uint8))
    assert io.is_labels_file(path) and io.read_voxel_size(path) is None
    with pytest.raises(ValueError, match="voxel_size must be 3 positive sizes"):
        io.write_labels(tmp_path / "bad.tif", np.ones((2, 4, 4), np.uint8),
                        voxel_size=(1.0, 0.0, 1.0))
    assert not (tmp_path / "bad.tif").exists()
    tifffile.imwrite(tmp_path / "raw.tif", np.ones((2, 4, 4), np.uint8))
    assert not io.is_labels_file(tmp_path / "raw.tif")  # only files marked as labels


def test_layer_voxel_size_from_napari_units():
    assert layer_voxel_size([30, 5, 5], ["nanometer"] * 3, 3) == (30.0, 5.0, 5.0)
    assert layer_voxel_size([0.03, 0.005, 0.005], ["micrometer"] * 3, 3) == (30.0, 5.0, 5.0)
    assert layer_voxel_size([1, 1, 1], ["pixel"] * 3, 3) is None
    assert layer_voxel_size([2, 1, 1], ["pixel"] * 3, 3) == (2.0, 1.0, 1.0)  # nm by convention
    assert layer_voxel_size([1, 30, 5, 5], None, 3) == (30.0, 5.0, 5.0)  # leading axes dropped
    assert layer_voxel_size([30, 5, 5], ["nanometer", "pixel", "pixel"], 3) is None


# --------------------------------------------------------------------------- reader patterns


@pytest.mark.parametrize("name, ours", [
    ("photo.png", False), ("stack.tif", False), ("stack.TIFF", False), ("notes.csv", False),
    ("vol.zarr", True), ("vol.h5", True), ("vol.hdf5", True), ("tomo.mrc", True),
    ("tomo.rec", True), ("tilt.st", True), ("map.map", True),
])
def test_napari_offers_this_reader_only_for_em_formats(name, ours):
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover(include_npe1=False)
    plugins = {r.plugin_name for r in pm.iter_compatible_readers([name])}
    assert ("napari-emseg" in plugins) == ours


# ------------------------------------------------------------- training side
def _tiny_cfg(**kw):
    from napari_emseg.train import TrainConfig

    return TrainConfig(dims=2, depth=2, width=4, patch=(32, 32), batch_size=2, steps=3,
                       val_every=3, threads=1, **kw)


def test_training_masks_nan_voxels_and_writes_finite_weights(tmp_path):
    import torch

    from napari_emseg.models.zoo import load_model
    from napari_emseg.train import fit

    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, (2, 48, 48)).astype(np.float32)
    mask = (img > 100).astype(np.uint8)
    img[0, :5, :5] = np.nan
    img[1, 10, 10] = np.inf
    original = img.copy()
    res = fit(img, mask, _tiny_cfg(), checkpoint=tmp_path / "m.pt")
    model = load_model(res.checkpoint)
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values()
               if v.is_floating_point())
    np.testing.assert_array_equal(img, original)  # input untouched (NaN == NaN here)


def test_non_finite_weights_are_never_written_or_loaded(tmp_path):
    import torch

    from napari_emseg.models.zoo import CheckpointError, build_model, load_model, save_checkpoint

    model = build_model(dict(dims=2, depth=2, width=4))
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN/Inf weights"):
        save_checkpoint(model, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    good = save_checkpoint(build_model(dict(dims=2, depth=2, width=4)), tmp_path / "ok.pt")
    ckpt = torch.load(good, weights_only=True)
    ckpt["state_dict"]["head.bias"].fill_(float("inf"))
    ckpt["meta"].pop("weights_sha256")  # as an old checkpoint without a hash
    torch.save(ckpt, tmp_path / "inf.pt")
    with pytest.raises(CheckpointError, match="NaN/Inf weights"):
        load_model(tmp_path / "inf.pt")


def test_a_0_255_mask_trains_a_binary_model_and_says_so():
    from napari_emseg.train import fit

    rng = np.random.default_rng(1)
    img = rng.normal(100, 10, (2, 48, 48)).astype(np.float32)
    mask = np.where(img > 100, 255, 0).astype(np.uint8)
    with pytest.warns(UserWarning, match="binary mask"):
        res = fit(img, mask, _tiny_cfg())
    assert res.model.config["out_channels"] == 1


def test_more_than_16_classes_needs_an_explicit_option():
    from napari_emseg.train import fit

    img = np.zeros((1, 48, 48), np.float32)
    ids = (np.arange(48 * 48).reshape(1, 48, 48) % 40).astype(np.uint16)
    with pytest.raises(ValueError, match="max_classes"):
        fit(img, ids, _tiny_cfg())


def test_cancel_before_any_check_keeps_the_existing_checkpoint(tmp_path):
    from napari_emseg.models.zoo import build_model, save_checkpoint
    from napari_emseg.train import fit

    target = save_checkpoint(build_model(dict(dims=2, depth=2, width=4)), tmp_path / "m.pt")
    before = target.read_bytes()
    img = np.random.default_rng(2).normal(100, 10, (2, 48, 48)).astype(np.float32)
    res = fit(img, (img > 100).astype(np.uint8), _tiny_cfg(), checkpoint=target,
              cancel=lambda: True)
    assert res.cancelled and res.checkpoint is None
    assert target.read_bytes() == before
