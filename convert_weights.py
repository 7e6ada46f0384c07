"""`clipviz-convert`: the command line of the CLIP checkpoint converter (`python convert_weights.py --help`).

Any supported checkpoint (OpenAI .pt, state dict, safetensors, transformers CLIPModel, open_clip) -> a verified Hub
repo folder -> the Hub. This file only parses the flags and prints the outcome; the work is done by the `clipviz`
package (`clipviz.convert.convert_checkpoint`, the key tables in `clipviz.state_dict`). Nothing heavy is imported
before the flags are parsed, so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from clipviz.convert_options import HIDDEN_ACTS, OUTPUT_DTYPES, SOURCE_FORMATS, ConvertOptions, parse_size

EXAMPLES = """\
examples:
  # OpenAI's published ViT-B/32: download, check its SHA-256, convert, verify
  clipviz-convert --model ViT-B/32 --output-dir clipviz-vit-b-32

  # ... and push it (token from `hf auth login` or HF_TOKEN)
  clipviz-convert --model ViT-B/32 --output-dir clipviz-vit-b-32 --push-to-hub my-org/clipviz-vit-b-32

  # a local OpenAI .pt file, in half precision, in shards of at most 500 MB
  clipviz-convert ~/.cache/clip/RN50.pt --output-dir clipviz-rn50 --dtype fp16 --max-shard-size 500MB

  # a transformers CLIP checkpoint, from the Hub or a local folder
  clipviz-convert openai/clip-vit-large-patch14 --output-dir clipviz-vit-l-14

  # an open_clip training checkpoint of an OpenAI-architecture model trained with GELU
  clipviz-convert epoch_32.pt --source-format open_clip --hidden-act gelu --license mit --output-dir my-clip

  # push to a branch, or open a pull request instead of committing to main
  clipviz-convert --model RN50 --output-dir clipviz-rn50 --push-to-hub my-org/clipviz-rn50 --revision fp32
  clipviz-convert --model RN50 --output-dir clipviz-rn50 --push-to-hub my-org/clipviz-rn50 --create-pr --overwrite

Checkpoints are never executed: OpenAI's TorchScript archives are read with a restricted unpickler, other pickles
only with torch.load(weights_only=True). The output folder appears only once the conversion has been verified.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipviz-convert",
        description=(
            "Convert a CLIP checkpoint (OpenAI .pt, state dict, safetensors, transformers CLIPModel, open_clip) into "
            "a verified Hugging Face Hub repo folder for clipviz, and optionally push it."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("source (give a SOURCE or --model)")
    source.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="checkpoint file (.pt TorchScript archive, .pt/.bin state dict, .safetensors), a folder (transformers "
        "CLIPModel or open_clip), or a Hub repo id, e.g. openai/clip-vit-base-patch32",
    )
    source.add_argument(
        "--model",
        dest="openai_model",
        metavar="NAME",
        help="download one of OpenAI's published checkpoints and verify its SHA-256, e.g. --model ViT-B/32 "
        "(RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px)",
    )
    source.add_argument(
        "--source-format",
        choices=SOURCE_FORMATS,
        default="auto",
        help="how to read SOURCE (default: auto, decided from the files), e.g. --source-format open_clip",
    )
    source.add_argument(
        "--source-revision", metavar="REV", help="revision of a Hub repo SOURCE, e.g. --source-revision main"
    )
    source.add_argument(
        "--hidden-act",
        choices=HIDDEN_ACTS,
        help="MLP activation when the checkpoint does not record it (OpenAI: quick_gelu; most open_clip models: "
        "gelu), e.g. --hidden-act gelu",
    )
    source.add_argument(
        "--text-heads",
        type=_positive_int,
        metavar="N",
        help="text attention heads when the checkpoint does not record them (default width/64), e.g. --text-heads 8",
    )
    source.add_argument(
        "--vision-heads",
        type=_positive_int,
        metavar="N",
        help="image attention heads when the checkpoint does not record them (default width/64), e.g. --vision-heads 16",
    )
    source.add_argument(
        "--cache-dir", metavar="DIR", help="download cache (default: the Hugging Face cache), e.g. --cache-dir /data/hf"
    )
    source.add_argument(
        "--download-base-url",
        metavar="URL",
        help="mirror of OpenAI's download host for --model (also CLIPVIZ_OPENAI_BASE_URL), e.g. "
        "--download-base-url http://mirror.local:8000",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--output-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder to create, e.g. --output-dir clipviz-vit-b-32",
    )
    output.add_argument(
        "--dtype",
        choices=OUTPUT_DTYPES,
        default="fp32",
        help="dtype of the saved weights (default fp32; OpenAI's fp16 files convert to fp32 exactly), e.g. --dtype fp16",
    )
    output.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="split the weights into shards of at most SIZE plus model.safetensors.index.json, e.g. --max-shard-size 2GB",
    )
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output-dir (only once the new folder is verified)",
    )
    card = parser.add_argument_group("model card")
    card.add_argument(
        "--license",
        metavar="ID",
        help="license of the weights (default: mit for OpenAI's, else from the source), e.g. --license mit",
    )
    card.add_argument(
        "--base-model",
        metavar="REPO",
        help="Hub repo the weights come from, e.g. --base-model openai/clip-vit-base-patch32",
    )
    card.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="TAG",
        help="extra card tag (repeatable), e.g. --tag vision",
    )
    hub = parser.add_argument_group(
        "push to the Hub (token from `hf auth login` or HF_TOKEN, endpoint from HF_ENDPOINT)"
    )
    hub.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="create the repo if needed and upload the folder in one commit, e.g. --push-to-hub my-org/clipviz-vit-b-32",
    )
    hub.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)"
    )
    hub.add_argument(
        "--revision",
        metavar="BRANCH",
        help="push to this branch (created from main when missing) or to refs/pr/N, e.g. --revision fp16",
    )
    hub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    hub.add_argument(
        "--commit-message", metavar="TEXT", help='commit title, e.g. --commit-message "Add ViT-B/32 in fp16"'
    )
    return parser


def options_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ConvertOptions:
    """The parsed flags as `ConvertOptions`; a flag that argparse cannot check alone ends in `parser.error`."""
    if (args.source is None) == (args.openai_model is None):
        parser.error("give either a SOURCE or --model NAME (exactly one)")
    fields = {field.name for field in dataclasses.fields(ConvertOptions)}
    options = ConvertOptions(**{name: value for name, value in vars(args).items() if name in fields})
    if options.max_shard_size is not None:
        try:
            options.max_shard_size = parse_size(options.max_shard_size)
        except ValueError as error:
            parser.error(str(error))
    return options


def print_summary(result) -> None:
    """What was converted, how it was checked, and where it went (`result`: a `clipviz.convert.ConversionResult`)."""
    from clipviz.verify import parity_table

    files = len(list(result.output_dir.iterdir()))
    report = result.report
    lines = [
        "",
        f"Converted {result.source_description}",
        f"  architecture  {result.architecture}",
        f"  parameters    {result.parameters:,}",
        f"  weights       {str(result.dtype).removeprefix('torch.')}, {len(result.weight_files)} file(s), "
        f"{result.weight_bytes / 1e6:,.1f} MB (source {result.source_bytes / 1e6:,.1f} MB)",
        f"  output        {result.output_dir} ({files} files)",
        f"  verified      {report.tensors_checked} tensors bitwise equal after reload, {report.attention_maps} attention "
        "maps with rows summing to 1, outputs finite",
        f"  time          {result.seconds:.1f} s",
        "",
        f"Parity with independent implementations on the same weights in {str(result.dtype).removeprefix('torch.')} "
        f"({report.probe}):",
        parity_table(report.parity, markdown=False),
    ]
    if result.push is not None:
        pushed = result.push
        if pushed.pull_request_url:
            lines += ["", f"Opened pull request {pushed.pull_request_url} (commit {pushed.commit_oid[:12]})"]
        elif pushed.created_commit:
            lines += ["", f"Pushed to {pushed.repo_url} ({pushed.revision}, commit {pushed.commit_oid[:12]})"]
        else:
            lines += ["", f"{pushed.repo_url} ({pushed.revision}) already holds this content: no new commit"]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """`clipviz-convert`: returns the exit status (0 done, 1 conversion or push failed, 2 bad arguments)."""
    parser = build_parser()
    options = options_from_args(parser, parser.parse_args(argv))

    from clipviz.checkpoint_io import DownloadError  # CheckpointError, SourceError, ... are ValueErrors
    from clipviz.convert import convert_checkpoint
    from clipviz.push import PushError
    from clipviz.state_dict import CheckpointKeyError
    from clipviz.verify import VerificationError

    try:
        result = convert_checkpoint(options)
    except PushError as error:
        converted = Path(options.output_dir).expanduser()
        where = (
            f" The verified conversion is in {converted}; run again with --overwrite to retry."
            if converted.is_dir()
            else ""
        )
        print(f"error: {error}{where}", file=sys.stderr)
        return 1
    except (ValueError, CheckpointKeyError, DownloadError, VerificationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
