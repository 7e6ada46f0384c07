"""The embedded models' training script: its loss, augmentation, determinism and the folder it writes."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from clipviz import scenes
from clipviz.train_embedded import (
    CODE_FILES,
    TrainSettings,
    build_model,
    cli_command,
    dihedral,
    load_tokenizer,
    multi_positive_loss,
    parse_args,
    refresh_code,
    save,
    scene_pool,
    sincos_2d,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "embedded"
EMBEDDED_NAMES = ("clipviz-tiny-vit", "clipviz-tiny-resnet")


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


def test_same_color_share_rerenders_part_of_the_pool_with_a_same_colour_pair():
    plain_images, plain_targets = scene_pool(64, 32)
    images, targets = scene_pool(64, 32, same_color_frac=0.5, seed=0)
    changed = [i for i in range(64) if not np.array_equal(images[i], plain_images[i])]
    assert 16 <= len(changed) <= 48
    for i in changed:
        scene = scenes.make_scene(
            scenes.scene_seed("train", i), size=32, num_objects=int(targets[i].sum()), same_color=True
        )
        assert np.array_equal(images[i], scene.image)
        colors = [obj.color for obj in scene.objects]
        assert len(colors) >= 2 and colors[0] == colors[1]
    unchanged = [i for i in range(64) if i not in changed]
    assert np.array_equal(targets[unchanged], plain_targets[unchanged])


def test_vision_overrides_change_only_the_named_entries():
    model = build_model("vit", {"num_hidden_layers": 2, "num_attention_heads": 2})
    vision = model.config.vision_config
    assert (vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size) == (2, 2, 8)
    assert len(model.vision_model.encoder.layers) == 2


def test_card_command_reproduces_the_settings():
    argv = ["--backbone", "vit", "--output-dir", "x", "--steps", "5", "--threads", "1", "--same-color-frac", "0.3"]
    argv += ["--logit-scale-max", "50", "--no-bf16", "--vision", "num_hidden_layers=6", "num_attention_heads=2"]
    settings, _ = parse_args(argv)
    assert settings.vision_config == {"num_hidden_layers": 6, "num_attention_heads": 2}
    command = shlex.split(cli_command(settings).replace("<dir>", "x"))
    assert command[:3] == ["python", "-m", "clipviz.train_embedded"]
    assert parse_args(command[3:])[0] == settings


@pytest.mark.parametrize("name", ["clipviz-tiny-vit", "clipviz-tiny-resnet"])
def test_saved_settings_still_parse_and_their_command_reproduces_them(name):
    record = json.loads((EMBEDDED / name / "training_args.json").read_text())
    settings = TrainSettings(**record["settings"])
    assert parse_args(shlex.split(cli_command(settings).replace("<dir>", "x"))[3:])[0] == settings


# ---- the embedded folders' remote code: links to the repository's files, never copies ----


@pytest.mark.parametrize("name", EMBEDDED_NAMES)
def test_embedded_code_files_are_relative_links_to_the_repository_files(name):
    for code in CODE_FILES:
        link = EMBEDDED / name / code
        assert link.is_symlink(), (
            f"{link} is a copy: run `python -m clipviz.train_embedded --refresh-code {link.parent}`"
        )
        assert os.readlink(link) == f"../../{code}"  # relative: it resolves in every clone
        assert link.resolve() == (ROOT / code).resolve()


def test_refresh_code_turns_copies_and_broken_links_into_links(tmp_path):
    folder = shutil.copytree(EMBEDDED / "clipviz-tiny-vit", tmp_path / "model")  # links copied as files
    assert not (folder / "modeling_clipviz.py").is_symlink()
    (folder / "explaining_clipviz.py").unlink()
    (folder / "explaining_clipviz.py").symlink_to("../nowhere.py")  # broken
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text("old card")
    refresh_code([folder])
    for code in CODE_FILES:
        assert (folder / code).is_symlink() and (folder / code).resolve() == (ROOT / code).resolve(), code
    assert (folder / "README.md").read_text() == card  # the card is rewritten from training_args.json
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 77


FRESH_CLONE_SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained("embedded/clipviz-tiny-vit", trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    size, vocab = model.config.vision_config.image_size, model.config.text_config.vocab_size
    ids = torch.tensor([[vocab - 2, 5, 6, vocab - 1]])
    maps = model.explain(torch.randn(1, 3, size, size), ids, method="relevance")
    print("explained", tuple(maps.image_maps.shape))
    """
)


def test_embedded_model_loads_and_explains_from_a_fresh_clone(tmp_path):
    """What git stores (links, not the working tree's files) is enough: clone the committed tree and load the
    embedded ViT offline with its remote code, nothing of the repository on the path."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--local", str(ROOT), str(clone)], check=True, timeout=300)
    assert (clone / "embedded" / "clipviz-tiny-vit" / "modeling_clipviz.py").is_symlink()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_CLONE_SCRIPT], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    grid = json.loads((clone / "embedded" / "clipviz-tiny-vit" / "config.json").read_text())["vision_config"]
    side = grid["image_size"] // grid["patch_size"]
    assert f"explained (1, 1, {side}, {side})" in result.stdout, result.stdout
