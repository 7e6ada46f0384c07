"""Occlusion (Zeiler & Fergus 2014) against the same computation written out window by window on OpenAI's
`clip/model.py`, and its options.

The oracle hides each square of grid cells in turn (pixels set to 0, the dataset mean after normalization), runs
OpenAI's `encode_image` on that one image, and credits the drop of the image-prompt cosine to every hidden cell;
each cell's value is the mean over the squares that hid it. The text side deletes one token at a time (the rest of
the prompt shifts left, OpenAI's zero padding fills the end) and runs `encode_text`. The registry's function is
compared before `explain` clamps and scales its maps, so negative drops (hiding a cell raises the score, as it
does everywhere on a random ResNet) are checked too.
"""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import explaining_clipviz
from clipviz import scenes
from clipviz.openai_clip import OPENAI_MEAN, OPENAI_STD
from tests.helpers import pixels, scaled, tiny_config, token_ids
from tests.test_explain_methods import cosines, openai_pair, resnet_config

# a 4 x 4 grid either way: the ViT's 16-pixel patches of 64 pixels, the ResNet's stride 32 on 128 pixels
CONFIGS = {"vit": lambda: tiny_config("vit"), "resnet": lambda: resnet_config(image_size=128)}


def expected_image_maps(reference, images, texts, grid: int, window: int) -> torch.Tensor:
    """`[I, T, grid, grid]`, one window position and one image per OpenAI forward."""
    cell = images.shape[-1] // grid
    with torch.no_grad():
        text = F.normalize(reference.encode_text(texts), dim=-1)  # [T, P]
        maps = torch.zeros(len(images), len(texts), grid, grid)
        for i, image in enumerate(images):
            base = F.normalize(reference.encode_image(image[None]), dim=-1) @ text.t()  # [1, T]
            drops, covered = torch.zeros(len(texts), grid, grid), torch.zeros(grid, grid)
            for y in range(grid - window + 1):
                for x in range(grid - window + 1):
                    hidden = image.clone()
                    hidden[:, y * cell : (y + window) * cell, x * cell : (x + window) * cell] = 0
                    score = F.normalize(reference.encode_image(hidden[None]), dim=-1) @ text.t()  # [1, T]
                    drops[:, y : y + window, x : x + window] += (base - score)[0, :, None, None]
                    covered[y : y + window, x : x + window] += 1
            maps[i] = drops / covered
    return maps


def expected_text_maps(reference, images, texts) -> torch.Tensor:
    """`[I, T, L]`: one deleted token per OpenAI forward of the text tower."""
    with torch.no_grad():
        image = F.normalize(reference.encode_image(images), dim=-1)  # [I, P]
        maps = torch.zeros(len(images), *texts.shape)
        for t, ids in enumerate(texts):
            base = image @ F.normalize(reference.encode_text(ids[None]), dim=-1)[0]  # [I]
            for j in range(1, int(ids.argmax())):
                deleted = torch.cat((ids[:j], ids[j + 1 :], ids.new_zeros(1)))
                maps[:, t, j] = base - image @ F.normalize(reference.encode_text(deleted[None]), dim=-1)[0]
    return maps


def raw_maps(model, images, texts, **options):
    """The registry function's unscaled `(image_maps, text_maps)`, as `explain` receives them."""
    inputs = explaining_clipviz.ExplainInputs.from_inputs(images, texts)
    resolved = explaining_clipviz.resolve_options("occlusion", options, model.config)
    with torch.no_grad():
        return explaining_clipviz.EXPLAIN_METHODS["occlusion"].function(model, inputs, resolved)


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_occlusion_matches_one_window_at_a_time_on_openai_clip(backbone, window):
    config = CONFIGS[backbone]()
    reference, ours = openai_pair(config)
    images, texts = pixels(2, config.vision_config.image_size), token_ids(3)
    image_maps, text_maps = raw_maps(ours, images, texts, window=window)
    assert image_maps.shape == (2, 3, 4, 4) and text_maps.shape == (2, *texts.shape)
    expected = expected_image_maps(reference, images, texts, grid=4, window=window)
    torch.testing.assert_close(image_maps, expected, atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(text_maps, expected_text_maps(reference, images, texts), atol=1e-6, rtol=1e-3)
    assert (image_maps != 0).all() and (text_maps[:, 0, 1:4] != 0).all()  # every cell and word was measured
    result = ours.explain(images, texts, method="occlusion", window=window)
    for i, t in [(0, 0), (1, 2)]:
        torch.testing.assert_close(result.image_maps[i, t], scaled(image_maps[i, t]))
        torch.testing.assert_close(result.text_maps[i, t], scaled(text_maps[i, t]))


def test_hugging_face_padding_and_a_mask_give_the_unpadded_maps():
    """Prompts padded with the end-of-text id (Hugging Face's CLIP tokenizer) under an attention mask: each
    prompt's maps equal those of the prompt alone, unpadded and without a mask."""
    config = tiny_config("vit")
    _, ours = openai_pair(config)
    images, texts = pixels(2, config.vision_config.image_size), token_ids(3)
    mask = (texts != 0).long()
    padded = texts.masked_fill(mask == 0, int(texts.max()))  # the end-of-text id after each prompt
    result = ours.explain(images, padded, mask, method="occlusion")
    assert (result.text_maps[:, mask == 0] == 0).all()
    for t in range(3):
        length = int(mask[t].sum())
        alone = ours.explain(images, texts[t : t + 1, :length], method="occlusion")
        torch.testing.assert_close(result.image_maps[:, t], alone.image_maps[:, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.text_maps[:, t, :length], alone.text_maps[:, 0], atol=1e-5, rtol=1e-4)


def test_a_prompt_without_words_gets_a_zero_text_map():
    config = tiny_config("vit")
    _, ours = openai_pair(config)
    texts = token_ids(2)
    texts[1, 1], texts[1, 2:] = int(texts.max()), 0  # <sot> <eot>: nothing to delete
    result = ours.explain(pixels(1, config.vision_config.image_size), texts, method="occlusion")
    assert (result.text_maps[0, 1] == 0).all() and result.text_maps[0, 0].max() == 1
    assert torch.isfinite(result.image_maps).all()


def test_chunks_do_not_change_the_maps(monkeypatch):
    """Chunks of 9 sequences: 3 images x 16 window positions end on a partial chunk, and so do the 24 deleted
    tokens of the prompts (3 + 8 + 13 words)."""
    config = tiny_config("vit")
    _, ours = openai_pair(config)
    images, texts = pixels(3, config.vision_config.image_size), token_ids(3)
    expected = ours.explain(images, texts, method="occlusion", window=1)
    monkeypatch.setattr(explaining_clipviz, "OCCLUSION_CHUNK", 9)
    result = ours.explain(images, texts, method="occlusion", window=1)
    torch.testing.assert_close(result.image_maps, expected.image_maps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.text_maps, expected.text_maps, atol=1e-4, rtol=1e-4)


def test_windows_wider_than_the_grid_allows_are_clipped_to_its_side_minus_one():
    config = tiny_config("vit")  # a 4 x 4 grid: windows of at most 3 cells
    _, ours = openai_pair(config)
    images, texts = pixels(1, config.vision_config.image_size), token_ids(2)
    widest = ours.explain(images, texts, method="occlusion", window=3).image_maps
    torch.testing.assert_close(ours.explain(images, texts, method="occlusion", window=10).image_maps, widest)
    assert not torch.allclose(ours.explain(images, texts, method="occlusion", window=2).image_maps, widest)


@pytest.mark.parametrize(
    "value,message", [(0, "`window`=0 must be a whole number in [1, inf)"), (1.5, "`window`=1.5 must be a whole")]
)
def test_invalid_window(value, message):
    config = tiny_config("vit")
    _, ours = openai_pair(config)
    with pytest.raises(ValueError, match=re.escape(message)):
        ours.explain(pixels(1, 64), token_ids(1), method="occlusion", window=value)


# ---- the ResNet's properties, on the trained embedded model (a random ResNet barely reacts to its image) ----


@pytest.fixture(scope="module")
def embedded_resnet():
    """The embedded ResNet, two held-out scenes and their captions (padded to the longest)."""
    from transformers import AutoModel, CLIPTokenizer

    folder = Path(__file__).resolve().parent.parent / "embedded" / "clipviz-tiny-resnet"
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    held_out = scenes.make_scenes("eval", 0, 2, size=model.config.vision_config.image_size, num_objects=2)
    images = scenes.to_pixel_values([scene.image for scene in held_out], OPENAI_MEAN, OPENAI_STD)
    captions = [caption for scene in held_out for caption in scene.captions][:3]
    text = CLIPTokenizer.from_pretrained(folder)(captions, padding="longest", return_tensors="pt")
    return model, images, text["input_ids"], text["attention_mask"]


def test_resnet_batch_equals_one_by_one_and_maps_are_well_formed(embedded_resnet):
    model, images, ids, mask = embedded_resnet
    result = model.explain(images, ids, mask, method="occlusion")
    assert result.image_maps.shape == (2, 3, 4, 4)
    for maps in (result.image_maps, result.text_maps):
        assert torch.isfinite(maps).all() and (maps >= 0).all()
        assert torch.equal(maps.flatten(2).amax(-1), torch.ones(2, 3))
    assert (result.text_maps[:, mask == 0] == 0).all()
    for i in range(2):
        for t in range(3):
            length = int(mask[t].sum())
            single = model.explain(
                images[i : i + 1], ids[t : t + 1, :length], mask[t : t + 1, :length], method="occlusion"
            )
            torch.testing.assert_close(single.image_maps[0, 0], result.image_maps[i, t], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(single.text_maps[0, 0], result.text_maps[i, t, :length], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resnet_reduced_precisions_give_the_float32_maps(embedded_resnet, dtype):
    model, images, ids, mask = embedded_resnet
    expected = model.explain(images, ids, mask, method="occlusion")
    low = copy.deepcopy(model).to(dtype)
    result = low.explain(images.to(dtype), ids, mask, method="occlusion")
    assert result.image_maps.dtype == torch.float32 and torch.isfinite(result.image_maps).all()
    assert cosines(result.image_maps, expected.image_maps).min() >= 0.97
    assert cosines(result.text_maps, expected.text_maps, map_dims=1).min() >= 0.9


def test_resnet_frozen_parameters_and_no_grad_context_give_the_same_maps(embedded_resnet):
    model, images, ids, mask = embedded_resnet
    frozen = copy.deepcopy(model).requires_grad_(False)
    expected = model.explain(images, ids, mask, method="occlusion")
    with torch.no_grad():
        result = frozen.explain(images, ids, mask, method="occlusion")
    torch.testing.assert_close(result.image_maps, expected.image_maps)
    torch.testing.assert_close(result.text_maps, expected.text_maps)
