"""Configuration of clipviz: OpenAI's CLIP (ViT and ModifiedResNet image towers) as a transformers model.

This file ships to the Hub as remote code: it imports only the standard library and transformers.
"""

from transformers import PretrainedConfig

VISION_BACKBONES = ("vit", "resnet")
ACTIVATIONS = ("quick_gelu", "gelu")
RESNET_DOWNSAMPLING = 32  # stem (4x) and three strided stages (2x each): the attention-pool grid is image_size // 32
# `save_pretrained` records AutoConfig and AutoModel itself; the zero-shot pipeline looks for this entry too.
ZERO_SHOT_AUTO_MAP = {"AutoModelForZeroShotImageClassification": "modeling_clipviz.CLIPVizModel"}


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}`={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}.")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_positive_float(name: str, value) -> None:
    """LayerNorm's epsilon and the like: a finite number above 0 (0 or less divides by zero or by a negative
    variance, inf flattens every output: both only produce NaN/inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ValueError(f"`{name}` must be a finite number above 0 (e.g. 1e-5), got {value!r}.")


def _check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


def _check_heads(width_name: str, width: int, heads: int) -> None:
    _check_positive_int(width_name, width)
    _check_positive_int("num_attention_heads", heads)
    if width % heads:
        divisors = [d for d in range(1, width + 1) if width % d == 0 and d <= 128]
        raise ValueError(
            f"`{width_name}`={width} is not divisible by `num_attention_heads`={heads}; "
            f"allowed head counts for this width: {divisors}."
        )


class CLIPVizTextConfig(PretrainedConfig):
    """Text tower of clipviz: OpenAI's causal text transformer, pooled at the first end-of-text token.

    Args:
        vocab_size (`int`, defaults to 49408): size of OpenAI's BPE vocabulary (incl. start/end-of-text tokens).
        hidden_size (`int`, defaults to 512): width of the transformer (`transformer_width` in OpenAI's code).
        intermediate_size (`int`, *optional*): width of the MLP; defaults to `4 * hidden_size` as in OpenAI's code.
        num_hidden_layers (`int`, defaults to 12): number of residual attention blocks.
        num_attention_heads (`int`, defaults to 8): attention heads per block; must divide `hidden_size`.
        max_position_embeddings (`int`, defaults to 77): the context length; longer `input_ids` are rejected.
        hidden_act (`str`, defaults to `"quick_gelu"`): `"quick_gelu"` (OpenAI) or `"gelu"` (some open_clip models).
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm, a finite number above 0.
        bos_token_id / eos_token_id / pad_token_id (`int`): OpenAI's `<|startoftext|>`, `<|endoftext|>` and the
            padding id (OpenAI pads with 0; pooling takes the first maximal id, so padding never changes it).
    """

    model_type = "clipviz_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size=49408,
        hidden_size=512,
        intermediate_size=None,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        initializer_factor=1.0,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.initializer_factor = initializer_factor
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Raise `ValueError` naming the field when the settings cannot build a text tower."""
        for name in ("vocab_size", "num_hidden_layers", "max_position_embeddings", "intermediate_size"):
            _check_positive_int(name, getattr(self, name))
        _check_heads("hidden_size", self.hidden_size, self.num_attention_heads)
        _check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        _check_positive_float("layer_norm_eps", self.layer_norm_eps)
        _check_finite("initializer_factor", self.initializer_factor)


class CLIPVizVisionConfig(PretrainedConfig):
    """Image tower of clipviz: a ViT (`backbone="vit"`) or OpenAI's ModifiedResNet (`backbone="resnet"`).

    Args:
        backbone (`str`, defaults to `"vit"`): `"vit"` or `"resnet"`.
        image_size (`int`, defaults to 224): input resolution; a multiple of `patch_size` (ViT) or of 32 (ResNet).
        num_channels (`int`, defaults to 3): input channels; OpenAI's models are RGB only.
        hidden_size (`int`, defaults to 768): ViT width. For ResNet it is the feature width `resnet_width * 32`
            (derived when omitted).
        num_hidden_layers (`int`, defaults to 12): ViT blocks (ignored for ResNet, which uses `resnet_layers`).
        num_attention_heads (`int`, *optional*): ViT heads per block (default 12), or the ResNet attention-pool
            heads (default `resnet_width * 32 // 64`, as OpenAI).
        patch_size (`int`, defaults to 32): ViT patch size (ignored for ResNet).
        intermediate_size (`int`, *optional*): ViT MLP width, defaults to `4 * hidden_size`.
        resnet_layers (`list[int]`, defaults to `[3, 4, 6, 3]`): Bottleneck blocks in each of the 4 ResNet stages.
        resnet_width (`int`, defaults to 64): ResNet stem width (stage widths are 1, 2, 4, 8 times this, x4 out).
        hidden_act (`str`, defaults to `"quick_gelu"`): ViT MLP activation, `"quick_gelu"` or `"gelu"`.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm, a finite number above 0.
    """

    model_type = "clipviz_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        backbone="vit",
        image_size=224,
        num_channels=3,
        hidden_size=None,
        num_hidden_layers=12,
        num_attention_heads=None,
        patch_size=32,
        intermediate_size=None,
        resnet_layers=(3, 4, 6, 3),
        resnet_width=64,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        initializer_factor=1.0,
        **kwargs,
    ):
        self.backbone = backbone
        self.image_size = image_size
        self.num_channels = num_channels
        if hidden_size is None:
            hidden_size = resnet_width * 32 if backbone == "resnet" else 768
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        if num_attention_heads is None:  # OpenAI's 64-wide heads
            num_attention_heads = resnet_width * 32 // 64 if backbone == "resnet" else 12
        self.num_attention_heads = num_attention_heads
        self.patch_size = patch_size
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.resnet_layers = list(resnet_layers) if isinstance(resnet_layers, (list, tuple)) else resnet_layers
        self.resnet_width = resnet_width
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.initializer_factor = initializer_factor
        super().__init__(**kwargs)
        self.validate_architecture()

    @property
    def grid_size(self) -> int:
        """Side of the token grid: ViT patches per side, or the ResNet attention-pool grid side."""
        step = self.patch_size if self.backbone == "vit" else RESNET_DOWNSAMPLING
        return self.image_size // step

    def validate_architecture(self) -> None:
        """Raise `ValueError` naming the field when the settings cannot build an image tower."""
        _check_choice("backbone", self.backbone, VISION_BACKBONES)
        _check_positive_int("image_size", self.image_size)
        if self.num_channels != 3:
            raise ValueError(f"`num_channels` must be 3 (OpenAI's CLIP takes RGB images), got {self.num_channels!r}.")
        _check_positive_float("layer_norm_eps", self.layer_norm_eps)
        _check_finite("initializer_factor", self.initializer_factor)
        if self.backbone == "vit":
            self._validate_vit()
        else:
            self._validate_resnet()

    def _validate_vit(self) -> None:
        _check_positive_int("patch_size", self.patch_size)
        _check_positive_int("num_hidden_layers", self.num_hidden_layers)
        _check_positive_int("intermediate_size", self.intermediate_size)
        _check_heads("hidden_size", self.hidden_size, self.num_attention_heads)
        _check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"`image_size`={self.image_size} is not divisible by `patch_size`={self.patch_size}; "
                f"use a multiple of {self.patch_size}, e.g. {self.patch_size * max(1, self.image_size // self.patch_size)}."
            )

    def _validate_resnet(self) -> None:
        layers = self.resnet_layers
        if not (isinstance(layers, list) and len(layers) == 4 and all(isinstance(n, int) and n > 0 for n in layers)):
            raise ValueError(
                f"`resnet_layers` must list 4 positive block counts, one per stage (e.g. [3, 4, 6, 3]), got {layers!r}."
            )
        _check_positive_int("resnet_width", self.resnet_width)
        if self.resnet_width % 2:
            raise ValueError(f"`resnet_width` must be even (the stem starts at width // 2), got {self.resnet_width}.")
        if self.hidden_size != self.resnet_width * 32:
            raise ValueError(
                f"`hidden_size`={self.hidden_size} must equal `resnet_width` * 32 = {self.resnet_width * 32} "
                "for the ResNet backbone (or leave it unset)."
            )
        _check_heads("hidden_size", self.hidden_size, self.num_attention_heads)
        if self.image_size % RESNET_DOWNSAMPLING:
            raise ValueError(
                f"`image_size`={self.image_size} is not divisible by {RESNET_DOWNSAMPLING} (the ResNet's total stride); "
                f"use a multiple of 32, e.g. {RESNET_DOWNSAMPLING * max(1, self.image_size // RESNET_DOWNSAMPLING)}."
            )


def _text(width: int, heads: int) -> dict:
    return {"hidden_size": width, "num_attention_heads": heads, "num_hidden_layers": 12}


def _resnet(layers, width: int, image_size: int) -> dict:
    return {
        "backbone": "resnet",
        "resnet_layers": list(layers),
        "resnet_width": width,
        "num_attention_heads": width * 32 // 64,
        "image_size": image_size,
    }


def _vit(layers: int, width: int, patch_size: int, image_size: int) -> dict:
    return {
        "backbone": "vit",
        "num_hidden_layers": layers,
        "hidden_size": width,
        "num_attention_heads": width // 64,
        "patch_size": patch_size,
        "image_size": image_size,
    }


# The 9 architectures OpenAI published, as `clip.model.build_model` infers them from their checkpoints.
PRESETS = {
    "RN50": {"projection_dim": 1024, "vision_config": _resnet((3, 4, 6, 3), 64, 224), "text_config": _text(512, 8)},
    "RN101": {"projection_dim": 512, "vision_config": _resnet((3, 4, 23, 3), 64, 224), "text_config": _text(512, 8)},
    "RN50x4": {"projection_dim": 640, "vision_config": _resnet((4, 6, 10, 6), 80, 288), "text_config": _text(640, 10)},
    "RN50x16": {"projection_dim": 768, "vision_config": _resnet((6, 8, 18, 8), 96, 384), "text_config": _text(768, 12)},
    "RN50x64": {
        "projection_dim": 1024,
        "vision_config": _resnet((3, 15, 36, 10), 128, 448),
        "text_config": _text(1024, 16),
    },
    "ViT-B/32": {"projection_dim": 512, "vision_config": _vit(12, 768, 32, 224), "text_config": _text(512, 8)},
    "ViT-B/16": {"projection_dim": 512, "vision_config": _vit(12, 768, 16, 224), "text_config": _text(512, 8)},
    "ViT-L/14": {"projection_dim": 768, "vision_config": _vit(24, 1024, 14, 224), "text_config": _text(768, 12)},
    "ViT-L/14@336px": {"projection_dim": 768, "vision_config": _vit(24, 1024, 14, 336), "text_config": _text(768, 12)},
}


class CLIPVizConfig(PretrainedConfig):
    """Configuration of [`CLIPVizModel`]: a text and a vision sub-config plus the shared embedding space.

    Defaults reproduce OpenAI's ViT-B/32. Use [`CLIPVizConfig.from_preset`] for any of the 9 published
    architectures (`CLIPVizConfig.PRESET_NAMES`).

    Args:
        text_config (`dict` or `CLIPVizTextConfig`, *optional*): settings of the text tower.
        vision_config (`dict` or `CLIPVizVisionConfig`, *optional*): settings of the image tower.
        projection_dim (`int`, defaults to 512): size of the joint embedding (`embed_dim` in OpenAI's code).
        logit_scale_init_value (`float`, defaults to log(1 / 0.07)): initial value of the learned log temperature.
        initializer_factor (`float`, defaults to 1.0): scales the standard deviations (and xavier gain) of OpenAI's
            random initialization, as in transformers' CLIP; loaded weights are unaffected.
        explain_method (`str`, defaults to `"relevance"`): the method `model.explain` uses when called without
            `method=` (a name in `explaining_clipviz.EXPLAIN_METHODS` available for the image tower).
        explain_options (`dict`, defaults to `{}`): that method's options (e.g. `{"start_layer": 0}`); options
            passed to `explain` override them. Both are checked when `explain` uses them, with an error naming
            the config.
    """

    model_type = "clipviz"
    sub_configs = {"text_config": CLIPVizTextConfig, "vision_config": CLIPVizVisionConfig}
    PRESET_NAMES = tuple(PRESETS)

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        projection_dim=512,
        logit_scale_init_value=2.6592,
        explain_method="relevance",
        explain_options=None,
        **kwargs,
    ):
        self.text_config = self._sub_config(CLIPVizTextConfig, text_config, "text_config")
        self.vision_config = self._sub_config(CLIPVizVisionConfig, vision_config, "vision_config")
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        self.explain_method = explain_method
        self.explain_options = {} if explain_options is None else explain_options
        self.initializer_factor = kwargs.pop("initializer_factor", 1.0)
        self.auto_map = {**ZERO_SHOT_AUTO_MAP, **(kwargs.pop("auto_map", None) or {})}
        super().__init__(**kwargs)
        _check_positive_int("projection_dim", self.projection_dim)
        _check_finite("logit_scale_init_value", self.logit_scale_init_value)
        _check_finite("initializer_factor", self.initializer_factor)

    @staticmethod
    def _sub_config(config_class, value, name):
        if value is None:
            return config_class()
        if isinstance(value, config_class):
            return value
        if isinstance(value, PretrainedConfig):
            return config_class(**value.to_dict())
        if isinstance(value, dict):
            return config_class(**value)
        raise ValueError(f"`{name}` must be a dict or a {config_class.__name__}, got {type(value).__name__}.")

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "CLIPVizConfig":
        """The config of one of OpenAI's 9 published architectures, e.g. `CLIPVizConfig.from_preset("RN50x4")`.

        Extra keyword arguments override top-level fields (e.g. `logit_scale_init_value`).
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; allowed values: {', '.join(PRESETS)}.")
        preset = PRESETS[name]
        return cls(
            text_config=dict(preset["text_config"]),
            vision_config=dict(preset["vision_config"]),
            projection_dim=preset["projection_dim"],
            **kwargs,
        )


CLIPVizConfig.register_for_auto_class()

__all__ = ["CLIPVizConfig", "CLIPVizTextConfig", "CLIPVizVisionConfig", "PRESETS"]
