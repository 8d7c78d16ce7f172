"""U-Net definitions and the checkpoint format (imports torch lazily)."""

from __future__ import annotations

__all__ = ["load_model", "save_checkpoint", "list_models", "UNet"]


def __getattr__(name: str):
    if name == "UNet":
        from .unet import UNet

        return UNet
    if name in {"load_model", "save_checkpoint", "list_models"}:
        from . import zoo

        return getattr(zoo, name)
    raise AttributeError(name)
