"""The model of a blockwise run: its settings, identity and how workers get it.

A model is a name or checkpoint path (loaded once per worker process), a
U-Net (shipped to workers as checkpoint bytes) or any other callable
(pickled).  torch is imported only when a model is loaded or shipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..models import zoo
from ..predict import DEFAULT_PATCH, select_device

__all__ = [
    "ModelInfo",
    "block_kwargs",
    "default_halo",
    "local_model",
    "model_info",
    "model_payload",
    "model_token",
    "worker_model",
]

# per worker-process cache: models loaded once
_MODEL_CACHE: dict[str, Any] = {}
_MODEL_LOCK = threading.Lock()  # guards _MODEL_CACHE; loads run one at a time


@dataclass
class ModelInfo:
    """What a blockwise run needs to know about its model."""

    dims: int
    context: int
    patch: tuple[int, ...] | None
    normalization: Any  # spec dict, (lo, hi) or None (= the default percentile spec)
    channels: int | None  # output channels after activation; None = unknown (probe)
    activation: str | None  # None = predict_volume decides (bare callables)


def _meta_and_config(model) -> tuple[dict, dict]:
    if isinstance(model, (str, os.PathLike)):
        info = zoo.model_info(model)
        config = info.pop("config")
        return info, config
    if not callable(model):
        raise ValueError(
            f"model must be a model name, a checkpoint path or a callable, got {type(model)}"
        )
    return dict(getattr(model, "meta", None) or {}), dict(getattr(model, "config", None) or {})


def model_info(model, kwargs: dict) -> ModelInfo:
    """The model's settings, ``predict_volume`` arguments in ``kwargs`` taking precedence."""
    meta, config = _meta_and_config(model)
    dims = int(kwargs.get("dims") or meta.get("dims", config.get("dims", 2)))
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    context = kwargs.get("context")
    context = int(context if context is not None else meta.get("context", 0) or 0)
    patch = kwargs.get("patch") or meta.get("patch")
    if patch is not None:
        patch = (int(patch),) * dims if np.isscalar(patch) else tuple(int(p) for p in patch)
        patch = patch if len(patch) == dims else None
    normalization = meta.get("normalization") if meta else {"mode": "none"}
    if "normalization" in kwargs and kwargs["normalization"] is not None:
        normalization = kwargs["normalization"]
    activation = kwargs.get("activation") or meta.get("activation")
    channels, activation = _output_channels(config.get("out_channels"), activation)
    return ModelInfo(dims, context, patch, normalization, channels, activation)


def _output_channels(out_channels, activation) -> tuple[int | None, str | None]:
    """(channels after activation, activation) from the network's output channels."""
    if out_channels is None:
        return None, activation
    if activation is None:
        activation = "softmax" if out_channels > 1 else "sigmoid"
    if activation == "softmax" and out_channels > 1:
        return out_channels - 1, activation
    return out_channels, activation


def block_kwargs(info: ModelInfo, kwargs: dict) -> dict:
    """predict_volume arguments fixing what :func:`model_info` decided.

    Passed explicitly because a model rebuilt from checkpoint bytes on a worker
    carries no ``.meta``; the normalization range is passed separately.
    """
    out = {k: v for k, v in kwargs.items() if k != "normalization"}
    out.update(dims=info.dims, context=info.context)
    if info.activation is not None:
        out["activation"] = info.activation
    if info.patch is not None:
        out["patch"] = info.patch
    return out


def default_halo(model, **predict_kwargs) -> tuple[int, int, int]:
    """Default halo ``(z, y, x)`` for a model.

    2D models: ``(context, py // 4, px // 4)`` (z needs only the 2.5D context
    slices); 3D models: ``patch // 4`` per axis, e.g. ``(8, 32, 32)`` for a
    32×128×128 patch.  ``patch`` is the model's (or ``predict_kwargs["patch"]``,
    else 256² / 32×128×128).
    """
    info = model_info(model, predict_kwargs)
    patch = info.patch or DEFAULT_PATCH[info.dims]
    if info.dims == 2:
        return (info.context, max(1, patch[0] // 4), max(1, patch[1] // 4))
    return tuple(max(1, p // 4) for p in patch)  # type: ignore[return-value]


def model_token(model) -> str:
    """A stable identity of a model, recorded to refuse resuming with another one."""
    if isinstance(model, (str, os.PathLike)):
        path = zoo.resolve(model)
        st = path.stat()
        return f"file:{path}:{st.st_size}:{int(st.st_mtime)}"
    state = getattr(model, "state_dict", None)
    if callable(state):
        h = hashlib.sha1()
        h.update(json.dumps(getattr(model, "config", None), sort_keys=True,
                            default=str).encode())
        h.update(zoo.weights_sha256(state()).encode())
        return f"state:{h.hexdigest()}"
    name = getattr(model, "__qualname__", type(model).__qualname__)
    return f"callable:{getattr(model, '__module__', '?')}.{name}"


def local_model(model, device):
    """The model ready to run in this process: a name or path is loaded onto the device.

    predict_volume prepares a torch module (eval copy, BatchNorm fused,
    channels-last) once and caches it until its weights change, serialised by
    its own lock, so the blocks can all be given the same module.
    """
    if isinstance(model, (str, os.PathLike)):
        model = zoo.load_model(model, device=str(select_device(device)))
    return model


def model_payload(model) -> tuple[str, Any]:
    """What a worker needs to rebuild the model: a name/path, checkpoint bytes or the callable."""
    if isinstance(model, (str, os.PathLike)):
        return ("path", str(model))
    config = getattr(model, "config", None)
    if isinstance(config, dict) and hasattr(model, "state_dict"):
        import torch

        buf = io.BytesIO()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        meta = dict(getattr(model, "meta", None) or {})
        torch.save({"config": config, "meta": meta, "state": state}, buf)
        return ("ckpt", buf.getvalue())
    return ("callable", model)


def worker_model(payload, token: str, device):
    """Rebuild (once per process) the model of a payload."""
    key = f"{token}|{device}"
    with _MODEL_LOCK:
        model = _MODEL_CACHE.get(key)
    if model is not None:
        return model
    kind, value = payload
    if kind == "path":
        with _MODEL_LOCK:
            model = local_model(value, device)
    elif kind == "ckpt":
        model = _unet_from_bytes(value)
    else:
        model = value
    with _MODEL_LOCK:
        return _MODEL_CACHE.setdefault(key, model)


def _unet_from_bytes(data: bytes):
    import torch

    from ..models.unet import UNet

    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = UNet(**ckpt["config"])
    model.load_state_dict(ckpt["state"])
    return model.eval()
