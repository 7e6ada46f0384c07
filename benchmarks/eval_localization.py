"""Which explanation method finds the object a prompt names, and which maps does the model really rely on?

Why: a heat map that looks plausible proves nothing. The scenes of :mod:`clipviz.scenes` record every object's
mask, so for "a photo of a red circle" in a scene with a red circle, a green star and a red square, we can check
where each method's map peaks; and removing the cells a map ranks first should cost the prompt's logit most.
Scenes come from ``EVAL_SEEDS``, a seed range training never draws from. Every method the model's explanation
registry offers for its backbone is run (with its default options; ``--sweep`` adds every combination of first
layer, target and occlusion window of the methods that take them), so a new method appears here without touching
this script.

Metrics (multi-object scenes: one map per object, prompted with that object's caption; implemented once, in
:mod:`clipviz.metrics`):

- ``point``: pointing game, strict: the map's argmax cell overlaps the named object's mask.
- ``point±1``: the same with a tolerance of one cell (any cell within Chebyshev distance 1 of the argmax).
- ``energy``: share of the map's mass inside the named object's mask (the map cell-constant at pixel resolution).
- ``wrong``: wrong-object control: the argmax cell overlaps another object's mask but not the named one's.
- ``pair``: text conditioning: for objects A != B of a scene, the map for A puts more mass on A than the map for B
  does (ties count 1/2, so a prompt-independent map scores exactly 0.5).
- ``same-col``: strict pointing on the objects that share their colour with another object (only the shape word
  tells them apart: the hard case); ``uniq-col``: the same on the objects whose colour is unique in the scene.
- ``del↓`` / ``ins↑``: faithfulness on the first ``--faithfulness`` scenes (:func:`clipviz.metrics.perturbation_curve`):
  pixels removed (deletion) or revealed (insertion) in the order of the map (upsampled bilinearly), in ``--steps``
  equal steps, tracking the prompt's logit. A removed pixel shows the dataset mean (zero in normalized pixels, the
  colour the Space letterboxes with) in both curves. Area under the mean curve over all prompts, rescaled so the intact
  image's logit is 1 and the all-mean image's 0 (RISE, Petsiuk et al. 2018; the positive/negative perturbation
  test of Chefer et al. 2021). Deletion: lower is better; insertion: higher is better.

Also zero-shot top-1 over the 30 captions on single-object scenes, and a random-map baseline (uniform noise per
cell, seeded) scored the same way. Rows are ranked by ``point±1``, then ``point``, then ``energy``.

Usage::

    python benchmarks/eval_localization.py embedded/clipviz-tiny-vit embedded/clipviz-tiny-resnet \
        --scenes 300 --faithfulness 100 --sweep --figure docs/maps.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clipviz import metrics, scenes  # noqa: E402

MULTI_START = 50_000  # multi-object scenes are taken from EVAL_SEEDS[MULTI_START:], single-object ones from [0:]
RANDOM = "random map"
LOCALIZATION = metrics.SCENE_METRICS
FAITHFULNESS = ("del↓", "ins↑")
METRICS = LOCALIZATION + FAITHFULNESS
# options whose every combination --sweep tries: the first image layer a method uses, its target (the prompt's
# logit, or the logit contrasted with the other prompts of the scene), and occlusion's window (in grid cells)
SWEPT_OPTIONS = ("start_layer", "target", "window")
SWEPT_NUMBERS = {"window": (1, 2, 3)}  # the values tried for the whole-number options above


@dataclass
class Loaded:
    """A model with the tokenizer and the preprocessing numbers saved next to it."""

    name: str
    model: object
    tokenizer: object
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def size(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def backbone(self) -> str:
        return self.model.config.vision_config.backbone

    @property
    def image_layers(self) -> int:
        vision = self.model.config.vision_config
        return vision.num_hidden_layers if self.backbone == "vit" else 1


def load(path: str | Path) -> Loaded:
    from transformers import AutoModel, CLIPImageProcessor, CLIPTokenizer

    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    processor = CLIPImageProcessor.from_pretrained(path)
    return Loaded(
        Path(path).name,
        model,
        CLIPTokenizer.from_pretrained(path),
        tuple(processor.image_mean),
        tuple(processor.image_std),
    )


# ---- what runs: every method of the model's registry ----


def label(method: str, options: dict) -> str:
    """``relevance`` / ``relevance start_layer=0``: the method and the options that differ from its defaults."""
    return method + "".join(f" {key}={value}" for key, value in options.items())


def registry_methods(loaded: Loaded) -> dict[str, object]:
    """The methods the model's own explanation code registers for its backbone (name -> its registry entry)."""
    explaining = sys.modules[type(loaded.model).explain.__module__]
    return {method.name: method for method in explaining.methods_for(loaded.backbone)}


def method_variants(loaded: Loaded, sweep: bool = False) -> dict[str, tuple[str, dict]]:
    """Rows to measure: label -> (method, options). The model's default (``config.explain_method`` with its
    options), every registry method with its defaults and, with ``sweep``, every combination of the values of the
    options named in ``SWEPT_OPTIONS`` (image layers 0 .. layers - 1, a choice's every choice, the values in
    ``SWEPT_NUMBERS``), each labelled with the options that differ from the method's defaults."""
    config = loaded.model.config
    default = dict(config.explain_options)
    variants = {label(config.explain_method, default): (config.explain_method, default)}
    for name, method in registry_methods(loaded).items():
        variants.setdefault(label(name, {}), (name, {}))
        swept = [option for option in method.options if sweep and option.name in SWEPT_OPTIONS]
        swept = [option for option in swept if loaded.backbone in option.backbones]
        for values in itertools.product(*(swept_values(loaded, option) for option in swept)):
            options = {
                option.name: value
                for option, value in zip(swept, values, strict=True)
                if value != swept_values(loaded, option, default=True)
            }
            variants.setdefault(label(name, options), (name, options))
    return variants


def swept_values(loaded: Loaded, option, default: bool = False):
    """Every value ``--sweep`` tries for ``option`` (an image layer, a choice, or a number of ``SWEPT_NUMBERS``), or
    with ``default`` its default in the same form (a layer index made non-negative)."""
    if option.kind == "image_layer":
        return option.default % loaded.image_layers if default else range(loaded.image_layers)
    if option.kind == "choice":
        return option.default if default else option.choices
    if option.name in SWEPT_NUMBERS:
        return option.default if default else SWEPT_NUMBERS[option.name]
    raise ValueError(f"--sweep cannot sweep option {option.name!r} of kind {option.kind!r}")


# ---- scenes and inputs ----


def multi_object_scenes(count: int, size: int) -> list[scenes.Scene]:
    """The first ``count`` held-out scenes with 2 or 3 objects, from ``EVAL_SEEDS[MULTI_START:]``."""
    return scenes.find_scenes("eval", MULTI_START, count, size, min_objects=2)


def pixel_values(loaded: Loaded, batch: list[scenes.Scene]) -> torch.Tensor:
    return scenes.to_pixel_values([scene.image for scene in batch], loaded.mean, loaded.std)


def caption_ids(loaded: Loaded) -> tuple[torch.Tensor, torch.Tensor]:
    batch = loaded.tokenizer(scenes.all_captions(), padding="longest", return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def zero_shot_top1(loaded: Loaded, count: int, batch_size: int = 250) -> float:
    """Top-1 over the 30 captions on the first ``count`` held-out single-object scenes."""
    held_out = scenes.make_scenes("eval", 0, count, size=loaded.size, num_objects=1)
    vocabulary = scenes.all_captions()
    ids, mask = caption_ids(loaded)
    correct = 0
    for begin in range(0, count, batch_size):
        chunk = held_out[begin : begin + batch_size]
        logits = loaded.model(input_ids=ids, pixel_values=pixel_values(loaded, chunk), attention_mask=mask)
        predicted = logits.logits_per_image.argmax(dim=1).tolist()
        correct += sum(vocabulary[p] == scene.captions[0] for p, scene in zip(predicted, chunk, strict=True))
    return correct / count


def logit_scorer(loaded: Loaded, rows: list[int]):
    """``images [B, 3, S, S] -> [B, len(rows)]``: the model's logits against the captions ``rows`` (as in its
    forward: scaled cosine of the projected embeddings), the text side computed once."""
    model = loaded.model
    ids, mask = caption_ids(loaded)
    with torch.no_grad():
        text = model.get_text_features(ids[rows], mask[rows])  # [K, P]
        text = text / text.norm(dim=-1, keepdim=True)
        scale = model.logit_scale.exp()

    def score(images: torch.Tensor) -> torch.Tensor:
        image = model.get_image_features(images)  # [B, P]
        return scale * (image / image.norm(dim=-1, keepdim=True)) @ text.t()  # [B, K]

    return score


# ---- measuring ----


def localization(
    loaded: Loaded,
    count: int,
    variants: dict[str, tuple[str, dict]] | None = None,
    faithfulness: int = 0,
    steps: int = 8,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Every variant's (and the random map's) metrics on ``count`` held-out multi-object scenes; deletion and
    insertion on the first ``faithfulness`` of them (NaN when 0).

    One `explain` call per scene and variant with just its objects' captions: every image x caption pair costs a
    backward for the gradient methods, so pairing each image with all 30 captions would do about 12 times the work.
    """
    variants = method_variants(loaded) if variants is None else variants
    held_out = multi_object_scenes(count, loaded.size)
    vocabulary = {caption: i for i, caption in enumerate(scenes.all_captions())}
    ids, mask = caption_ids(loaded)
    rng = np.random.default_rng(seed)
    names = [*variants, RANDOM]
    totals = {name: {metric: [] for metric in LOCALIZATION} for name in names}
    curves = {name: {"deletion": [], "insertion": []} for name in names}
    for index, scene in enumerate(held_out):
        px = pixel_values(loaded, [scene])
        rows = [vocabulary[caption] for caption in scene.captions]
        maps = {
            name: loaded.model.explain(px, ids[rows], mask[rows], method=method, **options).image_maps[0].numpy()
            for name, (method, options) in variants.items()
        }  # name -> [objects, gh, gw]
        grid = next(iter(maps.values())).shape[-2:]
        maps[RANDOM] = rng.random((len(rows), *grid))
        coverages = [metrics.cell_coverage(obj.mask, grid) for obj in scene.objects]
        colors = [obj.color for obj in scene.objects]
        for name, object_maps in maps.items():
            for metric, values in metrics.score_scene(object_maps, coverages, colors).items():
                totals[name][metric].extend(values)
        if index < faithfulness:
            scorer = logit_scorer(loaded, rows)
            removed = torch.zeros_like(px[0])  # the dataset mean in normalized pixels
            for name, object_maps in maps.items():
                for k, heat in enumerate(object_maps):
                    for mode in ("deletion", "insertion"):
                        curve = metrics.perturbation_curve(
                            lambda images, k=k, scorer=scorer: scorer(images)[:, k], px[0], heat, mode, steps, removed
                        )
                        curves[name][mode].append(curve)
    results = {
        name: {metric: float(np.mean(v)) if v else float("nan") for metric, v in m.items()}
        for name, m in totals.items()
    }
    for name in names:
        results[name]["del↓"] = metrics.relative_auc(curves[name]["deletion"], "deletion")
        results[name]["ins↑"] = metrics.relative_auc(curves[name]["insertion"], "insertion")
    return results


def ranked(results: dict[str, dict[str, float]]) -> list[str]:
    """Row names, best first: by ``point±1``, then ``point``, then ``energy``."""
    return sorted(results, key=lambda name: tuple(-results[name][m] for m in ("point±1", "point", "energy")))


def format_table(
    name: str, top1: float, results: dict[str, dict[str, float]], count: int, faithfulness: int, default: str = ""
) -> str:
    lines = [
        f"### {name}: zero-shot top-1 {top1:.3f}; localization on {count} held-out multi-object scenes, "
        f"deletion/insertion on the first {faithfulness}",
        "",
        "| method | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for method in ranked(results):
        shown = f"**{method}** (default)" if method == default else method
        lines.append(f"| {shown} | " + " | ".join(f"{results[method][m]:.3f}" for m in METRICS) + " |")
    return "\n".join(lines)


def default_variant(loaded: Loaded) -> str:
    """The label of the model's default explanation (``config.explain_method`` with its options)."""
    config = loaded.model.config
    return label(config.explain_method, dict(config.explain_options))


# ---- the figure ----


def figure(loaded_models: list[Loaded], path: Path, count: int = 3, scale: int = 3) -> None:
    """A PNG grid: for each model and the first ``count`` held-out scenes, the image and every registry method's
    map (default options) for the scene's last object."""
    from PIL import Image, ImageDraw

    from clipviz.rendering import overlay

    rows = []
    for loaded in loaded_models:
        variants = method_variants(loaded)
        for scene in multi_object_scenes(count, loaded.size):
            caption = scene.captions[-1]
            batch = loaded.tokenizer([caption], padding="longest", return_tensors="pt")
            px = pixel_values(loaded, [scene])
            side = 192  # every tile the same size, whatever the model's input
            picture = Image.fromarray(scene.image).resize((side, side), Image.NEAREST)
            tiles = [picture]
            for method, options in variants.values():
                heat = loaded.model.explain(px, batch["input_ids"], batch["attention_mask"], method=method, **options)
                tiles.append(overlay(picture, heat.image_maps[0, 0], alpha=0.55))
            rows.append((f"{loaded.name}: {caption!r}", ["image", *variants], tiles))
    width = max(sum(t.size[0] for t in tiles) + 4 * len(tiles) for _, _, tiles in rows)
    height = sum(tiles[0].size[1] + 34 for _, _, tiles in rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for title, labels, tiles in rows:
        draw.text((4, y + 2), title, fill="black")
        x = 0
        for text, tile in zip(labels, tiles, strict=True):
            draw.text((x + 2, y + 16), text, fill="black")
            sheet.paste(tile, (x, y + 30))
            x += tile.size[0] + 4
        y += tiles[0].size[1] + 34
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders (e.g. embedded/clipviz-tiny-vit)")
    parser.add_argument("--scenes", type=int, default=300, help="held-out multi-object scenes")
    parser.add_argument("--faithfulness", type=int, default=100, help="of those, scenes for deletion/insertion")
    parser.add_argument("--steps", type=int, default=8, help="deletion/insertion steps per curve")
    parser.add_argument("--single", type=int, default=500, help="held-out single-object scenes for zero-shot top-1")
    parser.add_argument(
        "--sweep", action="store_true", help="also every first layer x target (x window) of the methods that take them"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the random map and the order of tied cells")
    parser.add_argument("--figure", type=Path, help="also save a PNG of maps here, e.g. docs/maps.png")
    parser.add_argument("--json", type=Path, help="also save every number here")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the tiny models' ops are too small to split)"
    )
    args = parser.parse_args(argv)
    for flag in ("scenes", "steps", "single"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if not 0 <= args.faithfulness <= args.scenes:
        parser.error("--faithfulness must lie between 0 and --scenes")
    for path in args.models:
        if not (Path(path) / "config.json").is_file():
            parser.error(f"{path} is not a model folder (no config.json); pass e.g. embedded/clipviz-tiny-vit")
    torch.set_num_threads(args.threads)
    loaded_models = [load(path) for path in args.models]
    saved = {}
    for loaded in loaded_models:
        started = time.time()
        top1 = zero_shot_top1(loaded, args.single)
        variants = method_variants(loaded, args.sweep)
        results = localization(loaded, args.scenes, variants, args.faithfulness, args.steps, args.seed)
        print(format_table(loaded.name, top1, results, args.scenes, args.faithfulness, default_variant(loaded)))
        print(f"\n({time.time() - started:.0f} s)\n", flush=True)
        saved[loaded.name] = {"top1": top1, "scenes": args.scenes, "faithfulness": args.faithfulness, "rows": results}
    if args.json:
        args.json.write_text(json.dumps(saved, indent=1, ensure_ascii=False) + "\n")
    if args.figure:
        figure(loaded_models, args.figure)
        print(f"figure saved to {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
