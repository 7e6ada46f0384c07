"""How good is an explanation map? Scores against object masks, and faithfulness curves against the model itself.

Why here: the localization benchmark, its test floors and any dataset evaluation must score maps the same way, so
each metric has exactly one implementation, in this module.

Maps are grids ``[gh, gw]`` (ViT patches, ResNet attention-pool cells); masks are pixel masks ``[H, W]`` whose sides
are multiples of the grid's. Two families:

- **Localization** (does the map point at the object the prompt names?): :func:`cell_coverage` turns a pixel mask
  into the fraction of each cell it covers; :func:`points_at` is the pointing game (the argmax cell, or any cell
  within ``tolerance`` cells of it, Chebyshev distance, overlaps the mask); :func:`energy_in_mask` is the share of
  the map's mass inside the mask (the map taken cell-constant at pixel resolution); :func:`object_scores` scores
  one scene's maps together (pointing, energy, wrong object, the pair test).
- **Faithfulness** (does the model need what the map ranks first?): :func:`deletion_insertion` removes (deletion)
  or reveals (insertion) grid cells in the order the map ranks them and records the prompt's logit after each step,
  as in RISE (Petsiuk et al. 2018) and the positive/negative perturbation tests of Chefer et al. 2021. "Removed"
  means replaced by a ``baseline`` image the caller chooses (the benchmark uses the dataset mean, i.e. zeros in
  normalized pixels, the colour the processor pads with). :func:`relative_auc` summarizes many curves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# ---- localization ----


def cell_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each grid cell covered by a pixel mask: ``[H, W]`` -> ``[gh, gw]``."""
    grid_h, grid_w = grid
    height, width = mask.shape
    if height % grid_h or width % grid_w:
        raise ValueError(f"mask {height}x{width} does not split into a {grid_h}x{grid_w} grid of equal cells")
    cells = np.asarray(mask, dtype=np.float64).reshape(grid_h, height // grid_h, grid_w, width // grid_w)
    return cells.mean(axis=(1, 3))  # [gh, gw]


def near(index: int, grid: tuple[int, int], radius: int) -> np.ndarray:
    """Boolean ``[gh, gw]``: cells within Chebyshev distance ``radius`` of the flat cell ``index``."""
    rows, cols = np.indices(grid)
    row, col = divmod(int(index), grid[1])
    return (np.abs(rows - row) <= radius) & (np.abs(cols - col) <= radius)


def points_at(heat: np.ndarray, coverage: np.ndarray, tolerance: int = 0) -> bool:
    """Pointing game: the map's argmax cell (or a cell within ``tolerance`` cells of it) overlaps the mask.

    ``heat`` and ``coverage`` are ``[gh, gw]``; ties for the maximum go to the first cell in row-major order.
    """
    top = int(np.argmax(heat))
    return bool((coverage[near(top, heat.shape, tolerance)] > 0).any())


def energy_in_mask(heat: np.ndarray, coverage: np.ndarray) -> float:
    """Share of a non-negative map's mass inside the mask (0 for an all-zero map)."""
    total = float(heat.sum())
    return float((heat * coverage).sum() / total) if total > 0 else 0.0


def object_scores(maps: np.ndarray, coverages: Sequence[np.ndarray]) -> dict[str, list[float]]:
    """Scores of one scene whose objects were each prompted with their own caption.

    ``maps[k]`` ``[gh, gw]`` is the map for object k's caption, ``coverages[k]`` object k's cell coverage. Per map:
    ``point`` (strict pointing), ``point±1`` (one-cell tolerance), ``energy``, ``wrong`` (the argmax cell overlaps
    another object but not the named one). Per ordered pair of objects (k, j != k): ``pair``, 1 when the map for k
    puts more mass on k than the map for j does, 1/2 on a tie (a prompt-independent map scores exactly 1/2).
    """
    grid = maps.shape[1:]
    energy = np.array([[energy_in_mask(heat, cov) for cov in coverages] for heat in maps])  # [maps, objects]
    out: dict[str, list[float]] = {"point": [], "point±1": [], "energy": [], "wrong": [], "pair": []}
    for k, heat in enumerate(maps):
        top = int(np.argmax(heat))
        touches = [cov.flat[top] > 0 for cov in coverages]
        out["point"].append(float(touches[k]))
        out["point±1"].append(float((coverages[k][near(top, grid, 1)] > 0).any()))
        out["energy"].append(float(energy[k, k]))
        out["wrong"].append(float(not touches[k] and any(t for j, t in enumerate(touches) if j != k)))
        for j in range(len(maps)):
            if j != k:
                out["pair"].append(1.0 if energy[k, k] > energy[j, k] else 0.5 if energy[k, k] == energy[j, k] else 0.0)
    return out


# ---- faithfulness ----


def ranked_cells(heat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat cell indices, highest map value first; equal values in a random order drawn from ``rng`` (a fixed
    order such as row-major would favour whatever happens to sit first, e.g. in all-zero regions)."""
    flat = np.asarray(heat, dtype=np.float64).ravel()
    return np.lexsort((rng.random(flat.size), -flat))


def step_masks(order: np.ndarray, grid: tuple[int, int], size: tuple[int, int], steps: int):
    """``[steps + 1, 1, H, W]`` float masks: mask ``s`` is 1 on the first ``round(s * cells / steps)`` cells of
    ``order`` (nearest-neighbour upsampled to pixels), so mask 0 is empty and mask ``steps`` full."""
    import torch

    cells = grid[0] * grid[1]
    counts = np.rint(np.arange(steps + 1) * cells / steps).astype(int)
    rank = np.empty(cells, dtype=np.int64)
    rank[order] = np.arange(cells)  # rank of each cell in the order
    chosen = torch.from_numpy(rank[None, :] < counts[:, None]).float()  # [steps + 1, cells]
    chosen = chosen.view(steps + 1, 1, *grid)  # [steps + 1, 1, gh, gw]
    return torch.nn.functional.interpolate(chosen, size=size, mode="nearest")  # [steps + 1, 1, H, W]


def deletion_insertion(
    image,
    baseline,
    maps: np.ndarray,
    targets: Sequence[int],
    score: Callable,
    steps: int,
    rng: np.random.Generator,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves of several maps of one image, from one batched set of forwards.

    Args:
        image: the model input ``[C, H, W]`` (a tensor).
        baseline: what a removed cell shows, same shape (e.g. zeros: the dataset mean in normalized pixels).
        maps: ``[K, gh, gw]``, the maps to test (several methods' maps of the same image may be stacked).
        targets: for each map, the column of ``score``'s output it is judged by (its prompt).
        score: ``images [B, C, H, W] -> [B, P]`` tensor of logits, one column per prompt.
        steps: points of each curve minus one; step ``s`` removes / reveals ``round(s * cells / steps)`` cells.
        rng: draws the order of equally ranked cells.

    Returns:
        ``(deletion, insertion)``, each ``[K, steps + 1]``: the target logit after each step. Deletion starts at
        the full image and ends at the baseline, insertion the other way round.
    """
    import torch

    maps = np.asarray(maps)
    if len(targets) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(targets)} targets: give one prompt column per map")
    size = tuple(image.shape[-2:])
    grid = maps.shape[-2:]
    orders = [ranked_cells(heat, rng) for heat in maps]
    masks = torch.cat([step_masks(order, grid, size, steps)[1:-1] for order in orders])  # [K*(S-1), 1, H, W]
    image, baseline = image[None], baseline[None]  # [1, C, H, W]
    deleted = image * (1 - masks) + baseline * masks  # the first cells replaced by the baseline
    inserted = baseline * (1 - masks) + image * masks  # only the first cells shown
    batch = torch.cat([image, baseline, deleted, inserted])  # [2 + 2*K*(S-1), C, H, W]
    with torch.no_grad():
        logits = torch.cat([score(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)])
    logits = logits.float().numpy()  # [2 + 2*K*(S-1), P]
    inner = steps - 1
    full, empty = logits[0], logits[1]  # [P]
    middle_deleted = logits[2 : 2 + len(maps) * inner].reshape(len(maps), inner, -1)  # [K, S-1, P]
    middle_inserted = logits[2 + len(maps) * inner :].reshape(len(maps), inner, -1)  # [K, S-1, P]
    deletion, insertion = [], []
    for k, target in enumerate(targets):
        deletion.append([full[target], *middle_deleted[k, :, target], empty[target]])
        insertion.append([empty[target], *middle_inserted[k, :, target], full[target]])
    return np.array(deletion), np.array(insertion)


def area_under_curve(curves: np.ndarray) -> np.ndarray:
    """Trapezoidal area of curves sampled at evenly spaced points of [0, 1]: ``[..., S + 1]`` -> ``[...]``."""
    curves = np.asarray(curves, dtype=np.float64)
    steps = curves.shape[-1] - 1
    return (curves[..., :-1] + curves[..., 1:]).sum(axis=-1) / (2 * steps)


def relative_auc(curves: np.ndarray, full: np.ndarray, empty: np.ndarray) -> float:
    """Area under the mean curve, on a scale where the full image's logit is 1 and the baseline's 0.

    ``curves`` ``[N, S + 1]`` (N pairs of image and prompt), ``full``/``empty`` ``[N]`` their logits on the intact
    and on the baseline image. Averaging before rescaling keeps pairs whose two end points are close from blowing
    up. Deletion: lower is better (the logit falls as soon as the top-ranked cells go); insertion: higher is better.
    """
    mean_full, mean_empty = float(np.mean(full)), float(np.mean(empty))
    if mean_full == mean_empty:
        raise ValueError("the intact and the baseline image score the same on average: the curves have no scale")
    return (float(area_under_curve(np.mean(curves, axis=0))) - mean_empty) / (mean_full - mean_empty)
