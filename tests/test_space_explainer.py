"""space/explainer.py: model choice and cache, prompt checks, option mapping onto ``model.explain``, and the request
handler's outputs (overlays at the image's aspect ratio, probabilities, token relevance, per-head grid).

Models are tiny random clipviz models saved as complete folders (weights + code + CLIP tokenizer + processor config),
loaded exactly as the Space loads them: ``AutoModel.from_pretrained(folder, trust_remote_code=True)``."""

import io
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "space"))
sys.path.insert(0, str(ROOT / "tests"))

import explainer  # noqa: E402
import imaging  # noqa: E402
from conftest import TINY_TEXT, TINY_VISION  # noqa: E402
from errors import UserError  # noqa: E402
from explainer import ModelChoice, PromptError, Settings  # noqa: E402

CLIP_VOCAB = 49408
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def save_tiny_model(folder: Path, backbone: str, seed: int = 0, **text_overrides) -> Path:
    """A complete model folder: a tiny random clipviz model with CLIP's real vocabulary, tokenizer files and
    ``preprocessor_config.json``. Biases are randomised (OpenAI's init zeroes them) so every path carries signal."""
    from transformers import CLIPImageProcessor

    from clipviz.tokenizer_files import write_tokenizer_files
    from configuration_clipviz import CLIPVizConfig
    from modeling_clipviz import CLIPVizModel

    text = {**TINY_TEXT, "vocab_size": CLIP_VOCAB, "bos_token_id": CLIP_VOCAB - 2, "eos_token_id": CLIP_VOCAB - 1}
    text.update(text_overrides)
    config = CLIPVizConfig(text_config=text, vision_config=dict(TINY_VISION[backbone]), projection_dim=32)
    torch.manual_seed(seed)
    model = CLIPVizModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "class_embedding" not in name:
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
    model.save_pretrained(folder)
    write_tokenizer_files(folder)
    size = config.vision_config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD, resample=3,
    ).save_pretrained(folder)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("space-models")
    return {backbone: save_tiny_model(root / backbone, backbone) for backbone in ("vit", "resnet")}


@pytest.fixture(scope="module")
def loaded(model_dirs):
    return {b: explainer.load_model(ModelChoice(f"tiny-{b}", str(path))) for b, path in model_dirs.items()}


def photo(size=(48, 32), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ---- model choice ----


def test_default_choices_put_the_embedded_models_first_then_the_hub_repos(tmp_path):
    for name in explainer.EMBEDDED_NAMES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    choices = explainer.model_choices({"CLIPVIZ_EMBEDDED_DIR": str(tmp_path)})
    assert [c.label for c in choices[:2]] == ["embedded: clipviz-tiny-vit", "embedded: clipviz-tiny-resnet"]
    assert choices[0].source == str(tmp_path / "clipviz-tiny-vit")
    assert [c.label for c in choices[2:]] == explainer.hub_repos({})
    assert "clipviz/clip-vit-b-16" in explainer.hub_repos({}) and len(explainer.hub_repos({})) == 9


def test_clipviz_model_and_revision_come_first(tmp_path):
    env = {"CLIPVIZ_MODEL": "org/my-clip", "CLIPVIZ_REVISION": "a" * 40, "CLIPVIZ_EMBEDDED_DIR": str(tmp_path)}
    first = explainer.model_choices(env)[0]
    assert first == ModelChoice("org/my-clip", "org/my-clip", "a" * 40)
    env = {"CLIPVIZ_MODEL": "clipviz/clip-rn50", "CLIPVIZ_EMBEDDED_DIR": str(tmp_path)}
    labels = [c.label for c in explainer.model_choices(env)]
    assert labels[0] == "clipviz/clip-rn50" and labels.count("clipviz/clip-rn50") == 1


def test_hub_repo_list_can_be_replaced():
    assert explainer.hub_repos({"CLIPVIZ_HUB_REPOS": " a/b , c/d ,"}) == ["a/b", "c/d"]
    assert explainer.hub_repos({"CLIPVIZ_HUB_ORG": "me"})[0] == "me/clip-rn50"


def test_embedded_search_order(tmp_path, monkeypatch):
    """``CLIPVIZ_EMBEDDED_DIR``, then ``space/models`` (a deployed Space's copy), then ``<repo>/embedded``."""
    space_dir, repo_dir, env_dir = tmp_path / "space", tmp_path, tmp_path / "custom"
    monkeypatch.setattr(explainer, "SPACE_DIR", space_dir)
    name = "clipviz-tiny-vit"
    for root in (repo_dir / "embedded", space_dir / "models", env_dir):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    assert explainer.embedded_dir(name, {"CLIPVIZ_EMBEDDED_DIR": str(env_dir)}) == env_dir / name
    assert explainer.embedded_dir(name, {}) == space_dir / "models" / name
    (space_dir / "models" / name / "config.json").unlink()
    assert explainer.embedded_dir(name, {}) == repo_dir / "embedded" / name
    assert explainer.embedded_dir("clipviz-tiny-resnet", {}) is None


def test_missing_embedded_model_says_how_to_provide_it():
    with pytest.raises(explainer.ModelLoadError, match="Copy `embedded/clipviz-tiny-vit` into `space/models/"):
        explainer.load_model(ModelChoice("embedded: clipviz-tiny-vit", None))


def test_load_failures_are_readable(tmp_path, monkeypatch):
    with pytest.raises(explainer.ModelLoadError, match=r"Could not load the model 'broken': .*") as caught:
        explainer.load_model(ModelChoice("broken", str(tmp_path / "nowhere")))
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # unreachable here anyway; offline fails without retries
    with pytest.raises(explainer.ModelLoadError, match=r"Could not load the model 'clipviz/clip-vit-b-16'"):
        explainer.load_model(ModelChoice("clipviz/clip-vit-b-16", "clipviz/clip-vit-b-16"))


def test_loaded_model_reads_its_preprocessing_numbers(loaded):
    vit = loaded["vit"]
    assert vit.image_size == 32 and vit.mean == pytest.approx(OPENAI_MEAN) and vit.std == pytest.approx(OPENAI_STD)
    assert vit.backbone == "vit" and vit.num_layers == 2 and vit.num_heads == 4 and vit.context_length == 77
    assert loaded["resnet"].backbone == "resnet" and loaded["resnet"].num_layers == 1
    assert callable(vit.overlay) and "jet" in vit.colormaps
    # the folder's own tokenizer (OpenAI's text clean-up), not transformers' plain CLIPTokenizer
    assert type(vit.tokenizer).__name__ == "CLIPVizTokenizer"
    curly, straight = (vit.tokenizer(text)["input_ids"] for text in ("a cat’s toy &amp; ball", "a cat's toy & ball"))
    assert curly == straight


def test_cache_loads_each_model_once_even_under_concurrent_requests(model_dirs):
    calls = []

    def counting_loader(choice):
        calls.append(choice.label)
        return explainer.load_model(choice)

    choices = [ModelChoice("vit", str(model_dirs["vit"])), ModelChoice("resnet", str(model_dirs["resnet"]))]
    cache = explainer.ModelCache(choices, max_models=1, loader=counting_loader)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("vit"))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["vit"] and len(results) == 6 and all(r is results[0] for r in results)
    assert cache.get(None) is results[0]  # None: the default (first) model
    cache.get("resnet")  # max_models=1 evicts "vit"
    cache.get("vit")
    assert calls == ["vit", "resnet", "vit"]
    with pytest.raises(explainer.ModelLoadError, match="Unknown model 'org/other'; choose one of: vit, resnet"):
        cache.get("org/other")  # only listed models load: they run remote code


# ---- prompts ----


def test_prompts_one_per_line_blank_lines_ignored():
    assert explainer.parse_prompts("  a cat \n\n\ta dog\n   \n") == ["a cat", "a dog"]
    assert len(explainer.parse_prompts("\n".join(f"p{i}" for i in range(8)))) == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "Type at least one prompt"),
        ("", "Type at least one prompt"),
        ("\n  \n\t\n", "Type at least one prompt"),
        ("\n".join(f"p{i}" for i in range(9)), "9 prompts given; the limit is 8"),
        ("a cat\na dog\na cat", "“a cat” appears twice"),
        ("x" * 501, "Prompt 1 is 501 characters long; the limit is 500"),
    ],
)
def test_bad_prompts_get_clear_errors(text, message):
    with pytest.raises(PromptError, match=message):
        explainer.parse_prompts(text)


def test_prompt_over_the_context_is_an_error_not_truncated(loaded):
    tokenizer = loaded["vit"].tokenizer
    fits = " ".join(["cat"] * 75)  # 75 tokens + start + end = 77
    tokens = explainer.tokenize_prompts(tokenizer, [fits, "a dog"], 77)
    assert tokens.input_ids.shape == (2, 77) and tokens.attention_mask[1].sum() == 4
    with pytest.raises(PromptError, match=r"Prompt 2 \(“cat cat .*…”\) is 78 tokens long; CLIP reads at most 77 "):
        explainer.tokenize_prompts(tokenizer, ["a dog", fits + " cat"], 77)


def test_token_pieces_read_back_as_the_prompt(loaded):
    tokens = explainer.tokenize_prompts(loaded["vit"].tokenizer, ["a photo of a cat", "Café ☕ naïve"], 77)
    assert tokens.pieces[0] == ["a ", "photo ", "of ", "a ", "cat "]
    assert "".join(tokens.pieces[1]).strip() == "café ☕ naïve"


# ---- options ----


def test_settings_from_ui_values():
    settings = explainer.settings_from_ui("attention", "2", "3", True, 0.3, "viridis", "max", 0.5, "last")
    assert settings == Settings("attention", 2, "3", True, 0.3, "viridis", "max", 0.5, None)
    assert explainer.settings_from_ui("relevance", "last", "mean", False, 0.5, "jet", "mean", 0, "1").start_layer == 1
    with pytest.raises(UserError, match="opacity must be between 0 and 1"):
        explainer.settings_from_ui("relevance", "last", "mean", False, 1.5, "jet", "mean", 0.0, "last")
    with pytest.raises(UserError, match="layer must be 'last' or a whole number"):
        explainer.parse_layer("top")


@pytest.mark.parametrize(
    ("backbone", "settings", "options"),
    [
        ("vit", Settings("attention"), {"head": "mean", "text_head": "mean", "layer": 1}),
        ("vit", Settings("attention", layer=1, head="4"), {"head": 3, "text_head": 3, "layer": 0}),
        ("vit", Settings("attention", head="max"), {"head": "max", "text_head": "max", "layer": 1}),
        (
            "vit",
            Settings("rollout", head_fusion="min", discard_ratio=0.5),
            {"head_fusion": "min", "discard_ratio": 0.5},
        ),
        ("vit", Settings("relevance"), {}),
        ("vit", Settings("relevance", start_layer=1), {"start_layer": 0}),
        ("vit", Settings("gradcam"), {}),
        ("resnet", Settings("attention", head="2"), {"head": 1, "text_head": 1}),
        ("resnet", Settings("relevance", start_layer=1), {}),
        ("resnet", Settings("gradcam"), {}),
    ],
)
def test_options_map_onto_what_model_explain_accepts(loaded, backbone, settings, options):
    model = loaded[backbone]
    assert explainer.method_options(model, settings) == options
    size = model.image_size
    ids = explainer.tokenize_prompts(model.tokenizer, ["a cat"], 77)
    out = model.model.explain(
        torch.zeros(1, 3, size, size), ids.input_ids, ids.attention_mask, settings.method, **options
    )
    assert out.image_maps.shape[:2] == (1, 1)


@pytest.mark.parametrize(
    ("backbone", "settings", "message"),
    [
        (
            "resnet",
            Settings("rollout"),
            "Rollout needs a stack of attention layers; the ResNet image tower has a single",
        ),
        (
            "vit",
            Settings("saliency"),
            "Unknown method 'saliency'; choose one of: attention, rollout, relevance, gradcam",
        ),
        ("vit", Settings("attention", layer=3), "layer must be from 1 to 2 for this model, not 3"),
        ("vit", Settings("attention", head="5"), "head must be 'mean', 'max' or a number from 1 to 4"),
        ("vit", Settings("attention", head="0"), "head must be 'mean', 'max' or a number from 1 to 4"),
        ("vit", Settings("rollout", head_fusion="median"), "`head_fusion`='median' .* 'mean', 'max', 'min'"),
        ("vit", Settings("rollout", discard_ratio=1.0), r"Attention rollout: `discard_ratio`=1.0 .* in \[0, 1\)"),
        ("vit", Settings("relevance", colormap="rainbow"), "Unknown colour map 'rainbow'; choose one of: jet"),
    ],
)
def test_invalid_options_are_explained(loaded, backbone, settings, message):
    with pytest.raises(UserError, match=message):
        explainer.method_options(loaded[backbone], settings)


def test_controls_follow_the_backbone(loaded):
    vit, resnet = explainer.controls(loaded["vit"]), explainer.controls(loaded["resnet"])
    assert [m for _, m in vit.methods] == list(explainer.METHODS)
    assert vit.layers == ["last", "1", "2"] and vit.heads == ["mean", "max", "1", "2", "3", "4"] and vit.has_layers
    assert [m for _, m in resnet.methods] == ["attention", "relevance", "gradcam"] and not resnet.has_layers
    assert "Rollout needs a stack of attention layers" in resnet.status and "ResNet" in resnet.status


def test_every_method_has_a_note_for_every_backbone():
    for method in explainer.METHODS:
        for backbone in ("vit", "resnet"):
            note = explainer.method_note(method, backbone)
            assert len(note) > 80
    assert "class token" in explainer.method_note("attention", "vit")
    assert "attention pool" in explainer.method_note("attention", "resnet")
    assert explainer.method_note("rollout", "resnet").startswith("Rollout needs")
    assert "earlier first layer" in explainer.method_note("relevance", "vit")  # the registry's how_to_read
    assert "attention pool" in explainer.method_note("relevance", "resnet")


# ---- one request end to end ----


def test_prepared_pixels_match_clips_processor_for_a_square_image(loaded, model_dirs):
    from transformers import CLIPImageProcessor

    image = photo((32, 32))
    prepared = explainer.prepare_image(image, loaded["vit"])
    processor = CLIPImageProcessor.from_pretrained(model_dirs["vit"])
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.allclose(prepared.pixel_values, expected, atol=1e-5)
    assert prepared.display.size == (512, 512)


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_request_gives_overlays_probabilities_and_token_relevance(loaded, backbone):
    model = loaded[backbone]
    cache = explainer.ModelCache([model.choice], loader=lambda choice: model)
    prompts = ["a photo of a cat", "a photo of a dog", "a red circle"]
    result = explainer.run_request(cache, png_bytes(photo((96, 48))), "\n".join(prompts), None, Settings("relevance"))

    assert [caption.split(" · ")[0] for _, caption in result.overlays] == prompts
    assert all(overlay.size == (512, 256) and overlay.mode == "RGB" for overlay, _ in result.overlays)

    # the probabilities are CLIP's softmax over the prompts, as a plain forward pass computes it
    prepared = explainer.prepare_image(photo((96, 48)), model)
    ids = explainer.tokenize_prompts(model.tokenizer, prompts, 77)
    with torch.no_grad():
        logits = model.model(
            input_ids=ids.input_ids, pixel_values=prepared.pixel_values, attention_mask=ids.attention_mask
        ).logits_per_image
    assert list(result.probabilities) == prompts
    assert np.allclose(list(result.probabilities.values()), torch.softmax(logits[0], -1).numpy(), atol=1e-5)
    assert f"{result.probabilities[prompts[0]]:.0%}" in result.overlays[0][1]

    # token relevance: a numbered group per prompt, one entry per word piece, scaled to [0, 1] within the prompt
    groups = [i for i, (_, score) in enumerate(result.token_relevance) if score is None]
    assert [result.token_relevance[i][0].strip() for i in groups] == ["1.", "2.", "3."]
    words = [
        [t for t, s in result.token_relevance[a + 1 : b]] for a, b in zip(groups, groups[1:] + [None], strict=True)
    ]
    assert ["".join(w).strip() for w in words] == prompts
    scores = [s for _, s in result.token_relevance if s is not None]
    assert all(0.0 <= s <= 1.0 for s in scores) and max(scores) == 1.0
    assert result.head_grid == [] and result.note == explainer.method_note("relevance", backbone)


def test_overlays_sit_on_the_right_place_of_a_non_square_photo(loaded):
    """A map hot at the grid cells of the photo's top-left corner colours the photo's top-left corner."""
    model = loaded["vit"]
    prepared = explainer.prepare_image(photo((64, 32)), model)  # letterboxed: content in grid rows 1..2 of 4
    hot = np.zeros((4, 4), np.float32)
    hot[1, 0] = 1.0
    settings = Settings(alpha=1.0, colormap="gray")
    overlay = np.asarray(explainer.draw(model, prepared, hot, settings), np.float32).mean(-1)  # [256, 512]
    assert overlay.shape == (256, 512)
    assert overlay[:64, :64].mean() > 3 * overlay[-64:, -64:].mean()
    untouched = explainer.draw(model, prepared, hot, Settings(alpha=0.0))
    assert np.array_equal(np.asarray(untouched), np.asarray(prepared.display))


def test_exif_orientation_reaches_the_overlays(loaded):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    buffer = io.BytesIO()
    photo((60, 30)).save(buffer, "JPEG", exif=exif.tobytes())
    cache = explainer.ModelCache([loaded["vit"].choice], loader=lambda choice: loaded["vit"])
    result = explainer.run_request(cache, buffer.getvalue(), "a cat", None, Settings("gradcam"))
    assert result.overlays[0][0].size == (256, 512)


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_head_grid_equals_explain_attention_per_head(loaded, backbone):
    """The grid comes from one image-tower pass; each head must match ``explain(method="attention", head=h)``."""
    model = loaded[backbone]
    prepared = explainer.prepare_image(photo(), model)
    settings = Settings("attention", layer=1 if backbone == "vit" else None, head_grid=True)
    maps = explainer.head_maps(model, prepared.pixel_values, settings)
    assert len(maps) == model.num_heads
    ids = explainer.tokenize_prompts(model.tokenizer, ["a cat"], 77)
    for head in range(model.num_heads):
        options = explainer.method_options(model, Settings("attention", layer=settings.layer, head=str(head + 1)))
        expected = model.model.explain(prepared.pixel_values, ids.input_ids, ids.attention_mask, "attention", **options)
        assert np.allclose(maps[head], expected.image_maps[0, 0].numpy(), atol=1e-5)


def test_image_heads_the_text_tower_lacks_fall_back_to_its_mean(tmp_path):
    """ViT-B/16-like head counts (more image than text heads): every image head is offered; the token row uses
    the same head where the text tower has it and the mean over its heads otherwise."""
    model = explainer.load_model(
        ModelChoice("tiny", str(save_tiny_model(tmp_path / "m", "vit", num_attention_heads=2)))
    )
    assert (model.num_heads, model.num_text_heads) == (4, 2)
    offered = explainer.controls(model)
    assert offered.heads == ["mean", "max", "1", "2", "3", "4"] and "the mean over its heads" in offered.status
    options = {h: explainer.method_options(model, Settings("attention", head=h)) for h in ("2", "4", "max")}
    assert options["2"] == {"head": 1, "text_head": 1, "layer": 1}
    assert options["4"] == {"head": 3, "text_head": "mean", "layer": 1}
    assert options["max"] == {"head": "max", "text_head": "max", "layer": 1}
    result = explainer.run_request(
        explainer.ModelCache([model.choice], loader=lambda choice: model), png_bytes(photo()), "a cat", None,
        Settings("attention", head="4"),
    )  # fmt: skip
    assert len(result.overlays) == 1


def test_request_with_head_grid(loaded):
    cache = explainer.ModelCache([loaded["vit"].choice], loader=lambda choice: loaded["vit"])
    settings = Settings("attention", layer=2, head="2", head_grid=True)
    result = explainer.run_request(cache, png_bytes(photo()), "a cat\na dog", None, settings)
    assert [caption for _, caption in result.head_grid] == [f"layer 2, head {h}" for h in range(1, 5)]
    assert all(image.size == (192, 128) for image, _ in result.head_grid)
    # raw attention on the image side ignores the prompt: both prompts get the same overlay
    assert np.array_equal(np.asarray(result.overlays[0][0]), np.asarray(result.overlays[1][0]))


def test_request_checks_prompts_before_the_image_and_the_image_before_the_model(loaded):
    cache = explainer.ModelCache([loaded["vit"].choice], loader=lambda choice: loaded["vit"])
    with pytest.raises(PromptError):
        explainer.run_request(cache, b"not an image", "", None, Settings())
    with pytest.raises(UserError, match="Upload, paste or capture an image first"):
        explainer.run_request(cache, None, "a cat", None, Settings())
    with pytest.raises(imaging.ImageRejected, match="not a PNG, JPEG, WEBP, GIF or BMP image"):
        explainer.run_request(cache, b"not an image", "a cat", None, Settings())
    with pytest.raises(imaging.ImageRejected, match="aspect ratio"):
        explainer.run_request(cache, png_bytes(photo((200, 10))), "a cat", None, Settings())


@pytest.mark.parametrize("size", [(1, 1), (1, 10), (10, 1)])
def test_tiny_and_thin_images_explain(loaded, size):
    cache = explainer.ModelCache([loaded["resnet"].choice], loader=lambda choice: loaded["resnet"])
    result = explainer.run_request(cache, png_bytes(photo(size)), "a cat", None, Settings("gradcam"))
    assert result.overlays[0][0].size == imaging.display_size(size, explainer.DISPLAY_LONGEST)


def test_output_files_are_fresh_per_request_and_old_ones_are_removed(tmp_path):
    files = explainer.OutputFiles(tmp_path, keep=2)
    first = files.save([(photo((20, 10)), "a"), (photo((10, 20)), "b")])
    assert [caption for _, caption in first] == ["a", "b"]
    assert Path(first[0][0]).parent == Path(first[1][0]).parent and Path(first[0][0]).parent.parent == tmp_path
    with Image.open(first[1][0]) as saved:
        assert saved.format == "JPEG" and saved.size == (10, 20)
    second = files.save([(photo((20, 10)), "a")])  # the same picture again: a file of its own
    assert second[0][0] != first[0][0] and Path(first[0][0]).is_file()
    files.save([(photo(), "c")])  # a third folder: the first one goes
    assert not Path(first[0][0]).exists() and Path(second[0][0]).is_file()
    assert files.save([]) == []


# ---- examples ----


def test_examples_are_licensed_decodable_and_promptable():
    rows = explainer.load_examples()
    manifest = json.loads((explainer.SPACE_DIR / "examples" / "examples.json").read_text())
    licences = (explainer.SPACE_DIR / "examples" / "LICENSES.md").read_text()
    assert len(rows) == len(manifest) >= 6
    for (path, prompts, method), entry in zip(rows, manifest, strict=True):
        assert Path(path).name == entry["file"] and imaging.decode_image(path).mode == "RGB"
        assert 2 <= len(explainer.parse_prompts(prompts)) <= explainer.MAX_PROMPTS and method in explainer.METHODS
        assert Path(path).name in licences or ("scene_" in path and "scene_*.png" in licences)


def test_scene_examples_are_the_projects_held_out_scenes():
    from clipviz import scenes

    entries = json.loads((explainer.SPACE_DIR / "examples" / "examples.json").read_text())
    scene_entries = [e for e in entries if "seed" in e]
    assert len(scene_entries) == 3
    for entry in scene_entries:
        assert entry["seed"] in scenes.EVAL_SEEDS
        scene = scenes.make_scene(entry["seed"])
        stored = np.asarray(Image.open(explainer.SPACE_DIR / "examples" / entry["file"]))
        assert np.array_equal(stored, scene.image)
        assert entry["prompts"][:-1] == scene.captions and entry["prompts"][-1] not in scene.captions


def test_deployed_space_folder_finds_registry_and_drawing_in_its_own_copies(tmp_path):
    """A Space repository is ``space/`` alone plus the copies its README lists; nothing of the checkout is on the
    path, so the method registry and ``overlay`` must come from those copies."""
    import os
    import shutil
    import subprocess

    space = shutil.copytree(ROOT / "space", tmp_path / "space", ignore=shutil.ignore_patterns("examples", "models"))
    (space / "clipviz").mkdir()
    for name in ("__init__.py", "rendering.py"):
        shutil.copyfile(ROOT / "clipviz" / name, space / "clipviz" / name)
    shutil.copyfile(ROOT / "explaining_clipviz.py", space / "explaining_clipviz.py")
    script = (
        "import explainer; "
        "print(explainer.registry.__file__, explainer.rendering.__file__, ','.join(explainer.VALID_METHODS['vit']))"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=space, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    registry_file, rendering_file, methods = result.stdout.split()
    assert Path(registry_file).parent == space and Path(rendering_file).parent == space / "clipviz"
    assert methods.split(",")[:4] == ["attention", "rollout", "relevance", "gradcam"]
