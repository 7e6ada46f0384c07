"""The embedded models' training script: its loss, augmentation, determinism and the folder it writes."""

import json

import pytest
import torch

from clipviz import scenes
from clipviz.train_embedded import (
    TrainSettings,
    dihedral,
    load_tokenizer,
    multi_positive_loss,
    save,
    sincos_2d,
    train,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def tiny_settings(**overrides) -> TrainSettings:
    return TrainSettings(
        **{
            "backbone": "vit",
            "steps": 3,
            "batch_size": 8,
            "pool_size": 16,
            "warmup_steps": 1,
            "eval_scenes": 10,
            **overrides,
        }
    )


def test_multi_positive_loss_is_soft_cross_entropy_both_ways():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    targets = torch.tensor([[True, True, False], [False, True, False]])
    image = -(0.5 * logits[0].log_softmax(0)[0] + 0.5 * logits[0].log_softmax(0)[1] + logits[1].log_softmax(0)[1]) / 2
    columns = logits.t().log_softmax(1)  # caption 0 is in image 0 only, caption 1 in both, caption 2 in none
    text = -(columns[0, 0] + 0.5 * columns[1, 0] + 0.5 * columns[1, 1]) / 2
    torch.testing.assert_close(multi_positive_loss(logits, targets), (image + text) / 2)


def test_multi_positive_loss_is_lowest_when_every_present_caption_scores_high():
    targets = torch.tensor([[True, True, False, False], [False, False, True, False]])
    good = torch.where(targets, 10.0, -10.0)
    assert multi_positive_loss(good, targets) < multi_positive_loss(-good, targets)


def test_dihedral_moves_pixels_without_changing_them():
    images = torch.arange(4 * 6 * 6 * 3, dtype=torch.uint8).reshape(4, 6, 6, 3)
    out = dihedral(images, torch.Generator().manual_seed(3))
    for before, after in zip(images, out, strict=True):
        assert torch.equal(before.flatten().sort().values, after.flatten().sort().values)
        variants = [torch.rot90(before, k, (0, 1)) for k in range(4)]
        variants += [torch.flip(v, (1,)) for v in variants]
        assert any(torch.equal(after, v) for v in variants)


def test_sincos_table_shape_and_range():
    table = sincos_2d(8, 128)
    assert table.shape == (64, 128) and table.abs().max() <= 1.0
    assert not torch.equal(table[1], table[8])  # moving right differs from moving down
    with pytest.raises(ValueError):
        sincos_2d(8, 130)


def test_training_is_reproducible_and_the_folder_loads(tokenizer, tmp_path):
    first, summary = train(tiny_settings(), tokenizer, log=lambda line: None)
    second, _ = train(tiny_settings(), tokenizer, log=lambda line: None)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert 0.0 <= summary["zero_shot_top1"] <= 1.0

    save(first, tiny_settings(), summary, tmp_path)
    from transformers import AutoModel, CLIPImageProcessor

    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"].startswith("modeling_clipviz")
    processor = CLIPImageProcessor.from_pretrained(tmp_path)
    scene = scenes.make_scene(scenes.scene_seed("eval", 0))
    pixels = processor(images=scene.image, return_tensors="pt")["pixel_values"]
    ids = tokenizer(scene.captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = first.eval()(input_ids=ids["input_ids"], pixel_values=pixels).logits_per_image
        actual = loaded(input_ids=ids["input_ids"], pixel_values=pixels).logits_per_image
    torch.testing.assert_close(actual, expected)
    assert "zero-shot top-1" in (tmp_path / "README.md").read_text()
