"""``CLIPVizTokenizer`` (``tokenization_clipviz.py``) as Hub users load it, against OpenAI's own ``SimpleTokenizer``.

The folder is what a converted repository ships: the files of ``write_tokenizer_files`` (remote code included) and
the image processor configs ``clipviz.hub_repo`` writes. Every test runs on transformers 5 (``.venv``) and 4
(``.venv-tf4``); the remote class hooks a different encode method in each (see ``tokenization_clipviz.py``).
"""

import builtins
import inspect
import json
import logging
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, CLIPProcessor, CLIPTokenizerFast, pipeline

import tokenization_clipviz
from clipviz.openai_clip import OPENAI_MEAN, OPENAI_STD
from clipviz.tokenizer_files import TOKENIZER_AUTO_MAP, remote_code_path, write_tokenizer_files
from tests.helpers import DIFFERENT, EOT, SAME, SOT, openai_ids, openai_tokenize
from tests.openai_reference import openai_tokenizer_module

# Beyond the corpus: inputs where OpenAI's case-insensitive split or its missing NFC matter, and clean-up that
# is not idempotent (cleaning twice would turn "&amp;amp;" into "&").
EXTRA = [
    "&amp;amp;",
    "a.<|endoftext|>b!<|startoftext|>",
    "<|ſtartoftext|> it'ſ 'ﬅ",
    "<e&#769; and e&#769;",
    "ǈ ǋ ǲ Ⅻ ⓐⒶ K Å",
]
CORPUS = SAME + DIFFERENT + EXTRA
LONG = ["word " * 100, "a " + "very, " * 80 + "long caption &amp; more", "it’s " * 60]

# Fragments for random texts: each class of OpenAI clean-up, split and special-token behaviour, mixed freely.
FRAGMENTS = [
    "a", "Photo", "ΟΔΟΣ", "东京", "ﬁ", "ＡＢ", "ſ", "'s", "'t", "'ll", "'", "&amp;", "&#769;", "&lt;", "<", ">",
    "cafÃ©", "â€™", "’", "“", "\u0345", "\u0301", "e", "\u200b", "\ufeff", "\x1b[0m", "\x85", "\x1c", " ", "\t",
    "\n", "\u3000", ".", "!!", "<|endoftext|>", "<|startoftext|>", "<|", "|>", "1", "½", "🐱", "👍🏽", "İ", "ẞ",
]  # fmt: skip


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """The tokenizer and processor files of a converted repository."""
    folder = tmp_path_factory.mktemp("clipviz_repo")
    write_tokenizer_files(folder)
    image_processor = {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_MEAN),
        "image_std": list(OPENAI_STD),
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor))
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "CLIPProcessor"}))
    return folder


@pytest.fixture(scope="module")
def tokenizer(hub_folder):
    return AutoTokenizer.from_pretrained(hub_folder, trust_remote_code=True)


@contextmanager
def transformers_records():
    """Log records of transformers' loggers (they do not propagate to the root logger, so caplog misses them)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(FRAGMENTS, k=rng.randint(1, 12))) for _ in range(count)]


def test_remote_class_is_loaded(tokenizer, hub_folder):
    config = json.loads((hub_folder / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {"AutoTokenizer": TOKENIZER_AUTO_MAP}
    assert config["tokenizer_class"] == "CLIPTokenizer"
    assert type(tokenizer).__name__ == "CLIPVizTokenizer"
    assert type(tokenizer).__module__.startswith("transformers_modules.")  # the folder's copy, not the repo's
    assert isinstance(tokenizer, CLIPTokenizerFast)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (SOT, EOT, EOT)
    assert tokenizer.model_max_length == 77
    slow_requested = AutoTokenizer.from_pretrained(hub_folder, trust_remote_code=True, use_fast=False)
    assert type(slow_requested).__name__ == "CLIPVizTokenizer"  # transformers 4 too: the (class, None) auto_map


@pytest.mark.parametrize("text", CORPUS)
def test_same_ids_as_openai(tokenizer, simple_tokenizer, text):
    assert tokenizer(text)["input_ids"] == openai_ids(simple_tokenizer, text)


def test_cleaning_and_pieces_are_openais_own(simple_tokenizer):
    """``openai_clean_text``/``openai_pieces`` are OpenAI's ``whitespace_clean(basic_clean(t)).lower()`` and split."""
    openai = openai_tokenizer_module()
    for text in CORPUS + random_texts(100, seed=1):
        cleaned = openai.whitespace_clean(openai.basic_clean(text)).lower()
        assert tokenization_clipviz.openai_clean_text(text) == cleaned, ascii(text)
        assert tokenization_clipviz.openai_pieces(text) == openai.re.findall(simple_tokenizer.pat, cleaned)


def test_random_mixtures_same_ids_as_openai(tokenizer, simple_tokenizer):
    texts = random_texts(400)
    for text, ids in zip(texts, tokenizer(texts)["input_ids"], strict=True):
        assert ids == openai_ids(simple_tokenizer, text), ascii(text)


def test_code_point_sample_same_ids_as_openai(tokenizer, simple_tokenizer):
    """One code point in 53 of the first three planes, alone, cased, glued to an apostrophe and as an entity."""
    points = [chr(c) for c in range(0, 0x30000, 53) if not 0xD800 <= c <= 0xDFFF]
    texts = [f"A{c}b {c}'{c}{c}.{c}<|endoftext|>&#{ord(c)};" for c in points]
    for text, ids in zip(texts, tokenizer(texts)["input_ids"], strict=True):
        assert ids == openai_ids(simple_tokenizer, text), ascii(text)


def test_every_entry_point_cleans_once(tokenizer, simple_tokenizer):
    text = "Fish &amp;amp; Chips, it’s ΟΔΟΣ"
    expected = openai_ids(simple_tokenizer, text)
    tokens = [simple_tokenizer.decoder[i] for i in expected[1:-1]]
    assert tokenizer.encode(text) == expected
    assert tokenizer.tokenize(text) == tokens
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) == expected[1:-1]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected[1:-1]
    assert tokenizer([text, text])["input_ids"] == [expected, expected]
    if hasattr(tokenizer, "encode_plus"):  # removed in transformers 5
        assert tokenizer.encode_plus(text)["input_ids"] == expected
        assert tokenizer.batch_encode_plus([text])["input_ids"] == [expected]
    pair = tokenizer(text, text)["input_ids"]  # CLIP has no pair format; both halves are still OpenAI's
    assert pair[: len(expected)] == expected and pair[-len(expected) + 1 :] == expected[1:]


def test_pre_tokenized_words_are_tokenized_one_by_one(tokenizer, simple_tokenizer):
    words = ["Fish", "&amp;", "it’s", "ΟΔΟΣ", "   "]
    expected = [SOT, *(i for word in words for i in simple_tokenizer.encode(word)), EOT]
    assert tokenizer(words, is_split_into_words=True)["input_ids"] == expected
    assert tokenizer([words, words[:2]], is_split_into_words=True)["input_ids"][0] == expected


def test_batch_padding_and_truncation_match_clip_tokenize(tokenizer, simple_tokenizer):
    texts = CORPUS + LONG
    ours = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    theirs = openai_tokenize(simple_tokenizer, texts, truncate=True).long()
    lengths = torch.tensor([min(len(openai_ids(simple_tokenizer, text)), 77) for text in texts])
    valid = ours["attention_mask"].bool()
    assert torch.equal(valid, torch.arange(77)[None, :] < lengths[:, None])
    assert torch.equal(ours["input_ids"][valid], theirs[valid])
    assert (ours["input_ids"][~valid] == EOT).all()  # clip.tokenize pads with 0; CLIP pools at the first EOT
    assert torch.equal(ours["input_ids"].argmax(-1), theirs.argmax(-1))
    assert (lengths[-len(LONG) :] == 77).all()


def test_auto_processor_uses_remote_tokenizer(hub_folder, simple_tokenizer):
    processor = AutoProcessor.from_pretrained(hub_folder, trust_remote_code=True)
    assert isinstance(processor, CLIPProcessor)
    assert type(processor.tokenizer).__name__ == "CLIPVizTokenizer"
    image = Image.new("RGB", (320, 240), (200, 30, 90))
    batch = processor(text=CORPUS, images=[image], padding="max_length", truncation=True, return_tensors="pt")
    theirs = openai_tokenize(simple_tokenizer, CORPUS, truncate=True).long()
    valid = batch["attention_mask"].bool()
    assert torch.equal(batch["input_ids"][valid], theirs[valid])
    assert batch["pixel_values"].shape == (1, 3, 224, 224)


def test_zero_shot_pipeline_tokenizes_like_openai(hub_folder, simple_tokenizer):
    """The pipeline loads the tokenizer from the folder itself; a tiny random CLIP model keeps this cheap."""
    from transformers import CLIPConfig, CLIPModel

    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tiny, "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": EOT},
        vision_config={**tiny, "image_size": 224, "patch_size": 32},
        projection_dim=8,
    )
    classifier = pipeline(
        "zero-shot-image-classification",
        model=CLIPModel(config).eval(),
        tokenizer=str(hub_folder),
        image_processor=str(hub_folder),
        trust_remote_code=True,
    )
    assert type(classifier.tokenizer).__name__ == "CLIPVizTokenizer"
    labels = ["cat &amp; dog", "it’s a ﬁsh", "ＣＡＲ"]
    image = Image.new("RGB", (64, 64), (10, 120, 30))
    inputs = classifier.preprocess(image, candidate_labels=labels, hypothesis_template="a photo of {}")
    text_inputs = inputs["text_inputs"][0]
    for label, ids, mask in zip(labels, text_inputs["input_ids"], text_inputs["attention_mask"], strict=True):
        assert ids[mask.bool()].tolist() == openai_ids(simple_tokenizer, f"a photo of {label}")
    assert sorted(result["label"] for result in classifier(image, candidate_labels=labels)) == sorted(labels)


def test_save_pretrained_round_trip(tokenizer, simple_tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["normalizer"]["type"] == "Sequence"  # transformers' standard CLIP pipeline, not the pieces one
    assert saved["pre_tokenizer"]["pretokenizers"][0]["behavior"] == "Removed"
    assert (tmp_path / "tokenization_clipviz.py").is_file()
    auto_map = json.loads((tmp_path / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"]
    assert auto_map == TOKENIZER_AUTO_MAP  # what write_tokenizer_files writes
    assert tokenizer("it’s")["input_ids"] == openai_ids(simple_tokenizer, "it’s")  # the live pipeline is back
    reloaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(reloaded).__name__ == "CLIPVizTokenizer"
    for text in CORPUS:
        assert reloaded(text)["input_ids"] == openai_ids(simple_tokenizer, text), text


def test_without_remote_code_falls_back_to_clip_tokenizer(hub_folder, simple_tokenizer, monkeypatch):
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *args: prompts.append(args) or "n")
    plain = AutoTokenizer.from_pretrained(hub_folder)
    assert not prompts  # transformers has CLIPTokenizer locally, so it does not ask about the remote code
    assert type(plain) is CLIPTokenizerFast  # transformers 5: CLIPTokenizer, of which this is an alias
    for text in SAME:
        assert plain(text)["input_ids"] == openai_ids(simple_tokenizer, text), text
    for text in DIFFERENT:
        assert plain(text)["input_ids"] != openai_ids(simple_tokenizer, text), text
    processor = AutoProcessor.from_pretrained(hub_folder)
    assert isinstance(processor, CLIPProcessor) and type(processor.tokenizer) is CLIPTokenizerFast
    assert not prompts


def test_repository_with_custom_model_config(hub_folder, simple_tokenizer, tmp_path):
    """With the repository's config.json (model type "clipviz", its own remote code), as on the Hub. transformers 5
    reads that config before the tokenizer config; without trust_remote_code=True (False here: None would ask
    about the *configuration's* remote code on a terminal) it still falls back to CLIPTokenizer."""
    from configuration_clipviz import CLIPVizConfig

    folder = tmp_path / "repo"
    shutil.copytree(hub_folder, folder)
    config = CLIPVizConfig()
    config.auto_map = {**config.auto_map, "AutoConfig": "configuration_clipviz.CLIPVizConfig"}
    config.save_pretrained(folder)
    shutil.copyfile(Path(inspect.getfile(CLIPVizConfig)), folder / "configuration_clipviz.py")
    remote = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert type(remote).__name__ == "CLIPVizTokenizer"
    assert remote(DIFFERENT)["input_ids"] == [openai_ids(simple_tokenizer, text) for text in DIFFERENT]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor.tokenizer).__name__ == "CLIPVizTokenizer"
    assert type(AutoTokenizer.from_pretrained(folder, trust_remote_code=False)) is CLIPTokenizerFast


def test_loading_logs_no_warning(hub_folder):
    """transformers 4 warns when tokenizer_config.json's class differs from the loading one; here that is by design."""
    with transformers_records() as records:
        AutoTokenizer.from_pretrained(hub_folder, trust_remote_code=True)
    assert not [r.getMessage() for r in records]


def test_local_module_and_missing_ftfy(hub_folder, simple_tokenizer, monkeypatch):
    local = tokenization_clipviz.CLIPVizTokenizer.from_pretrained(hub_folder)
    assert local("ﬁsh &amp; chips")["input_ids"] == openai_ids(simple_tokenizer, "ﬁsh &amp; chips")
    monkeypatch.setattr(tokenization_clipviz, "ftfy", None)
    with pytest.raises(ImportError, match="pip install ftfy"):
        tokenization_clipviz.CLIPVizTokenizer.from_pretrained(hub_folder)


def test_remote_code_file_is_the_repository_copy(hub_folder):
    assert (hub_folder / "tokenization_clipviz.py").read_bytes() == remote_code_path().read_bytes()
