"""OpenAI's CLIP tokenizer as a transformers tokenizer that gives exactly the ids of OpenAI's ``SimpleTokenizer``.

This file ships to the Hub as remote code next to ``modeling_clipviz.py``: it imports only the standard library,
transformers and tokenizers, plus ``ftfy`` and ``regex`` (OpenAI's own tokenizer dependencies) inside
``try``/``except`` so that the module always imports; ``CLIPVizTokenizer`` raises a clear ``ImportError`` when
it is built without them.

Why a subclass: transformers' ``CLIPTokenizer`` reproduces OpenAI's tokenizer only where OpenAI's text clean-up
is a no-op. OpenAI's ``SimpleTokenizer.encode`` runs ``ftfy.fix_text``, ``html.unescape`` twice, collapses
whitespace, lower-cases with Python's ``str.lower`` and splits with a *case-insensitive* ``regex`` pattern; none
of that fits a ``tokenizers`` normalizer (HTML entities, mojibake, curly quotes, ligatures, full-width forms,
control characters, final capital sigma, ``ſ`` matching ``s`` in ``'s``, U+0345 matching nothing, special tokens
glued to punctuation, NFC composing what ``html.unescape`` left decomposed). So ``CLIPVizTokenizer`` does OpenAI's
cleaning and splitting in Python, with OpenAI's code path, and hands the backend the pieces joined by single
spaces; its backend then only splits on those spaces and runs byte-level BPE, as OpenAI's ``bpe`` does per piece.
The result is OpenAI's ids, wrapped in ``<|startoftext|>``/``<|endoftext|>`` like ``clip.tokenize``.

Consequences worth knowing:

* ``return_offsets_mapping`` offsets index the cleaned, re-joined text, not the caller's raw string.
* Pre-tokenized input (``is_split_into_words=True``) is cleaned and split word by word: each word gives the ids
  OpenAI gives that word on its own.
* ``backend_tokenizer`` expects that pre-split text; call the tokenizer itself (``tok(text)``, ``tok.tokenize``,
  ``tok.encode``), which every transformers entry point (processors, pipelines) does.
* ``save_pretrained`` writes ``tokenizer.json`` with transformers' standard CLIP pipeline (this class swaps in its
  own at load time), so loaders that read the file's pipeline without this class stay close to OpenAI, not far off.
  Like any custom tokenizer, the saved ``tokenizer_config.json`` names ``CLIPVizTokenizer``, so loading the copy
  needs ``trust_remote_code=True``.
"""

from __future__ import annotations

import html
import logging
from contextlib import contextmanager
from functools import cache

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizerFast  # transformers 5: an alias of the tokenizers-backed `CLIPTokenizer`

try:
    import ftfy
except ImportError:  # checked when a tokenizer is built, so that importing this module never fails
    ftfy = None
try:
    import regex  # OpenAI's split pattern needs \p{..} classes and this module's case-insensitive matching
except ImportError:
    regex = None

__all__ = ["OPENAI_SPLIT_PATTERN", "CLIPVizTokenizer", "openai_clean_text", "openai_pieces"]

# OpenAI's pre-tokenization pattern (clip/simple_tokenizer.py), compiled there with regex.IGNORECASE.
OPENAI_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_PIECE_SEPARATOR = " "  # never inside a piece: OpenAI's pattern matches no whitespace


def _require_text_libraries() -> None:
    """OpenAI's tokenizer needs ftfy and regex; say how to get them (or how to do without) before any text is seen."""
    missing = [name for name, module in (("ftfy", ftfy), ("regex", regex)) if module is None]
    if missing:
        raise ImportError(
            f"CLIPVizTokenizer reproduces OpenAI's text cleaning and needs {' and '.join(missing)}: "
            f"`pip install {' '.join(missing)}`. Without them, load the tokenizer without trust_remote_code to get "
            "transformers' CLIPTokenizer, whose ids differ from OpenAI's on text that ftfy or html.unescape change."
        )


def openai_clean_text(text: str) -> str:
    """The text OpenAI's ``SimpleTokenizer.encode`` splits: ``whitespace_clean(basic_clean(text)).lower()``, i.e.
    ``ftfy.fix_text``, ``html.unescape`` twice, ``regex``'s ``\\s+`` runs to one space, stripped, ``str.lower``."""
    _require_text_libraries()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def openai_pieces(text: str) -> list[str]:
    """The pieces OpenAI byte-encodes and runs BPE on, one by one: its case-insensitive pattern over the cleaned text
    (case-insensitive matters even on lower-cased text: ``'ſ`` matches ``'s``, U+0345 matches nothing)."""
    return _split_pattern().findall(openai_clean_text(text))


@cache
def _split_pattern():
    _require_text_libraries()
    return regex.compile(OPENAI_SPLIT_PATTERN, regex.IGNORECASE)


def _openai_split_text(text: str) -> str:
    """What the backend gets: OpenAI's pieces joined by single spaces. A special-token literal can only appear as a
    whole piece (punctuation runs hold no letters, letter runs no ``<``), exactly where OpenAI maps it to its id."""
    return _PIECE_SEPARATOR.join(openai_pieces(text))


def _map_texts(value, function):
    """Apply ``function`` to every string in a text, a batch, a pair or pre-tokenized words, keeping list/tuple types
    (the ``tokenizers`` backend tells pairs from pre-tokenized words by them)."""
    if isinstance(value, str):
        return function(value)
    if isinstance(value, tuple):
        return tuple(_map_texts(item, function) for item in value)
    if isinstance(value, list):
        return [_map_texts(item, function) for item in value]
    return value


def _pieces_pre_tokenizer():
    """Split only where ``_openai_split_text`` put a space, then map bytes to symbols (no GPT-2 regex split)."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_PIECE_SEPARATOR, behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


class _ConfiguredClassWarningFilter(logging.Filter):
    """Drops transformers 4's warning that ``tokenizer_config.json`` names another class than the one loading it.

    The file names ``CLIPTokenizer`` on purpose (loading without remote code falls back to it) and ``auto_map``
    names this class, so the warning ("may result in unexpected tokenization") would be wrong on every load.
    """

    def __init__(self, class_name: str):
        super().__init__()
        self.class_name = class_name

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("is not the same type as the class" in message and f"'{self.class_name}'" in message)


@contextmanager
def _configured_class_warning_filtered(class_name: str):
    logger = logging.getLogger("transformers.tokenization_utils_base")
    warning_filter = _ConfiguredClassWarningFilter(class_name)
    logger.addFilter(warning_filter)
    try:
        yield
    finally:
        logger.removeFilter(warning_filter)


class CLIPVizTokenizer(CLIPTokenizerFast):
    """transformers' CLIP tokenizer, fed with OpenAI's cleaned and split text so its ids equal OpenAI's.

    Loaded by ``AutoTokenizer``/``AutoProcessor``/``pipeline`` with ``trust_remote_code=True`` through the
    ``auto_map`` in ``tokenizer_config.json``. Padding uses ``<|endoftext|>`` (``clip.tokenize`` pads with 0;
    the attention mask marks it, and CLIP pools at the first end-of-text token, so text features are the same).
    """

    def __init__(self, *args, **kwargs):
        _require_text_libraries()
        super().__init__(*args, **kwargs)
        self._standard_pipeline = (self._tokenizer.normalizer, self._tokenizer.pre_tokenizer)
        self._set_pipeline(None, _pieces_pre_tokenizer())  # the text arrives cleaned and split

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Checked here too: transformers 4 reports any exception raised in __init__ as a missing protobuf library.
        _require_text_libraries()
        with _configured_class_warning_filtered(cls.__name__):
            return super().from_pretrained(*args, **kwargs)

    def _set_pipeline(self, normalizer, pre_tokenizer) -> None:
        self._tokenizer.normalizer = normalizer
        self._tokenizer.pre_tokenizer = pre_tokenizer

    @contextmanager
    def _standard_backend(self):
        """Temporarily restore the backend transformers' CLIPTokenizer builds (NFC, whitespace, lower case, split)."""
        current = (self._tokenizer.normalizer, self._tokenizer.pre_tokenizer)
        self._set_pipeline(*self._standard_pipeline)
        try:
            yield
        finally:
            self._set_pipeline(*current)

    def _save_pretrained(self, *args, **kwargs):
        """Write ``tokenizer.json`` with the standard CLIP pipeline: this class swaps in its own at load time, and a
        loader that reads the file's pipeline without this class then behaves as ``CLIPTokenizer``, not far worse
        (the pieces pipeline alone would neither lower-case nor split)."""
        with self._standard_backend():
            return super()._save_pretrained(*args, **kwargs)

    # Every encoding entry point (__call__, encode, encode_plus, batch_encode_plus, tokenize) ends in exactly one of
    # these; hooking the wrong one would skip texts or clean them twice (cleaning is not idempotent: "&amp;amp;").
    if hasattr(CLIPTokenizerFast, "_batch_encode_plus"):  # transformers 4: `_encode_plus` calls this one

        def _batch_encode_plus(self, batch_text_or_text_pairs, *args, **kwargs):
            batch = _map_texts(batch_text_or_text_pairs, _openai_split_text)
            return super()._batch_encode_plus(batch, *args, **kwargs)

    else:  # transformers 5: single texts, batches and pairs all arrive here

        def _encode_plus(self, text, text_pair=None, *args, **kwargs):
            text, text_pair = _map_texts(text, _openai_split_text), _map_texts(text_pair, _openai_split_text)
            return super()._encode_plus(text, text_pair, *args, **kwargs)
