"""Do the explanation maps point at the object the prompt names? Scored on held-out procedural scenes.

Why: a heat map that looks plausible proves nothing. The scenes of :mod:`clipviz.scenes` record every object's
mask, so for "a photo of a red circle" in a scene with a red circle, a green star and a red square, we can check
where each method's map peaks. Scenes come from ``EVAL_SEEDS``, a seed range training never draws from.

Metrics (multi-object scenes: one map per object, prompted with that object's caption):

- ``point``: pointing game, strict: the map's argmax cell overlaps the named object's mask.
- ``point±1``: the same with a tolerance of one cell (any cell within Chebyshev distance 1 of the argmax).
- ``energy``: share of the map's mass inside the named object's mask (the map upsampled to pixels, cell-constant).
- ``wrong``: wrong-object control: the argmax cell overlaps another object's mask but not the named one's.
- ``pair``: text conditioning: for objects A != B of a scene, the map for A puts more mass on A than the map for B
  does (ties count 1/2, so a prompt-independent map scores exactly 0.5).
- ``same-col``: strict pointing on the objects that share their colour with another object (only the shape word
  tells them apart: the hard case); ``uniq-col``: the same on the objects whose colour is unique in the scene.

Also zero-shot top-1 over the 30 captions on single-object scenes, and a random-map baseline (uniform noise per
cell) scored the same way.

Usage::

    python benchmarks/eval_localization.py embedded/clipviz-tiny-vit embedded/clipviz-tiny-resnet \
        --scenes 500 --figure docs/maps.png
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clipviz import scenes  # noqa: E402
from clipviz.metrics import SCENE_METRICS as METRICS  # noqa: E402
from clipviz.metrics import cell_coverage, score_scene  # noqa: E402

MULTI_START = 50_000  # multi-object scenes are taken from EVAL_SEEDS[MULTI_START:], single-object ones from [0:]
METHODS = {
    "vit": {
        "attention": ("attention", {}),
        "rollout": ("rollout", {}),
        "relevance (last layer)": ("relevance", {}),
        "relevance (all layers)": ("relevance", {"start_layer": 0}),
        "gradcam": ("gradcam", {}),
    },
    "resnet": {
        "attention": ("attention", {}),
        "relevance": ("relevance", {}),
        "gradcam": ("gradcam", {}),
    },
}
RANDOM = "random map"


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


def localization(loaded: Loaded, count: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Every method's (and the random map's) metrics on ``count`` held-out multi-object scenes.

    One `explain` call per scene with just its objects' captions: every image x caption pair costs a backward
    for the gradient methods, so pairing each image with all 30 captions would do about 12 times the work.
    """
    held_out = multi_object_scenes(count, loaded.size)
    vocabulary = {caption: i for i, caption in enumerate(scenes.all_captions())}
    ids, mask = caption_ids(loaded)
    rng = np.random.default_rng(seed)
    methods = METHODS[loaded.backbone]
    totals = {name: {metric: [] for metric in METRICS} for name in [*methods, RANDOM]}
    for scene in held_out:
        px = pixel_values(loaded, [scene])
        rows = [vocabulary[caption] for caption in scene.captions]
        maps = {
            name: loaded.model.explain(px, ids[rows], mask[rows], method=method, **options).image_maps[0].numpy()
            for name, (method, options) in methods.items()
        }  # name -> [objects, gh, gw]
        grid = next(iter(maps.values())).shape[-2:]
        maps[RANDOM] = rng.random((len(rows), *grid))
        coverages = [cell_coverage(obj.mask, grid) for obj in scene.objects]
        colors = [obj.color for obj in scene.objects]
        for name, object_maps in maps.items():
            for metric, values in score_scene(object_maps, coverages, colors).items():
                totals[name][metric].extend(values)
    return {
        name: {metric: float(np.mean(v)) if v else float("nan") for metric, v in m.items()}
        for name, m in totals.items()
    }


def format_table(name: str, top1: float, results: dict[str, dict[str, float]], count: int) -> str:
    lines = [
        f"### {name}: zero-shot top-1 {top1:.3f}; localization on {count} held-out multi-object scenes",
        "",
        "| method | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for method, metrics in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{metrics[m]:.3f}" for m in METRICS) + " |")
    return "\n".join(lines)


def figure(loaded_models: list[Loaded], path: Path, count: int = 4, scale: int = 3) -> None:
    """A PNG grid: for each model and a few held-out scenes, the image and each method's map for one object."""
    from PIL import Image, ImageDraw

    from clipviz.rendering import overlay

    rows = []
    for loaded in loaded_models:
        methods = METHODS[loaded.backbone]
        for scene in multi_object_scenes(count, loaded.size)[:count]:
            caption = scene.captions[-1]
            batch = loaded.tokenizer([caption], padding="longest", return_tensors="pt")
            px = pixel_values(loaded, [scene])
            side = loaded.size * scale if loaded.size < 128 else loaded.size * scale // 2
            picture = Image.fromarray(scene.image).resize((side, side), Image.NEAREST)
            tiles = [picture]
            for method, options in methods.values():
                heat = loaded.model.explain(px, batch["input_ids"], batch["attention_mask"], method=method, **options)
                tiles.append(overlay(picture, heat.image_maps[0, 0], alpha=0.55))
            rows.append((f"{loaded.name}: {caption!r}", ["image", *methods], tiles))
    width = max(sum(t.size[0] for t in tiles) + 4 * len(tiles) for _, _, tiles in rows)
    height = sum(tiles[0].size[1] + 34 for _, _, tiles in rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for title, labels, tiles in rows:
        draw.text((4, y + 2), title, fill="black")
        x = 0
        for label, tile in zip(labels, tiles, strict=True):
            draw.text((x + 2, y + 16), label, fill="black")
            sheet.paste(tile, (x, y + 30))
            x += tile.size[0] + 4
        y += tiles[0].size[1] + 34
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders (e.g. embedded/clipviz-tiny-vit)")
    parser.add_argument("--scenes", type=int, default=500, help="held-out multi-object scenes (>= 500 for the table)")
    parser.add_argument("--single", type=int, default=500, help="held-out single-object scenes for zero-shot top-1")
    parser.add_argument("--figure", type=Path, help="also save a PNG of maps here, e.g. docs/maps.png")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the tiny models' ops are too small to split)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded_models = [load(path) for path in args.models]
    for loaded in loaded_models:
        started = time.time()
        top1 = zero_shot_top1(loaded, args.single)
        results = localization(loaded, args.scenes)
        print(format_table(loaded.name, top1, results, args.scenes))
        print(f"\n({time.time() - started:.0f} s)\n", flush=True)
    if args.figure:
        figure(loaded_models, args.figure)
        print(f"figure saved to {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
