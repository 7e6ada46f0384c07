"""How much does an explanation cost next to a plain forward, and next to the naive way? One run, side by side.

Why: `explain` promises gradients only where needed: both towers run once for all image x prompt pairs, and
autograd is asked only for the tensors a method reads (for `relevance`, the attention weights from `start_layer`
on), one vmapped backward per side. The naive way, as Chefer's notebook is usually adapted, runs transformers'
`CLIPModel` (eager attention, to get the weights) and a full `backward()` per prompt.

Sizes: OpenAI's ViT-B/16 and RN50 architectures with random weights (speed does not depend on the weights), one
224x224 image, 1 and 8 prompts of 12 tokens (prompts padded to the longest, as a tokenizer with
`padding="longest"` gives; the causal text tower makes longer padding change nothing but cost). transformers has no
ModifiedResNet CLIP, so RN50's naive row is our own model with a full `backward()` per prompt.

Usage::

    python benchmarks/bench_explain.py [--repeats 5] [--threads 2] [--models ViT-B/16 RN50] [--methods gem legrad]
        [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clipviz.state_dict import transformers_clip_config  # noqa: E402
from configuration_clipviz import CLIPVizConfig  # noqa: E402
from modeling_clipviz import CLIPVizModel  # noqa: E402

PROMPT_LENGTH = 12
METHODS = {
    "ViT-B/16": [
        ("attention", {}),
        ("rollout", {}),
        ("relevance", {}),
        ("relevance", {"start_layer": 0}),
        ("gradcam", {}),
        ("legrad", {}),
        ("gem", {}),
        ("maskclip", {}),
        ("clearclip", {}),
    ],
    "RN50": [("attention", {}), ("relevance", {}), ("gradcam", {}), ("maskclip", {})],
}


def prompts(count: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``count`` random prompts in OpenAI's layout: start token, words, end-of-text (the largest id)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size - 2, (count, PROMPT_LENGTH), generator=generator)  # [T, L]
    ids[:, 0], ids[:, -1] = vocab_size - 2, vocab_size - 1
    return ids


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_interleaved(
    functions: dict[str, Callable[[], object]], repeats: int, clock: str = "wall"
) -> dict[str, float]:
    """Best time of each function over ``repeats`` rounds, after a warm-up round.

    Rounds visit every function in turn, so a burst of load from other processes hits all of them alike, and the
    minimum is the least disturbed measurement of each. ``clock="cpu"`` counts this process's CPU time instead of
    wall time: with one thread, time spent waiting for a core that other processes hold is left out (for a shared
    machine; with several threads it sums their work).
    """
    now = CLOCKS[clock]
    best = {name: float("inf") for name in functions}
    for round_index in range(repeats + 1):
        for name, function in functions.items():
            started = now()
            function()
            if round_index:  # round 0 warms up
                best[name] = min(best[name], now() - started)
    return best


def plain_forward(model, px, ids):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=px).logits_per_image


def naive_transformers(twin, px, ids, start_layer=-1):
    """Chefer's relevance the usual way: a forward with attentions and a full `backward()` for every prompt."""
    maps = []
    for t in range(ids.shape[0]):
        twin.zero_grad(set_to_none=True)
        out = twin(input_ids=ids[t : t + 1], pixel_values=px, output_attentions=True)
        attentions = out.vision_model_output.attentions
        for weights in attentions:
            weights.retain_grad()
        out.logits_per_image[0, 0].backward()
        size = attentions[0].shape[-1]
        relevance = torch.eye(size)
        for weights in attentions[start_layer % len(attentions) :]:
            cam = (weights.grad[0] * weights[0].detach()).clamp(min=0).mean(dim=0)  # [N, N]
            relevance = relevance + cam @ relevance
        maps.append(relevance[0, 1:])
    return maps


def naive_resnet(model, px, ids):
    """RN50: our model, a forward with attentions and a full `backward()` per prompt."""
    maps = []
    for t in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids[t : t + 1], pixel_values=px, output_attentions=True)
        pool = out.vision_model_output.attentions[0]
        pool.retain_grad()
        out.logits_per_image[0, 0].backward()
        maps.append((pool.grad[0] * pool[0].detach()).clamp(min=0).mean(dim=0)[0, 1:])
    return maps


def transformers_twin(model: CLIPVizModel):
    """transformers' `CLIPModel` (eager) of the same ViT architecture; random weights (speed only)."""
    import transformers

    config = transformers_clip_config(model.config)
    return transformers.CLIPModel._from_config(config, attn_implementation="eager").eval()


def label(method: str, options: dict) -> str:
    return method + "".join(f" {key}={value}" for key, value in options.items())


def bench(
    preset: str, repeats: int, counts: tuple[int, ...], only: list[str] | None = None, clock: str = "wall"
) -> list[tuple[str, dict[int, float]]]:
    """Rows of (name, {prompt count: seconds}); `only`: just these methods (the naive row comes with
    "relevance")."""
    torch.manual_seed(0)
    model = CLIPVizModel(CLIPVizConfig.from_preset(preset)).eval()
    size = model.config.vision_config.image_size
    px = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    inputs = {count: prompts(count, model.config.text_config.vocab_size) for count in counts}
    rows = {"our plain forward (sdpa, no grad)": lambda ids: plain_forward(model, px, ids)}
    methods = [(m, o) for m, o in METHODS[preset] if only is None or m in only]
    for method, options in methods:
        rows[f"explain {label(method, options)}"] = lambda ids, m=method, o=options: model.explain(
            px, ids, method=m, **o
        )
    naive = only is None or "relevance" in only
    if naive and model.config.vision_config.backbone == "vit":
        twin = transformers_twin(model)
        rows["naive: transformers CLIPModel eager + backward per prompt (relevance)"] = lambda ids: naive_transformers(
            twin, px, ids
        )
    elif naive:
        rows["naive: full backward per prompt (relevance)"] = lambda ids: naive_resnet(model, px, ids)
    functions = {(name, c): (lambda f=f, c=c: f(inputs[c])) for name, f in rows.items() for c in counts}
    best = timed_interleaved(functions, repeats, clock)
    return [(name, {c: best[(name, c)] for c in counts}) for name in rows]


def format_rows(preset: str, rows: list[tuple[str, dict[int, float]]], counts: tuple[int, ...]) -> str:
    low, high = counts[0], counts[-1]
    plain = rows[0][1]
    header = (
        f"| {preset} | {low} prompt (s) | x plain | {high} prompts (s) | x plain({high}) | {high} / {low} prompt(s) |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for name, seconds in rows:
        lines.append(
            f"| {name} | {seconds[low]:.3f} | {seconds[low] / plain[low]:.2f} | {seconds[high]:.3f} | "
            f"{seconds[high] / plain[high]:.2f} | {seconds[high] / seconds[low]:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", help="time only these methods (e.g. --methods gem maskclip)")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="wall time, or CPU time (a shared machine, --threads 1)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    counts = (1, 8)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, 1 image, prompts of {PROMPT_LENGTH} tokens; "
        f"best of {args.repeats} interleaved rounds, {args.clock} time"
    )
    for preset in args.models:
        rows = bench(preset, args.repeats, counts, args.methods, args.clock)
        print()
        print(format_rows(preset, rows, counts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
