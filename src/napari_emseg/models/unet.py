"""One U-Net for 2D and 3D EM segmentation.

A plain or residual (Res-U-Net) encoder/decoder with skip connections. For
anisotropic EM (thick sections) the 3D variant can skip pooling along z in
its first levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group', 'instance' or 'none', got {kind!r}")


class ConvBlock(nn.Module):
    """Two 3×3(×3) convolutions with norm and ReLU; optionally residual."""

    def __init__(
        self,
        dims: int,
        cin: int,
        cout: int,
        norm: str,
        residual: bool,
        dropout: float,
        kernel: Sequence[int],
        first_kernel: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        conv = _conv(dims)
        pad = tuple(k // 2 for k in kernel)
        k1 = tuple(first_kernel or kernel)
        self.conv1 = conv(cin, cout, k1, padding=tuple(k // 2 for k in k1),
                          bias=norm == "none")
        self.norm1 = _norm(norm, dims, cout)
        self.conv2 = conv(cout, cout, tuple(kernel), padding=pad, bias=norm == "none")
        self.norm2 = _norm(norm, dims, cout)
        self.act = nn.ReLU(inplace=True)
        drop = nn.Dropout2d if dims == 2 else nn.Dropout3d
        self.drop = drop(dropout) if dropout > 0 else nn.Identity()
        self.skip = None
        if residual:
            # 1×1 projection; with a first_kernel it reaches as far along z
            kz = first_kernel[0] if first_kernel else 1
            sk = (kz,) + (1,) * (dims - 1)
            sp = (kz // 2,) + (0,) * (dims - 1)
            self.skip = (conv(cin, cout, sk, padding=sp, bias=False) if cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.drop(y)
        y = self.norm2(self.conv2(y))
        if self.skip is not None:
            y = y + self.skip(x)
        return self.act(y)


class UNet(nn.Module):
    """U-Net for ``dims=2`` (NCYX) or ``dims=3`` (NCZYX) inputs.

    Parameters
    ----------
    dims : int
        2 or 3.
    in_channels, out_channels : int
        Input channels (e.g. 1, or 3 for a 2.5D model) and output logits.
    depth : int
        Number of resolution levels (``depth - 1`` poolings).
    width : int
        Channels of the first level; doubled at each level.
    norm : str
        ``"batch"``, ``"group"``, ``"instance"`` or ``"none"``.
    residual : bool
        Residual conv blocks (Res-U-Net).
    dropout : float
        Dropout in the two deepest levels.
    anisotropic_levels : int
        3D only: the first ``anisotropic_levels`` levels use 1×3×3 kernels and
        pool only in y/x (for thick sections).
    pool_z : bool
        3D only: ``False`` pools only in y/x at every level (full z resolution).
    first_kernel_z : int
        3D only: z extent of the very first convolution (and of its residual
        projection); 0 = that level's kernel. A 2.5D model with ``c`` context
        slices inflates exactly into ``first_kernel_z = 2c + 1``
        (:func:`inflate_2d`).

    Input spatial sizes must be divisible by :meth:`divisor`.
    """

    def __init__(
        self,
        dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        depth: int = 4,
        width: int = 16,
        norm: str = "batch",
        residual: bool = False,
        dropout: float = 0.0,
        anisotropic_levels: int = 0,
        pool_z: bool = True,
        first_kernel_z: int = 0,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if dims == 2 and (anisotropic_levels or not pool_z or first_kernel_z):
            raise ValueError("anisotropic_levels, pool_z and first_kernel_z apply to 3D "
                             "models only")
        if first_kernel_z < 0 or first_kernel_z and first_kernel_z % 2 == 0:
            raise ValueError(f"first_kernel_z must be 0 or odd, got {first_kernel_z}")
        self.config = dict(
            dims=dims,
            in_channels=in_channels,
            out_channels=out_channels,
            depth=depth,
            width=width,
            norm=norm,
            residual=residual,
            dropout=dropout,
            anisotropic_levels=anisotropic_levels,
        )
        if not pool_z or first_kernel_z:  # older checkpoints' configs stay as they were
            self.config.update(pool_z=pool_z, first_kernel_z=first_kernel_z)
        self.dims = dims
        chans = [width * 2**i for i in range(depth)]
        self.pools = [self._pool_size(i) for i in range(depth - 1)]
        self.down = nn.ModuleList()
        self.pool_layers = nn.ModuleList()
        cin = in_channels
        for level, c in enumerate(chans):
            drop = dropout if level >= depth - 2 else 0.0
            first = None
            if level == 0 and first_kernel_z:
                first = (first_kernel_z, 3, 3)
            self.down.append(
                ConvBlock(dims, cin, c, norm, residual, drop, self._kernel(level), first)
            )
            cin = c
        maxpool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        for p in self.pools:
            self.pool_layers.append(maxpool(p, p))
        convt = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in range(depth - 2, -1, -1):
            p = self.pools[level]
            self.ups.append(convt(chans[level + 1], chans[level], p, stride=p))
            self.up_blocks.append(
                ConvBlock(dims, 2 * chans[level], chans[level], norm, residual, 0.0,
                          self._kernel(level))
            )
        self.head = _conv(dims)(chans[0], out_channels, 1)

    def _pool_size(self, level: int) -> tuple[int, ...]:
        if self.dims == 2:
            return (2, 2)
        flat = level < self.config["anisotropic_levels"] or not self.config.get("pool_z", True)
        return (1 if flat else 2, 2, 2)

    def _kernel(self, level: int) -> tuple[int, ...]:
        if self.dims == 2:
            return (3, 3)
        z = 1 if level < self.config["anisotropic_levels"] else 3
        return (z, 3, 3)

    def divisor(self) -> tuple[int, ...]:
        """Spatial size factors (per axis) that inputs must be divisible by."""
        div = [1] * self.dims
        for p in self.pools:
            div = [d * s for d, s in zip(div, p, strict=True)]
        return tuple(div)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < len(self.pool_layers):
                skips.append(x)
                x = self.pool_layers[level](x)
        for up, block in zip(self.ups, self.up_blocks, strict=True):
            x = up(x)
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


_INFLATED_META = ("classes", "activation", "normalization", "threshold")


def inflate_2d(model2d: UNet, anisotropic_levels: int = 0) -> UNet:
    """A 3D U-Net that computes exactly what a 2D / 2.5D U-Net computes per slice.

    I3D-style inflation: each 2D kernel becomes the centre z-plane of a 3D
    kernel (the other planes are zero, free to learn z context), pooling stays
    in y/x, and the ``2c + 1`` input slices of a 2.5D model become the z taps
    of the first convolution. Away from the volume's first and last ``c``
    slices the outputs are identical; training then adds 3D context.

    Parameters
    ----------
    model2d : UNet
        ``dims=2``, with ``in_channels = 2c + 1`` (odd).
    anisotropic_levels : int
        Levels of the 3D model that keep 1×3×3 kernels (cheaper, no new z taps).

    Returns
    -------
    UNet
        ``dims=3``, one input channel, ``.meta`` copied with ``context=0``.
    """
    cfg = dict(model2d.config)
    if cfg["dims"] != 2 or cfg["in_channels"] % 2 == 0:
        raise ValueError("inflate_2d needs a 2D model with an odd number of input "
                         f"channels (1 or 2c + 1 slices), got {cfg}")
    model3d = UNet(**{**cfg, "dims": 3, "in_channels": 1, "pool_z": False,
                      "anisotropic_levels": anisotropic_levels,
                      "first_kernel_z": cfg["in_channels"] if cfg["in_channels"] > 1 else 0})
    own = model3d.state_dict()
    with torch.no_grad():
        for key, w2 in model2d.state_dict().items():
            own[key].copy_(_inflate_tensor(w2, own[key]))
    model3d.load_state_dict(own)
    meta = getattr(model2d, "meta", {})
    model3d.meta = {**{k: meta[k] for k in _INFLATED_META if k in meta},
                    "context": 0, "dims": 3, "inflated_from": meta.get("name")}
    return model3d


def _inflate_tensor(w2: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 2D weight placed into a 3D one of shape ``like`` (see :func:`inflate_2d`)."""
    if w2.ndim != 4:  # biases, norm parameters and statistics
        return w2
    out = torch.zeros_like(like)
    if like.shape[1] == 1 and w2.shape[1] == like.shape[2] > 1:  # 2.5D slices -> z taps
        out[:, 0] = w2
    else:
        out[:, :, like.shape[2] // 2] = w2
    return out


def collapse_context(model2d: UNet) -> UNet:
    """A plain 2D U-Net (one input slice) from a 2.5D one (``2c + 1`` slices).

    The first convolution's weights (and its residual projection) are summed
    over the input slices, so the new model computes exactly what the 2.5D
    model computes when each slice is fed as its own neighbours. Use it where
    the sections are much thicker than those the 2.5D model was trained on.

    Parameters
    ----------
    model2d : UNet
        ``dims=2`` with any number of input channels.

    Returns
    -------
    UNet
        ``in_channels=1``, ``.meta`` copied with ``context=0``.
    """
    cfg = dict(model2d.config)
    if cfg["dims"] != 2:
        raise ValueError(f"collapse_context needs a 2D model, got dims={cfg['dims']}")
    model = UNet(**{**cfg, "in_channels": 1})
    n_in = cfg["in_channels"]
    state = {}
    for key, w in model2d.state_dict().items():
        takes_input = key in ("down.0.conv1.weight", "down.0.skip.weight")
        state[key] = w.sum(dim=1, keepdim=True) if takes_input and n_in > 1 else w
    model.load_state_dict(state)
    model.train(model2d.training)
    model.meta = {**getattr(model2d, "meta", {}), "context": 0}
    return model
