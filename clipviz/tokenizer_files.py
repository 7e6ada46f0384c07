"""Write the Hugging Face tokenizer files of OpenAI's CLIP tokenizer, built from OpenAI's own BPE merges.

The vocabulary is built exactly as OpenAI's ``SimpleTokenizer`` builds its encoder: the 256 byte symbols of
``bytes_to_unicode()``, the same with ``</w>``, one entry per merge (the first 49152-256-2 merges of
``bpe_simple_vocab_16e6.txt.gz``), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). A copy of
that file (MIT licence, see ``assets/README.md``) ships in ``clipviz/assets`` so no OpenAI package is needed.
``tokenizer.json`` holds the same pipeline transformers' ``CLIPTokenizer`` uses (NFC, whitespace runs to one
space, lower-case; OpenAI's split regex; byte-level BPE with ``</w>``; start/end tokens added around the text).

``tokenizer_config.json`` names ``CLIPTokenizer`` as its class and, in ``auto_map``, ``CLIPVizTokenizer`` from
``tokenization_clipviz.py`` (copied next to the other files), so the folder loads two ways:

* **With** ``trust_remote_code=True`` (``AutoTokenizer``, ``AutoProcessor``, ``pipeline``): ``CLIPVizTokenizer``,
  whose ids equal OpenAI's ``clip.tokenize`` on any text: it runs OpenAI's own clean-up and split in Python (see
  ``tokenization_clipviz.py``). Needs ``ftfy`` (and ``regex``, a transformers dependency), like OpenAI's tokenizer.
* **Without** it: transformers' ``CLIPTokenizer`` (``CLIPTokenizerFast`` in transformers 4). transformers has a
  local class for the configured ``CLIPTokenizer``, so it uses it without asking about the remote code. Its ids
  equal OpenAI's whenever OpenAI's clean-up (``ftfy.fix_text``, ``html.unescape`` twice, Python ``str.lower``, a
  case-insensitive split) changes nothing beyond NFC, whitespace and plain lower-casing: ordinary text,
  punctuation, accents, CJK, emoji, numbers, tabs/newlines/repeated spaces, upper case, the empty string, the
  literal special tokens. They differ on HTML entities (``&amp;``), mojibake (``cafÃ©``), curly quotes
  (``it’s``), Latin ligatures (``ﬁ``, ``ǅ``), full-width forms (``ＡＢＣ``), control and C1 characters,
  byte-order marks, terminal escapes, a capital sigma ending a word (Python gives ``ς``, the tokenizer ``σ``),
  U+0345 (OpenAI's split drops it), ``ſ`` after an apostrophe (OpenAI's case-insensitive ``'s`` takes it),
  special-token literals glued to punctuation (``.<|endoftext|>`` is plain text to OpenAI) and decomposed accents
  that ``html.unescape`` produces where ftfy skipped HTML (``<e&#769;``: the tokenizer's NFC composes them).

Both ways:

* **Padding**: ``clip.tokenize`` pads with 0, ``padding="max_length"`` pads with the pad token
  ``<|endoftext|>`` (49407) and sets ``attention_mask`` to 0 there. Both give the same text features: OpenAI's
  text tower pools at ``text.argmax(-1)``, and ``argmax`` returns the *first* maximal index, which is the real
  end-of-text token in both cases (padding comes after it, and the causal mask keeps padding from influencing
  earlier positions).
* **Truncation**: ``truncation=True, max_length=77`` keeps ``<|startoftext|>``, the first 75 text tokens and
  ``<|endoftext|>``, which is what ``clip.tokenize(..., truncate=True)`` returns (its first 76 ids plus the
  end-of-text id). Without truncation, OpenAI raises for over-long text and transformers warns and returns all ids.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from functools import cache
from pathlib import Path

import tokenization_clipviz
from tokenization_clipviz import OPENAI_SPLIT_PATTERN, openai_clean_text

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "bpe_path",
    "build_openai_vocab",
    "bytes_to_unicode",
    "load_openai_bpe_merges",
    "openai_clean_text",
    "remote_code_path",
    "write_tokenizer_files",
]

# `auto_map["AutoTokenizer"]` is a (slow, fast) pair of class references. transformers files a class under "fast"
# only when its name ends in "Fast", so its own `save_pretrained` writes this class as (class, None); writing the
# same keeps a re-saved copy identical. Both versions load slot 0 when slot 1 is empty, with any `use_fast`.
TOKENIZER_AUTO_MAP = ["tokenization_clipviz.CLIPVizTokenizer", None]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN
UNK_TOKEN = EOS_TOKEN

_NUM_MERGES = 49152 - 256 - 2  # OpenAI's vocabulary: 256 bytes x 2 + merges + 2 special tokens = 49408


def bpe_path() -> Path:
    """The shipped copy of OpenAI's ``bpe_simple_vocab_16e6.txt.gz``."""
    return Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"


@cache
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's/GPT-2's reversible map from the 256 byte values to printable characters, in OpenAI's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def load_openai_bpe_merges(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The 48 894 BPE merges OpenAI's tokenizer uses, in rank order (line 1 of the file is a version header)."""
    lines = gzip.open(path or bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != _NUM_MERGES or bad:
        raise ValueError(
            f"{path or bpe_path()} is not OpenAI's CLIP merges file: expected {_NUM_MERGES} merge "
            f"lines of two symbols, got {len(merges)} lines ({len(bad)} malformed)"
        )
    return merges  # type: ignore[return-value]


def build_openai_vocab(merges: list[tuple[str, str]] | None = None) -> dict[str, int]:
    """Token → id exactly as ``SimpleTokenizer.encoder``: bytes, bytes + ``</w>``, merges, then the two specials."""
    merges = load_openai_bpe_merges() if merges is None else merges
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(vocab)}


def _build_backend_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The ``tokenizers`` pipeline of transformers' CLIPTokenizer (the same one transformers 5 rebuilds in code and
    transformers 4 reads from tokenizer.json), so both major versions tokenize alike."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=UNK_TOKEN,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(OPENAI_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(BOS_TOKEN, special=True, normalized=True), AddedToken(EOS_TOKEN, special=True, normalized=True)]
    )
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOS_TOKEN, vocab[EOS_TOKEN]), (BOS_TOKEN, vocab[BOS_TOKEN]), trim_offsets=False, add_prefix_space=False
    )
    return tokenizer


def _special_token_entry(token: str) -> dict[str, object]:
    return {
        "content": token,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _tokenizer_config(vocab: dict[str, int], context_length: int) -> dict[str, object]:
    return {
        "tokenizer_class": "CLIPTokenizer",  # what loading without trust_remote_code falls back to
        "auto_map": {"AutoTokenizer": list(TOKENIZER_AUTO_MAP)},
        "model_max_length": context_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {str(vocab[t]): _special_token_entry(t) for t in (BOS_TOKEN, EOS_TOKEN)},
    }


def write_tokenizer_files(
    out_dir: str | os.PathLike, context_length: int = 77, merges_path: str | os.PathLike | None = None
) -> list[Path]:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer.json``, ``special_tokens_map.json``,
    ``tokenizer_config.json`` and ``tokenization_clipviz.py`` for OpenAI's CLIP tokenizer into ``out_dir``; return
    the written paths.

    ``AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)`` then loads ``CLIPVizTokenizer`` (OpenAI's
    ids), ``AutoTokenizer.from_pretrained(out_dir)`` transformers' ``CLIPTokenizer`` (``CLIPTokenizerFast`` in
    transformers 4); both with ``model_max_length=context_length``. See the module docstring.
    """
    if not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for start and end tokens), got {context_length!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = load_openai_bpe_merges(merges_path)
    vocab = build_openai_vocab(merges)
    files = {
        "vocab.json": json.dumps(vocab, indent=2, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": _dumps(
            {
                "bos_token": _special_token_entry(BOS_TOKEN),
                "eos_token": _special_token_entry(EOS_TOKEN),
                "pad_token": _special_token_entry(PAD_TOKEN),
                "unk_token": _special_token_entry(UNK_TOKEN),
            }
        ),
        "tokenizer_config.json": _dumps(_tokenizer_config(vocab, context_length)),
    }
    written = []
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    _build_backend_tokenizer(vocab, merges).save(str(out / "tokenizer.json"))
    written.append(out / "tokenizer.json")
    written.append(Path(shutil.copyfile(remote_code_path(), out / "tokenization_clipviz.py")))
    return written


def remote_code_path() -> Path:
    """``tokenization_clipviz.py``, the file ``auto_map`` points at; it must ship in the same folder."""
    return Path(tokenization_clipviz.__file__)


def _dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
