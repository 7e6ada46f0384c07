"""Peak memory and time of `clipviz-convert` on a full-size ViT-L/14 checkpoint (random weights).

The archive is made like OpenAI's published files: OpenAI's reference `clip/model.py` CLIP(ViT-L/14) is traced and
saved with `torch.jit.save`, in fp16 (OpenAI's `convert_weights`, as published) or fp32. Each step runs in its own
subprocess; the conversion process reports its own peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which
includes the Python, torch and transformers imports, about 0.4 GB) and its RSS right after those imports. The goal
is a peak of at most 1.3x the checkpoint's size in bytes. The script prints the ratio with and without the imports,
and the floor any converter that verifies by reloading the model has: imports + the written weights, which must all
be resident for the verification forward pass (for OpenAI's fp16 ViT-L/14 that floor alone is above 1.3x).

    python benchmarks/bench_convert.py                        # fp16 archive -> fp16 repo (OpenAI's file, kept as is)
    python benchmarks/bench_convert.py --archive-dtype fp32 --dtype fp32
    python benchmarks/bench_convert.py --work-dir /data/bench --keep   # reuse the archive between runs

Needs about 3 GB of free disk in --work-dir and 4-6 GB of RAM; takes minutes on a laptop CPU.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.3

MAKE_ARCHIVE = textwrap.dedent(
    """
    import sys, torch
    from clipviz.openai_clip import openai_model_module
    path, dtype = sys.argv[1:3]
    torch.manual_seed(0)
    module = openai_model_module()
    with torch.no_grad():
        model = module.CLIP(768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12).eval()  # OpenAI's ViT-L/14
        image = torch.randn(1, 3, 224, 224)
        if dtype == "fp16":
            module.convert_weights(model)
            image = image.half()
        traced = torch.jit.trace(model, (image, torch.randint(0, 49408, (1, 77))), check_trace=False)
    torch.jit.save(traced, path)
    """
)

CONVERT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch, transformers
    import convert_weights
    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    code = convert_weights.main(sys.argv[1:])
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("BENCH " + json.dumps({"code": code, "seconds": seconds, "peak_rss": peak, "after_imports": after_imports}))
    """
)


def make_archive(path: Path, dtype: str) -> None:
    print(f"Tracing OpenAI's ViT-L/14 ({dtype}) into {path} ...", flush=True)
    subprocess.run([sys.executable, "-c", MAKE_ARCHIVE, str(path), dtype], cwd=REPO_ROOT, check=True)


def convert(archive: Path, output: Path, dtype: str, extra: list[str]) -> dict:
    args = [str(archive), "--output-dir", str(output), "--dtype", dtype, "--overwrite", *extra]
    run = subprocess.run([sys.executable, "-c", CONVERT, *args], cwd=REPO_ROOT, capture_output=True, text=True)
    sys.stderr.write(run.stderr[-4000:])
    lines = [line for line in run.stdout.splitlines() if line.startswith("BENCH ")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"conversion failed (exit {run.returncode}):\n{run.stdout[-3000:]}")
    print("\n".join(line for line in run.stdout.splitlines() if not line.startswith("BENCH ")))
    return json.loads(lines[-1].removeprefix("BENCH "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive-dtype", choices=("fp16", "fp32"), default="fp16", help="dtype of the traced archive")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="--dtype of the conversion")
    parser.add_argument("--work-dir", type=Path, help="where the archive and the output go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep --work-dir (and reuse its archive next time)")
    parser.add_argument("extra", nargs="*", help="further clipviz-convert flags, after --")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="clipviz-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    archive = work / f"ViT-L-14-random-{args.archive_dtype}.pt"
    try:
        if not archive.is_file():
            make_archive(archive, args.archive_dtype)
        size = archive.stat().st_size
        output = work / f"clipviz-vit-l-14-{args.dtype}"
        result = convert(archive, output, args.dtype, args.extra)
        weight_bytes = sum(path.stat().st_size for path in output.glob("model*.safetensors"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ratio = result["peak_rss"] / size
    print()
    print(f"checkpoint       {size / 1e9:.3f} GB ({args.archive_dtype} TorchScript archive)")
    print(f"conversion       --dtype {args.dtype}, {result['seconds']:.1f} s")
    print(f"RSS after imports {result['after_imports'] / 1e9:.3f} GB")
    print(f"peak RSS         {result['peak_rss'] / 1e9:.3f} GB")
    print(f"peak / checkpoint {ratio:.2f}x (goal <= {GOAL_RATIO}x: {'met' if ratio <= GOAL_RATIO else 'NOT met'})")
    own = (result["peak_rss"] - result["after_imports"]) / size
    print(
        f"(peak - RSS after imports) / checkpoint {own:.2f}x: the conversion's own memory, without the interpreter "
        f"(goal <= {GOAL_RATIO}x: {'met' if own <= GOAL_RATIO else 'NOT met'})"
    )
    floor = (result["after_imports"] + weight_bytes) / size
    print(f"floor: (RSS after imports + written weights {weight_bytes / 1e9:.3f} GB) / checkpoint {floor:.2f}x")


if __name__ == "__main__":
    main()
