"""Train the small embedded clipviz models (ViT and ResNet towers) from scratch on procedural scenes.

Why: the Space and the tests need a model that works offline and whose explanations can be *checked*: the scenes
(:mod:`clipviz.scenes`) record every object's mask, so a map for "a photo of a red circle" can be scored.

Recipe (from measurements on this 2-core CPU, see the project notes): CLIP's symmetric contrastive loss where the
texts of a step are the whole caption vocabulary (30 captions) and *every* object present in a scene is a positive
for that image ("multi-positive": the soft target is uniform over the scene's captions, and for each caption
uniform over the images containing it); AdamW with warm-up and cosine decay; a 2-D sin-cos start for the ViT's
position embeddings; dihedral flips/rotations of a fixed pool of training scenes; bf16 autocast on CPU.
Everything is seeded, so the same command on the same machine (and thread count) gives the same weights.

The embedded ViT uses 6 layers of 2 heads (OpenAI's 64 channels per head) instead of the 4 x 4 of
``VISION_CONFIGS``: with a same-colour distractor, relevance over all layers then points at the named object
more often (measured: pointing with 1-cell tolerance 0.905 vs 0.877 on 500 held-out scenes), although the
model's logit depended on the named object, not the distractor, even in the old model's misses (occlusion).

Usage (the embedded models' commands, also in their model cards and ``training_args.json``)::

    python -m clipviz.train_embedded --backbone vit --output-dir embedded/clipviz-tiny-vit --steps 3600 \
        --threads 1 --vision num_hidden_layers=6 num_attention_heads=2
    python -m clipviz.train_embedded --backbone resnet --output-dir embedded/clipviz-tiny-resnet --steps 2400
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from clipviz import scenes
from clipviz.openai_clip import OPENAI_MEAN, OPENAI_STD

CONTEXT_LENGTH = 77
TEXT_CONFIG = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77}
VISION_CONFIGS = {
    # 8x8 patch grid on 64x64 scenes
    "vit": {
        "backbone": "vit",
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
    },
    # 4x4 attention-pool grid on 128x128 scenes (the ResNet's total stride is 32)
    "resnet": {
        "backbone": "resnet",
        "image_size": 128,
        "resnet_layers": [1, 1, 1, 1],
        "resnet_width": 16,
        "num_attention_heads": 4,
    },
}
PROJECTION_DIM = 128


@dataclass
class TrainSettings:
    """Everything that determines the weights (saved next to them as ``training_args.json``)."""

    backbone: str
    steps: int = 2400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    pool_size: int = 16384
    seed: int = 0
    pos_embed_scale: float = 0.4
    bf16: bool = True
    threads: int = 2
    eval_scenes: int = 500
    # share of the training pool re-rendered with a same-colour distractor (0: the scenes' own draw, as the ResNet)
    same_color_frac: float = 0.0
    # cap on the learned logit scale (CLIP's is 100)
    logit_scale_max: float = 100.0
    # changes to the backbone's entry of VISION_CONFIGS (e.g. {"patch_size": 4, "hidden_size": 64})
    vision_config: dict = field(default_factory=dict)


def build_model(backbone: str, vision_overrides: dict | None = None):
    """A freshly initialized clipviz model of the embedded size (OpenAI's initialization); ``vision_overrides``
    change entries of the backbone's vision config."""
    from configuration_clipviz import CLIPVizConfig
    from modeling_clipviz import CLIPVizModel

    if backbone not in VISION_CONFIGS:
        raise ValueError(f"unknown backbone {backbone!r}: valid backbones are {list(VISION_CONFIGS)}")
    config = CLIPVizConfig(
        text_config=dict(TEXT_CONFIG),
        vision_config={**VISION_CONFIGS[backbone], **(vision_overrides or {})},
        projection_dim=PROJECTION_DIM,
    )
    return CLIPVizModel(config)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """MAE-style 2-D sine-cosine position table [grid*grid, dim], row-major: half the channels per axis."""
    if dim % 4:
        raise ValueError(f"the sin-cos table needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [grid, grid] each

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None, :]  # [grid*grid, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [grid*grid, dim/2]

    return torch.cat([axis(rows), axis(cols)], dim=1).float()  # [grid*grid, dim]


def init_position_embedding(model, scale: float) -> None:
    """Start the ViT grid positions from a scaled 2-D sin-cos table (still learned): it made the step at which the
    tiny ViT learns shape far less seed-dependent in the measurements."""
    vision = model.vision_model
    if model.config.vision_config.backbone != "vit" or scale == 0:
        return
    grid = model.config.vision_config.grid_size
    with torch.no_grad():
        vision.position_embedding[1:] = scale * sincos_2d(grid, vision.position_embedding.shape[1])


def tokenize_captions(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask padded to the longest caption: causal attention makes the end-of-text features equal to those
    of ids padded to 77, and it is cheaper."""
    batch = tokenizer(captions, padding="longest", return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def scene_pool(count: int, size: int, same_color_frac: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` training scenes: images [N, H, W, 3] uint8 and caption multi-hot targets [N, captions].

    ``same_color_frac``: a seeded random share of them is rendered with 2 or 3 objects, the first two of one colour
    (the hard case for localization: only the shape word tells them apart); 0 keeps every scene's own draw.
    """
    vocabulary = {caption: i for i, caption in enumerate(scenes.all_captions())}
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    targets = np.zeros((count, len(vocabulary)), dtype=bool)
    rng = np.random.default_rng(seed)
    forced = rng.random(count) < same_color_frac  # [N]
    counts = rng.integers(2, 4, size=count)  # [N] object count of a forced scene
    for index in range(count):
        overrides = {"num_objects": int(counts[index]), "same_color": True} if forced[index] else {}
        scene = scenes.make_scene(scenes.scene_seed("train", index), size=size, **overrides)
        images[index] = scene.image
        for caption in scene.captions:
            targets[index, vocabulary[caption]] = True
    return images, targets


def dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flip + quarter-turn per image of a [B, H, W, 3] batch: captions are invariant to both."""
    out = images.clone()
    codes = torch.randint(0, 8, (images.shape[0],), generator=generator)
    for code in range(1, 8):
        chosen = codes == code
        if chosen.any():
            block = torch.rot90(images[chosen], k=code % 4, dims=(1, 2))  # [b, H, W, 3]
            out[chosen] = torch.flip(block, dims=(2,)) if code >= 4 else block
    return out


def multi_positive_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with several positives: logits [B, C] (image x caption), targets [B, C] bool.

    Image -> text: soft cross-entropy against the uniform distribution over the scene's captions.
    Text -> image: for each caption present in the batch, the same over the images that contain it.
    """
    targets = targets.float()
    image_loss = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(dim=1)).sum(1).mean()
    present = targets.sum(0) > 0  # [C]
    per_caption = targets[:, present].t()  # [C', B]
    text_logits = logits[:, present].t()  # [C', B]
    text_loss = -(per_caption / per_caption.sum(1, keepdim=True) * text_logits.log_softmax(dim=1)).sum(1).mean()
    return (image_loss + text_loss) / 2


def param_groups(model, weight_decay: float) -> list[dict]:
    """CLIP's split: no weight decay on gains, biases, embeddings tables' 1-D params and the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or "logit_scale" in name or "position_embedding" in name or "class_embedding" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train(settings: TrainSettings, tokenizer, log=print):
    """Train and return ``(model, summary)``; ``summary`` holds timings and the held-out zero-shot accuracy."""
    generator = seed_everything(settings.seed)
    model = build_model(settings.backbone, settings.vision_config)
    init_position_embedding(model, settings.pos_embed_scale)
    size = model.config.vision_config.image_size
    started = time.time()
    images, targets = scene_pool(settings.pool_size, size, settings.same_color_frac, settings.seed)
    images, targets = torch.from_numpy(images), torch.from_numpy(targets)
    log(f"{settings.pool_size} training scenes at {size}px in {time.time() - started:.1f} s")
    caption_ids, caption_mask = tokenize_captions(tokenizer, scenes.all_captions())
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98))
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    model.train()
    train_started, cpu_started = time.time(), time.process_time()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        index = torch.randint(0, settings.pool_size, (settings.batch_size,), generator=generator)
        batch = dihedral(images[index], generator).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            out = model(input_ids=caption_ids, pixel_values=(batch - mean) / std, attention_mask=caption_mask)
            loss = multi_positive_loss(out.logits_per_image.float(), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(settings.logit_scale_max))  # CLIP's cap: 100
        if step % 100 == 0 or step == settings.steps - 1:
            log(
                f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step, settings):.2e}  {time.time() - train_started:.0f} s"
            )
    train_seconds, cpu_seconds = time.time() - train_started, time.process_time() - cpu_started
    model.eval()
    zero_shot = zero_shot_accuracy(model, tokenizer, settings.eval_scenes)
    log(
        f"trained {settings.steps} steps in {train_seconds / 60:.1f} min wall, {cpu_seconds / 60:.1f} min CPU "
        f"({settings.threads} threads); held-out zero-shot top-1 {zero_shot:.3f}"
    )
    summary = {"train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1)}
    return model, {**summary, "zero_shot_top1": round(zero_shot, 4)}


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, count: int, start: int = 0) -> float:
    """Top-1 over the 30 captions on ``count`` held-out single-object scenes."""
    size = model.config.vision_config.image_size
    held_out = scenes.make_scenes("eval", start, count, size=size, num_objects=1)
    vocabulary = scenes.all_captions()
    ids, mask = tokenize_captions(tokenizer, vocabulary)
    labels = torch.tensor([vocabulary.index(scene.captions[0]) for scene in held_out])
    correct = 0
    for begin in range(0, count, 250):
        chunk = held_out[begin : begin + 250]
        pixels = scenes.to_pixel_values([scene.image for scene in chunk], OPENAI_MEAN, OPENAI_STD)
        logits = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits_per_image  # [b, 30]
        correct += (logits.argmax(dim=1) == labels[begin : begin + len(chunk)]).sum().item()
    return correct / count


def zero_unseen_token_rows(model, tokenizer) -> int:
    """Zero the token embeddings of every token the captions never use; return how many rows stay non-zero.

    They never received a gradient (only weight decay), so they hold initialization noise; zeros make an unknown
    word contribute nothing, and let the 49,408-row table compress to almost nothing in git.
    """
    used = torch.unique(tokenize_captions(tokenizer, scenes.all_captions())[0])
    table = model.text_model.token_embedding.weight
    keep = torch.zeros(table.shape[0], dtype=torch.bool)
    keep[used] = True
    with torch.no_grad():
        table[~keep] = 0
    return int(keep.sum())


# What `explain` runs without `method=` on each embedded model (config.json's explain_method / explain_options): the
# best row of `benchmarks/eval_localization.py` on held-out scenes for the trained models (README, Benchmarks). ViT:
# occlusion with its 2-cell window (pointing±1 0.990, strict 0.966); the 3-cell window's 0.999 comes with strict
# pointing 0.787 (a 3-cell blur). ResNet: relevance (1.000, one backward).
EXPLAIN_DEFAULTS = {"vit": ("occlusion", {}), "resnet": ("relevance", {})}


def save(model, settings: TrainSettings, summary: dict, output_dir: Path) -> None:
    """The model (safetensors + config with auto_map + code), tokenizer and processor files, and a model card."""
    from clipviz.hub_repo import write_processing_files
    from clipviz.sources import ImageSettings

    output_dir.mkdir(parents=True, exist_ok=True)
    method, options = EXPLAIN_DEFAULTS[model.config.vision_config.backbone]
    model.config.explain_method, model.config.explain_options = method, dict(options)
    model.save_pretrained(output_dir)
    # the converter's writer: tokenizer, OpenAI's preprocessing at the model's size, and the CLIPProcessor config
    write_processing_files(output_dir, model.config, ImageSettings())
    record = {"settings": asdict(settings), "summary": summary}
    (output_dir / "training_args.json").write_text(json.dumps(record, indent=2) + "\n")
    (output_dir / "README.md").write_text(model_card(model, settings, summary))


FLAGS = {  # TrainSettings field -> command-line flag
    "batch_size": "--batch-size",
    "pool_size": "--pool-size",
    "lr": "--lr",
    "seed": "--seed",
    "eval_scenes": "--eval-scenes",
    "warmup_steps": "--warmup-steps",
    "weight_decay": "--weight-decay",
    "threads": "--threads",
    "same_color_frac": "--same-color-frac",
    "logit_scale_max": "--logit-scale-max",
}


def cli_command(settings: TrainSettings) -> str:
    """The training command that reproduces ``settings``: the steps, and every other setting that is not a default."""
    defaults = TrainSettings(backbone=settings.backbone)
    parts = [f"python -m clipviz.train_embedded --backbone {settings.backbone} --output-dir <dir>"]
    parts.append(f"--steps {settings.steps}")
    for name, flag in FLAGS.items():
        if getattr(settings, name) != getattr(defaults, name):
            parts.append(f"{flag} {getattr(settings, name)}")
    if not settings.bf16:
        parts.append("--no-bf16")
    if settings.vision_config:
        parts.append("--vision " + " ".join(f"{key}={value}" for key, value in settings.vision_config.items()))
    return " ".join(parts)


def model_card(model, settings: TrainSettings, summary: dict) -> str:
    vision = model.config.vision_config
    if vision.backbone == "vit":
        tower = (
            f"ViT: {vision.num_hidden_layers} layers, width {vision.hidden_size}, {vision.num_attention_heads} heads, "
            f"patch {vision.patch_size} on {vision.image_size}x{vision.image_size} ({vision.grid_size}x{vision.grid_size} grid)"
        )
    else:
        tower = (
            f"ModifiedResNet: stages {vision.resnet_layers}, width {vision.resnet_width}, attention pool with "
            f"{vision.num_attention_heads} heads on {vision.image_size}x{vision.image_size} "
            f"({vision.grid_size}x{vision.grid_size} grid)"
        )
    text = model.config.text_config
    params = sum(p.numel() for p in model.parameters())
    method, options = EXPLAIN_DEFAULTS[vision.backbone]
    explain_call = f"{method}" + "".join(f", {key}={value!r}" for key, value in options.items())
    explain_note = (
        f"Without `method=`, `explain` runs this model's default from `config.json` ({explain_call}): the best of "
        "every method measured on held-out scenes (`benchmarks/eval_localization.py`)."
    )
    if vision.backbone == "vit":
        explain_note += (
            " Occlusion asks the model itself (49 image-tower passes per image); of the methods that read one pass,"
            ' LeGrad from block 1 localizes best here, `method="legrad", start_layer=1`.'
        )
    else:
        explain_note += " The ResNet's map lives on its attention-pool grid (image size / 32 per side)."
    command = cli_command(settings)
    return f"""---
library_name: transformers
license: mit
tags:
- clip
- clipviz
- explainability
- synthetic
---

# clipviz tiny {vision.backbone} (embedded default model)

A tiny CLIP trained **from scratch** in {summary["train_seconds"] / 60:.0f} minutes on a shared 2-core CPU
({summary["train_cpu_seconds"] / 60:.0f} CPU-minutes with {settings.threads} thread{"s" if settings.threads != 1 else ""}), on the
procedural scenes of `clipviz.scenes` (1-3 coloured shapes on textured, noisy backgrounds). It knows only
{len(scenes.COLORS)} colours ({", ".join(scenes.COLORS)}) and {len(scenes.SHAPES)} shapes ({", ".join(scenes.SHAPES)}),
with captions such as "a photo of a red circle". It exists so that clipviz works offline and so that its
explanation maps can be checked against the scenes' object masks. It is not a general image model.

- Image tower: {tower}
- Text tower: {text.num_hidden_layers} layers, width {text.hidden_size}, {text.num_attention_heads} heads, OpenAI's
  BPE tokenizer (context 77). Token embeddings of tokens that never occur in the captions are zero, so unknown
  words contribute nothing.
- Joint space: {model.config.projection_dim}; {params / 1e6:.2f} M parameters.
- Training: {settings.steps} steps of batch {settings.batch_size}, multi-positive symmetric contrastive loss over
  the 30 captions, AdamW lr {settings.lr}, weight decay {settings.weight_decay}, bf16 autocast, seed {settings.seed};
  {settings.pool_size} training scenes (seed range `clipviz.scenes.TRAIN_SEEDS`) with flips and quarter turns.
- Held-out zero-shot top-1 on {settings.eval_scenes} single-object scenes (`EVAL_SEEDS`): **{summary["zero_shot_top1"]:.3f}**.

```python
from transformers import AutoModel, AutoTokenizer, CLIPImageProcessor

model = AutoModel.from_pretrained(path, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
processor = CLIPImageProcessor.from_pretrained(path)
ids = tokenizer(["a photo of a red circle"], padding=True, return_tensors="pt")
pixels = processor(images=image, return_tensors="pt")["pixel_values"]
maps = model.explain(pixels, ids["input_ids"], ids["attention_mask"])  # the model's default method

from clipviz.rendering import overlay  # drawing needs the clipviz package (and Pillow); the model does not

picture = overlay(image, maps.image_maps[0, 0])  # PIL image, the map blended over the original
```

{explain_note}

Reproduce: `{command}` (fixed seeds; `training_args.json` lists every setting).
"""


def parse_args(argv: list[str] | None = None) -> tuple[TrainSettings | None, Path | list[Path]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=sorted(VISION_CONFIGS))
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--pool-size", type=int, default=TrainSettings.pool_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--eval-scenes", type=int, default=TrainSettings.eval_scenes)
    parser.add_argument("--warmup-steps", type=int, default=TrainSettings.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=TrainSettings.weight_decay)
    parser.add_argument("--threads", type=int, default=TrainSettings.threads, help="torch threads (recorded)")
    parser.add_argument(
        "--vision",
        nargs="+",
        default=[],
        metavar="KEY=INT",
        help="change integer entries of the backbone's vision config, e.g. --vision patch_size=4 hidden_size=64",
    )
    parser.add_argument(
        "--logit-scale-max",
        type=float,
        default=TrainSettings.logit_scale_max,
        help="cap on the learned logit scale (CLIP: 100)",
    )
    parser.add_argument(
        "--same-color-frac",
        type=float,
        default=TrainSettings.same_color_frac,
        help="share of the training pool re-rendered as 2-3 objects with a same-colour pair (the hard case)",
    )
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32 (about 2x slower on CPU)")
    parser.add_argument(
        "--refresh-code",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="only link these saved model folders' remote-code files to the repository's current ones (relative "
        "symlinks) and rewrite their tokenizer files and model card",
    )
    args = parser.parse_args(argv)
    if args.refresh_code:
        return None, args.refresh_code
    if args.backbone is None or args.output_dir is None:
        parser.error("--backbone and --output-dir are required (unless --refresh-code is given)")
    settings = TrainSettings(
        backbone=args.backbone,
        steps=args.steps,
        batch_size=args.batch_size,
        pool_size=args.pool_size,
        lr=args.lr,
        seed=args.seed,
        eval_scenes=args.eval_scenes,
        bf16=not args.no_bf16,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        threads=args.threads,
        same_color_frac=args.same_color_frac,
        logit_scale_max=args.logit_scale_max,
        vision_config=parse_vision(parser, args.vision),
    )
    return settings, args.output_dir


def parse_vision(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    """``["patch_size=4", ...]`` -> ``{"patch_size": 4, ...}`` (integer values only)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key or not value.lstrip("-").isdigit():
            parser.error(f"--vision takes KEY=INT items, got {item!r}")
        out[key] = int(value)
    return out


def load_tokenizer(output_dir: Path):
    """CLIP's tokenizer from the files this run ships (the class is named, so no model config is consulted)."""
    from transformers import CLIPTokenizer

    from clipviz.tokenizer_files import write_tokenizer_files

    write_tokenizer_files(output_dir, context_length=CONTEXT_LENGTH)
    return CLIPTokenizer.from_pretrained(output_dir)


CODE_FILES = ("modeling_clipviz.py", "configuration_clipviz.py", "explaining_clipviz.py", "tokenization_clipviz.py")


def link_code(folder: Path) -> None:
    """Make each of the model folder's remote-code files a relative symlink to the repository's own file
    (``../../modeling_clipviz.py`` for ``embedded/<name>/``), replacing a copy or a broken link: git stores the
    links, ``from_pretrained(folder, trust_remote_code=True)`` follows them, and the code cannot go stale."""
    root = Path(__file__).resolve().parent.parent
    for name in CODE_FILES:
        link = folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(os.path.relpath(root / name, folder.resolve())))


def refresh_code(folders: list[Path]) -> None:
    """Point saved model folders' remote-code files at the repository's current files (symlinks, see
    ``link_code``) and rewrite their tokenizer files and model card (after a change to that code, so that
    `trust_remote_code` users of the embedded models get it); weights and configs stay as they are."""
    from clipviz.tokenizer_files import write_tokenizer_files

    for folder in folders:
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder} is not a saved model folder (no config.json)")
        tokenizer_code = folder / "tokenization_clipviz.py"
        if tokenizer_code.is_symlink():  # the tokenizer writer copies this file: never through the link onto itself
            tokenizer_code.unlink()
        write_tokenizer_files(folder, context_length=CONTEXT_LENGTH)
        link_code(folder)
        record = json.loads((folder / "training_args.json").read_text())
        settings = TrainSettings(**record["settings"])
        (folder / "README.md").write_text(
            model_card(build_model(settings.backbone, settings.vision_config), settings, record["summary"])
        )
        print(f"linked {', '.join(CODE_FILES)} and refreshed the tokenizer files and README.md in {folder}")


def main(argv: list[str] | None = None) -> int:
    settings, output_dir = parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:  # configuration_clipviz / modeling_clipviz are top-level modules of the checkout
        sys.path.insert(0, str(root))
    if settings is None:
        refresh_code(output_dir)
        return 0
    torch.set_num_threads(settings.threads)
    tokenizer = load_tokenizer(output_dir)
    model, summary = train(settings, tokenizer, log=lambda line: print(line, flush=True))
    summary["nonzero_token_rows"] = zero_unseen_token_rows(model, tokenizer)
    summary["zero_shot_top1_after_zeroing"] = round(zero_shot_accuracy(model, tokenizer, settings.eval_scenes), 4)
    save(model, settings, summary, output_dir)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
