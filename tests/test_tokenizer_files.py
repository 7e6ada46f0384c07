"""The tokenizer files written by ``clipviz.tokenizer_files`` against OpenAI's own ``SimpleTokenizer``, loaded
without remote code (transformers' ``CLIPTokenizer``); ``test_tokenization_clipviz.py`` covers the remote class.

OpenAI's ``clip.tokenize`` lives in ``clip/clip.py``, which imports torchvision, so it is re-created here from
``SimpleTokenizer`` exactly as ``clip.tokenize`` does it (start + text + end, zero padding, optional truncation).
"""

import hashlib
import json
import re

import pytest
import torch
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer, CLIPTokenizerFast  # transformers 5: an alias of CLIPTokenizer

from clipviz.openai_clip import openai_clip_dir, openai_model_module
from clipviz.tokenizer_files import (
    BOS_TOKEN,
    EOS_TOKEN,
    bpe_path,
    build_openai_vocab,
    load_openai_bpe_merges,
    write_tokenizer_files,
)
from tests.helpers import DIFFERENT, EOT, SAME, SOT, openai_ids, openai_tokenize
from tokenization_clipviz import OPENAI_SPLIT_PATTERN, openai_pieces


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(out)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_written_files_and_config(tokenizer_dir):
    names = {p.name for p in tokenizer_dir.iterdir()}
    assert names == {
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "tokenization_clipviz.py",
    }
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_clipviz.CLIPVizTokenizer", None]}
    assert config["model_max_length"] == 77
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS_TOKEN, EOS_TOKEN, EOS_TOKEN)
    special = json.loads((tokenizer_dir / "special_tokens_map.json").read_text())
    assert special["bos_token"]["content"] == BOS_TOKEN and special["pad_token"]["content"] == EOS_TOKEN
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 49152 - 256 - 2


def test_vocab_is_openais_encoder(tokenizer_dir, simple_tokenizer):
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert list(vocab.items()) == list(simple_tokenizer.encoder.items())
    assert build_openai_vocab() == simple_tokenizer.encoder and len(vocab) == 49408
    assert vocab[BOS_TOKEN] == SOT and vocab[EOS_TOKEN] == EOT
    assert load_openai_bpe_merges() == list(simple_tokenizer.bpe_ranks)


def test_shipped_merges_file_is_openais():
    shipped = hashlib.sha256(bpe_path().read_bytes()).hexdigest()
    original = hashlib.sha256((openai_clip_dir() / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).hexdigest()
    assert shipped == original


def test_loads_as_clip_tokenizer(tokenizer_dir, hf_tokenizer):
    assert type(hf_tokenizer) is CLIPTokenizerFast
    assert hf_tokenizer.model_max_length == 77
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (SOT, EOT, EOT)
    direct = CLIPTokenizerFast.from_pretrained(tokenizer_dir)
    for text in SAME + DIFFERENT:
        assert direct(text)["input_ids"] == hf_tokenizer(text)["input_ids"], text


@pytest.mark.parametrize("text", SAME)
def test_same_ids_as_openai(hf_tokenizer, simple_tokenizer, text):
    assert hf_tokenizer(text)["input_ids"] == openai_ids(simple_tokenizer, text)


@pytest.mark.parametrize("text", DIFFERENT)
def test_documented_differences(hf_tokenizer, simple_tokenizer, text):
    assert hf_tokenizer(text)["input_ids"] != openai_ids(simple_tokenizer, text)


def clip_tokenizer_pieces(hf_tokenizer, text):
    """The pieces CLIPTokenizer runs BPE on: normalized text, special-token literals cut out first, then the split."""
    normalized = hf_tokenizer.backend_tokenizer.normalizer.normalize_str(text)
    split = pre_tokenizers.Split(Regex(OPENAI_SPLIT_PATTERN), behavior="removed", invert=True).pre_tokenize_str
    segments = re.split(f"({re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)})", normalized)
    return [
        piece
        for segment in segments
        for piece in ([segment] if segment in (BOS_TOKEN, EOS_TOKEN) else [p for p, _ in split(segment)])
    ]


def test_difference_rule(hf_tokenizer):
    """The documented rule: ids match exactly when CLIPTokenizer's pipeline yields OpenAI's pieces."""
    for text in SAME:
        assert clip_tokenizer_pieces(hf_tokenizer, text) == openai_pieces(text), text
    for text in DIFFERENT:
        assert clip_tokenizer_pieces(hf_tokenizer, text) != openai_pieces(text), text


def test_empty_string(hf_tokenizer):
    assert hf_tokenizer("")["input_ids"] == [SOT, EOT]


def test_max_length_padding_vs_clip_tokenize(hf_tokenizer, simple_tokenizer):
    texts = ["a photo of a cat", "", "a much longer caption with several words, some punctuation and 42 numbers"]
    ours = hf_tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    theirs = openai_tokenize(simple_tokenizer, texts)
    eot_pos = theirs.argmax(-1)
    position = torch.arange(77)
    valid = position[None, :] <= eot_pos[:, None]
    assert torch.equal(ours["attention_mask"].bool(), valid)
    assert torch.equal(ours["input_ids"][valid], theirs.long()[valid])
    assert (ours["input_ids"][~valid] == EOT).all()  # HF pads with <|endoftext|>, OpenAI with 0
    assert torch.equal(ours["input_ids"].argmax(-1), eot_pos)  # argmax finds the first end-of-text


def test_pad_token_padding_gives_openai_text_features(hf_tokenizer, simple_tokenizer):
    """Padding with 49407 instead of 0 leaves OpenAI's text features unchanged (first-argmax pooling, causal mask)."""
    torch.manual_seed(0)
    model = openai_model_module().CLIP(16, 32, 1, 64, 16, 77, 49408, 32, 2, 2).eval()
    texts = ["a photo of a cat", "two dogs playing in the snow, at night", ""]
    with torch.no_grad():
        ours = model.encode_text(
            hf_tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        )
        theirs = model.encode_text(openai_tokenize(simple_tokenizer, texts).long())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_truncation_matches_clip_tokenize_truncate(hf_tokenizer, simple_tokenizer):
    texts = ["word " * 100, "a " + "very, " * 80 + "long caption", "short"]
    ours = hf_tokenizer(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    theirs = openai_tokenize(simple_tokenizer, texts, truncate=True)
    valid = ours["attention_mask"].bool()
    assert torch.equal(ours["input_ids"][valid], theirs.long()[valid])
    assert valid[:2].all()
    for text, row in zip(texts[:2], ours["input_ids"][:2], strict=True):
        full = openai_ids(simple_tokenizer, text)
        assert len(full) > 77
        assert row.tolist() == full[:76] + [EOT]
    untruncated = hf_tokenizer(texts[0])["input_ids"]
    assert untruncated == openai_ids(simple_tokenizer, texts[0])  # without truncation, every id is returned


def test_context_length_and_validation(tmp_path):
    write_tokenizer_files(tmp_path, context_length=32)
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 32
    with pytest.raises(ValueError, match="context_length"):
        write_tokenizer_files(tmp_path, context_length=1)
