"""The models shipped inside the package: size, metadata, and a sanity check on real EM.

The fixture crops come from training slices, so the bars below only catch broken
weights or a broken prediction path; held-back accuracy is in the README and
docs/models.md, whose table must match the checkpoints (scripts/model_table.py).
"""

from __future__ import annotations

import pytest
import tifffile

pytest.importorskip("torch")

from napari_emseg.metrics import class_scores  # noqa: E402
from napari_emseg.models.zoo import (  # noqa: E402
    list_models,
    load_model,
    read_checkpoint,
    resolve,
    weights_sha256,
)
from napari_emseg.predict import predict_volume  # noqa: E402

FIXTURES = {  # model -> (image, mask, bar on foreground F1)
    "mito-2d": ("lucchi_crop_image.tif", "lucchi_crop_mask.tif", 0.93),
    "mito-3d": ("lucchi_crop_image.tif", "lucchi_crop_mask.tif", 0.93),
    "mito-2d-mix": ("lucchi_crop_image.tif", "lucchi_crop_mask.tif", 0.93),
    "mito-2d-dr": ("lucchi_crop_image.tif", "lucchi_crop_mask.tif", 0.93),
    "membrane-2d": ("isbi_crop_image.tif", "isbi_crop_membrane.tif", 0.78),
    "neuron-boundary": ("isbi_crop_image.tif", "isbi_crop_membrane.tif", 0.75),
}
BUNDLED = [name for name in FIXTURES if name in list_models()]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_is_small_and_documents_itself(name):
    import torch

    assert resolve(name).stat().st_size <= 15e6
    stored = read_checkpoint(name)["meta"]  # as written, before the loader fills anything in
    model = load_model(name)
    meta = model.meta
    # the stored metadata describes the network that is really in the file: its dims
    # and slice context fix the input the weights accept
    dims, context = stored["dims"], stored.get("context", 0)
    assert dims == model.config["dims"]
    assert model.config["in_channels"] == (2 * context + 1 if dims == 2 else 1)
    size = (1, model.config["in_channels"]) + (32,) * dims
    with torch.no_grad():
        out = model(torch.zeros(size))
    assert tuple(out.shape) == (1, model.config["out_channels"]) + (32,) * dims
    assert len(stored["classes"]) == max(2, model.config["out_channels"])
    assert 0 < meta["threshold"] < 1
    assert meta["training"]["steps"] > 0 and meta["training"]["seconds"] > 0
    assert meta["training"]["device"]
    held = meta["metrics"]["held_back"]
    # one held-back IoU per volume ("val_iou", or "val_iou_<volume>" for several)
    ious = [v for k, v in held.items() if k.startswith("val_iou") and "zmedian" not in k]
    assert ious and all(0 < v <= 1 for v in ious)
    assert held["threshold"] == meta["threshold"]


@pytest.mark.parametrize("name", list_models())
def test_every_bundled_checkpoint_carries_a_hash_that_verifies(name):
    import torch

    raw = torch.load(resolve(name), map_location="cpu", weights_only=True)
    stored = raw["meta"].get("weights_sha256")
    assert isinstance(stored, str) and len(stored) == 64
    assert weights_sha256(raw["state_dict"]) == stored
    assert read_checkpoint(name)["meta"]["weights_sha256"] == stored  # verified on load


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_segments_its_fixture(name, fixtures_dir):
    image_file, mask_file, bar = FIXTURES[name]
    image = tifffile.imread(fixtures_dir / image_file)
    mask = tifffile.imread(fixtures_dir / mask_file)
    model = load_model(name)
    prob = predict_volume(image, model)
    assert prob.shape == image.shape and 0 <= prob.min() and prob.max() <= 1
    pred = (prob > model.meta["threshold"]).astype("uint8")
    assert class_scores(pred, mask, classes=[1])[1]["dice"] >= bar


def test_readme_model_table_matches_the_checkpoints():
    """The README's table is generated from the metadata: regenerate it after new weights."""
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("model_table", repo / "scripts" / "model_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (repo / "README.md").read_text(encoding="utf-8")
    for row in module.table().splitlines():
        assert row in readme, (f"README table row out of date (run "
                               f"`python scripts/model_table.py`): {row}")


@pytest.mark.skipif("synapse-2d" not in list_models(), reason="synapse-2d not installed")
def test_synapse_model_finds_held_back_sites(data_dir):
    """synapse-2d on two held-back ISBI sections: most true sites found, few false ones."""
    from napari_emseg.metrics import detection_scores
    from napari_emseg.postprocess import segment, segment_defaults

    image = tifffile.imread(data_dir / "isbi2012_train_image.tif")[27:29]
    truth = tifffile.imread(data_dir / "isbi2012_train_synapse.tif")[27:29]
    model = load_model("synapse-2d")
    settings = segment_defaults(model.meta)
    assert (settings.method, settings.dims) == ("components", 2)
    labels = segment(predict_volume(image, model), settings).labels
    found = [detection_scores(labels[z], truth[z], max_distance=100.0, spacing=(4.0, 4.0))
             for z in range(2)]
    n_gt = sum(s["n_gt"] for s in found)
    recall = sum(s["found"] for s in found) / n_gt
    precision = sum(s["correct"] for s in found) / max(1, sum(s["n_pred"] for s in found))
    assert n_gt >= 5 and recall >= 0.5 and precision >= 0.5, (recall, precision)
