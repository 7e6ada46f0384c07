"""Images per second through ``clipviz-explain`` against a notebook loop, and from 1 to 2 processes. One run.

Why: the dataset path batches images (one ``explain`` call per batch with every prompt) and overlaps nothing else;
the usual notebook loop calls ``model.explain`` once per image and prompt. Both here read the same scene dataset
(``save_to_disk``), decode the PNGs and run the model's processor; the dataset path also writes its Parquet shards.

- ``--models``: ``embedded`` (the 64 px tiny ViT) and ``ViT-B/16`` (OpenAI's architecture, random weights, 224 px:
  speed does not depend on the weights).
- For each method and batch size (1, 8, 32): images/s of ``explain_dataset`` in this process, and the loop's
  images/s; the ratio is the speed-up (goal: >= 3x at batch 32 for the gradient-free methods). A last row times
  plain forwards the same two ways (batches with the text features computed once, against a forward per image and
  prompt): no method's batched path can gain more over its loop than that.
- ``--processes``: the same run as 1 process with N threads and as N processes with 1 thread each under
  ``accelerate launch --cpu`` (wall time of the whole command, start-up included, so use enough images).
- ``--flops``: per-image forward FLOPs of ViT-B/16 and ViT-L/14 (``torch.utils.flop_counter``) and the paper estimate
  of the README for 1M images on 8 GPUs.

Usage (the README's full run, then a tiny smoke run)::

    python benchmarks/bench_dataset.py --images 256 --loop-images 64 --processes 2 --flops
    python benchmarks/bench_dataset.py --models embedded --images 16 --loop-images 4 --batch-sizes 1 8 --methods attention
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clipviz import scenes  # noqa: E402
from clipviz.dataset_explain import decode_image, explain_dataset, load_input, parse_method  # noqa: E402

METHODS = ("attention", "rollout", "relevance", "relevance:start_layer=0", "gradcam")
PROMPTS = list(scenes.all_captions()[:2])  # --prompts N: the first N scene captions
# cost of each method as a multiple of a plain forward (bench_explain.py, ViT-B/16, 1 prompt, 2026-12-03; README)
COST_MULTIPLE = {
    "attention": 0.99,
    "rollout": 1.00,
    "relevance": 1.02,
    "relevance:start_layer=0": 2.04,
    "gradcam": 1.18,
    "legrad": 1.30,
    "gem": 1.21,
    "maskclip": 1.05,
    "clearclip": 1.00,
    "occlusion": 166.06,
}


def model_folder(name: str, workdir: Path) -> Path:
    """The embedded ViT folder, or a random-weight ViT-B/16 written as a Hub folder (weights, code, processor)."""
    if name == "embedded":
        return ROOT / "embedded" / "clipviz-tiny-vit"
    from clipviz.hub_repo import write_config_and_code, write_processing_files
    from clipviz.sources import ImageSettings
    from configuration_clipviz import CLIPVizConfig
    from modeling_clipviz import CLIPVizModel

    folder = workdir / name.replace("/", "-")
    torch.manual_seed(0)
    model = CLIPVizModel(CLIPVizConfig.from_preset(name)).eval()
    model.save_pretrained(folder)
    write_config_and_code(folder, model, torch.float32)
    write_processing_files(folder, model.config, ImageSettings())
    return folder


def scene_folder(count: int, size: int, workdir: Path) -> Path:
    path = workdir / f"scenes-{size}-{count}"
    if not path.exists():
        scenes.scene_dataset("eval", 0, count, size=size).save_to_disk(str(path))
    return path


def load(model: Path):
    from transformers import AutoModel, AutoProcessor

    loaded = AutoModel.from_pretrained(model, trust_remote_code=True).eval()
    return loaded, AutoProcessor.from_pretrained(model, trust_remote_code=True)


def dataset_rate(loaded, data: Path, method: str, batch: int, workdir: Path) -> float:
    """Images/s of explain_dataset (fixed prompts) with a loaded model, in this process."""
    output = workdir / "out"
    shutil.rmtree(output, ignore_errors=True)
    dataset = load_input(str(data))
    model, processor = loaded
    started = time.perf_counter()
    explain_dataset(dataset, output, model, [method], prompts=list(PROMPTS), batch_size=batch,
                    shard_rows=batch * max(1, 256 // batch), progress=False, processor=processor)  # fmt: skip
    return dataset.num_rows / (time.perf_counter() - started)


def loop_rate(loaded, data: Path, method: str | None, count: int) -> float:
    """Images/s of the notebook loop: per image, the processor, then once per prompt ``model.explain`` with
    ``method`` (None: a plain forward, without gradients)."""
    import datasets

    model, processor = loaded
    spec = None if method is None else parse_method(method)
    rows = load_input(str(data)).select(range(count)).cast_column("image", datasets.Image(decode=False))
    started = time.perf_counter()
    for row in rows:
        pixel_values = processor(images=decode_image(row["image"]), return_tensors="pt")["pixel_values"]
        for prompt in PROMPTS:
            text = processor.tokenizer([prompt], return_tensors="pt")
            ids, mask = text["input_ids"], text["attention_mask"]
            if spec is None:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
            else:
                model.explain(pixel_values, ids, mask, method=spec.name, **spec.options).image_maps.numpy()
    return count / (time.perf_counter() - started)


@torch.no_grad()
def forward_rate(loaded, data: Path, batch: int) -> float:
    """Images/s of plain forwards in batches of ``batch`` images, the prompts' text features computed once: no
    maps, no writing. Against ``loop_rate(..., None, ...)``, the ceiling of what batching can gain on this
    machine."""
    import datasets

    model, processor = loaded
    rows = load_input(str(data)).cast_column("image", datasets.Image(decode=False))
    text = processor.tokenizer(list(PROMPTS), padding=True, return_tensors="pt")
    started = time.perf_counter()
    model.get_text_features(text["input_ids"], text["attention_mask"])
    for begin in range(0, rows.num_rows, batch):
        images = [decode_image(row["image"]) for row in rows.select(range(begin, min(begin + batch, rows.num_rows)))]
        model.get_image_features(processor(images=images, return_tensors="pt")["pixel_values"])
    return rows.num_rows / (time.perf_counter() - started)


def process_rates(model: Path, data: Path, method: str, batch: int, processes: int, workdir: Path) -> dict[str, float]:
    """Images/s (wall time of the whole command) as 1 process x N threads and as N processes x 1 thread."""
    rows = load_input(str(data)).num_rows
    args = [str(data), "--model", str(model), "--method", method, "--batch-size", str(batch), "--shard-rows",
            str(batch), "--no-progress"] + [a for p in PROMPTS for a in ("--prompt", p)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {
        f"1 process x {processes} threads": [
            sys.executable,
            "-m",
            "clipviz.dataset_explain",
            "--threads",
            str(processes),
        ],
        f"{processes} processes x 1 thread": [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(processes),
            "--cpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "clipviz.dataset_explain",
            "--threads",
            "1",
        ],  # fmt: skip
    }
    rates = {}
    for name, command in runs.items():
        output = workdir / "out-processes"
        shutil.rmtree(output, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run([*command, args[0], str(output), *args[1:]], env=env, check=True, capture_output=True)
        rates[name] = rows / (time.perf_counter() - started)
    return rates


def forward_flops(preset: str) -> tuple[int, int]:
    """(image tower FLOPs, text tower FLOPs for one 77-token prompt) of one forward, counted on CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from configuration_clipviz import CLIPVizConfig
    from modeling_clipviz import CLIPVizModel

    model = CLIPVizModel(CLIPVizConfig.from_preset(preset)).eval()
    size = model.config.vision_config.image_size
    counts = []
    with torch.no_grad():
        for call in (
            lambda: model.get_image_features(torch.zeros(1, 3, size, size)),
            lambda: model.get_text_features(torch.ones(1, 77, dtype=torch.long)),
        ):
            with FlopCounterMode(display=False) as counter:
                call()
            counts.append(counter.get_total_flops())
    return counts[0], counts[1]


def occlusion_windows(preset: str) -> int:
    """Window positions occlusion hides one at a time on the preset's patch grid (its registry default window)."""
    from configuration_clipviz import CLIPVizConfig
    from explaining_clipviz import EXPLAIN_METHODS

    window = next(o.default for o in EXPLAIN_METHODS["occlusion"].options if o.name == "window")
    vision = CLIPVizConfig.from_preset(preset).vision_config
    return (vision.image_size // vision.patch_size - window + 1) ** 2


def paper_estimate(images: float = 1e6, gpus: int = 8, peak: float = 312e12, utilization: float = 0.4) -> str:
    """Minutes to explain ``images`` on ``gpus`` GPUs of ``peak`` dense bf16 FLOP/s at ``utilization``, per method:
    per-image forward FLOPs (image tower + one 77-token prompt) times the method's cost multiple, and the images/s
    each GPU must then be fed."""
    lines = [
        "| model | image + text GFLOPs | " + " | ".join(COST_MULTIPLE) + " |",
        "|---" * (2 + len(COST_MULTIPLE)) + "|",
    ]
    for preset in ("ViT-B/16", "ViT-L/14"):
        image, text = forward_flops(preset)
        cells = []
        for method, cost in COST_MULTIPLE.items():
            if method == "occlusion":  # one image pass per window position: measured on ViT-B/16's grid
                cost *= occlusion_windows(preset) / occlusion_windows("ViT-B/16")
            seconds = images * (image + text) * cost / (gpus * peak * utilization)
            cells.append(f"{seconds / 60:.1f} min ({images / seconds / gpus:.0f} img/s/GPU)")
        lines.append(f"| {preset} | {image / 1e9:.1f} + {text / 1e9:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["embedded", "ViT-B/16"], choices=["embedded", "ViT-B/16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--images", type=int, default=256, help="images per dataset run")
    parser.add_argument("--loop-images", type=int, default=64, help="images for the per-image loop")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    parser.add_argument(
        "--prompts", type=int, default=2, help="fixed prompts per image (the loop calls explain per prompt)"
    )
    parser.add_argument("--processes", type=int, default=0, help="also compare 1 vs N processes (0: skip)")
    parser.add_argument("--flops", action="store_true", help="also print the FLOP-based 1M-image estimate")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    PROMPTS[:] = scenes.all_captions()[: args.prompts]
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    workdir = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompts: {len(PROMPTS)} fixed")
    try:
        for name in args.models:
            model = model_folder(name, workdir)
            loaded = load(model)
            size = 64 if name == "embedded" else 224
            data = scene_folder(args.images, size, workdir)
            sizes = args.batch_sizes
            print(f"\n| {name}: images/s | " + " | ".join(f"batch {b}" for b in sizes) + " | per-image loop | "
                  + f"batch {sizes[-1]} / loop |")  # fmt: skip
            print("|---" * (len(sizes) + 3) + "|")
            for method in args.methods:
                rates = [dataset_rate(loaded, data, method, batch, workdir) for batch in sizes]
                loop = loop_rate(loaded, data, method, min(args.loop_images, args.images))
                cells = " | ".join(f"{r:.1f}" for r in rates)
                print(f"| {method} | {cells} | {loop:.1f} | {rates[-1] / loop:.1f}x |", flush=True)
            rates = [forward_rate(loaded, data, batch) for batch in sizes]
            loop = loop_rate(loaded, data, None, min(args.loop_images, args.images))
            cells = " | ".join(f"{r:.1f}" for r in rates)
            print(f"| plain forward, no maps (the ceiling) | {cells} | {loop:.1f} | {rates[-1] / loop:.1f}x |")
            if args.processes > 1:
                rates = process_rates(model, data, args.methods[0], sizes[-1], args.processes, workdir)
                print(f"\n{name}, {args.methods[0]}, batch {sizes[-1]}, {args.images} images (wall, start-up included): "
                      + ", ".join(f"{k}: {v:.1f} images/s" for k, v in rates.items()), flush=True)  # fmt: skip
        if args.flops:
            print("\nMinutes for 1M images on 8 GPUs (312 TFLOP/s dense bf16 each, A100; 40% utilization), 1 prompt:\n")
            print(paper_estimate())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
