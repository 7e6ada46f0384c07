"""What `clipviz-convert` can be asked to do: the options of one conversion and the values its flags accept.

Imports nothing heavy (no torch, no transformers), so that the command line answers `--help` and argument errors
at once; the conversion itself is `clipviz.convert.convert_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

HIDDEN_ACTS = ("quick_gelu", "gelu")  # OpenAI's QuickGELU, or the exact GELU of most open_clip models
SOURCE_FORMATS = ("auto", "openai", "open_clip", "transformers")
OUTPUT_DTYPES = ("fp32", "fp16", "bf16")  # the torch dtypes: clipviz.hub_repo.DTYPES
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
MIN_SHARD_SIZE = 10**3  # below 1 KB every tensor would get a shard of its own


@dataclasses.dataclass
class ConvertOptions:
    """What `clipviz-convert` was asked to do; the fields mirror the command-line flags."""

    output_dir: Path
    source: str | None = None
    openai_model: str | None = None
    source_format: str = "auto"
    source_revision: str | None = None
    hidden_act: str | None = None
    text_heads: int | None = None
    vision_heads: int | None = None
    cache_dir: str | None = None
    download_base_url: str | None = None
    dtype: str = "fp32"
    max_shard_size: int | None = None
    overwrite: bool = False
    license: str | None = None
    base_model: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None


def parse_size(text: str | int) -> int:
    """Bytes from "500MB", "2GB", "1.5GiB" or a plain number (decimal units as transformers, binary with `i`)."""
    if isinstance(text, int):
        text = str(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if not match:
        raise ValueError(f"--max-shard-size must look like 500MB, 2GB or 1GiB, got {text!r}.")
    size = int(float(match[1]) * SIZE_UNITS[match[2] or ""])
    if size < MIN_SHARD_SIZE:
        raise ValueError(
            f"--max-shard-size {text} is {size} bytes; it must be at least 1KB (shards are meant to be hundreds of "
            "MB, e.g. 500MB or 2GB)."
        )
    return size
