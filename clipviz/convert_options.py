"""What `clipviz-convert` can be asked to do: the options of one conversion and the values its flags accept.

Imports nothing heavy (no torch, no transformers), so that the command line answers `--help` and argument errors
at once; the conversion itself is `clipviz.convert.convert_checkpoint`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

HIDDEN_ACTS = ("quick_gelu", "gelu")  # OpenAI's QuickGELU, or the exact GELU of most open_clip models
SOURCE_FORMATS = ("auto", "openai", "open_clip", "transformers")
OUTPUT_DTYPES = ("fp32", "fp16", "bf16")  # the torch dtypes: clipviz.hub_repo.DTYPES


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
