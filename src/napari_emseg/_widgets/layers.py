"""Layer helpers of the dock widgets (Qt-free logic where possible).

* :func:`set_layer` adds a result layer or updates the one of that name in
  place, keeping the source layer's scale and translate.
* :func:`layer_picker`: a combo box of the viewer's layers of one type that
  refreshes when layers are added, removed or renamed.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Label
from napari.layers import Image, Labels, Layer

# layer metadata key: the threshold the predicting model was tuned to (Predict → Segment)
THRESHOLD_KEY = "emseg_threshold"


def layer_geometry(source: Layer | None, ndim: int) -> dict:
    """scale/translate of ``source`` for a layer of ``ndim`` dims (leading axes 1/0)."""
    if source is None:
        return {}
    scale = list(np.asarray(source.scale, float))
    translate = list(np.asarray(source.translate, float))
    extra = ndim - len(scale)
    if extra > 0:
        scale, translate = [1.0] * extra + scale, [0.0] * extra + translate
    elif extra < 0:
        scale, translate = scale[-extra:], translate[-extra:]
    return {"scale": scale, "translate": translate}


def find_layer(viewer, name: str, kind: type[Layer] | None = None) -> Layer | None:
    """The layer called ``name`` (of type ``kind`` if given), else None."""
    for layer in viewer.layers:
        if layer.name == name and (kind is None or isinstance(layer, kind)):
            return layer
    return None


def set_layer(
    viewer,
    name: str,
    data: np.ndarray,
    kind: str,
    *,
    source: Layer | None = None,
    above: Layer | None = None,
    keep_selection: bool = False,
    **kwargs: Any,
) -> Layer:
    """Add a layer or update the one called ``name`` in place.

    Parameters
    ----------
    viewer : napari.Viewer
    name : str
    data : ndarray
    kind : "image" or "labels"
    source : Layer, optional
        Its scale and translate are copied (leading axes padded for extra dims).
    above : Layer, optional
        A new layer goes right above this one (default: on top).
    keep_selection : bool
        A new layer does not become the selected one (the user keeps painting
        in the layer they had selected).
    **kwargs
        Display options (colormap, blending, contrast_limits, opacity, ...),
        applied when adding and re-applied on update.
    """
    cls = {"image": Image, "labels": Labels}[kind]
    geometry = layer_geometry(source, data.ndim)
    layer = find_layer(viewer, name)
    if layer is None or not isinstance(layer, cls) or layer.ndim != data.ndim:
        if layer is not None:
            index = viewer.layers.index(layer)
            viewer.layers.remove(layer)
        elif above is not None and above in viewer.layers:
            index = viewer.layers.index(above) + 1
        else:
            index = len(viewer.layers)
        selected = (set(viewer.layers.selection), viewer.layers.selection.active)
        new = cls(data, name=name, **geometry, **kwargs)
        viewer.layers.insert(index, new)
        if keep_selection and selected[1] is not None:
            viewer.layers.selection.active = selected[1]  # selects only that one
            viewer.layers.selection.update(selected[0])
        return new
    layer.data = data  # refreshes the layer
    for key, value in {**geometry, **kwargs}.items():
        if not _same(getattr(layer, key, None), value):  # each change redraws: skip no-ops
            setattr(layer, key, value)
    return layer


def _same(current: Any, value: Any) -> bool:
    """True when setting a layer property to ``value`` would change nothing."""
    if isinstance(value, str):  # colormap (by name), blending, ...
        return str(getattr(current, "name", current)) == value
    try:
        return bool(np.array_equal(np.asarray(current, float), np.asarray(value, float)))
    except (TypeError, ValueError):
        return False


def base_name(layer_name: str) -> str:
    """``"cells probabilities"`` → ``"cells"`` (strips the suffixes we add)."""
    for suffix in (" probabilities", " instances", " objects 3D", " annotations"):
        if layer_name.endswith(suffix):
            return layer_name[: -len(suffix)]
    return layer_name


def source_path(layer: Layer) -> Path | None:
    """The local file or folder ``layer`` was read from, or None."""
    path = getattr(getattr(layer, "source", None), "path", None)
    if not path or "://" in str(path):
        return None
    return Path(str(path)).expanduser()


def safe_name(name: str) -> str:
    """``name`` usable as a file name ("em 1/2" → "em_1_2")."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "image"


def rgb_problem(layer: Image) -> str:
    """What to do with an RGB image layer: EM is grey (one channel).

    Grey saved as RGB (equal channels, checked on a sample) gets the way to split
    it off in napari; colour data gets "convert it to greyscale".
    """
    data = np.asarray(layer_array(layer)[..., ::7, ::7, :3])
    if data.shape[-1] == 3 and (data == data[..., :1]).all():
        return (f"image layer {layer.name!r} is grey saved as RGB (3 equal channels): "
                "right-click it → Split RGB, and use one of the three layers")
    return f"image layer {layer.name!r} is RGB colour; convert it to greyscale first"


def layer_array(layer: Layer) -> Any:
    """The full-resolution data of a layer (level 0 of a multiscale)."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return data


def current_index(viewer, layer: Layer, axis: int = 0) -> int:
    """Data index of the slice the viewer shows along ``axis`` of ``layer``."""
    shape = layer_array(layer).shape
    try:
        pos = layer.world_to_data(viewer.dims.point)
        value = int(round(float(pos[axis])))
    except Exception:
        step = viewer.dims.current_step
        value = int(step[len(step) - layer.ndim + axis])
    return int(np.clip(value, 0, shape[axis] - 1))


def watch_layers(viewer, callback: Callable[[], None]) -> None:
    """Call ``callback()`` when layers are added, removed, moved or renamed.

    ``callback`` is held weakly when it is a bound method, so a closed widget
    is not kept alive by the viewer's events.
    """
    ref = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else (lambda: callback)

    def fire(_event=None) -> None:
        fn = ref()
        if fn is None:
            return
        try:
            fn()
        except RuntimeError:  # the Qt widget was already deleted
            pass

    def changed(event=None) -> None:
        layer = getattr(event, "value", None)
        if isinstance(layer, Layer) and event.type == "inserted":
            layer.events.name.connect(fire)
        fire()

    for name in ("inserted", "removed", "moved"):
        getattr(viewer.layers.events, name).connect(changed)
    for layer in viewer.layers:
        layer.events.name.connect(fire)


def layer_picker(viewer, kind: type[Layer], label: str, tooltip: str = "",
                 nullable: bool = False) -> ComboBox:
    """A combo box of the viewer's layers of type ``kind`` (value: the layer).

    The choices are recomputed by ``reset_choices()`` (call it from a
    :func:`watch_layers` callback); the newest matching layer is selected when
    the current one disappears, unless ``nullable`` (then the value may be None).
    """
    ref = weakref.ref(viewer)

    def choices(_widget=None) -> list[tuple[str, Layer]]:
        v = ref()
        if v is None:
            return []
        return [(layer.name, layer) for layer in v.layers if isinstance(layer, kind)]

    return ComboBox(label=label, choices=choices, nullable=nullable, tooltip=tooltip)


def reason_label() -> Label:
    """A label that says why a widget is disabled (empty when all is ready)."""
    label = Label(value="")
    label.native.setWordWrap(True)
    label.native.setStyleSheet("color: #e0a040;")
    return label


# ------------------------------------------------------------- model registry
