"""Seeded procedural scenes: coloured shapes on textured, noisy backgrounds, with captions and object masks.

Why: the embedded default models must be trained and *checked* offline. Every scene records the boolean mask of each
object, so a localization benchmark can ask whether a map for "a photo of a red circle" really lands on the red
circle. A scene is a pure function of its seed (numpy ``default_rng``), so training and evaluation are reproducible
and the train and held-out splits are two disjoint seed ranges (``TRAIN_SEEDS``, ``EVAL_SEEDS``).

Hard case on purpose: in multi-object scenes a second object often has the *same colour* as the first one
(``SAME_COLOR_PROB``), so only the shape word of the caption tells them apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLORS = {
    "red": (0.86, 0.14, 0.14),
    "green": (0.16, 0.68, 0.22),
    "blue": (0.16, 0.30, 0.90),
    "yellow": (0.95, 0.84, 0.12),
    "purple": (0.60, 0.22, 0.78),
    "white": (0.96, 0.96, 0.96),
}
CAPTION_TEMPLATE = "a photo of a {color} {shape}"

# Seed ranges: training draws from TRAIN_SEEDS only; every benchmark and test of generalisation from EVAL_SEEDS.
TRAIN_SEEDS = range(0, 100_000_000)
EVAL_SEEDS = range(1_000_000_000, 1_000_100_000)
SPLITS = {"train": TRAIN_SEEDS, "eval": EVAL_SEEDS}

DEFAULT_SIZE = 64
NUM_OBJECTS_PROBS = (0.34, 0.33, 0.33)  # P(1 object), P(2), P(3)
SAME_COLOR_PROB = 0.35  # in a multi-object scene: the second object shares the first one's colour
RADIUS_RANGE = (0.13, 0.19)  # object bounding radius as a fraction of the image side
MAX_ROTATION_DEG = 25.0


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene: what it is, where it is, and exactly which pixels it covers."""

    shape: str
    color: str
    center: tuple[float, float]  # (row, column) in pixels
    radius: float  # bounding radius in pixels: the shape lies inside this circle
    mask: np.ndarray  # [H, W] bool

    @property
    def caption(self) -> str:
        return caption_for(self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    """A rendered scene: ``image`` is [H, W, 3] uint8 RGB; objects never overlap and have distinct captions."""

    seed: int
    image: np.ndarray  # [H, W, 3] uint8
    objects: tuple[SceneObject, ...]

    @property
    def captions(self) -> list[str]:
        return [obj.caption for obj in self.objects]


def caption_for(color: str, shape: str) -> str:
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown object {color!r} {shape!r}: colours {list(COLORS)}, shapes {list(SHAPES)}")
    return CAPTION_TEMPLATE.format(color=color, shape=shape)


def all_captions() -> list[str]:
    """Every caption a scene can carry, colour-major: index ``c * len(SHAPES) + s``."""
    return [caption_for(color, shape) for color in COLORS for shape in SHAPES]


def scene_seed(split: str, index: int) -> int:
    """The seed of the ``index``-th scene of a split; raises when the split's range is exhausted."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: valid splits are {list(SPLITS)}")
    seeds = SPLITS[split]
    if not 0 <= index < len(seeds):
        raise IndexError(f"scene index {index} outside the {split} split (0..{len(seeds) - 1})")
    return seeds[index]


def make_scene(
    seed: int,
    size: int = DEFAULT_SIZE,
    num_objects: int | None = None,
    same_color: bool | None = None,
) -> Scene:
    """Render the scene of ``seed``. ``num_objects`` (1–3) and ``same_color`` override the seeded draws.

    Geometry is drawn in units of the image side, so the same seed gives the same layout at any ``size``.
    """
    if num_objects is not None and num_objects not in (1, 2, 3):
        raise ValueError(f"num_objects must be 1, 2 or 3, got {num_objects}")
    layout_rng, background_rng, paint_rng = _streams(seed)
    drawn_count = int(layout_rng.choice(3, p=NUM_OBJECTS_PROBS)) + 1
    drawn_same = bool(layout_rng.random() < SAME_COLOR_PROB)
    count = drawn_count if num_objects is None else num_objects
    same = (drawn_same if same_color is None else same_color) and count >= 2
    labels = _draw_labels(layout_rng, count, same)
    placements = _draw_placements(layout_rng, count)
    image = _background(background_rng, size)  # [H, W, 3] float in [0, 1]
    objects = []
    for (color, shape), (cy, cx, radius, angle) in zip(labels, placements, strict=True):
        center, pixel_radius = (cy * size, cx * size), radius * size
        mask = shape_mask(shape, center, pixel_radius, angle, size)
        image = _paint(paint_rng, image, mask, COLORS[color])
        objects.append(SceneObject(shape, color, center, pixel_radius, mask))
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return Scene(seed=seed, image=pixels, objects=tuple(objects))


def render_background(seed: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The empty background of ``seed``'s scene, [H, W, 3] uint8: equal to the scene wherever no mask is set."""
    _, background_rng, _ = _streams(seed)
    return np.clip(np.rint(_background(background_rng, size) * 255.0), 0, 255).astype(np.uint8)


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent generators for layout, background and paint: the layout does not depend on the image size."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(3)]


def make_scenes(split: str, start: int, count: int, size: int = DEFAULT_SIZE, **overrides) -> list[Scene]:
    """Scenes ``start .. start+count-1`` of a split (``overrides`` go to :func:`make_scene`)."""
    return [make_scene(scene_seed(split, start + i), size=size, **overrides) for i in range(count)]


def _draw_labels(rng: np.random.Generator, count: int, same_color: bool) -> list[tuple[str, str]]:
    """Distinct (colour, shape) pairs; with ``same_color`` the first two share a colour (the hard case)."""
    colors, shapes = list(COLORS), list(SHAPES)
    labels: list[tuple[str, str]] = []
    while len(labels) < count:
        color = colors[rng.integers(len(colors))]
        if same_color and len(labels) == 1:
            color = labels[0][0]
        shape = shapes[rng.integers(len(shapes))]
        if (color, shape) not in labels:
            labels.append((color, shape))
    return labels


def _draw_placements(rng: np.random.Generator, count: int) -> list[tuple[float, float, float, float]]:
    """Non-overlapping (row, column, radius, angle) in units of the image side, by rejection sampling."""
    for _ in range(1000):
        placements = []
        for _ in range(count):
            radius = rng.uniform(*RADIUS_RANGE)
            cy, cx = rng.uniform(radius + 0.02, 1.0 - radius - 0.02, size=2)
            angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
            placements.append((float(cy), float(cx), float(radius), angle))
        if _disjoint(placements):
            return placements
    raise RuntimeError("could not place the objects without overlap")  # pragma: no cover - radii make this rare


def _disjoint(placements: list[tuple[float, float, float, float]], gap: float = 0.03) -> bool:
    """Bounding circles at least ``gap`` apart, so the masks can never touch."""
    for i, (y1, x1, r1, _) in enumerate(placements):
        for y2, x2, r2, _ in placements[i + 1 :]:
            if math.hypot(y1 - y2, x1 - x2) < r1 + r2 + gap:
                return False
    return True


def _shape_polygon(shape: str, radius: float) -> np.ndarray:
    """Vertices [K, 2] as (dy, dx) around the centre, all inside the bounding ``radius``, pointing up."""
    if shape == "square":
        half = radius * 0.70  # corners at sqrt(2) * 0.70 = 0.99 of the radius
        return np.array([(-half, -half), (-half, half), (half, half), (half, -half)])
    if shape == "triangle":
        angles = np.radians([-90.0, 30.0, 150.0])
        return np.stack([np.sin(angles), np.cos(angles)], axis=1) * radius  # [3, 2]
    if shape == "star":
        angles = np.radians(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        return np.stack([np.sin(angles) * radii, np.cos(angles) * radii], axis=1)  # [10, 2]
    if shape == "cross":
        arm, width = radius * 0.92, radius * 0.30  # arm tips at hypot(0.92, 0.30) = 0.97 < 1
        quarter = np.array([(-arm, -width), (-arm, width), (-width, width)])  # top arm and one inner corner
        turn = np.array([[0.0, -1.0], [1.0, 0.0]])  # (dy, dx) -> (dx, -dy): a quarter turn clockwise on screen
        return np.concatenate([quarter @ np.linalg.matrix_power(turn, k) for k in range(4)])  # [12, 2]
    raise ValueError(f"no polygon for shape {shape!r}")


def shape_mask(shape: str, center: tuple[float, float], radius: float, angle: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape, sampled at pixel centres."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: valid shapes are {list(SHAPES)}")
    coords = np.arange(size, dtype=np.float64) + 0.5
    dy = coords[:, None] - center[0]  # [H, 1]
    dx = coords[None, :] - center[1]  # [1, W]
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    cos, sin = math.cos(angle), math.sin(angle)
    # rotate the pixel offsets by -angle instead of rotating the polygon by +angle
    ry = cos * dy - sin * dx  # [H, W]
    rx = sin * dy + cos * dx  # [H, W]
    return _inside_polygon(_shape_polygon(shape, radius), ry, rx)


def _inside_polygon(vertices: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside when a ray towards +x crosses an odd number of edges."""
    inside = np.zeros(ys.shape, dtype=bool)
    nxt = np.roll(vertices, -1, axis=0)
    for (y1, x1), (y2, x2) in zip(vertices, nxt, strict=True):
        straddles = (y1 > ys) != (y2 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= straddles & (xs < x_cross)
    return inside


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted tint, a linear gradient between two tints, a low-frequency texture and pixel noise: [H, W, 3]."""
    tint_a, tint_b = _muted_color(rng), _muted_color(rng)
    theta = rng.uniform(0, 2 * math.pi)
    coords = (np.arange(size) + 0.5) / size - 0.5
    ramp = math.cos(theta) * coords[:, None] + math.sin(theta) * coords[None, :]  # [H, W] in about [-0.7, 0.7]
    ramp = np.clip(ramp + 0.5, 0.0, 1.0)[..., None]  # [H, W, 1]
    image = tint_a * (1 - ramp) + tint_b * ramp  # [H, W, 3]
    image = image + _low_frequency(rng, size, cells=int(rng.integers(3, 7))) * rng.uniform(0.04, 0.12)
    image = image + rng.normal(0.0, 0.025, size=(size, size, 3))
    return image


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A desaturated mid-tone RGB, so no background is mistaken for a saturated object colour."""
    gray = rng.uniform(0.32, 0.62)
    hue = rng.uniform(-1.0, 1.0, size=3)
    return gray + hue * rng.uniform(0.03, 0.10)  # [3]


def _low_frequency(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth texture [H, W, 1] in about [-1, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    pos = (np.arange(size) + 0.5) / size * cells
    i0 = np.minimum(pos.astype(int), cells - 1)
    frac = pos - i0
    rows = grid[i0] * (1 - frac)[:, None] + grid[i0 + 1] * frac[:, None]  # [H, cells + 1]
    out = rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]  # [H, W]
    return out[..., None]


def _paint(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, rgb: tuple[float, float, float]
) -> np.ndarray:
    """Fill ``mask`` with a jittered version of ``rgb``, a soft shading ramp and pixel noise; the rest untouched."""
    base = np.asarray(rgb) + rng.uniform(-0.05, 0.05, size=3)  # [3]
    shade = 1.0 + rng.uniform(-0.08, 0.08) * np.linspace(-1, 1, image.shape[0])[:, None, None]  # [H, 1, 1]
    fill = base * shade + rng.normal(0.0, 0.02, size=image.shape)  # [H, W, 3]
    return np.where(mask[..., None], fill, image)


def to_pixel_values(images: list[np.ndarray], mean, std, size: int | None = None):
    """Stack uint8 [H, W, 3] images into a normalized float tensor [B, 3, H, W] (bicubic resize to ``size``).

    Mirrors what ``CLIPImageProcessor`` does for our square scenes (rescale 1/255, then normalize), without the PIL
    round trip, so training is fast; the processor config saved with the model uses the same numbers.
    """
    import torch
    import torch.nn.functional as F

    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
    if size is not None and batch.shape[-1] != size:
        batch = F.interpolate(batch, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean_t = torch.tensor(mean, dtype=batch.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def find_scenes(split: str, start: int, count: int, size: int = DEFAULT_SIZE, min_objects: int = 1) -> list[Scene]:
    """The first ``count`` scenes of a split from index ``start`` on that have at least ``min_objects`` objects."""
    found, index = [], start
    while len(found) < count:
        scene = make_scene(scene_seed(split, index), size=size)
        if len(scene.objects) >= min_objects:
            found.append(scene)
        index += 1
    return found


def point_labels(scene: Scene, per_object: int = 8) -> list[list[dict]]:
    """Seeded point labels for each object, as in OpenImagesV7: ``per_object`` points inside its mask
    (``positive``) and as many outside it (anywhere else, other objects included), each ``{"y", "x", "positive"}``
    at a pixel centre."""
    rng = np.random.default_rng(np.random.SeedSequence(scene.seed).spawn(4)[3])
    labels = []
    for obj in scene.objects:
        points = []
        for positive, where in ((True, obj.mask), (False, ~obj.mask)):
            rows, cols = np.nonzero(where)
            picked = rng.choice(rows.size, size=min(per_object, rows.size), replace=False)
            points += [{"y": float(rows[i]) + 0.5, "x": float(cols[i]) + 0.5, "positive": positive} for i in picked]
        labels.append(points)
    return labels


def scene_dataset(
    split: str = "eval",
    start: int = 0,
    count: int = 100,
    size: int = DEFAULT_SIZE,
    min_objects: int = 1,
    points_per_object: int = 8,
):
    """Scenes as a Hugging Face ``datasets.Dataset`` (needs the ``dataset`` extra), one row per scene:

    ``seed``, ``image`` (an image column), ``captions`` / ``colors`` / ``shapes`` (one per object), ``masks`` (one
    mask image per object, 255 inside), ``points`` (per object: :func:`point_labels`). The scenes are those of
    :func:`find_scenes`, so ``scene_dataset("eval", 50_000, n, min_objects=2)`` holds the multi-object scenes of
    ``benchmarks/eval_localization.py``. Save it with ``.save_to_disk(path)`` for ``clipviz-explain``.
    """
    import datasets
    from PIL import Image

    point = {"y": datasets.Value("float32"), "x": datasets.Value("float32"), "positive": datasets.Value("bool")}
    features = datasets.Features(
        {
            "seed": datasets.Value("int64"),
            "image": datasets.Image(),
            "captions": datasets.List(datasets.Value("string")),
            "colors": datasets.List(datasets.Value("string")),
            "shapes": datasets.List(datasets.Value("string")),
            "masks": datasets.List(datasets.Image()),
            "points": datasets.List(datasets.List(point)),
        }
    )
    rows = {name: [] for name in features}
    for scene in find_scenes(split, start, count, size, min_objects):
        rows["seed"].append(scene.seed)
        rows["image"].append(Image.fromarray(scene.image))
        rows["captions"].append(scene.captions)
        rows["colors"].append([obj.color for obj in scene.objects])
        rows["shapes"].append([obj.shape for obj in scene.objects])
        rows["masks"].append([Image.fromarray(obj.mask.astype(np.uint8) * 255) for obj in scene.objects])
        rows["points"].append(point_labels(scene, points_per_object))
    return datasets.Dataset.from_dict(rows, features=features)
