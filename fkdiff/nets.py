"""Backbones shared by teachers (EDM denoisers) and students (energies): x-shaped networks F(u, c_noise, cond).

- `MLP`: residual MLP for vectors (Du et al. appendix G: 4 residual blocks, width 128).
- `UNet`: a small DDPM-style UNet (GroupNorm + SiLU residual blocks, FiLM by the noise/condition embedding,
  skip connections, optional self-attention at the lowest resolution), final conv zero-initialised (Du et al.
  appendix G), so the network starts at F = 0.

Both map `u [B, *event], c_noise [B], cond -> [B, *event]` and use only smooth activations (SiLU), so energies built
on them have well-defined second derivatives (distillation differentiates the score w.r.t. the weights).

Conditioning (`cond_kind`): "none"; "class" (`cond` a long tensor `[B]`, label -1 = the learned null token);
"position" (`cond` a float tensor `[B, cond_dim]`, a row of NaN = the learned null token). `cond=None` means null for
every sample. One network therefore gives conditional and unconditional outputs (classifier-free style), which is
what conditional composition (Du et al. eq. 13) needs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["NoiseEmbedding", "CondEmbedding", "MLP", "UNet", "build_backbone", "coordinate_channels", "position_map"]


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise (EDM's positional embedding) followed by a 2-layer MLP. `[B] -> [B, dim]`.

    The features are cos/sin(scale * c_noise * f_k), f_k from 1 down to 1/max_period: the highest frequency is
    scale / 4 radians per unit ln sigma (c_noise = ln(sigma)/4). The default scale 250 resolves sigma finely; a
    smaller one makes the network smoother in sigma (energy students whose levels must be consistent across sigma).
    """

    def __init__(self, dim: int, num_freqs: int = 32, max_period: float = 10000.0, scale: float = 250.0):
        super().__init__()
        freqs = torch.exp(-math.log(max_period) * torch.arange(num_freqs, dtype=torch.float32) / num_freqs)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = float(scale)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        # c_noise = ln(sigma)/4 lies in about [-1.6, 1.1]; scale up so the frequencies resolve it
        arg = (self.scale * c_noise.float())[:, None] * self.freqs[None]
        return self.mlp(torch.cat([arg.cos(), arg.sin()], dim=1))


_LABELS_CHECKED = "_fkdiff_labels_checked"


def checked_labels(labels: Tensor) -> Tensor:
    """Mark a `[B]` class-label tensor whose values the caller has checked on the host (e.g. one bound label broadcast
    by `fkdiff.compose.Conditioned`): `CondEmbedding` then skips its range check, a device read (host sync) per
    evaluation. Returns `labels`."""
    setattr(labels, _LABELS_CHECKED, True)
    return labels


class CondEmbedding(nn.Module):
    """Embedding of a class label or position vector, with a learned null token for "no condition"."""

    def __init__(self, kind: str, dim: int, num_classes: int | None = None, cond_dim: int | None = None):
        super().__init__()
        if kind not in ("none", "class", "position"):
            raise ValueError(f"cond_kind must be 'none', 'class' or 'position', got {kind!r}")
        self.kind, self.dim = kind, dim
        if kind == "class":
            if not num_classes or num_classes < 1:
                raise ValueError("cond_kind='class' needs num_classes >= 1")
            self.num_classes = num_classes
            self.table = nn.Embedding(num_classes + 1, dim)  # index num_classes = null token
        elif kind == "position":
            if not cond_dim or cond_dim < 1:
                raise ValueError("cond_kind='position' needs cond_dim >= 1")
            self.cond_dim = cond_dim
            self.proj = nn.Sequential(nn.Linear(cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, cond, batch: int, device, dtype=torch.float32) -> Tensor | None:
        if self.kind == "none":
            if cond is not None:
                raise ValueError("this network is unconditional (cond_kind='none') but a condition was given")
            return None
        if self.kind == "class":
            if cond is None:
                idx = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            else:
                cond = torch.as_tensor(cond, device=device)
                if cond.is_floating_point() or cond.shape != (batch,):
                    raise ValueError(f"class condition must be an integer tensor of shape [{batch}], got "
                                     f"{cond.dtype} {tuple(cond.shape)}")
                if not getattr(cond, _LABELS_CHECKED, False) and ((cond < -1) | (cond >= self.num_classes)).any():
                    raise ValueError(f"class labels must lie in [0, {self.num_classes}) or be -1 (null)")
                idx = torch.where(cond < 0, torch.full_like(cond, self.num_classes), cond).long()
            return self.table(idx).to(dtype)
        # position
        null = self.null.to(dtype)[None].expand(batch, -1)
        if cond is None:
            return null
        cond = torch.as_tensor(cond, device=device, dtype=dtype)
        if cond.shape != (batch, self.cond_dim):
            raise ValueError(f"position condition must have shape [{batch}, {self.cond_dim}], got {tuple(cond.shape)}")
        is_null = torch.isnan(cond).any(dim=1, keepdim=True)
        emb = self.proj(torch.nan_to_num(cond, nan=0.0))
        return torch.where(is_null, null, emb)


def _embed(noise_emb: NoiseEmbedding, cond_emb: CondEmbedding, u: Tensor, c_noise: Tensor, cond) -> Tensor:
    """SiLU(noise embedding + condition embedding) `[B, emb_dim]` in u's dtype (what every block is modulated by)."""
    emb = noise_emb(c_noise.reshape(-1).expand(u.shape[0]))
    c = cond_emb(cond, u.shape[0], u.device)
    if c is not None:
        emb = emb + c
    return nn.functional.silu(emb).to(u.dtype)


class _ResBlockMLP(nn.Module):
    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, 2 * width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.emb(emb).chunk(2, dim=1)
        y = self.norm(h) * (1 + scale) + shift
        y = self.fc2(nn.functional.silu(self.fc1(nn.functional.silu(y))))
        return h + y


class MLP(nn.Module):
    """Residual MLP `F(u [B, d], c_noise [B], cond) -> [B, d]` (Du et al. appendix G: 4 blocks, width 128)."""

    def __init__(self, dim: int, width: int = 128, num_blocks: int = 4, emb_dim: int = 128, cond_kind: str = "none",
                 num_classes: int | None = None, cond_dim: int | None = None, zero_init: bool = True,
                 noise_scale: float = 250.0):
        super().__init__()
        self.dim, self.event_shape = dim, (dim,)
        self.noise_emb = NoiseEmbedding(emb_dim, scale=noise_scale)
        self.cond_emb = CondEmbedding(cond_kind, emb_dim, num_classes, cond_dim)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_ResBlockMLP(width, emb_dim) for _ in range(num_blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        if zero_init:
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    def forward(self, u: Tensor, c_noise: Tensor, cond=None) -> Tensor:
        if u.ndim != 2 or u.shape[1] != self.dim:
            raise ValueError(f"MLP expects input [B, {self.dim}], got {tuple(u.shape)}")
        emb = _embed(self.noise_emb, self.cond_emb, u, c_noise, cond)
        h = self.inp(u)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(h)


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class _ResBlock2d(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        y = self.conv1(nn.functional.silu(self.norm1(h)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        y = self.norm2(y) * (1 + scale) + shift
        y = self.conv2(nn.functional.silu(y))
        return self.skip(h) + y


class _Attention2d(nn.Module):
    def __init__(self, ch: int, heads: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.heads = heads

    def forward(self, h: Tensor) -> Tensor:
        b, c, hh, ww = h.shape
        q, k, v = self.qkv(self.norm(h)).reshape(b, 3 * self.heads, c // self.heads, hh * ww).chunk(3, dim=1)
        att = torch.softmax(torch.einsum("bhcn,bhcm->bhnm", q, k) / math.sqrt(c // self.heads), dim=-1)
        out = torch.einsum("bhnm,bhcm->bhcn", att, v).reshape(b, c, hh, ww)
        return h + self.proj(out)


def coordinate_channels(batch: int, height: int, width: int, device=None, dtype=None) -> Tensor:
    """`[B, 2, H, W]`: the (x, y) position of every pixel centre in [-1, 1] (x along the width, y along the height,
    `grid_sample(align_corners=False)` convention, the same as the `shapes` position condition)."""
    x = (2 * torch.arange(width, device=device, dtype=dtype) + 1) / width - 1
    y = (2 * torch.arange(height, device=device, dtype=dtype) + 1) / height - 1
    grid = torch.stack([x[None, :].expand(height, width), y[:, None].expand(height, width)])
    return grid[None].expand(batch, 2, height, width)


def position_map(cond: Tensor | None, batch: int, height: int, width: int, device=None, dtype=None) -> Tensor:
    """`[B, 1, H, W]`: a Gaussian bump of one pixel's width at each requested position `cond` `[B, 2]` ((x, y) in
    [-1, 1], `coordinate_channels` convention), exp(-d^2 / 2) with d the distance in pixels; zeros for the null
    condition (a NaN row, or cond None)."""
    grid = coordinate_channels(batch, height, width, device, dtype)
    if cond is None:
        return torch.zeros(batch, 1, height, width, device=device, dtype=dtype)
    cond = torch.as_tensor(cond, device=device, dtype=dtype)
    null = torch.isnan(cond).any(1)
    p = torch.nan_to_num(cond, nan=0.0)[:, :, None, None]  # [B, 2, 1, 1]
    scale = torch.tensor([width / 2.0, height / 2.0], device=device, dtype=dtype)[None, :, None, None]  # -> pixels
    d2 = ((grid - p) * scale).pow(2).sum(1, keepdim=True)
    return torch.where(null[:, None, None, None], torch.zeros_like(d2), torch.exp(-0.5 * d2))


class UNet(nn.Module):
    """Small UNet `F(u [B, C, H, W], c_noise [B], cond) -> [B, C, H, W]`; H and W divisible by 2^(levels-1).

    `position_map=True` (position conditions `[B, 2]` only) also gives the condition spatially: `position_map(cond)`,
    a bump at the requested position, is appended to the input of the first convolution. Through the FiLM embedding
    alone, a small convolutional net sees absolute positions only via its zero padding and does not learn to place
    an object at the requested position (measured on `shapes_small`: detector accuracy at chance after 1500 steps,
    also with (x, y) coordinate channels after 600). The output is still a function of u for a fixed condition.
    """

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 64), num_res_blocks: int = 1,
                 emb_dim: int = 128, attention: bool = False, cond_kind: str = "none",
                 num_classes: int | None = None, cond_dim: int | None = None, zero_init: bool = True,
                 noise_scale: float = 250.0, position_map: bool = False):
        super().__init__()
        channels = tuple(channels)
        if position_map and (cond_kind != "position" or cond_dim != 2):
            raise ValueError(f"position_map needs cond_kind='position' with cond_dim=2, got {cond_kind!r}, {cond_dim}")
        self.in_channels, self.levels, self.position_map = in_channels, len(channels), bool(position_map)
        self.noise_emb = NoiseEmbedding(emb_dim, scale=noise_scale)
        self.cond_emb = CondEmbedding(cond_kind, emb_dim, num_classes, cond_dim)
        self.inp = nn.Conv2d(in_channels + self.position_map, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [channels[0]]
        ch = channels[0]
        for i, c in enumerate(channels):
            for _ in range(num_res_blocks):
                self.down.append(_ResBlock2d(ch, c, emb_dim))
                ch = c
                skips.append(ch)
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1 = _ResBlock2d(ch, ch, emb_dim)
        self.mid_attn = _Attention2d(ch) if attention else nn.Identity()
        self.mid2 = _ResBlock2d(ch, ch, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            for _ in range(num_res_blocks + 1):
                self.up.append(_ResBlock2d(ch + skips.pop(), c, emb_dim))
                ch = c
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out_norm = nn.GroupNorm(_groups(ch), ch)
        self.out = nn.Conv2d(ch, in_channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.num_res_blocks = num_res_blocks

    def forward(self, u: Tensor, c_noise: Tensor, cond=None) -> Tensor:
        if u.ndim != 4 or u.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects input [B, {self.in_channels}, H, W], got {tuple(u.shape)}")
        f = 2 ** (self.levels - 1)
        if u.shape[2] % f or u.shape[3] % f:
            raise ValueError(f"UNet with {self.levels} levels needs H and W divisible by {f}, got {tuple(u.shape[2:])}")
        emb = _embed(self.noise_emb, self.cond_emb, u, c_noise, cond)
        if self.position_map:
            u = torch.cat([u, position_map(cond, u.shape[0], u.shape[2], u.shape[3], u.device, u.dtype)], 1)
        h = self.inp(u)
        hs = [h]
        blocks = iter(self.down)
        for i in range(self.levels):
            for _ in range(self.num_res_blocks):
                h = next(blocks)(h, emb)
                hs.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        blocks = iter(self.up)
        for j, i in enumerate(reversed(range(self.levels))):
            for _ in range(self.num_res_blocks + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb)
            if i > 0:
                h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.upsample[j](h)
        return self.out(nn.functional.silu(self.out_norm(h)))


def build_backbone(event_shape, *, kind: str | None = None, cond_kind: str = "none", num_classes: int | None = None,
                   cond_dim: int | None = None, **kwargs) -> nn.Module:
    """An MLP for vector events `(d,)`, a UNet for image events `(C, H, W)` (or `kind` = "mlp" | "unet")."""
    event_shape = tuple(event_shape)
    kind = kind or ("mlp" if len(event_shape) == 1 else "unet")
    if kind == "mlp":
        if len(event_shape) != 1:
            raise ValueError(f"an MLP backbone needs a vector event shape (d,), got {event_shape}")
        return MLP(event_shape[0], cond_kind=cond_kind, num_classes=num_classes, cond_dim=cond_dim, **kwargs)
    if kind == "unet":
        if len(event_shape) != 3:
            raise ValueError(f"a UNet backbone needs an image event shape (C, H, W), got {event_shape}")
        return UNet(event_shape[0], cond_kind=cond_kind, num_classes=num_classes, cond_dim=cond_dim, **kwargs)
    raise ValueError(f"unknown backbone kind {kind!r}; use 'mlp' or 'unet'")
