"""space/explainer.py: model choice and cache, prompt checks, option mapping onto ``model.explain``, and the request
handler's outputs (overlays at the image's aspect ratio, probabilities, token relevance, per-head grid).

Models are tiny random clipviz models saved as complete folders (weights + code + CLIP tokenizer + processor config),
loaded exactly as the Space loads them: ``AutoModel.from_pretrained(folder, trust_remote_code=True)``."""

import io
import json
import threading
from pathlib import Path

import explainer
import imaging
import numpy as np
import pytest
import torch
from errors import UserError
from explainer import ModelChoice, PromptError, Settings
from PIL import Image

from clipviz.openai_clip import OPENAI_MEAN, OPENAI_STD
from explaining_clipviz import EXPLAIN_METHODS
from tests.helpers import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


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


def embedded_folders(root: Path, names=explainer.EMBEDDED_NAMES) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    return root


def online() -> bool:
    return True


def offline() -> bool:
    return False


def test_default_choices_put_the_embedded_models_first_then_the_hub_repos(tmp_path):
    choices = explainer.model_choices({"CLIPVIZ_EMBEDDED_DIR": str(embedded_folders(tmp_path))}, online)
    assert [c.label for c in choices[:2]] == ["embedded: clipviz-tiny-vit", "embedded: clipviz-tiny-resnet"]
    assert choices[0].source == str(tmp_path / "clipviz-tiny-vit")
    assert [c.label for c in choices[2:]] == explainer.hub_repos({})
    assert "clipviz/clip-vit-b-16" in explainer.hub_repos({}) and len(explainer.hub_repos({})) == 9
    assert [c.knows_photos for c in choices[:3]] == [False, False, True]


def test_offline_the_dropdown_lists_only_models_that_can_load(tmp_path, monkeypatch):
    """Without the Hub (unreachable, or HF_HUB_OFFLINE=1) the default Hub repos are not listed, and an embedded model
    that is not present is left out; configured Hub repos are listed (they may be in the local cache)."""
    monkeypatch.setattr(explainer, "SPACE_DIR", tmp_path / "space")  # not the repository's embedded/ folder
    env = {"CLIPVIZ_EMBEDDED_DIR": str(embedded_folders(tmp_path, ["clipviz-tiny-vit"]))}
    assert [c.label for c in explainer.model_choices(env, offline)] == ["embedded: clipviz-tiny-vit"]
    never = lambda: pytest.fail("HF_HUB_OFFLINE=1: the Hub is not asked")  # noqa: E731
    assert [c.label for c in explainer.model_choices({**env, "HF_HUB_OFFLINE": "1"}, never)] == [
        "embedded: clipviz-tiny-vit"
    ]
    configured = explainer.model_choices({**env, "CLIPVIZ_HUB_REPOS": "me/my-clip"}, offline)
    assert [c.label for c in configured] == ["embedded: clipviz-tiny-vit", "me/my-clip"]
    assert [c.label for c in explainer.model_choices({**env, "CLIPVIZ_HUB_ORG": "me"}, offline)][1] == "me/clip-rn50"


def test_with_no_local_model_at_all_the_embedded_entries_stay_to_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(explainer, "SPACE_DIR", tmp_path / "space")  # neither space/models nor ../embedded
    labels = [c.label for c in explainer.model_choices({}, offline)]
    assert labels == ["embedded: clipviz-tiny-vit", "embedded: clipviz-tiny-resnet"]
    assert [c.label for c in explainer.model_choices({"CLIPVIZ_MODEL": "org/x"}, offline)] == ["org/x"]


def test_models_shipped_with_the_space_come_before_the_embedded_ones(tmp_path, monkeypatch):
    space = tmp_path / "space"
    embedded_folders(space / "models", ["clipviz-tiny-vit", "my-vit-b-16"])
    (space / "models" / "not-a-model").mkdir()
    monkeypatch.setattr(explainer, "SPACE_DIR", space)
    choices = explainer.model_choices({}, offline)
    assert [c.label for c in choices] == ["my-vit-b-16", "embedded: clipviz-tiny-vit"]
    assert choices[0].source == str(space / "models" / "my-vit-b-16") and choices[0].knows_photos
    cache = explainer.ModelCache(choices)
    assert cache.knows_photos(None) and not cache.knows_photos("embedded: clipviz-tiny-vit")
    assert not cache.knows_photos("someone/else")


def test_hub_reachability_is_asked_once_and_never_offline(monkeypatch):
    from huggingface_hub import constants

    from tests.hub_server import HubServer

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(explainer, "_reachability", {})
    with HubServer() as hub:
        assert explainer.hub_reachable(hub.url)
        closed = hub.url
        count = len(hub.log)
    assert explainer.hub_reachable(closed)  # remembered: not asked again within the ttl
    assert not explainer.hub_reachable(closed, ttl=0)  # asked again: the server is gone
    assert count == 1
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(explainer, "_reachability", {})
    assert not explainer.hub_reachable(closed, ttl=0) and explainer._reachability == {}


def test_a_hub_model_while_the_hub_does_not_answer_fails_at_once_from_the_local_cache(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, the Hub simply unreachable (a closed port): loading reads the local cache only, so the
    error comes without the download retries, and says so."""
    from huggingface_hub import constants

    from tests.hub_server import HubServer

    with HubServer() as hub:
        closed = hub.url
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(explainer, "_reachability", {})
    with pytest.raises(explainer.ModelLoadError) as caught:
        explainer.load_model(ModelChoice("clipviz/clip-vit-b-16", "clipviz/clip-vit-b-16"))
    assert str(caught.value) == (
        f"Could not load the model 'clipviz/clip-vit-b-16': the Hub ({closed}) does not answer and the model is not "
        "in the local cache. Choose a local model, or run with network access."
    )


def test_hub_ids_and_folders_are_told_apart(tmp_path):
    assert explainer.is_hub_id("clipviz/clip-rn50") and explainer.is_hub_id("gpt2")
    assert not explainer.is_hub_id(str(tmp_path / "nowhere")) and not explainer.is_hub_id("./models/x")
    assert not explainer.is_hub_id("a/b/c") and not explainer.is_hub_id(str(tmp_path))


def test_clipviz_model_and_revision_come_first(tmp_path):
    env = {"CLIPVIZ_MODEL": "org/my-clip", "CLIPVIZ_REVISION": "a" * 40, "CLIPVIZ_EMBEDDED_DIR": str(tmp_path)}
    first = explainer.model_choices(env, offline)[0]
    assert first == ModelChoice("org/my-clip", "org/my-clip", "a" * 40)
    env = {"CLIPVIZ_MODEL": "clipviz/clip-rn50", "CLIPVIZ_EMBEDDED_DIR": str(tmp_path)}
    labels = [c.label for c in explainer.model_choices(env, online)]
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
    assert "attention" in vit.registry.EXPLAIN_METHODS  # the model's own registry (its remote-code module)
    assert vit.registry.__name__.startswith("transformers_modules.")  # loaded from the folder, not this checkout
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
    settings = explainer.settings_from_ui("attention", True, 0.3, "viridis", "fade", {"layer": "2", "head": "3"})
    assert settings == Settings("attention", {"layer": "2", "head": "3"}, True, 0.3, "viridis", "fade")
    unset = explainer.settings_from_ui(None, False, 0.5, "jet", None, {})
    assert (unset.method, unset.style) == (explainer.DEFAULT_METHOD, "full")
    with pytest.raises(UserError, match="opacity must be between 0 and 1"):
        explainer.settings_from_ui("relevance", False, 1.5, "jet", "full", {})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"alpha": "abc"}, r"overlay opacity \(opacity\) must be a number, not 'abc'"),
        ({"alpha": None}, r"overlay opacity \(opacity\) must be a number, not None"),
        ({"alpha": "nan"}, r"overlay opacity \(opacity\) must be a number, not 'nan'"),
        ({"alpha": True}, r"overlay opacity \(opacity\) must be a number, not True"),
        ({"head_grid": "maybe"}, "head_grid option must be true or false, not 'maybe'"),
    ],
)
def test_non_numeric_api_values_get_readable_errors(values, message):
    """What an API client can send for the sliders and the checkbox: a UserError naming the option, not float()'s."""
    ui = {"method": "rollout", "head_grid": False, "alpha": 0.5, "colormap": "jet", "style": "full", "options": {}}
    with pytest.raises(UserError, match=message):
        explainer.settings_from_ui(**(ui | values))


def test_numbers_and_flags_as_text_are_accepted():
    settings = explainer.settings_from_ui("rollout", "true", "0.25", "jet", "full", {"discard_ratio": "0.5"})
    assert (settings.alpha, settings.head_grid) == (0.25, True)
    assert explainer.settings_from_ui("rollout", "false", 1, "jet", "full", {}).head_grid is False


# ---- methods and options from the registry ----


def registry_options() -> list[tuple[str, str]]:
    """(method, option) pairs of the repository's registry, in registry order."""
    from explaining_clipviz import EXPLAIN_METHODS

    return [(m.name, o.name) for m in EXPLAIN_METHODS.values() for o in m.options]


def test_option_fields_are_the_registry_options(loaded):
    fields = explainer.option_fields(loaded["vit"].registry)
    pairs = registry_options()
    assert [f.key for f in fields] == list(dict.fromkeys(name for _, name in pairs))
    for f in fields:
        assert f.name == f.key and set(f.methods) == {m for m, name in pairs if name == f.name}


def test_option_fields_give_clashing_names_their_own_control():
    from types import SimpleNamespace

    from explaining_clipviz import ExplainOption

    def method(name, *options):
        return SimpleNamespace(name=name, options=options)

    registry = SimpleNamespace(
        EXPLAIN_METHODS={
            "a": method("a", ExplainOption("layer", "image_layer", -1, "h"), ExplainOption("model", "choice", "x", "h", ("x",))),
            "b": method("b", ExplainOption("layer", "text_layer", -1, "h"), ExplainOption("ratio", "float", 0.5, "h", minimum=0.0, maximum=1.0, maximum_exclusive=True)),
            "c": method("c", ExplainOption("layer", "image_layer", 0, "h")),
        }
    )  # fmt: skip
    fields = {f.key: f for f in explainer.option_fields(registry)}
    assert list(fields) == ["layer", "a_model", "b_layer", "ratio"]
    assert fields["layer"].methods == ("a", "c") and fields["b_layer"].kind == "text_layer"
    assert fields["a_model"].name == "model"  # "model" is the page's own parameter
    assert (fields["ratio"].minimum, fields["ratio"].maximum) == (0.0, 0.99)  # below the exclusive maximum
    assert explainer.option_fields(None) == []


@pytest.mark.parametrize(
    ("backbone", "settings", "options"),
    [
        ("vit", Settings("attention"), {}),
        ("vit", Settings("attention", {"layer": "1", "head": "4"}), {"layer": 0, "head": 3}),
        ("vit", Settings("attention", {"layer": "last", "head": "max", "text_head": "same"}), {"layer": -1, "head": "max", "text_head": None}),
        ("vit", Settings("attention", {"text_layer": "1", "text_head": "2"}), {"text_layer": 0, "text_head": 1}),
        ("vit", Settings("rollout", {"head_fusion": "min", "discard_ratio": 0.5}), {"head_fusion": "min", "discard_ratio": 0.5}),
        ("vit", Settings("relevance", {"start_layer": "1", "head": "3"}), {"start_layer": 0}),  # head: not relevance's
        ("vit", Settings("gradcam"), {}),
        ("resnet", Settings("attention", {"head": "2", "layer": "1"}), {"head": 1, "layer": 0}),
        ("resnet", Settings("relevance", {"start_layer": "1"}), {}),  # no image start layer on a ResNet
        ("resnet", Settings("gradcam"), {}),
    ],
)  # fmt: skip
def test_plans_map_the_page_values_onto_what_model_explain_accepts(loaded, backbone, settings, options):
    model = loaded[backbone]
    chosen = explainer.plan(model, settings)
    assert (chosen.method, chosen.call_method, chosen.options) == (settings.method, settings.method, options)
    assert chosen.resolved == model.registry.resolve_options(settings.method, options, model.config)
    size = model.image_size
    ids = explainer.tokenize_prompts(model.tokenizer, ["a cat"], 77)
    out = model.model.explain(
        torch.zeros(1, 3, size, size), ids.input_ids, ids.attention_mask, settings.method, **options
    )
    assert out.image_maps.shape[:2] == (1, 1)


def test_the_models_default_method_is_used_when_none_is_chosen(loaded):
    """method "default": ``model.explain(method=None)``, i.e. config.explain_method with config.explain_options."""
    model = loaded["vit"]
    model.config.explain_method, model.config.explain_options = "rollout", {"head_fusion": "max"}
    try:
        chosen = explainer.plan(model, Settings(options={"head_fusion": "min"}))  # controls do not apply to it
        assert (chosen.method, chosen.call_method, chosen.options, chosen.is_default) == ("rollout", None, {}, True)
        assert chosen.resolved == {"head_fusion": "max", "discard_ratio": 0.0}
        cache = explainer.ModelCache([model.choice], loader=lambda choice: model)
        result = explainer.run_request(cache, png_bytes(photo()), "a cat\na dog", None, Settings())
        assert result.note.startswith("This model's default method (head fusion: max, discard ratio: 0.0). **Attention")
        ids = explainer.tokenize_prompts(model.tokenizer, ["a cat"], 77)
        prepared = explainer.prepare_image(photo(), model)
        expected = model.model.explain(
            prepared.pixel_values, ids.input_ids, ids.attention_mask, "rollout", head_fusion="max"
        )
        default = model.model.explain(prepared.pixel_values, ids.input_ids, ids.attention_mask, chosen.call_method)
        assert torch.equal(expected.image_maps, default.image_maps)
        assert explainer.controls(model).methods[0] == ("Model's default: Attention rollout", "default")
        model.config.explain_options = {"head_fusion": "median"}
        with pytest.raises(UserError, match="This model's default explanation is invalid"):
            explainer.plan(model, Settings())
    finally:
        model.config.explain_method, model.config.explain_options = "relevance", {}


@pytest.mark.parametrize(
    ("backbone", "settings", "message"),
    [
        ("resnet", Settings("rollout"), "Attention rollout is not available for this model's ResNet image tower .*It needs a stack of attention layers"),
        ("vit", Settings("saliency"), "Unknown method 'saliency'; choose one of: default, attention, rollout, relevance, gradcam"),
        ("vit", Settings("attention", {"layer": "3"}), "The layer must be 'last' or a number from 1 to 2 for this model, not '3'"),
        ("vit", Settings("attention", {"layer": "top"}), "The layer must be 'last' or a number from 1 to 2"),
        ("vit", Settings("attention", {"head": "5"}), "The head must be 'mean', 'max' or a number from 1 to 4 for this model, not '5'"),
        ("vit", Settings("attention", {"head": "0"}), "The head must be 'mean', 'max' or a number from 1 to 4"),
        ("vit", Settings("attention", {"text_head": "x"}), "The text head must be 'same', 'mean', 'max' or a number from 1 to"),
        ("vit", Settings("rollout", {"head_fusion": "median"}), "Attention rollout: `head_fusion`='median' is not valid here; valid values: 'mean', 'max', 'min'"),
        ("vit", Settings("rollout", {"discard_ratio": 1.0}), r"Attention rollout: `discard_ratio`=1.0 must be a number in \[0, 1\)"),
        ("vit", Settings("rollout", {"discard_ratio": "lots"}), "The discard ratio must be a number, not 'lots'"),
        ("vit", Settings("relevance", colormap="rainbow"), "Unknown colour map 'rainbow'; choose one of: jet"),
        ("vit", Settings("relevance", style="soft"), "Unknown overlay style 'soft'; choose one of: full, fade"),
    ],
)  # fmt: skip
def test_invalid_options_are_explained(loaded, backbone, settings, message):
    with pytest.raises(UserError, match=message):
        explainer.plan(loaded[backbone], settings)


def test_controls_follow_the_backbone(loaded):
    registry = loaded["vit"].registry
    vit, resnet = explainer.controls(loaded["vit"]), explainer.controls(loaded["resnet"])
    assert [m for _, m in vit.methods] == ["default"] + [m.name for m in registry.methods_for("vit")]
    assert [m for _, m in resnet.methods] == ["default"] + [m.name for m in registry.methods_for("resnet")]
    assert "rollout" not in [m for _, m in resnet.methods] and "ResNet" in resnet.status
    assert "Not offered for this image tower: Attention rollout" in resnet.status
    assert "Not offered" not in vit.status


def test_field_views_follow_the_model_and_the_method(loaded):
    fields = explainer.option_fields(loaded["vit"].registry)
    keys = [f.key for f in fields]

    def shown(backbone, method):
        views = explainer.field_views(loaded[backbone], fields, method)
        return {key: (view.choices, view.value) for key, view in zip(keys, views, strict=True) if view.visible}

    attention = shown("vit", "attention")
    assert attention["layer"] == (("last", "1", "2"), "last")
    assert attention["head"] == (("mean", "max", "1", "2", "3", "4"), "mean")
    assert attention["text_head"][1] == "same" and attention["text_head"][0][:3] == ("same", "mean", "max")
    assert set(attention) == {"layer", "head", "text_layer", "text_head"}
    assert shown("vit", "rollout") == {"head_fusion": (("mean", "max", "min"), "mean"), "discard_ratio": ((), 0.0)}
    assert set(shown("vit", "relevance")) == {"start_layer", "start_layer_text", "target"}
    assert set(shown("resnet", "relevance")) == {"start_layer_text", "target"}  # no image start layer on a ResNet
    assert shown("resnet", "attention")["layer"] == (("last", "1"), "last")
    target = (("logit", "contrast"), "logit")  # one control shared by the methods that take it
    assert shown("vit", "default") == {} and shown("vit", "gradcam") == {"target": target}
    assert shown("vit", "legrad")["target"] == target


def test_a_method_added_to_the_registry_appears_with_its_controls_and_runs(loaded):
    """Nothing in the Space names the methods: one registered in the model's registry (a toy "patch norm" with an
    int and a choice option, ViT only) is offered, gets its controls, is explained by its own note and runs."""
    import dataclasses

    model = loaded["vit"]
    registry = model.registry

    def norm_maps(net, inputs, options):
        registry.encode(net, inputs, image_attentions=False)
        tokens = inputs.vision.last_hidden_state[:, 1:]  # [I, gh*gw, D]
        image = tokens.norm(dim=-1) ** options["power"]  # [I, gh*gw]
        image = image[None].expand(inputs.input_ids.shape[0], *image.shape).transpose(0, 1)  # [I, T, gh*gw]
        text = torch.ones(image.shape[0], *inputs.input_ids.shape)  # [I, T, L]
        return registry._to_grid(image, inputs), text

    method = registry.ExplainMethod(
        name="patchnorm", title="Patch norm", function=norm_maps, backbones=("vit",),
        options=(
            registry.ExplainOption("power", "int", 1, "exponent", minimum=1, maximum=3),
            registry.ExplainOption("flavour", "choice", "plain", "a choice", ("plain", "fancy")),
        ),
        prompt_dependent=False, cost="forward only", needs_grad=False,
        how_to_read="Bright patches have large token norms.", reference="A toy method for this test.",
    )  # fmt: skip
    registry.register(method)
    try:
        fields = explainer.option_fields(registry)
        power = next(f for f in fields if f.key == "power")
        assert dataclasses.astuple(power)[2:] == ("int", "Power", "exponent", (), 1, 3, 1, ("patchnorm",))
        assert ("Patch norm", "patchnorm") in explainer.controls(model).methods
        assert "Patch norm" not in dict(explainer.controls(loaded["resnet"]).methods)
        views = dict(zip([f.key for f in fields], explainer.field_views(model, fields, "patchnorm"), strict=True))
        assert {k for k, v in views.items() if v.visible} == {"power", "flavour"}
        assert views["flavour"].choices == ("plain", "fancy") and views["power"].value == 1
        cache = explainer.ModelCache([model.choice], loader=lambda choice: model)
        settings = Settings("patchnorm", {"power": "2", "flavour": "fancy"})
        result = explainer.run_request(cache, png_bytes(photo()), "a cat", None, settings)
        assert result.note.startswith("**Patch norm**: Bright patches have large token norms.")
        with pytest.raises(UserError, match=r"Patch norm: `power`=4 must be a whole number in \[1, 3\]"):
            explainer.plan(model, Settings("patchnorm", {"power": 4}))
        # each model folder runs its own copy of the code: the ResNet model's registry never heard of it
        with pytest.raises(UserError, match="Unknown method 'patchnorm'; choose one of: default, attention, rel"):
            explainer.plan(loaded["resnet"], Settings("patchnorm"))
    finally:
        del registry.EXPLAIN_METHODS["patchnorm"]


def test_the_page_is_laid_out_from_the_default_models_registry_or_the_repositorys(loaded):
    import explaining_clipviz

    def failing(choice):
        raise explainer.ModelLoadError("offline")

    working = explainer.ModelCache([loaded["vit"].choice], loader=lambda choice: loaded["vit"])
    assert explainer.page_registry(working) is loaded["vit"].registry
    assert explainer.page_registry(explainer.ModelCache([ModelChoice("x", "x")], loader=failing)) is explaining_clipviz
    assert [v for _, v in explainer.page_methods(explaining_clipviz)] == [
        "default",
        *explaining_clipviz.EXPLAIN_METHODS,
    ]


def test_every_method_has_its_registry_note(loaded):
    for backbone in ("vit", "resnet"):
        model = loaded[backbone]
        for entry in model.registry.methods_for(backbone):
            note = explainer.method_note(model, entry.name)
            assert note.startswith(f"**{entry.title}**: {entry.how_to_read}") and entry.reference in note
            assert f"Cost: {entry.cost}." in note  # e.g. occlusion: one image-tower pass per window position
        assert explainer.method_note(model, "default").startswith("This model's default method")
    assert "class token" in explainer.method_note(loaded["vit"], "attention")


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
    assert result.head_grid == [] and result.note == explainer.method_note(model, "relevance")


def test_overlays_sit_on_the_right_place_of_a_non_square_photo(loaded):
    """A map hot at the grid cells of the photo's top-left corner colours the photo's top-left corner."""
    model = loaded["vit"]
    prepared = explainer.prepare_image(photo((64, 32)), model)  # letterboxed: content in grid rows 1..2 of 4
    hot = np.zeros((4, 4), np.float32)
    hot[1, 0] = 1.0
    settings = Settings(alpha=1.0, colormap="gray")
    overlay = np.asarray(explainer.draw(prepared, hot, settings), np.float32).mean(-1)  # [256, 512]
    assert overlay.shape == (256, 512)
    assert overlay[:64, :64].mean() > 3 * overlay[-64:, -64:].mean()
    untouched = explainer.draw(prepared, hot, Settings(alpha=0.0))
    assert np.array_equal(np.asarray(untouched), np.asarray(prepared.display))
    faded = np.asarray(explainer.draw(prepared, hot, Settings(alpha=1.0, colormap="gray", style="fade")), np.float32)
    display = np.asarray(prepared.display, np.float32)
    assert np.abs(faded[-64:, -64:] - display[-64:, -64:]).max() <= 1  # cold regions: the photo itself


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
    maps = explainer.head_maps(model, prepared.pixel_values, 0)
    assert len(maps) == model.num_heads
    ids = explainer.tokenize_prompts(model.tokenizer, ["a cat"], 77)
    for head in range(model.num_heads):
        options = explainer.plan(model, Settings("attention", {"layer": "1", "head": str(head + 1)})).options
        expected = model.model.explain(prepared.pixel_values, ids.input_ids, ids.attention_mask, "attention", **options)
        assert np.allclose(maps[head], expected.image_maps[0, 0].numpy(), atol=1e-5)


def test_image_heads_the_text_tower_lacks_need_a_text_head(tmp_path):
    """ViT-B/16-like head counts (more image than text heads): every image head is offered, the text head control
    offers the text tower's; an image head the text tower lacks, with the text head left at "same", says so."""
    model = explainer.load_model(
        ModelChoice("tiny", str(save_tiny_model(tmp_path / "m", "vit", num_attention_heads=2)))
    )
    assert (model.num_heads, model.num_text_heads) == (4, 2)
    fields = explainer.option_fields(model.registry)
    views = dict(zip([f.key for f in fields], explainer.field_views(model, fields, "attention"), strict=True))
    assert views["head"].choices == ("mean", "max", "1", "2", "3", "4")
    assert views["text_head"].choices == ("same", "mean", "max", "1", "2")
    assert explainer.plan(model, Settings("attention", {"head": "2"})).resolved["text_head"] == 1
    with pytest.raises(
        UserError, match=r"Raw attention: `head`=3 exists in the image tower \(4 heads\) but not in the text"
    ):
        explainer.plan(model, Settings("attention", {"head": "4"}))
    result = explainer.run_request(
        explainer.ModelCache([model.choice], loader=lambda choice: model), png_bytes(photo()), "a cat", None,
        Settings("attention", {"head": "4", "text_head": "mean"}),
    )  # fmt: skip
    assert len(result.overlays) == 1


def test_request_with_head_grid(loaded):
    cache = explainer.ModelCache([loaded["vit"].choice], loader=lambda choice: loaded["vit"])
    settings = Settings("attention", {"layer": "2", "head": "2"}, head_grid=True)
    result = explainer.run_request(cache, png_bytes(photo()), "a cat\na dog", None, settings)
    assert [caption for _, caption in result.head_grid] == [f"layer 2, head {h}" for h in range(1, 5)]
    assert all(image.size == (192, 128) for image, _ in result.head_grid)
    # raw attention on the image side ignores the prompt: both prompts get the same overlay
    assert np.array_equal(np.asarray(result.overlays[0][0]), np.asarray(result.overlays[1][0]))
    relevance = explainer.run_request(cache, png_bytes(photo()), "a cat", None, Settings("relevance", head_grid=True))
    assert relevance.head_grid[0][1] == "layer 2, head 1"  # relevance's start layer: the last by default


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
        assert 2 <= len(explainer.parse_prompts(prompts)) <= explainer.MAX_PROMPTS
        assert method in EXPLAIN_METHODS
        assert Path(path).name in licences or ("scene_" in path and "scene_*.png" in licences)


def test_examples_split_into_scenes_and_photos():
    scenes, photos = explainer.load_examples(kind="scene"), explainer.load_examples(kind="photo")
    assert len(scenes) == 3 and len(photos) >= 3 and len(scenes) + len(photos) == len(explainer.load_examples())
    assert all(Path(row[0]).name.startswith("scene_") for row in scenes)
    assert not any(Path(row[0]).name.startswith("scene_") for row in photos)


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


# ---- words without relevance ----


def test_token_scores_scale_per_prompt_and_mark_all_zero_rows():
    pieces = [["a ", "cat "], ["a ", "dog "]]
    text_maps = np.array([[0.0, 0.2, 0.4, 0.9, 0.0], [0.0, 0.0, 0.0, 0.7, 0.0]])  # [start, a, cat/dog, end, pad]
    scores = explainer.token_scores(pieces, text_maps)
    assert np.allclose(scores[0], [0.5, 1.0]) and scores[1] is None  # the end marker's 0.7 does not count
    entries = explainer.token_entries(pieces, scores)
    assert entries == [("1. ", None), ("a ", 0.5), ("cat ", 1.0), ("   2. ", None), ("a ", None), ("dog ", None)]
    note = explainer.silent_words_note("Grad-CAM", ["a cat", "a dog"], scores)
    assert note.startswith("**No word relevance for prompt 2 (“a dog”)**: Grad-CAM gave every word of it a score")
    assert explainer.silent_words_note("Grad-CAM", ["a cat"], scores[:1]) == ""


def test_gradcam_on_a_photo_with_the_embedded_model_explains_its_uncoloured_words():
    """The embedded model knows shapes, not photos: Grad-CAM's text maps for a cat photo come out zero everywhere.
    The words are shown plain and the note says why, instead of an all-zero highlight that looks broken."""
    folder = ROOT / "embedded" / "clipviz-tiny-vit"
    loaded = explainer.load_model(ModelChoice("embedded: clipviz-tiny-vit", str(folder)))
    image = imaging.decode_image(explainer.SPACE_DIR / "examples" / "chelsea.jpg")
    prompts = ["a photo of a cat", "a photo of a dog"]
    result = explainer.explain(loaded, image, prompts, Settings("gradcam"))
    assert all(score is None for _, score in result.token_relevance)
    assert result.note.startswith("**No word relevance for prompts 1 (“a photo of a cat”), 2 (“a photo of a dog”)**")
    assert "Grad-CAM" in result.note.split("\n\n", 1)[1]  # the method's own how-to-read text follows
