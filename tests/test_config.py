"""CLIPVizConfig: presets, defaults, round trips and clear errors for inconsistent settings."""

import pytest

from configuration_clipviz import PRESETS, CLIPVizConfig, CLIPVizTextConfig, CLIPVizVisionConfig

# (embed_dim, image_resolution, vision layers, vision width, patch) as OpenAI's build_model infers them
OPENAI_ARCHITECTURES = {
    "RN50": (1024, 224, [3, 4, 6, 3], 64, None, 512),
    "RN101": (512, 224, [3, 4, 23, 3], 64, None, 512),
    "RN50x4": (640, 288, [4, 6, 10, 6], 80, None, 640),
    "RN50x16": (768, 384, [6, 8, 18, 8], 96, None, 768),
    "RN50x64": (1024, 448, [3, 15, 36, 10], 128, None, 1024),
    "ViT-B/32": (512, 224, 12, 768, 32, 512),
    "ViT-B/16": (512, 224, 12, 768, 16, 512),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768),
}


@pytest.mark.parametrize("name", list(OPENAI_ARCHITECTURES))
def test_presets_match_openai(name):
    embed_dim, resolution, layers, width, patch, text_width = OPENAI_ARCHITECTURES[name]
    config = CLIPVizConfig.from_preset(name)
    vision, text = config.vision_config, config.text_config
    assert config.projection_dim == embed_dim and vision.image_size == resolution
    if patch is None:
        assert vision.backbone == "resnet" and vision.resnet_layers == layers and vision.resnet_width == width
        assert vision.hidden_size == width * 32 and vision.num_attention_heads == width * 32 // 64
    else:
        assert vision.backbone == "vit" and vision.num_hidden_layers == layers and vision.hidden_size == width
        assert vision.patch_size == patch and vision.num_attention_heads == width // 64
    assert (text.hidden_size, text.num_attention_heads, text.num_hidden_layers) == (text_width, text_width // 64, 12)
    assert (text.vocab_size, text.max_position_embeddings, text.hidden_act) == (49408, 77, "quick_gelu")


def test_presets_cover_the_nine_published_models():
    assert set(PRESETS) == set(OPENAI_ARCHITECTURES) == set(CLIPVizConfig.PRESET_NAMES)


def test_defaults_are_vit_b32():
    default, preset = CLIPVizConfig(), CLIPVizConfig.from_preset("ViT-B/32")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size", "backbone"):
        assert getattr(default.vision_config, field) == getattr(preset.vision_config, field)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(default.text_config, field) == getattr(preset.text_config, field)
    assert default.projection_dim == preset.projection_dim


def test_round_trip(tmp_path):
    config = CLIPVizConfig.from_preset("RN50x4", logit_scale_init_value=1.5)
    config.save_pretrained(tmp_path)
    loaded = CLIPVizConfig.from_pretrained(tmp_path)
    assert isinstance(loaded.vision_config, CLIPVizVisionConfig) and isinstance(loaded.text_config, CLIPVizTextConfig)
    assert loaded.vision_config.resnet_layers == [4, 6, 10, 6] and loaded.logit_scale_init_value == 1.5
    assert loaded.to_dict()["vision_config"] == config.to_dict()["vision_config"]


def test_extra_kwargs_pass_through():
    config = CLIPVizVisionConfig(note="kept")
    assert config.note == "kept"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vision_config": {"hidden_size": 100}}, r"`hidden_size`=100 is not divisible by `num_attention_heads`=12"),
        (
            {"text_config": {"hidden_size": 64, "num_attention_heads": 5}},
            r"allowed head counts for this width: \[1, 2, 4",
        ),
        ({"vision_config": {"image_size": 225}}, r"`image_size`=225 is not divisible by `patch_size`=32"),
        ({"vision_config": {"backbone": "resnet", "image_size": 200}}, r"not divisible by 32"),
        ({"vision_config": {"backbone": "resnet", "resnet_layers": [1, 2, 3]}}, r"`resnet_layers` must list 4"),
        ({"vision_config": {"backbone": "resnet", "resnet_layers": [1, 0, 1, 1]}}, r"4 positive block counts"),
        ({"vision_config": {"backbone": "resnet", "hidden_size": 100}}, r"must equal `resnet_width` \* 32 = 2048"),
        ({"vision_config": {"backbone": "convnext"}}, r"`backbone`='convnext' .* allowed values: 'vit', 'resnet'"),
        ({"vision_config": {"num_channels": 1}}, r"`num_channels` must be 3"),
        ({"text_config": {"hidden_act": "relu"}}, r"`hidden_act`='relu' .*'quick_gelu', 'gelu'"),
        ({"text_config": {"num_hidden_layers": 0}}, r"`num_hidden_layers` must be a positive integer"),
        ({"projection_dim": -1}, r"`projection_dim` must be a positive integer"),
        ({"vision_config": "vit"}, r"`vision_config` must be a dict or a CLIPVizVisionConfig"),
    ],
)
def test_inconsistent_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLIPVizConfig(**kwargs)


def test_unknown_preset_lists_allowed_names():
    with pytest.raises(ValueError, match=r"Unknown preset 'RN18'; allowed values: RN50, RN101, .*ViT-L/14@336px"):
        CLIPVizConfig.from_preset("RN18")
