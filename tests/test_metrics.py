"""clipviz.metrics on hand-made maps whose scores are known."""

import numpy as np
import pytest
import torch

from clipviz import metrics


def test_pointing_game_tolerance_and_energy():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:2, 0:2] = True  # the top-left cell of a 4x4 grid
    coverage = metrics.cell_coverage(mask, (4, 4))
    assert coverage[0, 0] == 1 and coverage.sum() == 1
    heat = np.zeros((4, 4))
    heat[1, 1] = 1.0  # one cell off diagonally
    assert not metrics.pointing_game(heat, coverage)
    assert metrics.pointing_game(heat, coverage, tolerance=1)
    heat[0, 0] = 3.0
    assert metrics.pointing_game(heat, coverage)
    assert metrics.energy_in_mask(heat, coverage) == pytest.approx(0.75)
    assert metrics.energy_in_mask(np.zeros((4, 4)), coverage) == 0.0


def test_score_scene_pair_and_colors():
    a, b = np.zeros((2, 2)), np.zeros((2, 2))
    a[0, 0], b[1, 1] = 1, 1
    coverages = [a.copy(), b.copy()]
    good = metrics.score_scene(np.stack([a, b]), coverages, ["red", "red"])
    assert good["point"] == [1.0, 1.0] and good["pair"] == [1.0, 1.0] and good["same-col"] == [1.0, 1.0]
    same = metrics.score_scene(np.stack([a, a]), coverages, None, tolerance=2)  # one map for both prompts
    assert same["pair"] == [0.5, 0.5] and same["wrong"] == [0.0, 1.0] and "point±2" in same
    assert same["same-col"] == [] and same["uniq-col"] == []


def test_mask_coverage_on_a_non_square_image_uses_the_crop():
    mask = np.zeros((16, 32), dtype=bool)
    mask[:, 8:16] = True  # the left half of the centred 16x16 square
    assert metrics.crop_region(16, 32, (4, 4)) == (0, 8, 16, 16)
    np.testing.assert_array_equal(metrics.mask_coverage(mask, (4, 4)), np.repeat([[1.0, 1.0, 0.0, 0.0]], 4, axis=0))
    odd = metrics.mask_coverage(np.ones((15, 15), dtype=bool), (4, 4))  # cells of unequal size: area resampling
    np.testing.assert_allclose(odd, np.ones((4, 4)))
    placed = metrics.place_on_image(np.ones((2, 2), dtype=np.float32), 10, 20)
    assert placed.shape == (10, 20) and placed[:, 5:15].all() and not placed[:, :5].any() and not placed[:, 15:].any()


def test_average_precision_matches_the_step_definition():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 0, 0], dtype=bool)
    assert metrics.average_precision(scores, labels) == pytest.approx((1.0 + 2 / 3) / 2)
    # a tie between a positive and a negative counts as one threshold
    assert metrics.average_precision(np.array([1.0, 1.0]), np.array([True, False])) == pytest.approx(0.5)
    assert metrics.average_precision(scores, np.zeros(5, dtype=bool)) == 0.0


def test_segmentation_totals_perfect_and_inverted_maps():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :4] = True
    perfect = metrics.SegmentationTotals()
    perfect.add(mask.astype(np.float32), mask)  # already at the mask's size: used as it is
    result = perfect.result()
    assert result["pixAcc"] == 1.0 and result["mIoU"] == 1.0 and result["mAP"] == 1.0 and result["best mIoU"] == 1.0
    inverted = metrics.SegmentationTotals()
    inverted.add((~mask).astype(np.float32), mask)
    assert inverted.result()["mIoU"] == 0.0 and inverted.result()["pixAcc"] == 0.0


def test_point_totals_iou_per_class_then_mean():
    totals = metrics.PointTotals(thresholds=(0.5,))
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0] = 1.0
    points = [(0.5, 0.5, True), (3.5, 3.5, False), (3.5, 0.5, True)]  # hit, correct reject, miss
    totals.add(heat, (4, 4), points, "cat")
    totals.add(heat, (4, 4), [(0.5, 0.5, False)], "dog")  # a false positive only
    result = totals.result()
    assert result["p-mIoU@0.5"] == pytest.approx((1 / 2 + 0.0) / 2) and result["p-mIoU"] == result["p-mIoU@0.5"]


def test_deletion_and_insertion_follow_the_map():
    image = torch.zeros(3, 8, 8)
    image[:, :4] = 1.0  # the score is the mass of the top half

    def score(images):
        return images[:, :, :4].sum(dim=(1, 2, 3))

    right = np.zeros((2, 2), dtype=np.float32)
    right[0] = 1.0
    wrong = 1.0 - right
    baseline = torch.zeros_like(image)
    deletion_right = metrics.perturbation_curve(score, image, right, "deletion", 4, baseline)
    deletion_wrong = metrics.perturbation_curve(score, image, wrong, "deletion", 4, baseline)
    assert deletion_right[0] == deletion_wrong[0] == 96 and deletion_right[-1] == 0
    assert metrics.curve_auc(deletion_right) < metrics.curve_auc(deletion_wrong)
    insertion_right = metrics.perturbation_curve(score, image, right, "insertion", 4, baseline)
    assert insertion_right[0] == 0 and insertion_right[-1] == 96 and insertion_right[2] == 96
    assert metrics.curve_auc(np.array([0.0, 1.0])) == 0.5
    blurred = metrics.gaussian_blur(image[None])[0]
    assert blurred.shape == image.shape and 0 < blurred[:, 4].mean() < 1
    with pytest.raises(ValueError, match="deletion"):
        metrics.perturbation_images(image, right, "erase", 4)


def test_crop_region_is_where_overlay_draws():
    from PIL import Image

    from clipviz.rendering import overlay

    for size, grid in (((40, 24), (2, 2)), ((24, 40), (2, 2)), ((30, 30), (3, 3)), ((50, 20), (2, 4))):
        drawn = np.asarray(overlay(Image.new("RGB", size, "white"), np.ones(grid), alpha=1.0))
        changed = (drawn != 255).any(axis=2)  # [H, W]
        top, left, height, width = metrics.crop_region(size[1], size[0], grid)
        assert changed[top : top + height, left : left + width].all() and changed.sum() == height * width, size
