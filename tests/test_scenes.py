"""The procedural scenes behind the embedded models and the localization benchmark."""

import re

import numpy as np
import pytest

from clipviz import scenes
from clipviz.scenes import COLORS, EVAL_SEEDS, SHAPES, TRAIN_SEEDS, make_scene, render_background, scene_seed

CAPTION = re.compile(r"^a photo of a (\w+) (\w+)$")


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b, c = make_scene(123), make_scene(123), make_scene(124)
    assert np.array_equal(a.image, b.image)
    assert a.captions == b.captions
    for obj_a, obj_b in zip(a.objects, b.objects, strict=True):
        assert np.array_equal(obj_a.mask, obj_b.mask)
    assert not np.array_equal(a.image, c.image)


def test_layout_is_independent_of_the_image_size():
    small, large = make_scene(7, size=64), make_scene(7, size=128)
    assert small.captions == large.captions
    for obj_s, obj_l in zip(small.objects, large.objects, strict=True):
        assert obj_l.center == pytest.approx((2 * obj_s.center[0], 2 * obj_s.center[1]))
        # the same shape: the area scales by 4 up to sampling at pixel centres
        assert obj_l.mask.sum() == pytest.approx(4 * obj_s.mask.sum(), rel=0.15)


@pytest.mark.parametrize("seed", range(40))
def test_masks_match_pixels(seed):
    scene = make_scene(seed)
    background = render_background(seed)
    union = np.zeros(scene.image.shape[:2], dtype=bool)
    for obj in scene.objects:
        assert obj.mask.any()
        assert not (union & obj.mask).any(), "objects overlap"
        union |= obj.mask
        # the painted pixels carry the object's colour (jitter, shading and noise stay within 0.25 of it)
        rgb = np.asarray(COLORS[obj.color]) * 255.0
        distance = np.abs(scene.image[obj.mask].astype(float) - rgb).max(axis=1)  # [pixels]
        assert np.quantile(distance, 0.99) < 0.25 * 255
        # the mask sits where the object was placed
        rows, cols = np.nonzero(obj.mask)
        assert abs(rows.mean() + 0.5 - obj.center[0]) < 0.3 * obj.radius
        assert abs(cols.mean() + 0.5 - obj.center[1]) < 0.3 * obj.radius
        assert np.hypot(rows + 0.5 - obj.center[0], cols + 0.5 - obj.center[1]).max() <= obj.radius + 1e-9
    # outside every mask the scene is exactly its background; inside, the object changed the pixels
    assert np.array_equal(scene.image[~union], background[~union])
    assert (scene.image[union] != background[union]).any(axis=1).mean() > 0.95


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_has_a_plausible_area(shape):
    radius, size = 20.0, 64
    mask = scenes.shape_mask(shape, (32.0, 32.0), radius, 0.0, size)
    fraction = mask.sum() / (np.pi * radius**2)  # of the bounding circle
    # analytic: square 2 * 0.70**2 / pi, triangle 3 sqrt(3) / (4 pi), cross 1.848 / pi, star 5 * 0.45 sin 36° / pi
    expected = {"circle": 1.0, "square": 0.62, "triangle": 0.41, "cross": 0.59, "star": 0.42}[shape]
    assert fraction == pytest.approx(expected, abs=0.05)


def test_captions_use_the_fixed_vocabulary_and_name_distinct_objects():
    seen_colors, seen_shapes, counts = set(), set(), set()
    for seed in range(300):
        scene = make_scene(seed)
        assert 1 <= len(scene.objects) <= 3
        counts.add(len(scene.objects))
        assert len(set(scene.captions)) == len(scene.captions), "a caption must name exactly one object"
        for obj, caption in zip(scene.objects, scene.captions, strict=True):
            match = CAPTION.match(caption)
            assert match, caption
            assert match.groups() == (obj.color, obj.shape)
            seen_colors.add(obj.color)
            seen_shapes.add(obj.shape)
    assert seen_colors == set(COLORS) and seen_shapes == set(SHAPES) and counts == {1, 2, 3}
    assert scenes.all_captions() == [f"a photo of a {c} {s}" for c in COLORS for s in SHAPES]


def test_same_color_distractor_pairs_are_drawn_and_can_be_forced():
    natural = [make_scene(seed) for seed in range(200)]
    multi = [s for s in natural if len(s.objects) >= 2]
    same = [s for s in multi if s.objects[0].color == s.objects[1].color]
    assert 0.25 < len(same) / len(multi) < 0.6
    for seed in range(20):
        forced = make_scene(seed, num_objects=2, same_color=True)
        assert forced.objects[0].color == forced.objects[1].color
        assert forced.objects[0].shape != forced.objects[1].shape
        assert len(make_scene(seed, num_objects=1).objects) == 1


def test_seed_ranges_are_disjoint_and_enforced():
    assert max(TRAIN_SEEDS) < min(EVAL_SEEDS)
    assert set(range(TRAIN_SEEDS.start, TRAIN_SEEDS.stop, 10_000_000)).isdisjoint(EVAL_SEEDS)
    assert scene_seed("train", 0) == TRAIN_SEEDS[0] and scene_seed("eval", 5) == EVAL_SEEDS[5]
    with pytest.raises(IndexError):
        scene_seed("eval", len(EVAL_SEEDS))
    with pytest.raises(ValueError, match="train"):
        scene_seed("test", 0)


def test_invalid_requests_raise():
    with pytest.raises(ValueError, match="num_objects"):
        make_scene(0, num_objects=4)
    with pytest.raises(ValueError, match="circle"):
        scenes.shape_mask("hexagon", (10.0, 10.0), 5.0, 0.0, 32)


def test_to_pixel_values_normalizes_and_resizes():
    torch = pytest.importorskip("torch")
    images = [make_scene(s).image for s in range(3)]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    px = scenes.to_pixel_values(images, mean, std)
    assert px.shape == (3, 3, 64, 64)
    expected = (images[1][5, 6, 2] / 255.0 - mean[2]) / std[2]
    assert px[1, 2, 5, 6].item() == pytest.approx(expected, abs=1e-5)
    assert scenes.to_pixel_values(images, mean, std, size=128).shape == (3, 3, 128, 128)
    assert torch.isfinite(px).all()
