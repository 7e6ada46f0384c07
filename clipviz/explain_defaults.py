"""Which explanation a converted checkpoint uses by default, and the evidence for it, which its model card cites.

`model.explain(...)` without `method=` runs the config's `explain_method` with its `explain_options`. The embedded
tiny models carry the best method measured on held-out scenes (`benchmarks/eval_localization.py`); a converted
OpenAI / open_clip / transformers checkpoint is a real CLIP, for which published benchmarks exist:

- ViT: LeGrad with its authors' settings (the last two blocks: `layer_index=-2` in their wrapper, our
  `start_layer=-2`). On OpenAI's ViT-B/16 the LeGrad paper reports ImageNet-Segmentation mIoU 58.7 against 47.5 for
  Chefer et al.'s relevance and 40.6 for rollout, and OpenImagesV7 p-mIoU 48.4 against 5.9 for relevance.
- ResNet: the published comparisons of these methods are on ViTs, so the best ResNet method measured by clipviz's
  held-out scene benchmark: the attention pool's gradient-weighted attention (`relevance`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExplainDefault:
    """A default explanation: the method, its options, and one sentence of evidence with its source."""

    method: str
    options: dict = field(default_factory=dict)
    evidence: str = ""


CONVERTED = {
    "vit": ExplainDefault(
        "legrad",
        {"start_layer": -2},
        "LeGrad with its authors' settings (the last two blocks, `layer_index=-2` in their wrapper): on OpenAI's "
        "ViT-B/16 its paper reports ImageNet-Segmentation mIoU 58.7 against 47.5 for Chefer et al.'s relevance and "
        "40.6 for attention rollout, and OpenImagesV7 p-mIoU 48.4 against 5.9 (Bousselham, Boggust, Chaybouti, "
        "Strobelt & Kuehne 2024, LeGrad: An Explainability Method for Vision Transformers via Feature Formation "
        "Sensitivity, arXiv 2404.03214).",
    ),
    "resnet": ExplainDefault(
        "relevance",
        {},
        "the attention pool's gradient-weighted attention (Chefer, Gur & Wolf 2021, applied to the ResNet's one "
        "attention layer). The published comparisons of these methods are on ViTs; on clipviz's held-out scene "
        "benchmark (`benchmarks/eval_localization.py`, the embedded tiny ResNet) it is the best ResNet method, "
        "pointing at the named object in every scene.",
    ),
}


def apply(config) -> ExplainDefault:
    """Set a converted model's `config.explain_method` / `explain_options` for its image tower; returns the choice."""
    choice = CONVERTED[config.vision_config.backbone]
    config.explain_method, config.explain_options = choice.method, dict(choice.options)
    return choice


def card_text(config) -> str:
    """The model card's paragraph on the default explanation of `config`."""
    choice = CONVERTED[config.vision_config.backbone]
    options = ", ".join(f"{key}={value!r}" for key, value in choice.options.items())
    call = f'method="{choice.method}"' + (f", {options}" if options else "")
    return (
        f"`model.explain(pixel_values, input_ids, attention_mask)` without `method=` runs `{call}` "
        f"(`explain_method` / `explain_options` in `config.json`; pass `method=` for another one): {choice.evidence}"
    )
