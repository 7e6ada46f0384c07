"""The README.md model card of a converted repo: Hub metadata, a runnable snippet, and this conversion's checks.

The card holds nothing that changes between two identical conversions (no dates, no local paths), so pushing the
same conversion twice leaves the repo unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clipviz.verify import VerificationReport, format_figure, parity_table

BASE_TAGS = ("clip", "clipviz", "zero-shot-image-classification", "attention-visualization", "custom_code")

CITATION = """@inproceedings{radford2021learning,
  title     = {Learning Transferable Visual Models From Natural Language Supervision},
  author    = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and
               Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and
               Krueger, Gretchen and Sutskever, Ilya},
  booktitle = {International Conference on Machine Learning},
  year      = {2021}
}"""


@dataclass
class CardInfo:
    """Everything the card states; filled by the converter from the source, the config and the verification."""

    title: str
    repo_id: str
    source_description: str
    source_sha256: str | None
    license: str
    base_model: str | None
    architecture: list[tuple[str, str]]
    dtype_name: str
    weight_files: list[str]
    weight_bytes: int
    report: VerificationReport
    has_tokenizer: bool
    image_size: int
    bos_eos: tuple[int, int]
    extra_tags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    openai_weights: bool = False  # the weights are OpenAI's own (a published checkpoint or its Hub copy)


def count(n: int, noun: str) -> str:
    """ "1 head", "2 heads", "0 heads": the card's numbers with their nouns (English plurals in -s only)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def render(info: CardInfo) -> str:
    """The full README.md text."""
    parts = [
        _front_matter(info),
        f"# {info.title}\n",
        _introduction(info),
        "## Usage\n",
        _snippet(info),
        "## Architecture\n",
        _architecture_table(info),
        "## Conversion checks\n",
        _checks(info),
        "## License and citation\n",
        f"The weights keep the license of their source ({info.license}). CLIP is described in:\n",
        f"```bibtex\n{CITATION}\n```\n",
    ]
    return "\n".join(parts)


def _front_matter(info: CardInfo) -> str:
    tags = list(dict.fromkeys([*BASE_TAGS, *info.extra_tags]))
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: zero-shot-image-classification",
        f"license: {info.license}",
    ]
    lines += ["tags:", *(f"- {tag}" for tag in tags)]
    if info.base_model:
        lines.append(f"base_model: {info.base_model}")
    return "\n".join([*lines, "---", ""])


def _introduction(info: CardInfo) -> str:
    what = "OpenAI's CLIP" if info.openai_weights else "A CLIP model (OpenAI's CLIP architecture, not OpenAI's weights)"
    lines = [
        f"{what} as a transformers model that can return every attention map "
        "(`output_attentions=True`), for attention visualization and relevance maps. The code "
        "(`modeling_clipviz.py`, `configuration_clipviz.py`, ...) ships in this repo: load it with "
        "`trust_remote_code=True`.",
        "",
        f"- Converted from: {info.source_description}",
    ]
    if info.source_sha256:
        lines.append(f"- Source SHA-256: `{info.source_sha256}`")
    if info.base_model:
        lines.append(f"- Same weights as: [{info.base_model}](https://huggingface.co/{info.base_model})")
    lines += [f"- Note: {note}" for note in info.notes]
    return "\n".join(lines) + "\n"


def _snippet(info: CardInfo) -> str:
    size = info.image_size
    if info.has_tokenizer:
        body = f'''# pip install torch transformers pillow ftfy regex  (ftfy and regex: OpenAI's exact tokenizer)
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

repo = "{info.repo_id}"
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

image = Image.new("RGB", ({size}, {size}), (220, 40, 40))  # or Image.open("photo.jpg")
labels = ["a red image", "a blue image", "a photo of a dog"]
inputs = processor(text=labels, images=image, return_tensors="pt", padding=True)
with torch.no_grad():
    out = model(**inputs, output_attentions=True)
print(out.logits_per_image.softmax(dim=-1))
print(len(out.vision_model_output.attentions), out.vision_model_output.attentions[-1].shape)
print(len(out.text_model_output.attentions), out.text_model_output.attentions[-1].shape)

classifier = pipeline("zero-shot-image-classification", model=repo, trust_remote_code=True)
print(classifier(image, candidate_labels=labels))'''
    else:
        bos, eos = info.bos_eos
        body = f'''import torch
from transformers import AutoModel

repo = "{info.repo_id}"
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
pixel_values = torch.randn(1, 3, {size}, {size})  # normalized images
input_ids = torch.tensor([[{bos}, 1, 2, 3, {eos}]])  # this model's own vocabulary: no tokenizer is bundled
with torch.no_grad():
    out = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True)
print(out.logits_per_image)
print(len(out.vision_model_output.attentions), out.vision_model_output.attentions[-1].shape)'''
    return f"```python\n{body}\n```\n"


def _architecture_table(info: CardInfo) -> str:
    rows = [*info.architecture, ("Weights", _weights_line(info))]
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]) + "\n"


def _all(n: int, noun: str, verb: bool = True) -> str:
    """ "all 5 saved tensors are" / "the 1 saved tensor is" (without the verb when `verb` is False)."""
    words = f"all {count(n, noun)}" if n != 1 else f"the {count(n, noun)}"
    return f"{words} {'is' if n == 1 else 'are'}" if verb else words


def _weights_line(info: CardInfo) -> str:
    files = info.weight_files[0] if len(info.weight_files) == 1 else count(len(info.weight_files), "shard")
    return f"{info.dtype_name}, safetensors ({files}, {info.weight_bytes / 1e6:,.1f} MB)"


def _checks(info: CardInfo) -> str:
    report = info.report
    lines = [
        "Measured while converting, after reloading this folder with "
        "`AutoModel.from_pretrained(..., trust_remote_code=True)`:",
        "",
        f"- {_all(report.tensors_checked, 'saved tensor')} bitwise identical to the source "
        f"(converted to {info.dtype_name})",
        f"- outputs are finite and the rows of {_all(report.attention_maps, 'attention map', verb=False)} sum to 1 "
        f"(largest deviation {format_figure(report.attention_row_error)})",
        f"- parity with independent implementations run on the same weights in {info.dtype_name}, on "
        f"{report.probe} (max abs differences of L2-normalized embeddings and of logits):",
        "",
        parity_table(report.parity, markdown=True),
    ]
    return "\n".join(lines) + "\n"


__all__ = ["CardInfo", "count", "render"]
