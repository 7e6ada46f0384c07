"""Forward speed, side by side in one run: clipviz vs transformers' CLIPModel (sdpa, eager) vs OpenAI's code.

For ViT-B/16 and RN50 (transformers has no ResNet CLIP), batch 1 and 16, fp32 and bf16: the full CLIP forward
(images + as many 77-token texts), without and with attentions. Prints a markdown table and the ratios the
project targets: clipviz plain <= 1.0x the fastest peer, with attentions <= 1.05x clipviz plain, bf16 >= 2x fp32.

    python benchmarks/bench_forward.py [--repeats 7] [--archs ViT-B/16 RN50] [--batches 1 16] [--allocator tcmalloc]

Times are medians of `--repeats` interleaved rounds, each in a shuffled order (5x as many rounds at batch 1); the two
ratio columns are medians of the ratio within each round (paired), steadier on a shared machine than a ratio of two
medians.
"""

import argparse
import copy
import ctypes.util
import datetime
import os
import platform
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipviz.state_dict import from_openai_state_dict, transformers_clip_config  # noqa: E402
from configuration_clipviz import CLIPVizConfig  # noqa: E402
from tests.openai_reference import randomized_openai_clip  # noqa: E402


def interleaved_times(runs: dict, repeats: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds of each callable in every round; each round runs every callable once, in a shuffled order, so that
    slow drifts of the machine (frequency, other load) hit every implementation alike, and no implementation always
    follows the same neighbour: a call that frees hundreds of MB changes what the next call's allocations cost
    (glibc gives large freed blocks back to the OS; faulting them in again is slow on a VM)."""
    for run in runs.values():
        run()  # warm-up: first-call allocations and kernel selection
    labels = list(runs)
    times = {label: [] for label in labels}
    order = random.Random(seed)
    for _ in range(repeats):
        for label in order.sample(labels, len(labels)):
            start = time.perf_counter()
            runs[label]()
            times[label].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominators: tuple[str, ...]) -> float:
    """Median over rounds of `numerator / fastest denominator` within the same round: calls of one round are
    seconds apart, so this ratio is far steadier on a shared machine than a ratio of two medians."""
    present = [label for label in denominators if label in times]
    per_round = [times[numerator][i] / min(times[label][i] for label in present) for i in range(len(times[numerator]))]
    return statistics.median(per_round)


def transformers_clip(config: CLIPVizConfig, implementation: str, dtype):
    """transformers' CLIPModel with the same ViT architecture (random weights: only speed is compared here)."""
    from transformers import CLIPModel

    hf_config = transformers_clip_config(config)
    hf_config._attn_implementation = implementation
    return CLIPModel(hf_config).to(dtype).eval()


def inputs(config: CLIPVizConfig, batch: int, dtype):
    size = config.vision_config.image_size
    images = torch.randn(batch, 3, size, size).to(dtype)
    texts = torch.randint(1, 49405, (batch, 77))
    texts[:, 0], texts[:, 20] = 49406, 49407
    return images, texts


def openai_in_dtype(reference, dtype):
    """OpenAI's model in `dtype` the way its own fp16 conversion does it: LayerNorm parameters stay fp32."""
    model = copy.deepcopy(reference).to(dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
    return model


def call_clipviz(model, images, texts, output_attentions=False):
    return model(input_ids=texts, pixel_values=images, output_attentions=output_attentions)


def call_openai(model, images, texts):
    return model(images, texts)


def peers_for(config: CLIPVizConfig, reference, dtype) -> dict:
    """The implementations clipviz is compared with, each a callable `(images, texts)`."""
    peers = {"openai": partial(call_openai, openai_in_dtype(reference, dtype))}
    if config.vision_config.backbone == "vit":  # transformers has no ResNet CLIP
        sdpa, eager = (transformers_clip(config, impl, dtype) for impl in ("sdpa", "eager"))
        peers["transformers-sdpa"] = partial(call_clipviz, sdpa)
        peers["transformers-eager"] = partial(call_clipviz, eager)
        peers["transformers-eager+attn"] = partial(call_clipviz, eager, output_attentions=True)
    return peers


def rounds_for(batch: int, repeats: int) -> int:
    """Batch-1 calls take 0.05-0.3 s, where one scheduler hiccup moves a median of 7: give them 5x the rounds."""
    return repeats * 5 if batch == 1 else repeats


def bench_arch(name: str, batches, dtypes, repeats: int) -> list[dict]:
    config = CLIPVizConfig.from_preset(name)
    reference = randomized_openai_clip(config)
    rows = []
    for dtype in dtypes:
        ours = from_openai_state_dict(reference.state_dict(), dtype=dtype)
        runs = {
            "clipviz": partial(call_clipviz, ours),
            "clipviz+attn": partial(call_clipviz, ours, output_attentions=True),
            **peers_for(config, reference, dtype),
        }
        for batch in batches:
            images, texts = inputs(config, batch, dtype)
            row = {"arch": name, "batch": batch, "dtype": str(dtype).removeprefix("torch.")}
            with torch.no_grad():
                calls = {label: partial(run, images, texts) for label, run in runs.items()}
                times = interleaved_times(calls, rounds_for(batch, repeats))
            row.update({label: statistics.median(values) for label, values in times.items()})
            row["vs_peer"] = paired_ratio(times, "clipviz", ("openai", "transformers-sdpa", "transformers-eager"))
            row["attn_cost"] = paired_ratio(times, "clipviz+attn", ("clipviz",))
            rows.append(row)
            print(f"  measured {name} batch {batch} {row['dtype']}", file=sys.stderr, flush=True)
    return rows


# what `torch.backends.xeon.run_cpu` (PyTorch's CPU launcher) preloads, with the jemalloc settings it uses
ALLOCATORS = {
    "tcmalloc": (("tcmalloc_minimal", "tcmalloc"), {}),
    "jemalloc": (("jemalloc",), {"MALLOC_CONF": "oversize_threshold:1,background_thread:true,metadata_thp:auto"}),
}


def run_under_allocator(name: str) -> None:
    """Re-run this script with the `name` malloc preloaded (returns at once for "glibc", or once preloaded)."""
    if name == "glibc":
        return
    libraries, settings = ALLOCATORS[name]
    library = next(filter(None, map(ctypes.util.find_library, libraries)), None)
    if library is None:
        raise SystemExit(
            f"--allocator {name}: no lib{libraries[0]} found on this machine; install it (Debian: "
            "apt-get install libtcmalloc-minimal4 or libjemalloc2) or run with --allocator glibc"
        )
    if library in os.environ.get("LD_PRELOAD", ""):
        return
    env = {**settings, **os.environ, "LD_PRELOAD": " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def allocator_settings() -> str:
    """The memory-allocator settings of this run: returned attention maps are hundreds of MB of fresh memory per
    call, and whether freed memory goes back to the OS (glibc's default) decides what faulting it in costs."""
    names = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")
    settings = [f"{name}={os.environ[name]}" for name in names if os.environ.get(name)]
    return ", ".join(settings) or "glibc malloc, default settings"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(rows: list[dict]) -> str:
    peers = ("openai", "transformers-sdpa", "transformers-eager", "transformers-eager+attn")
    columns = ["arch", "batch", "dtype", "clipviz", "clipviz+attn", *peers]
    columns += ["clipviz / fastest peer", "+attn / clipviz", "bf16 speed-up"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    fp32 = {(r["arch"], r["batch"]): r["clipviz"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        speedup = ratio(fp32.get((r["arch"], r["batch"])), r["clipviz"]) if r["dtype"] == "bfloat16" else ""
        cells = [f"{r[p] * 1000:.0f} ms" if p in r else "n/a" for p in peers]
        lines.append(
            f"| {r['arch']} | {r['batch']} | {r['dtype']} | {r['clipviz'] * 1000:.0f} ms | "
            f"{r['clipviz+attn'] * 1000:.0f} ms | "
            + " | ".join(cells)
            + f" | {r['vs_peer']:.2f}x | {r['attn_cost']:.2f}x | {speedup} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["ViT-B/16", "RN50"], choices=CLIPVizConfig.PRESET_NAMES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--allocator",
        choices=["glibc", *ALLOCATORS],
        default="glibc",
        help="malloc of the run: glibc's (default) gives large freed blocks back to the OS; tcmalloc and jemalloc, "
        "which PyTorch's CPU launcher preloads, keep them",
    )
    args = parser.parse_args()
    run_under_allocator(args.allocator)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    rows = [row for name in args.archs for row in bench_arch(name, args.batches, dtypes, args.repeats)]
    print(
        f"clipviz forward benchmark, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats} interleaved rounds "
        f"({rounds_for(1, args.repeats)} at batch 1), allocator: {allocator_settings()}\n"
    )
    print(report(rows))


if __name__ == "__main__":
    main()
