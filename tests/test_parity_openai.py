"""Parity with OpenAI's own `clip/model.py` for all 9 published architectures at full size (random weights).

The oracle is OpenAI's code (PyPI `openai-clip`, loaded by file path) and PyTorch's own `nn.MultiheadAttention`
for the attention weights, never our own numbers.
"""

import pytest
import torch
from torch import nn

from clipviz import verify
from clipviz.state_dict import (
    CheckpointKeyError,
    config_from_openai_state_dict,
    from_openai_state_dict,
    transformers_clip_config,
)
from configuration_clipviz import PRESETS, CLIPVizConfig
from tests.helpers import TINY_VOCAB, pixels, tiny_config, token_ids
from tests.openai_reference import randomized_openai_clip

OPENAI_VOCAB = 49408


def normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def pytorch_block_attentions(reference_blocks, hidden_states, attn_mask=None) -> list[torch.Tensor]:
    """Per-head weights from PyTorch's `nn.MultiheadAttention` of OpenAI's blocks, fed our block inputs."""
    weights = []
    for block, block_input in zip(reference_blocks, hidden_states, strict=False):
        x = block.ln_1(block_input).permute(1, 0, 2)  # NLD -> LND, OpenAI's layout
        mask = None if attn_mask is None else attn_mask[: x.shape[0], : x.shape[0]]
        _, per_head = block.attn(x, x, x, need_weights=True, average_attn_weights=False, attn_mask=mask)
        weights.append(per_head)  # [B, heads, L, L]
    return weights


def pytorch_attention_pool_weights(attnpool, features: torch.Tensor) -> torch.Tensor:
    """The mean token's per-head weights from an `nn.MultiheadAttention` holding OpenAI's attention-pool weights."""
    width = attnpool.q_proj.in_features
    attention = nn.MultiheadAttention(width, attnpool.num_heads)
    with torch.no_grad():
        attention.in_proj_weight.copy_(
            torch.cat([attnpool.q_proj.weight, attnpool.k_proj.weight, attnpool.v_proj.weight])
        )
        attention.in_proj_bias.copy_(torch.cat([attnpool.q_proj.bias, attnpool.k_proj.bias, attnpool.v_proj.bias]))
    x = features.flatten(2).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
    x = x + attnpool.positional_embedding[:, None, :]
    _, per_head = attention(x, x, x, need_weights=True, average_attn_weights=False)  # [B, heads, HW+1, HW+1]
    return per_head[:, :, :1]  # the mean token's row: [B, heads, 1, HW+1]


def assert_parity(reference, model, image: torch.Tensor, text: torch.Tensor) -> None:
    with torch.no_grad():
        reference_image = reference.encode_image(image)
        reference_text = reference.encode_text(text)
        reference_logits, reference_logits_per_text = reference(image, text)
        out = model(input_ids=text, pixel_values=image, output_attentions=True, output_hidden_states=True)
        image_features = model.vision_model.project(out.vision_model_output.pooler_output)
        text_features = out.text_model_output.pooler_output @ model.text_projection

    tolerance = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(image_features, reference_image, **tolerance)
    torch.testing.assert_close(text_features, reference_text, **tolerance)
    torch.testing.assert_close(out.image_embeds, normalized(reference_image), **tolerance)
    torch.testing.assert_close(out.text_embeds, normalized(reference_text), **tolerance)
    torch.testing.assert_close(out.logits_per_image, reference_logits, **tolerance)
    torch.testing.assert_close(out.logits_per_text, reference_logits_per_text, **tolerance)

    with torch.no_grad():
        text_expected = pytorch_block_attentions(
            reference.transformer.resblocks, out.text_model_output.hidden_states, reference.build_attention_mask()
        )
        if model.config.vision_config.backbone == "vit":
            vision_expected = pytorch_block_attentions(
                reference.visual.transformer.resblocks, out.vision_model_output.hidden_states
            )
        else:
            features = out.vision_model_output.hidden_states[-1]
            vision_expected = [pytorch_attention_pool_weights(reference.visual.attnpool, features)]
    for ours, expected in zip(
        (*out.text_model_output.attentions, *out.vision_model_output.attentions),
        (*text_expected, *vision_expected),
        strict=True,
    ):
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLIPVizConfig.PRESET_NAMES)
def test_full_size_parity_with_openai(name):
    preset = CLIPVizConfig.from_preset(name)
    reference = randomized_openai_clip(preset)
    model = from_openai_state_dict(reference.state_dict())
    # the architecture inferred from shapes is the published one
    assert model.config.projection_dim == PRESETS[name]["projection_dim"]
    for key, value in PRESETS[name]["vision_config"].items():
        assert getattr(model.config.vision_config, key) == value, key
    for key, value in PRESETS[name]["text_config"].items():
        assert getattr(model.config.text_config, key) == value, key
    size = preset.vision_config.image_size
    assert_parity(reference, model, pixels(1, size), token_ids(2, vocab=OPENAI_VOCAB))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B/32", "RN50"])
def test_full_size_batch_of_three_equals_single_passes(name):
    preset = CLIPVizConfig.from_preset(name)
    reference = randomized_openai_clip(preset)
    model = from_openai_state_dict(reference.state_dict())
    images, texts = pixels(3, preset.vision_config.image_size), token_ids(3, vocab=OPENAI_VOCAB)
    with torch.no_grad():
        batched = model(input_ids=texts, pixel_values=images, output_attentions=True)
        for i in range(3):
            single = model(input_ids=texts[i : i + 1], pixel_values=images[i : i + 1], output_attentions=True)
            torch.testing.assert_close(single.image_embeds[0], batched.image_embeds[i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(single.text_embeds[0], batched.text_embeds[i], rtol=1e-4, atol=1e-5)
            for x, y in zip(
                (*single.vision_model_output.attentions, *single.text_model_output.attentions),
                (*batched.vision_model_output.attentions, *batched.text_model_output.attentions),
                strict=True,
            ):
                torch.testing.assert_close(x[0], y[i], atol=1e-6, rtol=0)
    assert_parity(reference, model, images, texts)


# ---- the state-dict bridge on tiny OpenAI models ----


def tiny_openai(backbone: str):
    return randomized_openai_clip(tiny_config(backbone))


def tiny_from_openai(state_dict, **kwargs):
    """Tiny models use 16-wide heads; checkpoints do not record head counts, so they are passed."""
    config = tiny_config("vit")
    heads = {
        "text_heads": config.text_config.num_attention_heads,
        "vision_heads": config.vision_config.num_attention_heads,
    }
    return from_openai_state_dict(state_dict, **heads, **kwargs)


def test_tiny_parity_both_backbones(backbone):
    reference = tiny_openai(backbone)
    model = tiny_from_openai(reference.state_dict())
    assert model.config.vision_config.backbone == backbone
    assert_parity(reference, model, pixels(3, model.config.vision_config.image_size), token_ids(2))


def test_fp16_state_dict_is_accepted(backbone):
    reference = tiny_openai(backbone)
    half = {k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    model = tiny_from_openai(half)
    assert model.dtype == torch.float32
    reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    assert_parity(reference, model, pixels(2, model.config.vision_config.image_size), token_ids(2))
    assert tiny_from_openai(half, dtype=torch.float16).dtype == torch.float16


def test_ignored_metadata_keys(backbone):
    state_dict = dict(tiny_openai(backbone).state_dict())
    state_dict.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=TINY_VOCAB)
    assert tiny_from_openai(state_dict).config.text_config.vocab_size == TINY_VOCAB


def test_missing_unknown_and_misshaped_keys_are_named(backbone):
    state_dict = dict(tiny_openai(backbone).state_dict())
    missing = dict(state_dict)
    del missing["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointKeyError, match=r"lacks tensors .*text_model\.encoder\.layers\.1\.mlp\.fc1\.bias"):
        from_openai_state_dict(missing)
    unknown = dict(state_dict, **{"visual.extra_head.weight": torch.zeros(3)})
    with pytest.raises(CheckpointKeyError, match=r"Unknown keys .*visual\.extra_head\.weight"):
        from_openai_state_dict(unknown)
    misshaped = dict(state_dict)
    misshaped["transformer.resblocks.0.attn.out_proj.weight"] = torch.zeros(64, 65)
    with pytest.raises(
        CheckpointKeyError, match=r"`transformer\.resblocks\.0\.attn\.out_proj\.weight` has shape \(64, 65\)"
    ):
        from_openai_state_dict(misshaped)
    no_text = {k: v for k, v in state_dict.items() if k != "text_projection"}
    with pytest.raises(CheckpointKeyError, match="missing `text_projection`"):
        from_openai_state_dict(no_text)


def test_inferred_heads_follow_openai(backbone):
    state_dict = tiny_openai(backbone).state_dict()
    config = config_from_openai_state_dict(state_dict)
    assert config.text_config.num_attention_heads == 64 // 64
    expected = 64 // 64 if backbone == "vit" else 2 * 32 // 64
    assert config.vision_config.num_attention_heads == expected
    assert config_from_openai_state_dict(state_dict, text_heads=4).text_config.num_attention_heads == 4


def test_fp32_limits_pass_rounding_and_fail_a_wrong_mapping():
    """The conversion's float32 limits (clipviz.verify.FP32_LIMITS) sit between float32 rounding, OpenAI's code
    against ours on the same weights, and a single wrongly mapped tensor, as their comment says."""
    reference = tiny_openai("vit")
    image, text = pixels(2, 32), token_ids(3)
    with torch.no_grad():
        image_embeds, text_embeds = normalized(reference.encode_image(image)), normalized(reference.encode_text(text))
        expected = verify.Outputs(
            image_embeds, text_embeds, reference.logit_scale.exp() * image_embeds @ text_embeds.t()
        )

    def outputs(state_dict) -> verify.Outputs:
        with torch.no_grad():
            out = tiny_from_openai(state_dict)(input_ids=text, pixel_values=image)
        return verify.Outputs(out.image_embeds, out.text_embeds, out.logits_per_image)

    state_dict = reference.state_dict()
    row = verify._parity_row("OpenAI", outputs(state_dict), expected, torch.float32)
    assert max(row.max_abs_diff.values()) < 1e-5
    q, k, v = state_dict["visual.transformer.resblocks.0.attn.in_proj_weight"].chunk(3)
    wrong = {
        "q and k swapped": {"visual.transformer.resblocks.0.attn.in_proj_weight": torch.cat([k, q, v])},
        "ln_2 read as ln_1": {"transformer.resblocks.1.ln_1.weight": state_dict["transformer.resblocks.1.ln_2.weight"]},
        "projection rows flipped": {"visual.proj": state_dict["visual.proj"].flip(0)},
    }
    for name, change in wrong.items():
        try:
            verify._parity_row("OpenAI", outputs({**state_dict, **change}), expected, torch.float32)
        except verify.VerificationError as error:
            assert "disagrees with OpenAI" in str(error), name
        else:
            pytest.fail(f"{name}: within the float32 limits")


def test_transformers_clip_config_copies_the_architecture():
    config = tiny_config("vit")
    config.projection_dim, config.text_config.hidden_act = 16, "gelu"
    hf, ours = transformers_clip_config(config).to_dict(), config.to_dict()
    layer = {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_act",
        "layer_norm_eps",
    }
    for tower, fields in (
        ("text_config", {"vocab_size", "bos_token_id", "eos_token_id"}),
        ("vision_config", {"patch_size"}),
    ):
        shared = set(hf[tower]) & set(ours[tower]) - {"model_type", "transformers_version", "_name_or_path"}
        assert layer | fields <= shared
        assert {key: (hf[tower][key], ours[tower][key]) for key in shared if hf[tower][key] != ours[tower][key]} == {}
    assert hf["projection_dim"] == 16 and hf["text_config"]["hidden_act"] == "gelu"
    with pytest.raises(ValueError, match="no ResNet image tower"):
        transformers_clip_config(tiny_config("resnet"))
