"""Save dock widget: Labels layer → TIFF / zarr; model → checkpoint / TorchScript."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton
from napari.layers import Labels

from .._writer import layer_voxel_size
from . import jobs, layers, registry
from .dock import ScrollingDock
from .jobs import Job, JobOwner
from .layers import base_name, layer_array, layer_picker, source_path
from .registry import ModelChoices, model_registry

if TYPE_CHECKING:
    import napari

LABEL_SUFFIXES = (".tif", ".tiff", ".zarr")


def _chosen(value) -> Path | None:
    """The path typed / browsed in a FileEdit, or None when nothing was chosen."""
    text = str(value or "").strip()
    if text in ("", "."):
        return None
    return Path(text).expanduser()


def suggested_labels_path(viewer, layer: Labels) -> Path:
    """``<folder>/<layer name>.tif`` that does not exist yet (``_2``, ``_3`` … added).

    The folder is that of the file the layer's image was read from (the layer
    named like it without " instances" etc., else any layer read from a file),
    else the current folder.
    """
    own = base_name(layer.name)
    ordered = sorted(viewer.layers, key=lambda lay: lay.name != own)  # the image's layer first
    folder = next((p.parent for p in map(source_path, ordered) if p is not None), Path.cwd())
    stem = layers.safe_name(layer.name)
    path, n = folder / f"{stem}.tif", 2
    while path.exists():
        path, n = folder / f"{stem}_{n}.tif", n + 1
    return path


def _replace_problem(viewer, path: Path, replace: bool) -> str | None:
    """Why writing ``path`` would lose data (a layer's own file, or an unticked replace)."""
    target = path.resolve()
    for lay in viewer.layers:
        source = source_path(lay)
        if source is not None and source.resolve() == target:
            return (f"{path.name} is the file layer {lay.name!r} was read from: saving "
                    "would replace it; choose another name")
    if path.exists() and not replace:
        return (f"{path.name} exists: tick 'replace an existing file' to write over it, "
                "or choose another name")
    return None


class SaveWidget(ScrollingDock, ModelChoices, JobOwner, Container):
    """Dock widget: write labels atomically (TIFF or zarr) and export models."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True, scrollable=True)
        self._viewer = napari_viewer
        self._registry = model_registry(napari_viewer)
        self.job: Job | None = None

        self.labels_reason = layers.reason_label()
        self.labels_layer = layer_picker(napari_viewer, Labels, "labels layer")
        self.labels_path = FileEdit(label="labels file", mode="w",
                                    filter="*.tif *.tiff *.zarr",
                                    tooltip=".tif / .tiff (multi-page) or .zarr")
        self.replace = CheckBox(text="replace an existing file", value=False)
        self.save_labels_button = PushButton(text="Save labels")
        self.model_reason = layers.reason_label()
        self.model = ComboBox(label="model", choices=self._model_choices, nullable=True)
        self.checkpoint_path = FileEdit(label="checkpoint file", mode="w", filter="*.pt")
        self.save_checkpoint_button = PushButton(text="Save checkpoint")
        self.torchscript_path = FileEdit(label="TorchScript file", mode="w", filter="*.pt *.ts")
        self.export_button = PushButton(text="Export TorchScript")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.extend([self.labels_reason, self.labels_layer, self.labels_path, self.replace,
                     self.save_labels_button, self.model_reason, self.model,
                     self.checkpoint_path, self.save_checkpoint_button,
                     self.torchscript_path, self.export_button, self.status])

        self.save_labels_button.clicked.connect(self.save_labels)
        self.save_checkpoint_button.clicked.connect(self.save_checkpoint)
        self.export_button.clicked.connect(self.export_torchscript)
        self.labels_layer.changed.connect(self._update_state)
        self.labels_layer.changed.connect(self._suggest_name)
        self._suggested: Path | None = None
        self._follow_registry(napari_viewer)
        self._layers_changed()
        self._suggest_name()
        self.fit_narrow()

    # -- state
    def _layers_changed(self) -> None:
        self.labels_layer.reset_choices()
        self._update_state()

    def _update_state(self, _value=None) -> None:
        no_labels = None if self.labels_layer.value is not None else (
            "no Labels layer: segment or paint something first")
        no_model = None if self.model.value else (
            "no model: predict or train first, or browse to one in Predict")
        self.labels_reason.value, self.labels_reason.visible = no_labels or "", bool(no_labels)
        self.model_reason.value, self.model_reason.visible = no_model or "", bool(no_model)
        self.save_labels_button.enabled = no_labels is None and not self._busy()
        self.save_checkpoint_button.enabled = no_model is None and not self._busy()
        self.export_button.enabled = no_model is None and not self._busy()

    def _suggest_name(self, _value=None) -> None:
        """Fill the labels file with a free name for the chosen layer, unless one was typed."""
        layer = self.labels_layer.value
        typed = _chosen(self.labels_path.value)
        if layer is None or (typed is not None and typed != self._suggested):
            return
        self._suggested = suggested_labels_path(self._viewer, layer)
        self.labels_path.value = str(self._suggested)

    def _start(self, work, description: str, done_text,
               preload: tuple[str, ...] = ()) -> Job | None:
        if self._busy():
            jobs.info("Save: a save is already running")
            return None

        def show(path) -> None:
            self.status.value = done_text(path)
            jobs.info(self.status.value)

        self.job = Job(work, description=description, on_returned=show,
                       on_finished=lambda _job: self._update_state(), preload=preload)
        self._update_state()
        return self.job

    # -- actions
    def save_labels(self, _value=None) -> Job | None:
        """Write the chosen Labels layer to the chosen .tif/.tiff/.zarr (atomic).

        The layer's scale is saved as the voxel size, so the file reopens as
        a Labels layer at the same scale.
        """
        layer = self.labels_layer.value
        if layer is None:
            jobs.error("Save: no Labels layer to save")
            return None
        path = _chosen(self.labels_path.value)
        if path is None:
            jobs.error("Save: choose a labels file (.tif, .tiff or .zarr) first")
            return None
        if path.suffix.lower() not in LABEL_SUFFIXES:
            jobs.error(f"Save: {path.name!r} must end in .tif, .tiff or .zarr")
            return None
        problem = _replace_problem(self._viewer, path, bool(self.replace.value))
        if problem:
            jobs.error(f"Save: {problem}")
            return None
        data = layer_array(layer)
        sizes = layer_voxel_size(layer.scale, getattr(layer, "units", None), data.ndim)

        def work(progress, cancel, _log):
            from ..io import write_labels

            progress(0, 1)
            out = write_labels(path, data, voxel_size=sizes)
            progress(1, 1)
            return out

        return self._start(work, f"Save {layer.name!r}", lambda p: f"labels saved to {p}")

    def save_checkpoint(self, _value=None) -> Job | None:
        """Write the chosen model as a napari-emseg checkpoint file."""
        return self._model_job("checkpoint")

    def export_torchscript(self, _value=None) -> Job | None:
        """Write a TorchScript copy of the chosen model."""
        return self._model_job("torchscript")

    def _model_job(self, kind: str) -> Job | None:
        key = self.model.value
        if not key:
            jobs.error("Save: no model chosen")
            return None
        widget = self.checkpoint_path if kind == "checkpoint" else self.torchscript_path
        path = _chosen(widget.value)
        if path is None or path.is_dir():
            jobs.error(f"Save: choose a {'checkpoint' if kind == 'checkpoint' else 'TorchScript'}"
                          " file name first")
            return None
        if not path.suffix:
            path = path.with_suffix(".pt")

        def work(progress, cancel, _log):
            from ..models import zoo

            model = zoo.load_model(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "checkpoint":
                return zoo.save_checkpoint(model, path)
            return zoo.export_torchscript(model, path)

        what = "checkpoint" if kind == "checkpoint" else "TorchScript model"
        return self._start(work, f"Save {what} of {registry.model_label(key)}",
                           lambda p: f"{what} saved to {p}", preload=("torch",))
