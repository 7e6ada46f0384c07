"""Localization and faithfulness metrics for explanation maps: one implementation of each, used by
``benchmarks/eval_localization.py`` and ``clipviz-eval`` (:mod:`clipviz.dataset_eval`).

Maps are ``[gh, gw]`` grids (ViT patches, ResNet pool cells), non-negative; masks are boolean pixel arrays ``[H, W]``.

- Grid metrics (the scene benchmark): :func:`cell_coverage`, :func:`pointing_game` (strict or with a tolerance in
  cells), :func:`energy_in_mask`, and :func:`score_scene`, which scores every map of one multi-object scene
  (``point``, ``point±1``, ``energy``, ``wrong``, ``pair``, ``same-col``, ``uniq-col``: see :data:`SCENE_METRICS`).
- Pixel metrics: :class:`SegmentationTotals` (the ImageNet-Segmentation protocol of Chefer et al. 2021, also used by
  LeGrad: bilinear upsampling, min-max scaling, pixel accuracy, mIoU and mAP over the dataset, here at a threshold
  sweep too) and :class:`PointTotals` (p-mIoU on point labels, the OpenImagesV7 protocol: per-class IoU over the
  labelled points of the whole dataset, then the mean over classes).
- Faithfulness: :func:`perturbation_curve` and :func:`curve_auc` (deletion / insertion AUC, Petsiuk et al. 2018):
  pixels are removed from (or inserted into) the image in the order of the map, most important first, and the
  model's score for the prompt is recorded at each step.

numpy and torch only; no model code here (the perturbation curve takes a ``score`` callable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SCENE_METRICS = ("point", "point±1", "energy", "wrong", "pair", "same-col", "uniq-col")
THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # the mIoU / p-mIoU sweep on min-max scaled maps


# ---- grid metrics


def cell_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each grid cell covered by a pixel mask: ``[H, W]`` -> ``[gh, gw]`` (H, W multiples of the grid)."""
    grid_h, grid_w = grid
    height, width = mask.shape
    if height % grid_h or width % grid_w:
        raise ValueError(f"mask {height}x{width} does not split into a {grid_h}x{grid_w} grid of equal cells")
    mask = np.asarray(mask, dtype=np.float64)
    cells = mask.reshape(grid_h, height // grid_h, grid_w, width // grid_w)  # [gh, ch, gw, cw]
    return cells.mean(axis=(1, 3))


def near(index: int, grid: tuple[int, int], radius: int) -> np.ndarray:
    """Boolean ``[gh, gw]``: cells within Chebyshev distance ``radius`` of the flat cell ``index``."""
    rows, cols = np.indices(grid)
    row, col = divmod(index, grid[1])
    return (np.abs(rows - row) <= radius) & (np.abs(cols - col) <= radius)


def pointing_game(heat: np.ndarray, coverage: np.ndarray, tolerance: int = 0) -> bool:
    """Hit when a cell within ``tolerance`` cells (Chebyshev) of the map's argmax overlaps the mask (coverage > 0)."""
    top = int(np.argmax(heat))
    if tolerance == 0:
        return bool(coverage.flat[top] > 0)
    return bool((coverage[near(top, heat.shape, tolerance)] > 0).any())


def energy_in_mask(heat: np.ndarray, coverage: np.ndarray) -> float:
    """Share of the map's mass inside the mask, the map taken constant over each cell (0 for an all-zero map)."""
    return float((heat * coverage).sum() / max(float(heat.sum()), 1e-12))


def score_scene(
    maps: np.ndarray, coverages: Sequence[np.ndarray], colors: Sequence[str] | None = None, tolerance: int = 1
) -> dict[str, list[float]]:
    """Metrics of one scene. ``maps[k]``: the map for object k's prompt ``[gh, gw]``; ``coverages[k]``: object k's
    cell coverage; ``colors[k]``: its colour (``same-col`` / ``uniq-col`` are skipped without colours).

    ``point``: strict pointing game; ``point±1``: with a tolerance of one cell (``point±{tolerance}``); ``energy``: energy in the mask;
    ``wrong``: the argmax cell overlaps another object but not the named one; ``pair``: for objects A != B, the map
    for A puts more mass on A than the map for B does (ties 1/2: a prompt-independent map scores 0.5);
    ``same-col`` / ``uniq-col``: strict pointing on objects whose colour is shared / unique in the scene.
    Returns a list of per-map (or per-pair) values for every metric.
    """
    loose = f"point±{tolerance}"
    out = {loose if metric == "point±1" else metric: [] for metric in SCENE_METRICS}
    energy = np.array([[energy_in_mask(m, cov) for cov in coverages] for m in maps])  # [maps, objects]
    for k, heat in enumerate(maps):
        top = int(np.argmax(heat))
        touches = [cov.flat[top] > 0 for cov in coverages]
        out["point"].append(float(touches[k]))
        out[loose].append(float(pointing_game(heat, coverages[k], tolerance)))
        out["energy"].append(float(energy[k, k]))
        out["wrong"].append(float(not touches[k] and any(t for j, t in enumerate(touches) if j != k)))
        if colors is not None:
            out["same-col" if list(colors).count(colors[k]) > 1 else "uniq-col"].append(float(touches[k]))
        for j in range(len(maps)):
            if j != k:
                out["pair"].append(1.0 if energy[k, k] > energy[j, k] else 0.5 if energy[k, k] == energy[j, k] else 0.0)
    return out


# ---- pixel metrics


def upsample(heat: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a ``[gh, gw]`` map to ``size`` = (H, W), as float32 (half-pixel centres); a map
    already of that size is returned as it is."""
    values = np.asarray(heat, dtype=np.float32)
    if values.shape == tuple(size):
        return values
    grid = torch.from_numpy(values)[None, None]  # [1, 1, gh, gw]
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def crop_region(height: int, width: int, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, region_h, region_w): the centred part of an image that a map of ``grid``'s aspect ratio covers
    after the processor's resize of the short side and centre crop (the whole image for a square one)."""
    grid_h, grid_w = grid
    region_w = min(width, round(height * grid_w / grid_h))
    region_h = min(height, round(region_w * grid_h / grid_w))
    return (height - region_h) // 2, (width - region_w) // 2, region_h, region_w


def place_on_image(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """A ``[gh, gw]`` map on its original image ``[height, width]``: bilinear over :func:`crop_region`, 0 elsewhere."""
    top, left, region_h, region_w = crop_region(height, width, heat.shape)
    out = np.zeros((height, width), dtype=np.float32)
    out[top : top + region_h, left : left + region_w] = upsample(heat, (region_h, region_w))
    return out


def mask_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each grid cell covered by an image's mask, over the :func:`crop_region` the map sees:
    :func:`cell_coverage` when the region splits into equal cells, area resampling otherwise."""
    mask = np.asarray(mask, dtype=bool)
    top, left, region_h, region_w = crop_region(*mask.shape, grid)
    region = mask[top : top + region_h, left : left + region_w]
    if region_h % grid[0] == 0 and region_w % grid[1] == 0:
        return cell_coverage(region, grid)
    pixels = torch.from_numpy(region.astype(np.float32))[None, None]  # [1, 1, h, w]
    return F.adaptive_avg_pool2d(pixels, grid)[0, 0].double().numpy()


def min_max(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the minimum and maximum (a constant map becomes all zeros)."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall step curve, ties in ``scores`` grouped (scikit-learn's definition);
    0 when there is no positive label (Chefer's code turns that NaN into 0)."""
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels, dtype=bool).ravel()
    positives = int(labels.sum())
    if positives == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, hits = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_pos = np.cumsum(hits)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


class SegmentationTotals:
    """ImageNet-Segmentation protocol (Chefer et al. 2021, LeGrad): the map is upsampled bilinearly to the mask,
    min-max scaled, and thresholded at its own mean (``mIoU``) and at each of ``thresholds`` (``mIoU@t``);
    intersections and unions of the two classes (background, foreground) are summed over the dataset before the
    IoU, and ``mAP`` is the mean over images of the two classes' average precision."""

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.inter = np.zeros((1 + len(self.thresholds), 2))  # [mean threshold + sweep, (background, foreground)]
        self.union = np.zeros_like(self.inter)
        self.correct = 0
        self.labelled = 0
        self.precisions: list[float] = []

    def add(self, heat: np.ndarray, mask: np.ndarray) -> None:
        """One map ``[gh, gw]`` against its pixel mask ``[H, W]``."""
        mask = np.asarray(mask, dtype=bool)
        scaled = min_max(upsample(heat, mask.shape))  # [H, W] in [0, 1]
        cuts = [float(scaled.mean()), *self.thresholds]
        for i, cut in enumerate(cuts):
            foreground = scaled > cut
            for cls, (pred, true) in enumerate(((~foreground, ~mask), (foreground, mask))):
                self.inter[i, cls] += np.logical_and(pred, true).sum()
                self.union[i, cls] += np.logical_or(pred, true).sum()
            if i == 0:
                self.correct += int((foreground == mask).sum())
                self.labelled += mask.size
        ap = (average_precision(scaled, mask) + average_precision(1.0 - scaled, ~mask)) / 2
        self.precisions.append(ap)

    def result(self) -> dict[str, float]:
        """``pixAcc``, ``mIoU`` (mean threshold), ``mAP``, ``mIoU@t`` per threshold and ``best mIoU`` of the sweep."""
        miou = (self.inter / np.maximum(self.union, 1)).mean(axis=1)  # [1 + thresholds]
        out = {
            "pixAcc": self.correct / max(self.labelled, 1),
            "mIoU": float(miou[0]),
            "mAP": float(np.mean(self.precisions)) if self.precisions else float("nan"),
        }
        out.update({f"mIoU@{t:g}": float(v) for t, v in zip(self.thresholds, miou[1:], strict=True)})
        out["best mIoU"] = float(miou[1:].max()) if self.thresholds else float("nan")
        return out


class PointTotals:
    """p-mIoU on point labels (OpenImagesV7 protocol, Benenson & Ferrari 2022, as in LeGrad): the map, upsampled and
    min-max scaled, is thresholded; for each class the labelled points of the whole dataset give
    IoU = TP / (TP + FP + FN) (positive points predicted in, negative points predicted in, positive points
    predicted out); p-mIoU is the mean IoU over the classes that have any such point."""

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.counts: dict[str, np.ndarray] = {}  # class -> [thresholds, (tp, fp, fn)]

    def add(self, heat: np.ndarray, size: tuple[int, int], points: Sequence[tuple[float, float, bool]], label: str):
        """One map ``[gh, gw]`` for class ``label`` on an image of ``size`` (H, W) with points (y, x, positive)
        in pixel coordinates."""
        if not len(points):
            return
        scaled = min_max(upsample(heat, size))  # [H, W]
        ys = np.clip(np.array([p[0] for p in points], dtype=np.float64).astype(int), 0, size[0] - 1)
        xs = np.clip(np.array([p[1] for p in points], dtype=np.float64).astype(int), 0, size[1] - 1)
        positive = np.array([bool(p[2]) for p in points])
        values = scaled[ys, xs]  # [points]
        counts = self.counts.setdefault(label, np.zeros((len(self.thresholds), 3)))
        for i, cut in enumerate(self.thresholds):
            inside = values > cut
            counts[i] += (np.sum(inside & positive), np.sum(inside & ~positive), np.sum(~inside & positive))

    def result(self) -> dict[str, float]:
        """``p-mIoU@t`` per threshold, ``p-mIoU`` at 0.5 (the threshold LeGrad reports) and ``best p-mIoU``."""
        if not self.counts:
            return {}
        totals = np.stack(list(self.counts.values()))  # [classes, thresholds, 3]
        denominators = totals.sum(axis=2)
        iou = np.where(denominators > 0, totals[..., 0] / np.maximum(denominators, 1), np.nan)  # [classes, thresholds]
        per_threshold = np.nanmean(iou, axis=0)  # [thresholds]
        out = {f"p-mIoU@{t:g}": float(v) for t, v in zip(self.thresholds, per_threshold, strict=True)}
        out["p-mIoU"] = out.get("p-mIoU@0.5", float("nan"))
        out["best p-mIoU"] = float(np.nanmax(per_threshold))
        return out


# ---- faithfulness: deletion / insertion


def gaussian_blur(pixel_values: torch.Tensor, kernel: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` (reflect padding): the insertion baseline of RISE."""
    offsets = torch.arange(kernel, dtype=pixel_values.dtype, device=pixel_values.device) - (kernel - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()  # [k]
    channels = pixel_values.shape[1]
    pad = kernel // 2
    x = F.pad(pixel_values, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, weights.view(1, 1, 1, kernel).expand(channels, 1, 1, kernel), groups=channels)  # along W
    return F.conv2d(x, weights.view(1, 1, kernel, 1).expand(channels, 1, kernel, 1), groups=channels)  # along H


def perturbation_images(
    pixel_values: torch.Tensor,
    heat: np.ndarray | torch.Tensor,
    mode: str = "deletion",
    steps: int = 16,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """The images of a deletion or insertion curve: ``[steps + 1, 3, H, W]``.

    Args:
        pixel_values: the processed image ``[3, H, W]``.
        heat: its map ``[gh, gw]``, upsampled bilinearly to ``H x W`` to rank the pixels (ties: row-major order).
        mode: ``"deletion"`` (start from the image, replace pixels by the baseline, most important first; default
            baseline: zeros, i.e. the processor's mean colour) or ``"insertion"`` (start from the baseline, put the
            most important pixels back first; default baseline: the image blurred as in RISE).
        steps: image ``k`` has ``k / steps`` of the pixels changed.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _, height, width = pixel_values.shape
    if baseline is None:
        baseline = torch.zeros_like(pixel_values) if mode == "deletion" else gaussian_blur(pixel_values[None])[0]
    ranked = np.argsort(-upsample(heat, (height, width)).ravel(), kind="stable")  # [H*W], most important first
    rank = torch.empty(height * width, dtype=torch.long)
    rank[torch.from_numpy(ranked)] = torch.arange(height * width)  # rank of each pixel
    counts = torch.round(torch.linspace(0, height * width, steps + 1)).long()  # pixels changed at each step
    changed = (rank[None, :] < counts[:, None]).view(steps + 1, 1, height, width)  # [K, 1, H, W]
    changed = changed.to(pixel_values.device)
    start, end = (pixel_values, baseline) if mode == "deletion" else (baseline, pixel_values)
    return torch.where(changed, end[None], start[None])  # [K, 3, H, W]


def perturbation_curve(
    score: Callable[[torch.Tensor], torch.Tensor],
    pixel_values: torch.Tensor,
    heat: np.ndarray | torch.Tensor,
    mode: str = "deletion",
    steps: int = 16,
    baseline: torch.Tensor | None = None,
) -> np.ndarray:
    """The model's score along a deletion or insertion curve (:func:`perturbation_images`): ``[steps + 1]``.
    ``score`` maps a batch of images ``[K, 3, H, W]`` to one score each ``[K]`` (e.g. the prompt's logit)."""
    images = perturbation_images(pixel_values, heat, mode, steps, baseline)
    return score(images).detach().float().cpu().numpy()


def curve_auc(curve: np.ndarray) -> float:
    """Trapezoidal area under a curve sampled at evenly spaced fractions of [0, 1]."""
    curve = np.asarray(curve, dtype=np.float64)
    return float(((curve[1:] + curve[:-1]) / 2).mean()) if curve.size > 1 else float(curve[0])


def relative_auc(curves: list[np.ndarray], mode: str) -> float:
    """Area under the mean of ``curves`` (deletion or insertion curves of one method) on a scale where the intact
    image's score is 1 and the all-removed image's 0 (NaN without curves). Averaging before rescaling keeps curves
    whose two end points are close from blowing up."""
    if not curves:
        return float("nan")
    mean = np.mean(curves, axis=0)  # [steps + 1]
    full, empty = (mean[0], mean[-1]) if mode == "deletion" else (mean[-1], mean[0])
    return float((curve_auc(mean) - empty) / (full - empty))
