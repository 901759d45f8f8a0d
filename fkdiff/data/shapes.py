"""Procedural multi-object images and an exact object-position detector (Du et al. 2023, sec. 5 CLEVR experiment,
in miniature).

Each image holds 1-5 coloured squares or discs on a black canvas, 3 channels, values in [-1, 1] (background -1, each
object a colour from a fixed palette of saturated colours whose brightest channel is +1). Objects are placed by
rejection sampling with a minimum Chebyshev separation between centres, so they never overlap or touch and the
detector below is exact on clean images. Everything is a pure function of a `torch.Generator`.

Position convention (the `cond` of the `shapes` datamodule, and the `positions` argument of `detect`): a float pair
`(x, y)` in [-1, 1], x along the width (left -> right), y along the height (top -> bottom), the centre of pixel
(row i, column j) being `x = (2 j + 1) / W - 1`, `y = (2 i + 1) / H - 1`: the convention of
`torch.nn.functional.grid_sample(..., align_corners=False)`.

Geometry for an object of half-size r (default r = canvas // 16: 1 px on 16x16, 2 px on 32x32): a square covers
`max(|di|, |dj|) <= r`, a disc `di^2 + dj^2 <= (r + 1/4)^2` around its centre pixel; centres keep a distance r from the
border and a Chebyshev distance of at least `min_separation` (default 2 r + 2) from each other.

Detector: a pixel is foreground when its brightest channel is > 0. A pixel c is an object centre when the whole
"core" (the disc footprint, which every object shape contains) around c is foreground and at least `ring_fraction`
of the ring at Chebyshev distance r + 1 is background. On clean data, with the separation above, exactly the true
centres pass (a core shifted off-centre leaves its object's footprint, and the gap keeps it out of the neighbours').
`detect` says whether an object centre lies within `tol` pixels (Chebyshev) of the requested position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PALETTE",
    "ShapesSample",
    "generate_shapes",
    "render",
    "pixel_to_position",
    "position_to_pixel",
    "centre_map",
    "detect",
    "detect_all",
    "composition_accuracy",
    "default_radius",
]

# saturated colours in {0, 1}^3 minus black; mapped to [-1, 1] as 2 c - 1, so the brightest channel is +1
PALETTE = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.float32
)
SQUARE, DISC = 0, 1


def default_radius(canvas: int) -> int:
    """Object half-size in pixels for a canvas: 1 on 16x16, 2 on 32x32."""
    return max(1, canvas // 16)


@dataclass
class ShapesSample:
    """A batch of generated scenes.

    images `[N, 3, H, W]` float32 in [-1, 1]; centres `[N, M, 2]` long (row, col), -1 where absent;
    positions `[N, M, 2]` float32 normalised (x, y), NaN where absent; counts `[N]`; kinds `[N, M]` (0 square,
    1 disc, -1 absent); colours `[N, M]` palette indices (-1 absent).
    """

    images: Tensor
    centres: Tensor
    positions: Tensor
    counts: Tensor
    kinds: Tensor
    colours: Tensor


def pixel_to_position(rc: Tensor, canvas: int) -> Tensor:
    """(row, col) pixel indices `[..., 2]` -> normalised (x, y) `[..., 2]` (pixel centres, align_corners=False)."""
    rc = rc.to(torch.float32)
    return torch.stack([(2 * rc[..., 1] + 1) / canvas - 1, (2 * rc[..., 0] + 1) / canvas - 1], -1)


def position_to_pixel(pos: Tensor, canvas: int) -> Tensor:
    """Normalised (x, y) `[..., 2]` -> continuous (row, col) `[..., 2]`; inverse of `pixel_to_position`."""
    pos = pos.to(torch.float32)
    return torch.stack([((pos[..., 1] + 1) * canvas - 1) / 2, ((pos[..., 0] + 1) * canvas - 1) / 2], -1)


def _footprint(kind: int, r: int) -> Tensor:
    """Bool `[2r+1, 2r+1]` footprint of a square (kind 0) or disc (kind 1) of half-size r."""
    d = torch.arange(-r, r + 1)
    di, dj = d[:, None], d[None, :]
    if kind == SQUARE:
        return torch.ones(2 * r + 1, 2 * r + 1, dtype=torch.bool)
    return (di**2 + dj**2).float() <= (r + 0.25) ** 2


def render(centres: Tensor, kinds: Tensor, colours: Tensor, canvas: int, radius: int | None = None) -> Tensor:
    """Draw scenes: centres `[N, M, 2]` (row, col; -1 absent), kinds/colours `[N, M]` -> images `[N, 3, H, W]`."""
    r = default_radius(canvas) if radius is None else radius
    n, m, _ = centres.shape
    grid = torch.arange(canvas)
    di = grid[None, None, :, None] - centres[..., 0, None, None]  # [N, M, H, 1]
    dj = grid[None, None, None, :] - centres[..., 1, None, None]  # [N, M, 1, W]
    square = (di.abs() <= r) & (dj.abs() <= r)
    disc = (di**2 + dj**2).float() <= (r + 0.25) ** 2
    present = (kinds >= 0)[..., None, None]
    mask = torch.where((kinds == SQUARE)[..., None, None], square, disc) & present  # [N, M, H, W]
    col = PALETTE[colours.clamp_min(0)] * 2  # colour + 1 in [0, 2]
    img = -1 + torch.einsum("nmhw,nmc->nchw", mask.float(), col)
    return img.clamp(-1, 1)


def generate_shapes(
    num_images: int,
    canvas: int = 16,
    min_objects: int = 1,
    max_objects: int = 5,
    radius: int | None = None,
    min_separation: int | None = None,
    generator: torch.Generator | None = None,
    max_tries: int = 64,
) -> ShapesSample:
    """Generate `num_images` scenes with 1..5 non-overlapping objects each (deterministic given `generator`).

    Object count uniform in [min_objects, max_objects]; kind, colour uniform; centres uniform over the valid pixels,
    accepted in turn if at Chebyshev distance >= min_separation from those already placed (rejection sampling; a
    scene whose objects do not fit after `max_tries` rounds of candidates raises ValueError).
    """
    r = default_radius(canvas) if radius is None else int(radius)
    sep = 2 * r + 2 if min_separation is None else int(min_separation)
    if canvas < 2 * r + 1 or canvas < 4:
        raise ValueError(f"canvas={canvas} is too small for objects of half-size {r}")
    if not (1 <= min_objects <= max_objects):
        raise ValueError(f"need 1 <= min_objects <= max_objects, got min_objects={min_objects}, max_objects={max_objects}")
    if sep < 2 * r + 2:
        raise ValueError(f"min_separation={sep} < 2*radius+2={2 * r + 2}: objects could touch and detection would be ambiguous")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    lo, hi = r, canvas - 1 - r  # valid centre range (inclusive)
    span = hi - lo + 1
    counts = torch.randint(min_objects, max_objects + 1, (num_images,), generator=generator)
    kinds = torch.randint(0, 2, (num_images, max_objects), generator=generator)
    colours = torch.randint(0, len(PALETTE), (num_images, max_objects), generator=generator)
    centres = torch.full((num_images, max_objects, 2), -1, dtype=torch.long)
    ncand = 4 * max_objects
    cand_all = torch.randint(0, span, (num_images, ncand, 2), generator=generator).add_(lo).tolist()
    for i, k in enumerate(counts.tolist()):
        cand, placed, tries = cand_all[i], [], 0
        while True:
            for ci, cj in cand:
                if all(max(abs(ci - pi), abs(cj - pj)) >= sep for pi, pj in placed):
                    placed.append((ci, cj))
                    if len(placed) == k:
                        break
            if len(placed) == k:
                break
            tries += 1
            if tries >= max_tries:
                raise ValueError(
                    f"could not place {k} objects of half-size {r} with separation {sep} on a {canvas}x{canvas} "
                    f"canvas; lower max_objects or min_separation, or use a larger canvas"
                )
            placed = []
            cand = (torch.randint(0, span, (ncand, 2), generator=generator) + lo).tolist()
        centres[i, :k] = torch.tensor(placed)
    absent = torch.arange(max_objects)[None] >= counts[:, None]
    kinds = kinds.masked_fill(absent, -1)
    colours = colours.masked_fill(absent, -1)
    positions = pixel_to_position(centres, canvas).masked_fill(absent[..., None], float("nan"))
    images = render(centres, kinds, colours, canvas, r)
    return ShapesSample(images, centres, positions, counts, kinds, colours)


def _ring(r: int) -> Tensor:
    d = torch.arange(-(r + 1), r + 2)
    cheb = torch.maximum(d[:, None].abs(), d[None, :].abs())
    return cheb == r + 1


def centre_map(images: Tensor, radius: int | None = None, ring_fraction: float = 0.5) -> Tensor:
    """Bool `[B, H, W]`: pixels detected as object centres (full core foreground, ring mostly background)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a [B, 3, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    h, w = images.shape[-2:]
    r = default_radius(min(h, w)) if radius is None else radius
    fg = (images.amax(1, keepdim=True) > 0).float()  # [B, 1, H, W]
    core = _footprint(DISC, r).float()[None, None]
    ring = _ring(r).float()[None, None]
    core_hits = F.conv2d(fg, core, padding=r)[:, 0]
    ring_fg = F.conv2d(fg, ring, padding=r + 1)[:, 0]  # zero padding: outside the canvas counts as background
    core_ok = core_hits >= core.sum() - 0.5
    ring_ok = (ring.sum() - ring_fg) >= ring_fraction * ring.sum() - 1e-6
    return core_ok & ring_ok


def _lookup(cmap: Tensor, positions: Tensor, tol: int) -> Tensor:
    """cmap `[B, H, W]` bool, positions `[B, M, 2]` -> bool `[B, M]`: a centre within `tol` px of each position."""
    if tol < 0:
        raise ValueError(f"tol must be >= 0 pixels, got {tol}")
    b, h, w = cmap.shape
    m = positions.shape[1]
    nan = positions.isnan().any(-1)
    pos = positions.nan_to_num(0.0).to(torch.float32).clamp(-2, 2)
    row = torch.round(((pos[..., 1] + 1) * h - 1) / 2).long()  # nearest pixel; inverse of pixel_to_position
    col = torch.round(((pos[..., 0] + 1) * w - 1) / 2).long()
    padded = F.pad(cmap, (tol, tol, tol, tol))  # [B, H + 2 tol, W + 2 tol]; padded index = index + tol
    off = torch.arange(2 * tol + 1)
    ri = row[..., None] + off  # [B, M, 2 tol + 1]: padded rows of row - tol .. row + tol
    ci = col[..., None] + off
    ok_r = (ri >= 0) & (ri < h + 2 * tol)
    ok_c = (ci >= 0) & (ci < w + 2 * tol)
    win = padded[torch.arange(b)[:, None, None, None], ri.clamp(0, h + 2 * tol - 1)[..., :, None],
                 ci.clamp(0, w + 2 * tol - 1)[..., None, :]]  # [B, M, 2 tol + 1, 2 tol + 1]
    win = win & ok_r[..., :, None] & ok_c[..., None, :]
    return win.reshape(b, m, -1).any(-1) & ~nan


def detect(images: Tensor, positions: Tensor, tol: int = 1, radius: int | None = None,
           ring_fraction: float = 0.5) -> Tensor:
    """Whether an object sits at each requested position: images `[B, 3, H, W]`, positions `[B, 2]` -> bool `[B]`.

    True when a detected object centre (see `centre_map`) lies within Chebyshev distance `tol` pixels of the pixel
    nearest to the position. NaN positions give False.
    """
    if not isinstance(positions, Tensor) or positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must be a [B, 2] tensor of (x, y) in [-1, 1], got {getattr(positions, 'shape', type(positions))}")
    cmap = centre_map(images, radius, ring_fraction)
    if positions.shape[0] != cmap.shape[0]:
        raise ValueError(f"images and positions disagree on the batch size: {cmap.shape[0]} vs {positions.shape[0]}")
    return _lookup(cmap, positions[:, None], tol)[:, 0]


def detect_all(images: Tensor, positions: Tensor, tol: int = 1, radius: int | None = None,
               ring_fraction: float = 0.5) -> Tensor:
    """Bool `[B]`: every requested position in `positions` `[B, M, 2]` holds an object (NaN rows are ignored)."""
    if not isinstance(positions, Tensor) or positions.ndim != 3 or positions.shape[2] != 2:
        raise ValueError(f"positions must be a [B, M, 2] tensor, got {getattr(positions, 'shape', type(positions))}")
    cmap = centre_map(images, radius, ring_fraction)
    if positions.shape[0] != cmap.shape[0]:
        raise ValueError(f"images and positions disagree on the batch size: {cmap.shape[0]} vs {positions.shape[0]}")
    req = ~positions.isnan().any(-1)  # [B, M]
    return (_lookup(cmap, positions, tol) | ~req).all(1)


def composition_accuracy(images: Tensor, positions: Tensor, tol: int = 1, **kw) -> float:
    """Fraction of images in which all requested positions `[B, M, 2]` hold an object (Du et al. 2023, table 3)."""
    return float(detect_all(images, positions, tol=tol, **kw).float().mean())
