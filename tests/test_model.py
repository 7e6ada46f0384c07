"""CLIPVizModel on tiny configs: shapes, attention conventions, eager vs SDPA, gradients, dtypes, bad inputs."""

import pytest
import torch

from modeling_clipviz import CLIPVizModel, multi_head_attention
from tests.helpers import pixels, tiny_config, tiny_model, token_ids


def run(model, num_images=2, num_texts=3, **kwargs):
    size = model.config.vision_config.image_size
    return model(input_ids=token_ids(num_texts), pixel_values=pixels(num_images, size), **kwargs)


def expected_vision_attention_shapes(config, batch):
    vision = config.vision_config
    if vision.backbone == "vit":
        tokens = vision.grid_size**2 + 1
        return [(batch, vision.num_attention_heads, tokens, tokens)] * vision.num_hidden_layers
    return [(batch, vision.num_attention_heads, 1, vision.grid_size**2 + 1)]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_shapes_and_rows(backbone, implementation):
    model = tiny_model(backbone, implementation)
    assert model.config._attn_implementation == implementation
    out = run(model, output_attentions=True)
    vision_attentions = out.vision_model_output.attentions
    assert [tuple(a.shape) for a in vision_attentions] == expected_vision_attention_shapes(model.config, 2)
    text_attentions = out.text_model_output.attentions
    assert len(text_attentions) == model.config.text_config.num_hidden_layers
    for attention in (*vision_attentions, *text_attentions):
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
        assert (attention >= 0).all()
    for attention in text_attentions:
        assert attention.shape == (3, 4, 77, 77)
        assert attention.triu(1).abs().max() == 0  # causal: no token sees the future


def test_eager_and_sdpa_agree(backbone):
    eager, sdpa = tiny_model(backbone, "eager"), tiny_model(backbone, "sdpa")
    for output_attentions in (False, True):
        a = run(eager, output_attentions=output_attentions, output_hidden_states=True)
        b = run(sdpa, output_attentions=output_attentions, output_hidden_states=True)
        for name in ("logits_per_image", "text_embeds", "image_embeds"):
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
        for tower in ("vision_model_output", "text_model_output"):
            for x, y in zip(a[tower].hidden_states, b[tower].hidden_states, strict=True):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
            if output_attentions:
                for x, y in zip(a[tower].attentions, b[tower].attentions, strict=True):
                    torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
            else:
                assert a[tower].attentions is None and b[tower].attentions is None


def test_attentions_do_not_change_outputs(backbone):
    model = tiny_model(backbone, "sdpa")
    plain, with_attentions = run(model), run(model, output_attentions=True)
    torch.testing.assert_close(plain.logits_per_image, with_attentions.logits_per_image, atol=1e-5, rtol=0)


def test_hidden_states(backbone):
    model = tiny_model(backbone)
    out = run(model, output_hidden_states=True)
    vision = model.config.vision_config
    states = out.vision_model_output.hidden_states
    if backbone == "vit":
        assert len(states) == vision.num_hidden_layers + 1
        assert all(s.shape == (2, vision.grid_size**2 + 1, vision.hidden_size) for s in states)
    else:
        width = vision.resnet_width
        side = vision.image_size // 4
        expected = [(2, width, side, side)] + [
            (2, width * 4 * 2**i, side // 2**i, side // 2**i) for i in range(4)
        ]  # stem, then the 4 stages
        assert [tuple(s.shape) for s in states] == expected
        assert out.vision_model_output.last_hidden_state.shape == expected[-1]
    assert len(out.text_model_output.hidden_states) == model.config.text_config.num_hidden_layers + 1


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_gradients_reach_attentions_and_hidden_states(backbone, implementation):
    model = tiny_model(backbone, implementation)
    out = run(model, output_attentions=True, output_hidden_states=True)
    tensors = [
        *out.vision_model_output.attentions,
        *out.vision_model_output.hidden_states,
        *out.text_model_output.attentions,
        *out.text_model_output.hidden_states,
    ]
    gradients = torch.autograd.grad(out.logits_per_image[0, 1], tensors)
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)
    assert gradients[0].abs().sum() > 0  # the first vision attention does influence the logit
    assert (
        gradients[len(out.vision_model_output.attentions) + len(out.vision_model_output.hidden_states)].abs().sum() > 0
    )


def test_batch_of_three_equals_single_passes(backbone):
    model = tiny_model(backbone)
    size = model.config.vision_config.image_size
    images, texts = pixels(3, size), token_ids(3)
    batched = model(input_ids=texts, pixel_values=images, output_attentions=True)
    for i in range(3):
        single = model(input_ids=texts[i : i + 1], pixel_values=images[i : i + 1], output_attentions=True)
        torch.testing.assert_close(single.image_embeds[0], batched.image_embeds[i], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(single.text_embeds[0], batched.text_embeds[i], atol=1e-6, rtol=1e-5)
        for x, y in zip(single.vision_model_output.attentions, batched.vision_model_output.attentions, strict=True):
            torch.testing.assert_close(x[0], y[i], atol=1e-6, rtol=1e-5)


def test_text_pooling_at_first_end_of_text(backbone):
    model = tiny_model(backbone)
    ids = token_ids(2)
    out = model.text_model(ids)
    eot = (ids == model.config.text_config.eos_token_id).float().argmax(-1)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eot])
    # padding after end-of-text (0 as OpenAI, or the eot id as transformers' tokenizers) does not change pooling
    repadded = ids.clone()
    for row in range(2):
        repadded[row, eot[row] + 1 :] = model.config.text_config.eos_token_id
    torch.testing.assert_close(model.text_model(repadded).pooler_output, out.pooler_output, atol=1e-6, rtol=1e-5)


def test_padding_mask_keeps_pooled_output_and_masks_keys(backbone):
    model = tiny_model(backbone)
    ids = token_ids(2)
    mask = torch.zeros_like(ids)
    for row in range(2):
        mask[row, : int(ids[row].argmax()) + 1] = 1
    plain = model.text_model(ids)
    masked = model.text_model(ids, mask, output_attentions=True)
    torch.testing.assert_close(masked.pooler_output, plain.pooler_output, atol=1e-6, rtol=1e-5)
    padded = ~mask.bool()
    for attention in masked.attentions:  # [B, heads, L, L]
        assert torch.isfinite(attention).all()
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
        to_padding = attention * padded[:, None, None, :]  # weight every query gives to padded keys
        assert to_padding.abs().max() == 0
    with torch.no_grad():  # the explicit path without a graph applies the [B, 1, L, L] mask item by item
        no_graph = model.text_model(ids, mask, output_attentions=True)
        model.set_attn_implementation("eager")
        eager_without_maps = model.text_model(ids, mask)
    for attention, expected in zip(no_graph.attentions, masked.attentions, strict=True):
        torch.testing.assert_close(attention, expected)
    torch.testing.assert_close(no_graph.pooler_output, masked.pooler_output)
    torch.testing.assert_close(eager_without_maps.pooler_output, masked.pooler_output)


def test_return_tuple_and_loss(backbone):
    model = tiny_model(backbone)
    size = model.config.vision_config.image_size
    out = model(input_ids=token_ids(3), pixel_values=pixels(3, size), return_loss=True, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0 and torch.isfinite(out[0])
    logits = out[1]
    expected = (
        torch.nn.functional.cross_entropy(logits, torch.arange(3))
        + torch.nn.functional.cross_entropy(logits.t(), torch.arange(3))
    ) / 2
    torch.testing.assert_close(out[0], expected)


def test_features_match_forward(backbone):
    model = tiny_model(backbone)
    out = run(model)
    size = model.config.vision_config.image_size
    image = model.get_image_features(pixels(2, size))
    text = model.get_text_features(token_ids(3))
    assert isinstance(image, torch.Tensor) and image.shape == (2, 32)
    torch.testing.assert_close(image / image.norm(dim=-1, keepdim=True), out.image_embeds)
    torch.testing.assert_close(text / text.norm(dim=-1, keepdim=True), out.text_embeds)


def test_interpolate_pos_encoding(backbone):
    model = tiny_model(backbone)
    size = model.config.vision_config.image_size
    same = run(model, interpolate_pos_encoding=True)
    torch.testing.assert_close(same.logits_per_image, run(model).logits_per_image)
    bigger = model(
        input_ids=token_ids(2), pixel_values=pixels(1, 2 * size), interpolate_pos_encoding=True, output_attentions=True
    )
    grid = 2 * model.config.vision_config.grid_size
    keys = bigger.vision_model_output.attentions[-1].shape[-1]
    assert keys == grid**2 + 1 and torch.isfinite(bigger.logits_per_image).all()
    with pytest.raises(ValueError, match=rf"doesn't match the model's \({size}x{size}\).*interpolate_pos_encoding"):
        model(input_ids=token_ids(2), pixel_values=pixels(1, 2 * size))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(backbone, dtype):
    model = tiny_model(backbone)
    reference = run(model).logits_per_image
    half = model.to(dtype)
    assert half.text_model.ln_final.weight.dtype == dtype
    out = run(half, output_attentions=True)
    assert out.logits_per_image.dtype == dtype
    assert all(a.dtype == dtype for a in out.vision_model_output.attentions)
    torch.testing.assert_close(
        out.logits_per_image.float(), reference, atol=0.05 if dtype == torch.float16 else 0.2, rtol=0.05
    )


def test_layer_norm_runs_in_fp32():
    model = tiny_model("vit").to(torch.float16)
    layer_norm = model.text_model.ln_final
    x = torch.randn(2, 5, 64).half() * 100
    expected = torch.nn.functional.layer_norm(x.float(), (64,), layer_norm.weight.float(), layer_norm.bias.float())
    torch.testing.assert_close(layer_norm(x), expected.half())


def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(backbone).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.text_model.encoder.gradient_checkpointing
        size = model.config.vision_config.image_size
        loss = model(input_ids=token_ids(2), pixel_values=pixels(2, size), return_loss=True).loss
        loss.backward()
        grads.append(model.text_model.encoder.layers[0].self_attn.qkv_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_openai_initialization(backbone):
    torch.manual_seed(0)
    model = CLIPVizModel(tiny_config(backbone))
    assert model.logit_scale.item() == pytest.approx(2.6592)
    width = model.config.text_config.hidden_size
    qkv = torch.cat([layer.self_attn.qkv_proj.weight for layer in model.text_model.encoder.layers])
    assert qkv.std().item() == pytest.approx(width**-0.5, rel=0.1)
    assert model.text_model.position_embedding.std().item() == pytest.approx(0.01, rel=0.1)
    if backbone == "resnet":
        blocks = [block for stage in (model.vision_model.layer1, model.vision_model.layer4) for block in stage]
        assert all(block.bn3.weight.abs().max() == 0 for block in blocks)


# ---- bad inputs: clear errors ----


def test_bad_inputs(backbone):
    model = tiny_model(backbone)
    size = model.config.vision_config.image_size
    ids, images = token_ids(2), pixels(2, size)
    with pytest.raises(ValueError, match="78 tokens but the context length is 77.*truncation=True"):
        model(input_ids=token_ids(2, length=78), pixel_values=images)
    with pytest.raises(ValueError, match="4 channels but CLIP takes 3"):
        model(input_ids=ids, pixel_values=torch.randn(2, 4, size, size))
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\].*pixel_values\[None\]"):
        model(input_ids=ids, pixel_values=images[0])
    with pytest.raises(ValueError, match=r"doesn't match the model's"):
        model(input_ids=ids, pixel_values=pixels(2, size + 32))
    with pytest.raises(ValueError, match="`attention_mask` shape .* does not match `input_ids`"):
        model(input_ids=ids, pixel_values=images, attention_mask=torch.ones(3, 77))
    with pytest.raises(ValueError, match="matching pairs, got 2 images and 3 texts"):
        model(input_ids=token_ids(3), pixel_values=images, return_loss=True)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
        model(input_ids=ids + 5000, pixel_values=images)
    with pytest.raises(ValueError, match="needs both `input_ids` and `pixel_values`"):
        model(pixel_values=images)


def test_multi_head_attention_paths_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.full((5, 5), float("-inf")).triu(1)
    fast, none = multi_head_attention(q, k, v, mask, need_weights=False, use_sdpa=True)
    manual, weights = multi_head_attention(q, k, v, mask, need_weights=True, use_sdpa=True)
    explicit, no_weights = multi_head_attention(q, k, v, mask, need_weights=False, use_sdpa=False)
    assert none is None and no_weights is None and weights.shape == (2, 3, 5, 5)
    torch.testing.assert_close(fast, manual)
    torch.testing.assert_close(explicit, manual, atol=0, rtol=0)
    torch.testing.assert_close(manual, weights @ v)
    expected = torch.softmax((q @ k.transpose(-2, -1)) / 8**0.5 + mask, dim=-1)  # the textbook formula
    torch.testing.assert_close(weights, expected)


def test_attention_weights_are_in_the_graph():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    _, weights = multi_head_attention(q, k, v, need_weights=True)
    (grad,) = torch.autograd.grad(weights[:, :, 0, 1].sum(), q)
    assert grad[:, :, 0].abs().sum() > 0 and grad[:, :, 1:].abs().sum() == 0  # row 0 depends on query 0 only


@pytest.mark.parametrize("mask", [False, True])
def test_block_for_the_first_queries_equals_the_full_block(mask):
    # explanations run a block for the class token alone: the same values as the full block's first rows
    model = tiny_model("vit")
    block = model.text_model.encoder.layers[0]
    x = torch.randn(2, 7, 64)
    attn_mask = torch.full((7, 7), float("-inf")).triu(1) if mask else None
    with torch.no_grad():
        full, full_weights = block(x, attn_mask, output_attentions=True)
        first, first_weights = block(x, attn_mask, output_attentions=True, num_queries=2)
    assert first.shape == (2, 2, 64) and first_weights.shape == (2, 4, 2, 7)
    torch.testing.assert_close(first, full[:, :2])
    torch.testing.assert_close(first_weights, full_weights[:, :, :2])


def test_initializer_factor_scales_openai_initialization(backbone):
    models = []
    for factor in (1.0, 3.0):
        torch.manual_seed(0)
        models.append(CLIPVizModel(tiny_config(backbone, initializer_factor=factor)))
    base, scaled = (dict(model.named_parameters()) for model in models)
    torch.testing.assert_close(scaled["text_projection"], 3 * base["text_projection"])
    torch.testing.assert_close(scaled["text_model.position_embedding"], 3 * base["text_model.position_embedding"])
    qkv = "text_model.encoder.layers.0.self_attn.qkv_proj.weight"  # OpenAI's normal init of the text blocks
    torch.testing.assert_close(scaled[qkv], 3 * base[qkv])
    if backbone == "vit":  # the xavier init of the ViT blocks' fused projection
        qkv = "vision_model.encoder.layers.0.self_attn.qkv_proj.weight"
        torch.testing.assert_close(scaled[qkv], 3 * base[qkv])
    else:  # PyTorch's default init is left alone
        conv = "vision_model.conv1.weight"
        torch.testing.assert_close(scaled[conv], base[conv])


def count_sdpa_calls(monkeypatch, model) -> int:
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(
            torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
        )
        run(model)
    return len(calls)


def attention_layers(config) -> int:
    vision = config.vision_config
    return config.text_config.num_hidden_layers + (vision.num_hidden_layers if vision.backbone == "vit" else 1)


def test_every_tower_uses_sdpa_by_default(backbone, tmp_path, monkeypatch):
    # the default is resolved on the top-level config only; both towers must follow it, built or loaded
    model = CLIPVizModel(tiny_config(backbone)).eval()
    assert model.config._attn_implementation == "sdpa"
    assert count_sdpa_calls(monkeypatch, model) == attention_layers(model.config)
    model.save_pretrained(tmp_path)
    loaded = CLIPVizModel.from_pretrained(tmp_path).eval()
    assert count_sdpa_calls(monkeypatch, loaded) == attention_layers(loaded.config)


def test_set_attn_implementation_switches_both_towers(backbone, monkeypatch):
    model = tiny_model(backbone)
    sdpa_out = run(model, output_attentions=True)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"
    assert count_sdpa_calls(monkeypatch, model) == 0
    eager_out = run(model, output_attentions=True)
    torch.testing.assert_close(eager_out.logits_per_image, sdpa_out.logits_per_image, atol=1e-5, rtol=0)
    model.set_attn_implementation("sdpa")
    assert count_sdpa_calls(monkeypatch, model) == attention_layers(model.config)


@pytest.mark.parametrize("num_images", [1, 2])
def test_resnet_memory_formats_agree(num_images):
    # the ResNet tower picks channels-first or channels-last by batch, dtype and the weights' own format
    model = tiny_model("resnet")
    with torch.no_grad():
        first = run(model, num_images=num_images, output_hidden_states=True)
        model.vision_model.to(memory_format=torch.channels_last)
        last = run(model, num_images=num_images, output_hidden_states=True)
    torch.testing.assert_close(last.image_embeds, first.image_embeds, atol=1e-5, rtol=0)
    for x, y in zip(last.vision_model_output.hidden_states, first.vision_model_output.hidden_states, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("avx512_bf16", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_model_in_reduced_precision_on_cpu(backbone, dtype, avx512_bf16, monkeypatch):
    # CPU bf16 with AVX-512 BF16: explicit matmuls (faster than PyTorch's flash kernel there); otherwise SDPA
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    model = tiny_model(backbone, "sdpa").to(dtype)
    expected = 0 if dtype == torch.bfloat16 and avx512_bf16 else attention_layers(model.config)
    assert count_sdpa_calls(monkeypatch, model) == expected
