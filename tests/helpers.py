"""Shared test helpers: tiny configurations (hidden <= 64, <= 2 layers), tiny random models and saved model folders,
inputs in OpenAI's token layout. Tests import them with ``from tests.helpers import ...``; ``conftest.py`` holds only
fixtures (never import from it)."""

from pathlib import Path

import torch

from clipviz.openai_clip import OPENAI_MEAN, OPENAI_STD
from configuration_clipviz import CLIPVizConfig
from modeling_clipviz import CLIPVizModel

TINY_VOCAB = 1000  # ids 998 / 999 play <|startoftext|> / <|endoftext|>
TINY_TEXT = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "bos_token_id": TINY_VOCAB - 2,
    "eos_token_id": TINY_VOCAB - 1,
}
TINY_VISION = {
    "vit": {
        "backbone": "vit",
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "resnet": {
        "backbone": "resnet",
        "image_size": 64,
        "resnet_layers": [1, 1, 2, 1],
        "resnet_width": 2,
        "num_attention_heads": 4,
    },
}
BACKBONES = tuple(TINY_VISION)


def tiny_config(backbone: str, **overrides) -> CLIPVizConfig:
    return CLIPVizConfig(
        text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION[backbone]), projection_dim=32, **overrides
    )


def tiny_model(backbone: str, attn_implementation: str | None = None, seed: int = 0) -> CLIPVizModel:
    torch.manual_seed(seed)
    config = tiny_config(backbone)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return randomize_biases(CLIPVizModel(config).eval())


def randomize_biases(model: CLIPVizModel) -> CLIPVizModel:
    """OpenAI's init zeroes biases and each block's last BatchNorm: add noise to every 1-d parameter (but the class
    embedding) so every path carries signal. In place, with the global torch generator; returns ``model``."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "class_embedding" not in name:
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
    return model


def token_ids(num_texts: int, length: int = 77, vocab: int = TINY_VOCAB, seed: int = 1) -> torch.Tensor:
    """Texts as OpenAI tokenizes them: <sot>, words, <eot>, zero padding; lengths vary per row."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(num_texts, length, dtype=torch.long)
    for row in range(num_texts):
        words = 3 + (5 * row) % (length - 5)
        ids[row, 0] = vocab - 2
        ids[row, 1 : words + 1] = torch.randint(1, vocab - 2, (words,), generator=generator)
        ids[row, words + 1] = vocab - 1
    return ids


def pixels(num_images: int, size: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(seed))


def scaled(x: torch.Tensor) -> torch.Tensor:
    """A map as `explain` scales it: clamped at 0, divided by its maximum (an all-zero map stays zero)."""
    x = x.clamp(min=0)
    return x / x.max() if x.max() > 0 else x


CLIP_VOCAB = 49408  # OpenAI's BPE vocabulary: what the real tokenizer files need


def save_tiny_model(folder: Path, backbone: str, seed: int = 0, **text_overrides) -> Path:
    """A complete model folder: a tiny random clipviz model with CLIP's real vocabulary, tokenizer files and
    ``preprocessor_config.json``, loadable as the Space loads it (``AutoModel.from_pretrained(folder,
    trust_remote_code=True)``). Biases are randomised (``randomize_biases``)."""
    from transformers import CLIPImageProcessor

    from clipviz.tokenizer_files import write_tokenizer_files

    text = {**TINY_TEXT, "vocab_size": CLIP_VOCAB, "bos_token_id": CLIP_VOCAB - 2, "eos_token_id": CLIP_VOCAB - 1}
    text.update(text_overrides)
    config = CLIPVizConfig(text_config=text, vision_config=dict(TINY_VISION[backbone]), projection_dim=32)
    torch.manual_seed(seed)
    model = randomize_biases(CLIPVizModel(config).eval())
    model.save_pretrained(folder)
    write_tokenizer_files(folder)
    size = config.vision_config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD), resample=3,
    ).save_pretrained(folder)  # fmt: skip
    return folder


# ---- OpenAI's tokenizer as the oracle (``simple_tokenizer``: the fixture in conftest.py) ----

SOT, EOT = 49406, 49407

# Texts on which transformers' CLIPTokenizer gives exactly OpenAI's ids.
SAME = [
    "a photo of a cat",
    "A PHOTO OF A DOG, IN UPPER CASE",
    "Hello, World!!! ... ?!? (parentheses) [brackets] {braces} #hash @at $5 50% a+b=c ~tilde~ `code`",
    "don't can't we'll I'M they've she's you'd I'd've",
    "rock'n'roll o'clock 'quoted' \"double\"",
    "café naïve résumé Ångström Zürich façade jalapeño",
    "e\u0301 decomposed accent (NFC composes it on both sides)",
    "東京タワーの写真 中文字符 한국어 문장",
    "Привет мир, Ελληνικά γράμματα, עברית, العربية, हिन्दी",
    "🐱🐶 emoji 👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
    "a\t\tb\n\nc   d \r\n e\u00a0f\u3000g\u2028h",
    "   leading and trailing spaces   ",
    "",
    "   ",
    "3.14159 1234567 2024-01-01 10,000 ½ ² Ⅻ",
    "İstanbul ß ẞ straße",
    "<|endoftext|> literal special tokens <|startoftext|>",
    "<|ENDOFTEXT|> upper-case special token",
    "x\u200by zero-width space, a\u200db joiner",
    "snake_case CamelCase kebab-case dot.separated path/to/file.png https://example.com/?q=1&r=2",
    "AT&T R&D Q&A",
]

# Texts where OpenAI's clean-up (ftfy, html.unescape, str.lower) or its case-insensitive split differ from the
# CLIPTokenizer pipeline, so its ids differ (CLIPVizTokenizer gets them right). Documented in tokenizer_files.py.
DIFFERENT = [
    "fish &amp; chips &lt;b&gt; &quot;hi&quot; &#39;x&#39;",  # HTML entities
    "&amp;amp;amp; nested entity",
    "cafÃ© mojibake, donâ€™t",  # mojibake that ftfy repairs
    "it’s a “curly” ‘quote’",  # ftfy uncurls quotes
    "ﬁsh ﬂower ǅ",  # Latin ligatures
    "ＡＢＣ full-width １２３",  # full-width forms
    "a\x1cb control char \x7f",  # control characters ftfy removes
    "a\x85b C1 control",  # C1 control ftfy reads as windows-1252
    "\ufeffbyte order mark",
    "\x1b[31mred\x1b[0m terminal escapes",
    "ΟΔΟΣ final capital sigma",  # Python str.lower gives final ς
    "a\u0345b ypogegrammeni",  # dropped by OpenAI's case-insensitive regex
    "it'ſ long s",  # OpenAI's case-insensitive 's takes 'ſ
    "a.<|endoftext|>b",  # glued to punctuation, the literal is plain text to OpenAI
    "<e&#769;",  # '<' stops ftfy's HTML decoding; html.unescape leaves e + U+0301, which NFC would compose
]


def openai_ids(simple_tokenizer, text):
    return [SOT, *simple_tokenizer.encode(text), EOT]


def openai_tokenize(simple_tokenizer, texts, context_length=77, truncate=False):
    """OpenAI's ``clip.tokenize``, line for line."""
    result = torch.zeros(len(texts), context_length, dtype=torch.int)
    for i, text in enumerate(texts):
        tokens = openai_ids(simple_tokenizer, text)
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            tokens = tokens[:context_length]
            tokens[-1] = EOT
        result[i, : len(tokens)] = torch.tensor(tokens)
    return result
