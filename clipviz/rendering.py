"""Drawing explanation maps: blend a map from `model.explain` over the original image.

Library code, not model code: it needs Pillow and numpy, which the Hub remote code (`modeling_clipviz.py`,
`explaining_clipviz.py`) must not require.

    >>> from clipviz.rendering import overlay
    >>> result = model.explain(pixel_values, input_ids)
    >>> overlay(image, result.image_maps[0, 0]).save("map.png")
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OVERLAY_COLORMAPS = ("jet", "viridis", "inferno", "gray")
# "full": every pixel gets `alpha` of the colour map; "fade": a pixel gets `alpha * value`, so regions the map leaves
# low stay the plain image (readable) and only the strong regions are coloured
OVERLAY_STYLES = ("full", "fade")

_COLORMAP_HEX = {  # 11 evenly spaced stops, interpolated linearly
    "viridis": "440154 482475 414487 355f8d 2a788e 21918c 22a884 44bf70 7ad151 bddf26 fde725",
    "inferno": "000004 160b39 420a68 6a176e 932667 bc3754 dd513a f37819 fca50a f6d746 fcffa4",
}


def _apply_colormap(values: torch.Tensor, colormap: str) -> torch.Tensor:
    """`[h, w]` values in [0, 1] -> `[h, w, 3]` RGB in [0, 1]."""
    if colormap == "jet":
        centers = torch.tensor([3.0, 2.0, 1.0], dtype=values.dtype)  # red, green, blue peaks of 4x
        return (1.5 - (4 * values[..., None] - centers).abs()).clamp(0, 1)  # [h, w, 3]
    if colormap == "gray":
        return values[..., None].expand(*values.shape, 3)  # [h, w, 3]
    stops = torch.tensor(
        [[int(code[i : i + 2], 16) / 255 for i in (0, 2, 4)] for code in _COLORMAP_HEX[colormap].split()],
        dtype=values.dtype,
    )  # [11, 3]
    position = values * (len(stops) - 1)
    low = position.floor().long().clamp(max=len(stops) - 2)  # [h, w]
    frac = (position - low)[..., None]  # [h, w, 1]
    return stops[low] * (1 - frac) + stops[low + 1] * frac  # [h, w, 3]


def overlay(image, map, alpha: float = 0.5, colormap: str = "jet", style: str = "full"):
    """Blend an explanation map over the original image and return a PIL image of the image's size.

    The processor resizes the short side and centre-crops, so the map covers the centred region of the map's
    aspect ratio (a square for square grids) at full height or width; it is upsampled bilinearly to that region
    and blended there (`alpha` = weight of the colours), the rest of the image is left as it is.

    Args:
        image: a PIL image, or an array `[H, W, 3]` / `[H, W]` of uint8.
        map: `[grid_h, grid_w]` tensor or array (leading size-1 dimensions are dropped), e.g.
            `explain(...).image_maps[i, t]`; it is scaled to a maximum of 1 here.
        alpha (`float`): in [0, 1].
        colormap (`str`): one of `OVERLAY_COLORMAPS` ("jet", "viridis", "inferno", "gray").
        style (`str`): "full" (the colour map over the whole region, `alpha` everywhere) or "fade" (each pixel's
            weight is `alpha` times the map's value there: where the map is low the image shows through unchanged).
    """
    if colormap not in OVERLAY_COLORMAPS:
        raise ValueError(f"Unknown colormap {colormap!r}; valid colormaps: {', '.join(OVERLAY_COLORMAPS)}.")
    if style not in OVERLAY_STYLES:
        raise ValueError(f"Unknown overlay style {style!r}; valid styles: {', '.join(OVERLAY_STYLES)}.")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha!r}.")
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    picture = picture.convert("RGB")
    values = torch.as_tensor(np.asarray(map.detach().cpu() if torch.is_tensor(map) else map), dtype=torch.float32)
    while values.ndim > 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"`map` must be a 2-D grid [grid_h, grid_w], got shape {tuple(values.shape)}.")
    width, height = picture.size
    grid_h, grid_w = values.shape
    region_w = min(width, round(height * grid_w / grid_h))
    region_h = min(height, round(region_w * grid_h / grid_w))
    left, top = (width - region_w) // 2, (height - region_h) // 2
    values = values.clamp(min=0)
    values = values / values.max() if values.max() > 0 else values
    upsampled = F.interpolate(values[None, None], size=(region_h, region_w), mode="bilinear", align_corners=False)
    values = upsampled[0, 0].clamp(0, 1)  # [region_h, region_w]
    colors = _apply_colormap(values, colormap)  # [region_h, region_w, 3]
    weight = alpha * values[..., None] if style == "fade" else alpha  # [region_h, region_w, 1] or a number
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)  # [H, W, 3]
    region = pixels[top : top + region_h, left : left + region_w]
    pixels[top : top + region_h, left : left + region_w] = (1 - weight) * region + weight * colors
    return Image.fromarray((pixels * 255).round().clamp(0, 255).to(torch.uint8).numpy())
