"""clipviz.metrics on hand-made maps, masks and a linear "model" whose logit is known in closed form."""

import numpy as np
import pytest
import torch

from clipviz import metrics


def square_mask(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_cell_coverage_counts_the_covered_fraction_of_each_cell():
    coverage = metrics.cell_coverage(square_mask(8, 0, 0, 3), (2, 2))  # cells of 4x4 pixels
    np.testing.assert_allclose(coverage, [[9 / 16, 0], [0, 0]])
    with pytest.raises(ValueError, match="does not split"):
        metrics.cell_coverage(np.zeros((10, 10), dtype=bool), (4, 4))


def test_pointing_strict_and_with_one_cell_tolerance():
    coverage = metrics.cell_coverage(square_mask(16, 0, 0, 4), (4, 4))  # the object fills cell (0, 0)
    heat = np.zeros((4, 4))
    heat[1, 1] = 1.0  # diagonal neighbour of the object's cell
    assert not metrics.points_at(heat, coverage)
    assert metrics.points_at(heat, coverage, tolerance=1)
    heat[1, 1], heat[2, 2] = 0.0, 1.0  # two cells away
    assert not metrics.points_at(heat, coverage, tolerance=1)


def test_energy_is_the_share_of_mass_inside_the_mask():
    coverage = metrics.cell_coverage(square_mask(4, 0, 0, 2), (2, 2))  # cell (0, 0) fully covered
    heat = np.array([[3.0, 1.0], [0.0, 0.0]])
    assert metrics.energy_in_mask(heat, coverage) == pytest.approx(0.75)
    assert metrics.energy_in_mask(np.zeros((2, 2)), coverage) == 0.0


def test_object_scores_wrong_object_and_pair_test():
    size, grid = 16, (4, 4)
    coverages = [
        metrics.cell_coverage(square_mask(size, 0, 0, 4), grid),  # object 0 in cell (0, 0)
        metrics.cell_coverage(square_mask(size, 12, 12, 4), grid),  # object 1 in cell (3, 3)
    ]
    right, wrong = np.zeros(grid), np.zeros(grid)
    right[0, 0], wrong[3, 3] = 1.0, 1.0
    scores = metrics.object_scores(np.stack([right, right]), coverages)  # both prompts get object 0's map
    assert scores["point"] == [1.0, 0.0] and scores["wrong"] == [0.0, 1.0]
    assert scores["pair"] == [0.5, 0.5]  # the same map for both prompts cannot tell them apart
    scores = metrics.object_scores(np.stack([right, wrong]), coverages)
    assert scores["point"] == [1.0, 1.0] and scores["pair"] == [1.0, 1.0] and scores["energy"] == [1.0, 1.0]


def test_ties_are_ordered_by_the_seeded_generator_not_by_position():
    heat = np.zeros((4, 4))
    heat[2, 1] = 1.0
    first = metrics.ranked_cells(heat, np.random.default_rng(0))
    assert first[0] == 9  # the one positive cell leads
    assert sorted(first) == list(range(16))
    np.testing.assert_array_equal(first, metrics.ranked_cells(heat, np.random.default_rng(0)))
    orders = {tuple(metrics.ranked_cells(heat, np.random.default_rng(seed))[1:]) for seed in range(5)}
    assert len(orders) > 1  # tied cells are shuffled


def test_step_masks_grow_by_cells_in_rank_order():
    masks = metrics.step_masks(np.array([3, 0, 1, 2]), (2, 2), (4, 4), steps=4)  # [5, 1, 4, 4]
    assert masks.shape == (5, 1, 4, 4)
    assert masks[0].sum() == 0 and masks[-1].sum() == 16
    np.testing.assert_array_equal(masks[1, 0].numpy(), np.kron([[0, 0], [0, 1]], np.ones((2, 2))))
    assert [int(m.sum()) for m in masks] == [0, 4, 8, 12, 16]


def linear_scorer(weights: torch.Tensor):
    """A model whose logit for prompt p is the sum of the pixels weighted by ``weights[p]`` ``[P, C, H, W]``."""

    def score(images: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,pchw->bp", images, weights)  # [B, P]

    return score


def test_deletion_and_insertion_follow_the_map_order():
    size, grid, steps = 8, (4, 4), 16
    weights = torch.zeros(2, 1, size, size)
    weights[0, 0, :2, :2] = 1.0  # prompt 0 reads cell (0, 0) only
    weights[1, 0, 6:, 6:] = 1.0  # prompt 1 reads cell (3, 3) only
    image, baseline = torch.ones(1, size, size), torch.zeros(1, size, size)
    good, bad = np.zeros(grid), np.zeros(grid)
    good[0, 0], bad[3, 3] = 1.0, 1.0
    maps = np.stack([good, bad, bad])
    deletion, insertion = metrics.deletion_insertion(
        image, baseline, maps, [0, 0, 1], linear_scorer(weights), steps, np.random.default_rng(0)
    )
    assert deletion.shape == insertion.shape == (3, steps + 1)
    np.testing.assert_allclose(deletion[0], [4.0] + [0.0] * steps)  # the one cell that matters goes first
    np.testing.assert_allclose(insertion[0], [0.0] + [4.0] * steps)
    assert deletion[1, 1] == 4.0 and insertion[1, 1] == 0.0  # the map of another object: cell (0, 0) comes later
    np.testing.assert_allclose(deletion[2], [4.0] + [0.0] * steps)  # right for prompt 1
    full, empty = deletion[:, 0], deletion[:, -1]
    assert metrics.relative_auc(deletion[:1], full[:1], empty[:1]) == pytest.approx(1 / (2 * steps))
    assert metrics.relative_auc(insertion[:1], full[:1], empty[:1]) == pytest.approx(1 - 1 / (2 * steps))
    assert metrics.relative_auc(deletion[1:2], full[1:2], empty[1:2]) > 0.5 / steps  # worse than the right map
    with pytest.raises(ValueError, match="targets"):
        metrics.deletion_insertion(image, baseline, maps, [0], linear_scorer(weights), steps, np.random.default_rng(0))


def test_area_under_curve_and_a_curve_without_scale():
    np.testing.assert_allclose(metrics.area_under_curve(np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])), [1.0, 0.5])
    with pytest.raises(ValueError, match="no scale"):
        metrics.relative_auc(np.ones((2, 3)), np.ones(2), np.ones(2))
