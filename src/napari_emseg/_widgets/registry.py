"""Which models the docks of one viewer offer.

:class:`ModelRegistry` / :func:`model_registry`: per-viewer list of checkpoints
(what Train produced, what the user browsed to), so the widgets share models
without a global singleton; :class:`ModelChoices`: a model combo box that
follows it.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from psygnal import Signal as PSignal

from .layers import watch_layers

#: Where Train writes checkpoints unless the user picks another folder.
DEFAULT_MODEL_DIR = "~/.napari-emseg/models"


class ModelRegistry:
    """Checkpoints known to one viewer's widgets, newest last.

    ``current`` is the model last used or produced (bundled name or path), so
    Train can start from what Predict used and Save can write what Train made.
    """

    changed = PSignal()

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.current: str | None = None

    def add(self, path: str | Path, *, make_current: bool = True) -> str:
        """Register a checkpoint file; returns its key (the path as a string)."""
        path = Path(path).expanduser().resolve()
        if path not in self.paths:
            self.paths.append(path)
        if make_current:
            self.current = str(path)
        self.changed.emit()
        return str(path)

    def set_current(self, key: str) -> None:
        """Remember ``key`` (bundled name or path) as the current model."""
        if key != self.current:
            self.current = key
            self.changed.emit()

    def choices(self) -> list[tuple[str, str]]:
        """(label, key) pairs: bundled models, then registered checkpoint files."""
        from ..models.zoo import list_models

        items = [(f"{name} (bundled)", name) for name in list_models()]
        seen = set()
        for path in reversed(self.paths):  # newest first
            if path in seen:
                continue
            seen.add(path)
            items.append((f"{path.name} ({path.parent.name})", str(path)))
        return items


_REGISTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_registry(viewer) -> ModelRegistry:
    """The :class:`ModelRegistry` of ``viewer`` (created on first use)."""
    # npe2 hands widgets a PublicOnlyProxy of the viewer (one per widget): key on
    # the real viewer so every widget of that viewer shares one registry
    viewer = getattr(viewer, "__wrapped__", viewer)
    registry = _REGISTRIES.get(viewer)
    if registry is None:
        registry = _REGISTRIES[viewer] = ModelRegistry()
    return registry


def model_label(key: str | None) -> str:
    """Short display name of a model key (bundled name or checkpoint path)."""
    if not key:
        return "none"
    return Path(key).name if ("/" in key or "\\" in key) else key


# -------------------------------------------------------------- widget mixins


class ModelChoices:
    """Mixin: a model combo box that follows the viewer's :class:`ModelRegistry`.

    The widget sets ``self._registry = model_registry(viewer)`` before building
    the combo box (``choices=self._model_choices``), names it in
    ``model_field``, defines ``_layers_changed()`` and ``_update_state()``, and
    calls :meth:`_follow_registry` at the end of ``__init__``.
    """

    _registry: ModelRegistry
    #: attribute name of the model combo box
    model_field = "model"
    #: re-select the previous choice when the registry's current model is not offered
    keep_previous_model = False

    def _model_choices(self, _widget=None) -> list[tuple[str, str]]:
        return self._registry.choices()

    def _follow_registry(self, viewer) -> None:
        """Refresh on registry, model choice and layer changes, and once now."""
        getattr(self, self.model_field).changed.connect(self._update_state)
        self._registry.changed.connect(self._registry_changed)
        watch_layers(viewer, self._layers_changed)
        self._registry_changed()

    def _registry_changed(self) -> None:
        combo = getattr(self, self.model_field)
        try:
            previous = combo.value if self.keep_previous_model else None
            combo.reset_choices()
            current = self._registry.current
            if current and current in combo.choices:
                combo.value = current
            elif self.keep_previous_model and previous in combo.choices:
                combo.value = previous
        except RuntimeError:  # widget deleted
            return
        self._update_state()
