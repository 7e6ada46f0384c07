"""The explanation registry (`explaining_clipviz.EXPLAIN_METHODS`): what it lists, how options resolve, the config's
default method, adding a method, and the remote code loading and explaining without Pillow."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import explaining_clipviz as explaining
from explaining_clipviz import (
    EXPLAIN_METHODS,
    ExplainInputs,
    ExplainMethod,
    ExplainOption,
    encode,
    methods_for,
    option_bounds,
    register,
    resolve_options,
)
from tests.helpers import pixels, tiny_config, tiny_model, token_ids

ROOT = Path(__file__).resolve().parents[1]


def test_registry_lists_the_methods_per_backbone_with_complete_entries():
    assert list(EXPLAIN_METHODS)[:4] == ["attention", "rollout", "relevance", "gradcam"]
    assert [m.name for m in methods_for("resnet")][:3] == ["attention", "relevance", "gradcam"]
    assert "rollout" not in [m.name for m in methods_for("resnet")]
    for method in EXPLAIN_METHODS.values():
        assert method.title and method.how_to_read and method.reference and callable(method.function)
        assert method.cost in explaining.COSTS and set(method.backbones) <= {"vit", "resnet"}
        for option in method.options:
            assert option.kind in explaining.OPTION_KINDS and option.help and "\n" not in option.help
    assert EXPLAIN_METHODS["relevance"].needs_grad and not EXPLAIN_METHODS["attention"].needs_grad
    assert EXPLAIN_METHODS["gradcam"].prompt_dependent and not EXPLAIN_METHODS["rollout"].prompt_dependent


def test_resolve_fills_defaults_and_makes_layers_non_negative():
    vit, resnet = tiny_config("vit"), tiny_config("resnet")  # 2 image layers, 4 heads; text: 2 layers, 4 heads
    assert resolve_options("attention", {}, vit) == {"layer": 1, "head": "mean", "text_layer": 1, "text_head": "mean"}
    assert resolve_options("attention", {"head": 3, "layer": -2}, vit)["text_head"] == 3  # follows `head`
    assert resolve_options("attention", {"layer": -1}, resnet)["layer"] == 0  # the one attention pool
    assert resolve_options("relevance", {}, vit) == {"start_layer": 1, "start_layer_text": 1, "target": "logit"}
    assert resolve_options("relevance", {}, resnet) == {"start_layer_text": 1, "target": "logit"}
    assert resolve_options("rollout", {"discard_ratio": 0}, vit) == {"head_fusion": "mean", "discard_ratio": 0.0}
    assert resolve_options("gradcam", {}, resnet) == {"target": "logit"}


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("rollout", {"discard_ratio": -0.1}, r"`discard_ratio`=-0.1 must be a number in \[0, 1\)"),
        ("rollout", {"discard_ratio": "0.5"}, r"must be a number in \[0, 1\)"),
        ("attention", {"text_head": 4}, "valid values: 0, 1, 2, 3, 'mean', 'max'"),
        ("attention", {"text_layer": 1.0}, "valid values: -2 .. 1"),
        ("attention", {"heads": 1}, r"Unknown option\(s\) \['heads'\] .* valid options: layer, head, text_layer"),
    ],
)
def test_resolve_rejects_bad_values_with_the_valid_ones(method, options, message):
    with pytest.raises(ValueError, match=message):
        resolve_options(method, options, tiny_config("vit"))


def test_option_bounds_are_concrete_for_the_model():
    vit, resnet = tiny_config("vit"), tiny_config("resnet")
    layer, head, text_layer, text_head = EXPLAIN_METHODS["attention"].options
    assert option_bounds(layer, vit) == (0, 1) and option_bounds(layer, resnet) == (0, 0)
    assert option_bounds(head, vit) == (0, 1, 2, 3, "mean", "max")
    assert option_bounds(text_layer, resnet) == (0, 1) and option_bounds(text_head, vit)[-2:] == ("mean", "max")
    fusion, ratio = EXPLAIN_METHODS["rollout"].options
    assert option_bounds(fusion, vit) == ("mean", "max", "min")
    assert option_bounds(ratio, vit) == (0.0, 1.0) and ratio.maximum_exclusive


def test_explain_without_a_method_uses_the_config_default():
    model = tiny_model("vit")
    px, ids = pixels(2, 32), token_ids(3, length=10)
    torch.testing.assert_close(model.explain(px, ids).image_maps, model.explain(px, ids, method="relevance").image_maps)
    model.config.explain_method, model.config.explain_options = "attention", {"head": 2}
    expected = model.explain(px, ids, method="attention", head=2)
    torch.testing.assert_close(model.explain(px, ids).image_maps, expected.image_maps)
    overridden = model.explain(px, ids, head="max")  # keyword options override the config's
    torch.testing.assert_close(overridden.image_maps, model.explain(px, ids, method="attention", head="max").image_maps)


def test_config_default_round_trips_and_a_bad_one_is_named(tmp_path):
    model = tiny_model("resnet")
    model.config.explain_method, model.config.explain_options = "gradcam", {}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["explain_method"] == "gradcam"
    model.config.explain_method, model.config.explain_options = "rollout", {}
    with pytest.raises(ValueError, match=r"config.explain_method='rollout'.*not available for the resnet backbone"):
        model.explain(pixels(1, 64), token_ids(1, length=8))
    model.config.explain_method, model.config.explain_options = "attention", ["head"]
    with pytest.raises(ValueError, match="config.explain_options=.*must be a dict"):
        model.explain(pixels(1, 64), token_ids(1, length=8))


def test_a_registered_method_is_offered_validated_and_dispatched():
    def first_token_maps(model, inputs: ExplainInputs, options):
        """The image map is one grid cell; the text map one token: checks dispatch and option passing."""
        encode(model, inputs, image_attentions=False, text_attentions=False)
        num_images, num_texts = inputs.logits.shape
        image = torch.zeros(num_images, num_texts, *inputs.grid)
        image[..., 0, options["cell"]] = options["weight"]
        return image, torch.ones(num_images, num_texts, inputs.input_ids.shape[1])

    method = ExplainMethod(
        name="test-first-cell",
        title="First cell",
        function=first_token_maps,
        backbones=("vit",),
        options=(
            ExplainOption("cell", "int", 0, "grid column", minimum=0, maximum=3),
            ExplainOption("weight", "float", 1.0, "cell value", minimum=0.5),
        ),
        prompt_dependent=False,
        cost="forward only",
        needs_grad=False,
        how_to_read="A test method.",
        reference="none",
    )
    register(method)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(method)
        assert methods_for("vit")[-1] is method and method not in methods_for("resnet")
        model = tiny_model("vit")
        result = model.explain(pixels(1, 32), token_ids(2, length=8), method="test-first-cell", cell=2)
        assert result.image_maps[0, 1, 0, 2] == 1 and result.image_maps.sum() == 2
        assert result.logits_per_image.shape == (1, 2)
        with pytest.raises(ValueError, match=r"`cell`=4 must be a whole number in \[0, 3\]"):
            model.explain(pixels(1, 32), token_ids(2, length=8), method="test-first-cell", cell=4)
    finally:
        del EXPLAIN_METHODS[method.name]


# ---- remote code without Pillow ----

NO_PIL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    try:
        import PIL
    except ImportError:
        pass
    else:
        raise SystemExit("the shim did not hide Pillow")
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    config = model.config
    size, vocab = config.vision_config.image_size, config.text_config.vocab_size
    ids = torch.tensor([[vocab - 2, 5, 6, vocab - 1], [vocab - 2, 7, vocab - 1, 0]])
    result = model.explain(torch.randn(1, 3, size, size), ids)  # the model's default method
    assert result.image_maps.shape[:2] == (1, 2) and bool(torch.isfinite(result.image_maps).all())
    # (on noise, occlusion may find no window whose hiding lowers the score: an all-zero map is a valid answer)
    assert 0.0 <= float(result.image_maps.min()) and float(result.image_maps.max()) <= 1.0
    result = model.explain(torch.randn(1, 3, size, size), ids, method="attention")
    assert float(result.image_maps.max()) == 1.0
    registry = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".explaining_clipviz"]
    for method in registry.methods_for(config.vision_config.backbone):
        model.explain(torch.randn(1, 3, size, size), ids, method=method.name)
    try:
        model.overlay(None, result.image_maps[0, 0])
    except ImportError as error:
        assert "clipviz" in str(error), error
    else:
        raise SystemExit("overlay drew without clipviz")
    print("explained", [m.name for m in registry.methods_for(config.vision_config.backbone)])
    """
)


@pytest.mark.parametrize("name", ["clipviz-tiny-vit", "clipviz-tiny-resnet"])
def test_embedded_model_loads_and_explains_without_pillow(name, tmp_path):
    folder = shutil.copytree(ROOT / "embedded" / name, tmp_path / name)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['PIL'] = None  # `import PIL` raises ImportError\n")
    # outside the repository, with nothing of it on the path: the model's own code files are all it has
    env = dict(os.environ, PYTHONPATH=str(shim), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", NO_PIL_SCRIPT, str(folder)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "explained" in result.stdout and "attention" in result.stdout
