"""Checkpoints for the converter tests, made here from OpenAI's reference ``clip/model.py`` with random weights.

The archives are what OpenAI publishes, in miniature: a traced ``CLIP`` saved with ``torch.jit.save`` (fp16 like the
published files, or fp32), with OpenAI's 49408-token vocabulary so that the converted folders get tokenizer files.
Tiny widths need explicit head counts (OpenAI derives them from the width), hence ``HEAD_FLAGS``.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from clipviz.openai_clip import openai_model_module
from configuration_clipviz import CLIPVizConfig
from tests.helpers import pixels, tiny_config, token_ids
from tests.openai_reference import randomized_openai_clip

OPENAI_VOCAB = 49408
HEAD_FLAGS = ["--text-heads", "4", "--vision-heads", "4"]


def tiny_openai_config(backbone: str) -> CLIPVizConfig:
    """conftest's tiny architecture with OpenAI's vocabulary (a 12.6 MB embedding: still fast)."""
    config = tiny_config(backbone)
    text = config.text_config
    text.vocab_size, text.bos_token_id, text.eos_token_id = OPENAI_VOCAB, OPENAI_VOCAB - 2, OPENAI_VOCAB - 1
    return config


@dataclass
class Archive:
    path: Path
    config: CLIPVizConfig
    reference: torch.nn.Module  # OpenAI's CLIP in float32 holding exactly the archive's values

    def inputs(self, texts: int = 3, images: int = 2) -> dict[str, torch.Tensor]:
        size = self.config.vision_config.image_size
        return {"input_ids": token_ids(texts, vocab=OPENAI_VOCAB), "pixel_values": pixels(images, size)}

    def expected_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.reference(inputs["pixel_values"], inputs["input_ids"])[0]


def make_archive(path: Path, backbone: str, fp16: bool, seed: int = 0) -> Archive:
    """Trace OpenAI's CLIP (random weights) and save it as a TorchScript archive, fp16 as OpenAI's files are."""
    return make_archive_from_config(path, tiny_openai_config(backbone), fp16, seed, archive=True)


def make_archive_from_config(path: Path, config: CLIPVizConfig, fp16: bool = False, seed: int = 0, archive=False):
    """`make_archive` for any tiny config (e.g. head counts other than OpenAI's rule); returns the path, or the
    `Archive` with `archive=True`."""
    model = randomized_openai_clip(config, seed=seed)
    image = pixels(1, config.vision_config.image_size)
    if fp16:
        openai_model_module().convert_weights(model)
        image = image.half()
    with torch.no_grad():
        traced = torch.jit.trace(model, (image, token_ids(1, vocab=OPENAI_VOCAB)), check_trace=False)
    torch.jit.save(traced, str(path))
    return Archive(path, config, model.float()) if archive else path
