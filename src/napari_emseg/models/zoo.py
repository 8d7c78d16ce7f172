"""Checkpoints: one file with the state dict and its metadata; bundled models.

A checkpoint is a ``torch.save`` of a plain dict::

    {"format": "napari-emseg", "version": 1,
     "config": {...UNet arguments...},
     "meta": {"name", "dims", "context", "classes", "activation",
              "normalization", "patch", "training", "metrics", ...},
     "state_dict": {...}}

It is read with ``torch.load(weights_only=True)``: no pickle is executed.
``meta["weights_sha256"]`` (written since checkpoint hashes were introduced)
is the :func:`weights_sha256` of the state dict; loading verifies it, so a
file with damaged weights is refused instead of predicting slightly wrong.
Older checkpoints without it still load.
"""

from __future__ import annotations

import functools
import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Any

from .._normalize import DEFAULT_NORMALIZATION
from ..io.atomic import atomic_path

FORMAT = "napari-emseg"
VERSION = 1
WEIGHTS_DIR = "weights"

DEFAULT_META: dict[str, Any] = {
    "context": 0,
    "classes": ["background", "foreground"],
    "activation": "sigmoid",
    "normalization": dict(DEFAULT_NORMALIZATION),
    "patch": None,
    "training": {},
    "metrics": {},
}


class CheckpointError(ValueError):
    """A file is not a usable napari-emseg checkpoint."""


def _weights_root() -> Path:
    return Path(str(resources.files("napari_emseg.models") / WEIGHTS_DIR))


#: Bundled models listed first, in this order (the first is the default choice).
PREFERRED_ORDER = ("mito-2d", "mito-3d", "mito-2d-mix", "mito-2d-dr", "membrane-2d",
                   "neuron-boundary", "synapse-2d")


def list_models() -> list[str]:
    """Names of the bundled checkpoints, :data:`PREFERRED_ORDER` first, then by name."""
    root = _weights_root()
    names = sorted(p.stem for p in root.glob("*.pt")) if root.is_dir() else []
    rank = {name: k for k, name in enumerate(PREFERRED_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Path of a bundled model name or of a checkpoint file."""
    text = str(name_or_path)
    bundled = _weights_root() / f"{text}.pt"
    if bundled.is_file():
        return bundled
    path = Path(text).expanduser()
    if path.is_file():
        return path
    names = ", ".join(list_models()) or "none"
    raise FileNotFoundError(
        f"no bundled model or checkpoint file named {text!r} (bundled: {names})"
    )


def weights_sha256(state_dict: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every tensor, in key order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _verify_weights(ckpt: dict, path: Path) -> None:
    """Compare the stored weights hash (if any) with the loaded weights."""
    expected = ckpt["meta"].get("weights_sha256") if isinstance(ckpt["meta"], dict) else None
    if expected is None:
        return  # saved before checkpoints carried a hash
    try:
        actual = weights_sha256(ckpt["state_dict"])
    except Exception as exc:
        raise CheckpointError(f"{path} has unreadable weights: {exc}") from None
    if actual != expected:
        raise CheckpointError(
            f"{path} is corrupt: its weights do not match the checksum saved with them "
            "(copy or download the file again)"
        )


def read_checkpoint(name_or_path: str | os.PathLike) -> dict:
    """Load and validate the raw checkpoint dict (weights stay on the CPU)."""
    import torch

    path = resolve(name_or_path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, not torch at all
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a napari-emseg checkpoint (no 'format': {FORMAT!r} entry)"
        )
    if int(ckpt.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt['version']}; this napari-emseg reads "
            f"up to version {VERSION}. Upgrade napari-emseg."
        )
    for key in ("config", "meta", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"{path} lacks the {key!r} entry")
    _verify_weights(ckpt, path)
    bad = _non_finite(ckpt["state_dict"])
    if bad:
        raise CheckpointError(f"{path} holds NaN/Inf weights ({bad}): it cannot predict")
    return ckpt


def _non_finite(state: dict) -> str:
    """``""``, or how many float tensors of ``state`` hold NaN/Inf (e.g. ``"3 tensors"``)."""
    import torch

    n = sum(1 for v in state.values()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()))
    return f"{n} tensor{'s' if n > 1 else ''}" if n else ""


def model_info(name_or_path: str | os.PathLike) -> dict:
    """Metadata of a checkpoint (architecture under ``"config"``), no model built."""
    ckpt = read_checkpoint(name_or_path)
    return {**DEFAULT_META, **ckpt["meta"], "config": dict(ckpt["config"])}


def bundled_info(name: str) -> dict:
    """:func:`model_info` of a bundled model, read once per process."""
    return dict(_bundled_info(_weights_root() / f"{name}.pt"))


@functools.cache
def _bundled_info(path: Path) -> dict:
    return model_info(path)


def related_models(name: str) -> list[str]:
    """Other bundled models for the same task (the same class names).

    ``[]`` when ``name`` is not a bundled model (a user's own checkpoint is
    never swapped for a bundled one).
    """
    names = list_models()
    if name not in names:
        return []
    classes = bundled_info(name)["classes"]
    return [other for other in names
            if other != name and bundled_info(other)["classes"] == classes]


def build_model(config: dict, meta: dict | None = None):
    """A fresh :class:`UNet` from its config, with ``.meta`` attached."""
    from .unet import UNet

    try:
        model = UNet(**config)
    except TypeError as exc:
        raise CheckpointError(f"unknown U-Net arguments in checkpoint config: {exc}") from None
    model.meta = {**DEFAULT_META, **(meta or {}), "dims": model.dims}
    return model


def _check_state(model, state: dict, path: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]})")
        raise CheckpointError(f"checkpoint {path} does not fit its architecture: "
                              + "; ".join(parts))


def load_model(name_or_path: str | os.PathLike, device: str | None = None):
    """Load a bundled model (by name) or a checkpoint file.

    Returns
    -------
    torch.nn.Module
        A :class:`~napari_emseg.models.unet.UNet` in eval mode with a ``.meta``
        dict (dims, context, classes, normalization, patch, training, ...).
    """
    ckpt = read_checkpoint(name_or_path)
    model = build_model(ckpt["config"], ckpt["meta"])
    _check_state(model, ckpt["state_dict"], str(name_or_path))
    model.load_state_dict(ckpt["state_dict"])
    model.meta["source"] = str(resolve(name_or_path))
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _plain(value: Any) -> Any:
    """``value`` as plain Python types that ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None:
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    for kind in (bool, int, float):  # exact types, also for subclasses
        if isinstance(value, kind):
            return kind(value)
    return str(value)  # strings (incl. subclasses such as TorchVersion), paths, ...


def save_checkpoint(model, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``model`` (a UNet with ``.config``) and its metadata atomically."""
    import torch

    if not hasattr(model, "config"):
        raise TypeError("save_checkpoint needs a napari_emseg UNet (with a .config dict)")
    full_meta = {**DEFAULT_META, **getattr(model, "meta", {}), **(meta or {})}
    full_meta.pop("source", None)
    full_meta["dims"] = model.config["dims"]
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    bad = _non_finite(state)
    if bad:
        raise CheckpointError(f"not writing {path}: the model has NaN/Inf weights ({bad}); "
                              "training diverged (try a smaller learning rate)")
    full_meta["weights_sha256"] = weights_sha256(state)
    ckpt = {"format": FORMAT, "version": VERSION, "config": _plain(dict(model.config)),
            "meta": _plain(full_meta), "state_dict": state}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def export_torchscript(model, path: str | os.PathLike) -> Path:
    """Save a TorchScript (traced) copy of ``model`` for use outside napari-emseg."""
    import torch

    dims = model.config["dims"]
    div = model.divisor()
    shape = (1, model.config["in_channels"], *[max(d, 16) * 2 for d in div])
    if dims == 3:
        shape = (1, model.config["in_channels"], div[0] * 2, 64, 64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model.cpu(), torch.zeros(shape))
    finally:
        model.train(was_training)
    path = Path(path)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
    return path
