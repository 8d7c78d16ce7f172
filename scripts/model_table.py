"""Print the README's table of bundled models from the checkpoints' own metadata.

    .venv/bin/python scripts/model_table.py

Run it after installing new weights and paste the output over the table in
README.md (tests/test_bundled.py checks that every row is there). Scores come
from ``napari_emseg.models.zoo.model_info(name)["metrics"]["held_back"]``,
written by ``scripts/train_bundled.py --install``; model cards with the
training recipes are in docs/models.md.
"""

from __future__ import annotations

from napari_emseg.models.zoo import list_models, model_info, resolve

DATASETS = {"lucchi": "Lucchi++", "isbi2012": "ISBI 2012", "flyem": "FlyEM"}

# Held-back scores measured with `train_bundled.py membrane-2d --evaluate` before
# checkpoints stored them; used only for the exact weights they were measured on.
MEASURED_LATER = {
    "0b4a98bacfb579f23ccb824295ac5ec1ca8224254f7b674fef3fa74e067837b2": {
        "val_pixel_error": 0.079, "val_boundary_f1_2px": 0.941},
}


def _dataset(filename: str) -> str:
    return DATASETS.get(filename.split("_")[0], filename.split("_")[0])


def _held_back_slices(info: dict) -> str:
    data = info.get("training_data") or []
    volumes = [data] if isinstance(data, dict) else list(data)
    parts = []
    for vol in volumes:
        z0, z1 = vol["val_slices"]
        part = f"{_dataset(vol['files'][0])} z {z0}–{z1 - 1}"
        if part not in parts:  # one volume seen in several views
            parts.append(part)
    return "; ".join(parts) or "—"


def _input(info: dict) -> str:
    cfg = info["config"]
    if cfg["dims"] == 3:
        text = "3D"
    elif info.get("context", 0):
        text = f"2.5D ({2 * info['context'] + 1} slices)"
    else:
        text = "2D"
    voxel = info.get("voxel_size_nm")
    if voxel:
        return f"{text}, {'×'.join(f'{v:g}' for v in voxel)} nm"
    several = info.get("voxel_sizes_nm")  # trained at several scales: never resampled
    if several:
        return f"{text}, {' and '.join(f'{v[-1]:g}' for v in several)} nm pixels"
    return text


def _tags(held: dict) -> list[str]:
    """'' for a single held-back volume, else the per-volume suffixes (_lucchi, ...)."""
    tags = sorted({k[len("val_iou"):] for k in held
                   if k.startswith("val_iou") and not k.startswith("val_iou_zmedian")})
    return tags or [""]


def _scores(info: dict) -> str:
    held = dict(info.get("metrics", {}).get("held_back", {}))
    held.update(MEASURED_LATER.get(info.get("weights_sha256", ""), {}))
    membrane = bool({"membrane", "boundary"} & set(info.get("classes", [])))
    parts = []
    for tag in _tags(held):
        where = f"{DATASETS.get(tag.lstrip('_'), tag.lstrip('_'))}: " if tag else ""
        iou, dice = held.get(f"val_iou{tag}"), held.get(f"val_dice_f1{tag}")
        zmed = held.get(f"val_iou_zmedian{tag}")
        if membrane:
            text = f"pixel F1 **{dice:.3f}** (IoU {iou:.3f})"
            if f"val_pixel_error{tag}" in held:
                text += f", pixel error {held[f'val_pixel_error{tag}']:.3f}"
            f1_2px = held.get(f"val_boundary_f1_2px{tag}")
            if f1_2px is not None:
                text += f", boundary F1 within 2 px **{f1_2px:.3f}**"
        elif iou is not None:
            text = f"IoU **{iou:.3f}**, Dice {dice:.3f}"
            if zmed is not None:
                text += f" (IoU {zmed:.3f} with z-median {held.get('zmedian_size', '')})"
        else:
            continue
        parts.append(where + text)
    detection = held.get("detection_held_back")
    if detection:  # objects found per section, within the recipe's distance
        parts.insert(0, f"object F1 **{detection['f1']:.3f}** (precision "
                        f"{detection['precision']:.3f}, recall {detection['recall']:.3f}, "
                        f"within {detection['max_distance_nm']:g} nm)")
    return "; ".join(parts) or "not measured"


def _settings(info: dict) -> str:
    held = info.get("metrics", {}).get("held_back", {})
    tta = held.get("tta")
    if tta is True:  # "all" variants: flips and rotations, 8 in 2D, 16 in 3D
        tta = 8 if info["config"]["dims"] == 2 else 16
    tta_text = f"{tta}-variant TTA" if tta else "no TTA"
    text = f"{info.get('threshold', 0.5):g}, {tta_text}"
    seg = info.get("segment") or {}
    if seg.get("method") == "components" and "threshold" in seg:  # objects: scored settings
        text += f"; objects at {seg['threshold']:g}, ≥ {seg.get('min_size', 0)} px"
    return text


def table() -> str:
    """The Markdown table, one row per bundled model."""
    rows = ["| model | finds | input | held back (never trained on) | held-back score "
            "| threshold | size |",
            "|---|---|---|---|---|---|---:|"]
    for name in list_models():
        info = model_info(name)
        classes = ", ".join(info.get("classes", [])[1:]) or "?"
        size = resolve(name).stat().st_size / 1e6
        rows.append(f"| `{name}` | {classes} | {_input(info)} | {_held_back_slices(info)} "
                    f"| {_scores(info)} | {_settings(info)} | {size:.1f} MB |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
