"""Score a ``clipviz-explain`` output against the dataset's masks and point labels: ``clipviz-eval``.

Per method (one table row each, also written as JSON):

- with a mask column (one mask per row, or one per prompt): the pointing game, strict (``point``) and with a
  tolerance in grid cells (``point±N``), ``energy`` in the mask, and with several prompts per row the scene metrics
  ``wrong`` / ``pair`` (and ``same-col`` / ``uniq-col`` given a colour column); then the ImageNet-Segmentation
  protocol (Chefer et al. / LeGrad): ``pixAcc``, ``mIoU`` (threshold at the map's mean), ``mAP``, ``best mIoU`` over
  the threshold sweep (every ``mIoU@t`` in the JSON);
- with a point column (OpenImagesV7-style ``{"y", "x", "positive"}`` points per prompt): ``p-mIoU`` at 0.5 and
  ``best p-mIoU`` over the sweep;
- with ``--faithfulness``: ``deletion`` and ``insertion`` AUC of the prompt's logit (Petsiuk et al. 2018): the area
  under the method's mean curve, rescaled so that the intact image's logit is 1 and the all-removed image's 0
  (lower is better for deletion, higher for insertion); removed pixels take the processor's mean colour (zeros) in
  both curves. The same numbers as ``benchmarks/eval_localization.py``'s ``del↓`` / ``ins↑`` (one implementation,
  ``metrics.relative_auc``). It runs the model again (``--steps + 1`` images per map).

Every metric comes from :mod:`clipviz.metrics`, the code ``benchmarks/eval_localization.py`` uses. The dataset is
the one recorded in the run's manifest unless another is given; rows are matched by their position.

Usage::

    clipviz-eval out/ --json out/eval.json            # masks / points / colours found by column name
    clipviz-eval out/ --mask-column mask --tolerance 1 --faithfulness --steps 16
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from clipviz import metrics
from clipviz.dataset_explain import MANIFEST, ExplainError, decode_image, load_input, load_model

TABLE_METRICS = ("pixAcc", "mIoU", "mAP", "best mIoU", "p-mIoU", "best p-mIoU", "deletion", "insertion")


def _masks(value, count: int, row: int) -> list[np.ndarray]:
    """A row's mask cell -> one boolean mask per prompt (a single mask serves every prompt)."""
    if value is None:
        raise ExplainError(f"row {row} has no mask")
    per_prompt = isinstance(value, list) and value and np.asarray(value[0]).ndim >= 2  # else one mask for all
    items = value if per_prompt else [value]
    masks = [_as_mask(item) for item in items]
    if len(masks) == 1:
        return masks * count
    if len(masks) != count:
        raise ExplainError(f"row {row} has {len(masks)} masks for {count} prompts: give one mask, or one per prompt")
    return masks


def _as_mask(item) -> np.ndarray:
    array = np.asarray(item)
    if array.ndim == 3:  # an RGB mask image
        array = array.max(axis=2)
    return array > 0


def _points(value, count: int, row: int) -> list[list[tuple[float, float, bool]]]:
    if not value:
        return [[] for _ in range(count)]
    per_prompt = value if isinstance(value[0], list) else [value]
    if len(per_prompt) == 1:
        per_prompt = per_prompt * count
    if len(per_prompt) != count:
        raise ExplainError(f"row {row} has point lists for {len(per_prompt)} prompts, not {count}")
    return [[(p["y"], p["x"], bool(p["positive"])) for p in points] for points in per_prompt]


class _MeanCurve:
    """Running mean of deletion / insertion curves (memory bounded whatever the dataset size)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, curves: list[np.ndarray]) -> None:
        for curve in curves:
            self.total, self.count = self.total + np.asarray(curve, dtype=np.float64), self.count + 1

    def mean(self) -> np.ndarray:
        return self.total / self.count


class _Faithfulness:
    """Deletion / insertion AUC of the prompt's logit: every curve of a row (methods x prompts x both modes) goes
    through the image tower in one batch."""

    def __init__(self, manifest: dict, steps: int, device: str | None):
        import torch

        settings = manifest["settings"]
        self.model, self.processor = load_model(
            settings["model"], settings["revision"], device or "cpu", getattr(torch, settings["dtype"])
        )
        self.steps = steps
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype

    def row(self, image_cell, prompts: list[str], maps: dict[str, list[np.ndarray]], chunk: int = 256) -> dict:
        """``maps[label][t]``: the map for prompt ``t``; returns ``{label: {"deletion": [...], "insertion": [...]}}``
        (one logit curve ``[steps + 1]`` per prompt)."""
        import torch

        pixel_values = self.processor.image_processor(images=[decode_image(image_cell)], return_tensors="pt")
        pixel_values = pixel_values["pixel_values"][0].to(self.device, self.dtype)  # [3, H, W]
        modes = ("deletion", "insertion")
        curves = [(label, t, mode) for label in maps for t in range(len(prompts)) for mode in modes]
        with torch.no_grad():
            tokens = self.processor.tokenizer(prompts, padding="longest", return_tensors="pt").to(self.device)
            text = self.model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
            text = text / text.norm(dim=-1, keepdim=True)  # [T, P]
            removed = torch.zeros_like(pixel_values)  # the dataset mean colour, in both curves (as eval_localization)
            images = torch.cat(
                [
                    metrics.perturbation_images(pixel_values, maps[label][t], mode, self.steps, removed)
                    for label, t, mode in curves
                ]
            )  # [curves * (steps + 1), 3, H, W]
            features = torch.cat([self.model.get_image_features(part) for part in images.split(chunk)])
            features = features / features.norm(dim=-1, keepdim=True)  # [curves * (steps + 1), P]
            logits = self.model.logit_scale.exp() * features.view(len(curves), self.steps + 1, -1)  # [C, K, P]
            prompt_of = torch.tensor([t for _, t, _ in curves], device=self.device)
            scores = (logits * text[prompt_of][:, None]).sum(-1).float().cpu().numpy()  # [C, K]
        out = {label: {mode: [] for mode in modes} for label in maps}
        for (label, _, mode), curve in zip(curves, scores, strict=True):
            out[label][mode].append(curve)
        return out


def evaluate(
    output_dir: str,
    dataset=None,
    mask_column: str | None = "auto",
    points_column: str | None = "auto",
    color_column: str | None = "auto",
    tolerance: int = 1,
    thresholds=metrics.THRESHOLDS,
    faithfulness: bool = False,
    steps: int = 16,
    device: str | None = None,
) -> dict:
    """Metrics per method of a finished ``clipviz-explain`` run. ``dataset`` defaults to the manifest's source;
    ``"auto"`` columns are ``masks``/``mask``, ``points``, ``colors`` when the dataset has them (None: unused).
    Returns ``{"methods": {label: {metric: value}}, "counts": {...}, ...}``."""
    import datasets
    import pyarrow.parquet as pq

    output = Path(output_dir)
    if not (output / MANIFEST).exists():
        raise ExplainError(f"{output} has no {MANIFEST}: pass a clipviz-explain output folder")
    manifest = json.loads((output / MANIFEST).read_text())
    if not manifest.get("complete"):
        raise ExplainError(f"the run in {output} is not complete: run clipviz-explain again with the same arguments")
    settings = manifest["settings"]
    if dataset is None:
        source = manifest["dataset"].get("source") or {}
        if not source.get("path"):
            raise ExplainError("the manifest records no dataset source (the run came from the Python API): pass one")
        dataset = load_input(source["path"], source.get("split"), source.get("revision"), source.get("name"))
    if not isinstance(dataset, datasets.Dataset):
        raise ExplainError("evaluation needs a map-style dataset (rows by position), not a streaming one")
    columns = dataset.column_names

    def pick(given, names):
        if given != "auto":
            if given is not None and given not in columns:
                raise ExplainError(f"no column {given!r} in the dataset; columns: {', '.join(columns)}")
            return given
        return next((name for name in names if name in columns), None)

    mask_column = pick(mask_column, ("masks", "mask"))
    points_column = pick(points_column, ("points",))
    color_column = pick(color_column, ("colors",))
    if mask_column is None and points_column is None and not faithfulness:
        raise ExplainError(
            f"nothing to score: the dataset has no mask or point column (columns: {', '.join(columns)}); "
            "pass --mask-column / --points-column, or --faithfulness"
        )
    wanted = [c for c in (mask_column, points_column, color_column) if c]
    if faithfulness:
        wanted.append(settings["image_column"])
        judge = _Faithfulness(manifest, steps, device)
    source = dataset.select_columns(wanted)
    if faithfulness:
        source = source.cast_column(settings["image_column"], datasets.Image(decode=False))

    labels = [m["label"] for m in settings["methods"]]
    scene = {label: defaultdict(list) for label in labels}
    segmentation = {label: metrics.SegmentationTotals(thresholds) for label in labels}
    points = {label: metrics.PointTotals(thresholds) for label in labels}
    curves = {label: defaultdict(_MeanCurve) for label in labels}  # bounded: a running sum per method and mode
    counts = {"rows": 0, "maps": 0}
    for name in manifest["shards"]:
        wanted_columns = ["row", "prompt_index", "prompt", "method", "image_map", "image_height", "image_width"]
        table = pq.read_table(output / name, columns=wanted_columns)
        grouped: dict[int, dict[str, dict[int, tuple[str, np.ndarray]]]] = defaultdict(lambda: defaultdict(dict))
        sizes: dict[int, tuple[int, int]] = {}
        for row, index, prompt, method, heat, height, width in zip(
            *(table.column(c).to_pylist() for c in wanted_columns), strict=True
        ):
            grouped[row][method][index] = (prompt, np.asarray(heat, dtype=np.float32))
            sizes[row] = (height, width)
        for row in sorted(grouped):
            record = source[row]
            by_method = grouped[row]
            prompts = [by_method[labels[0]][i][0] for i in sorted(by_method[labels[0]])]
            count = len(prompts)
            masks = _masks(record[mask_column], count, row) if mask_column else None
            row_points = _points(record[points_column], count, row) if points_column else None
            colors = record[color_column] if color_column else None
            if faithfulness:
                maps_of = {label: [by_method[label][i][1] for i in sorted(by_method[label])] for label in labels}
                for label, row_curves in judge.row(record[settings["image_column"]], prompts, maps_of).items():
                    for mode, values in row_curves.items():
                        curves[label][mode].add(values)
            counts["rows"] += 1
            for label in labels:
                maps = [by_method[label][i][1] for i in sorted(by_method[label])]  # [prompts] x [gh, gw]
                counts["maps"] += len(maps)
                if masks is not None:
                    grid = maps[0].shape
                    coverages = [metrics.mask_coverage(mask, grid) for mask in masks]
                    row_colors = colors if colors is not None and len(colors) == count else None
                    for metric, values in metrics.score_scene(np.stack(maps), coverages, row_colors, tolerance).items():
                        scene[label][metric].extend(values)
                    for heat, mask in zip(maps, masks, strict=True):
                        segmentation[label].add(metrics.place_on_image(heat, *mask.shape), mask)
                if row_points is not None:
                    for heat, prompt, pts in zip(maps, prompts, row_points, strict=True):
                        size = sizes[row]
                        points[label].add(metrics.place_on_image(heat, *size), size, pts, prompt)
    results = {}
    for label in labels:
        values = {metric: float(np.mean(v)) for metric, v in scene[label].items() if v}
        if mask_column:
            values.update(segmentation[label].result())
        if points_column:
            values.update(points[label].result())
        values.update({mode: metrics.relative_auc([c.mean()], mode) for mode, c in curves[label].items() if c.count})
        results[label] = values
    return {
        "methods": results,
        "counts": counts,
        "model": manifest["model"]["id"],
        "columns": {"mask": mask_column, "points": points_column, "colors": color_column},
        "tolerance": tolerance,
        "thresholds": list(thresholds),
        "steps": steps if faithfulness else None,
    }


def format_table(report: dict) -> str:
    results = report["methods"]
    present = []
    for values in results.values():
        present += [m for m in values if m not in present]
    shown = [m for m in present if "@" not in m]  # the sweep stays in the JSON
    order = [m for m in shown if m not in TABLE_METRICS] + [m for m in TABLE_METRICS if m in shown]
    lines = [
        f"{report['counts']['rows']} rows, {report['counts']['maps']} maps; model {report['model']}",
        "",
        "| method | " + " | ".join(order) + " |",
        "|---" * (len(order) + 1) + "|",
    ]
    for label, values in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{values[m]:.3f}" if m in values else "-" for m in order) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipviz-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="a finished clipviz-explain output folder")
    parser.add_argument("--dataset", help="the dataset (default: the source recorded in the manifest)")
    parser.add_argument("--split", help="its split (with --dataset)")
    parser.add_argument("--mask-column", default="auto", help="mask column (default: masks or mask if present)")
    parser.add_argument("--points-column", default="auto", help="point-label column (default: points if present)")
    parser.add_argument("--color-column", default="auto", help="colour column for same-col/uniq-col (scenes)")
    parser.add_argument("--tolerance", type=int, default=1, help="pointing-game tolerance in grid cells")
    parser.add_argument("--faithfulness", action="store_true", help="also deletion / insertion AUC (runs the model)")
    parser.add_argument("--steps", type=int, default=16, help="deletion / insertion curve steps")
    parser.add_argument("--device", help="device for --faithfulness (default cpu)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dataset = load_input(args.dataset, args.split) if args.dataset else None
        report = evaluate(
            args.output,
            dataset,
            mask_column=None if args.mask_column == "none" else args.mask_column,
            points_column=None if args.points_column == "none" else args.points_column,
            color_column=None if args.color_column == "none" else args.color_column,
            tolerance=args.tolerance,
            faithfulness=args.faithfulness,
            steps=args.steps,
            device=args.device,
        )
    except ExplainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
