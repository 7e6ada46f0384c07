"""One attention layer, two ways, side by side: the measurements behind `modeling_clipviz`'s attention choices.

Without a graph (`--mode forward`, under `torch.no_grad`): PyTorch's SDPA vs the explicit softmax(QK^T)V the
model runs when weights are needed. `modeling_clipviz` takes the explicit one without weights only for bf16 on CPUs
with AVX-512 BF16, where it measured faster. With a graph (`--mode backward`, the weights in the autograd graph as
explanations need them, forward + backward): the explicit path on the strided q/k/v views of the fused projection
(what the model does) vs on a contiguous copy of them.

Default sizes: one ViT-B/16 layer (197 tokens, width 768, 12 heads) at batch 16.

    python benchmarks/bench_attention.py [--dtype bfloat16] [--mode forward] [--batch 16] [--repeats 15]

Prints the median time of each variant over interleaved rounds (shuffled order each round) and the median of the
per-round ratio, which is steadier on a shared machine than a ratio of medians.
"""

import argparse
import platform
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_forward import interleaved_times, paired_ratio  # noqa: E402
from modeling_clipviz import _cpu_has_avx512_bf16, multi_head_attention  # noqa: E402


def split_qkv(qkv: torch.Tensor, heads: int, contiguous: bool):
    batch, length, width3 = qkv.shape
    qkv = qkv.view(batch, length, 3, heads, width3 // (3 * heads)).permute(2, 0, 3, 1, 4)  # [3, B, heads, L, hd]
    return (qkv.contiguous() if contiguous else qkv).unbind(0)


def forward_only(qkv, heads: int, use_sdpa: bool):
    with torch.no_grad():
        return multi_head_attention(*split_qkv(qkv, heads, False), use_sdpa=use_sdpa)


def forward_backward(qkv, heads: int, contiguous: bool):
    qkv = qkv.detach().requires_grad_(True)
    context, weights = multi_head_attention(*split_qkv(qkv, heads, contiguous), need_weights=True)
    torch.autograd.grad((context.float().sum(), weights.float().sum()), qkv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--mode", default="forward", choices=["forward", "backward"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    qkv = torch.randn(args.batch, args.tokens, 3 * args.width).to(dtype)  # [B, L, 3 * width], as qkv_proj gives it
    if args.mode == "forward":
        runs = {"explicit": partial(forward_only, qkv, args.heads, False)}
        runs["sdpa"] = partial(forward_only, qkv, args.heads, True)
    else:
        runs = {"strided": partial(forward_backward, qkv, args.heads, False)}
        runs["contiguous"] = partial(forward_backward, qkv, args.heads, True)
    times = interleaved_times(runs, args.repeats)
    first, second = runs
    print(
        f"{args.mode}, {args.dtype}, batch {args.batch}, {args.tokens} tokens, width {args.width}, {args.heads} heads; "
        f"{platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, AVX-512 BF16: {_cpu_has_avx512_bf16()}, "
        f"{torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {args.repeats} rounds"
    )
    for label, values in times.items():
        print(f"  {label}: {statistics.median(values) * 1000:.1f} ms")
    print(f"  {first} / {second}: {paired_ratio(times, first, (second,)):.3f}x (median of per-round ratios)")


if __name__ == "__main__":
    main()
