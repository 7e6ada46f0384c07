"""`CLIPVizModel.explain`: every method against a hand computation on tiny random models, batching, validation,
and Chefer's relevance computed on transformers' own `CLIPModel` with the same weights."""

import copy

import numpy as np
import pytest
import torch

from clipviz.rendering import overlay
from clipviz.state_dict import transformers_clip_config
from configuration_clipviz import CLIPVizConfig
from explaining_clipviz import CLIPVizExplanationOutput, _discard_lowest
from modeling_clipviz import CLIPVizModel
from tests.helpers import scaled

BOS, EOS = 98, 99
TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=12,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=0,
)
VISION = {
    "vit": dict(
        backbone="vit", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2
    ),
    "resnet": dict(backbone="resnet", image_size=64, resnet_layers=[1, 1, 1, 1], resnet_width=4, num_attention_heads=2),
}
# three prompts of different lengths, padded with 0 after end-of-text as OpenAI's tokenizer does
IDS = torch.tensor([[BOS, 5, 6, EOS, 0, 0], [BOS, 7, 8, 9, 10, EOS], [BOS, 11, EOS, 0, 0, 0]])
MASK = (torch.arange(IDS.shape[1])[None] <= IDS.argmax(-1)[:, None]).long()


def tiny_model(backbone: str, seed: int = 0) -> CLIPVizModel:
    torch.manual_seed(seed)
    config = CLIPVizConfig(text_config=dict(TEXT), vision_config=dict(VISION[backbone]), projection_dim=16)
    model = CLIPVizModel(config).eval()
    with torch.no_grad():  # sharpen the random attention a little so maps differ between layers and heads
        for name, param in model.named_parameters():
            if "qkv_proj.weight" in name or "q_proj.weight" in name or "k_proj.weight" in name:
                param.mul_(3.0)
            if "bn3.weight" in name:  # OpenAI zero-inits it; a live residual branch makes Grad-CAM non-trivial
                param.normal_(1.0, 0.2)
    return model


def pixels(backbone: str, count: int = 2, seed: int = 1) -> torch.Tensor:
    size = VISION[backbone]["image_size"]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit():
    return tiny_model("vit")


@pytest.fixture(scope="module")
def resnet():
    return tiny_model("resnet")


def plain_forward(model, px, ids=IDS, mask=MASK, hidden=False):
    """A detached copy of the model, run the ordinary way, with attentions/hidden states keeping their grads."""
    clone = copy.deepcopy(model)
    out = clone(
        input_ids=ids, pixel_values=px, attention_mask=mask, output_attentions=True, output_hidden_states=hidden
    )
    for tensor in out.vision_model_output.attentions + out.text_model_output.attentions:
        tensor.retain_grad()
    if hidden:
        for tensor in out.vision_model_output.hidden_states + out.text_model_output.hidden_states:
            tensor.retain_grad()
    return clone, out


def chefer(attentions, index, start):
    """R = I + sum_l mean_h ReLU(grad * A) R with plain `.grad`s, for batch element `index`."""
    size = attentions[0].shape[-1]
    relevance = torch.eye(size)
    for weights in attentions[start:]:
        cam = (weights.grad[index] * weights[index]).clamp(min=0).mean(dim=0)  # [N, N]
        relevance = relevance + cam @ relevance
    return relevance.detach()


def text_row(matrix, t, ids=IDS, mask=MASK):
    eot = int(ids[t].argmax())
    row = matrix[eot].clone()
    row[eot + 1 :] = 0
    return row * mask[t]


# ---- hand computations ----


@pytest.mark.parametrize("layer", [0, -1])
@pytest.mark.parametrize("head", [0, 1, "mean", "max"])
def test_attention_is_the_class_token_row(vit, layer, head):
    px = pixels("vit")
    out = vit(input_ids=IDS, pixel_values=px, attention_mask=MASK, output_attentions=True)
    result = vit.explain(px, IDS, MASK, method="attention", layer=layer, head=head, text_layer=layer)
    image = out.vision_model_output.attentions[layer][:, :, 0, 1:]  # [I, heads, 16]
    text = out.text_model_output.attentions[layer]  # [T, heads, L, L]
    fuse = {"mean": lambda x: x.mean(1), "max": lambda x: x.amax(1)}.get(head, lambda x: x[:, head])
    for i in range(2):
        for t in range(3):
            torch.testing.assert_close(result.image_maps[i, t].flatten(), scaled(fuse(image)[i]))
            torch.testing.assert_close(result.text_maps[i, t], scaled(text_row(fuse(text)[t], t)))


def test_image_and_text_heads_are_chosen_per_tower():
    """ViT-B/16 has 12 image heads and 8 text heads: an image head the text tower lacks needs its own `text_head`."""
    torch.manual_seed(0)
    vision = {**VISION["vit"], "num_attention_heads": 4}
    model = CLIPVizModel(CLIPVizConfig(text_config=dict(TEXT), vision_config=vision, projection_dim=16)).eval()
    px = pixels("vit")
    with pytest.raises(ValueError, match=r"`head`=3 exists in the image tower \(4 heads\) but not in the text tower"):
        model.explain(px, IDS, MASK, method="attention", head=3)
    with pytest.raises(ValueError, match=r"`text_head`=2 is not valid here; valid values: 0, 1, 'mean', 'max'"):
        model.explain(px, IDS, MASK, method="attention", head=3, text_head=2)
    out = model(input_ids=IDS, pixel_values=px, attention_mask=MASK, output_attentions=True)
    result = model.explain(px, IDS, MASK, method="attention", head=3, text_head="max")
    image = out.vision_model_output.attentions[-1][:, 3, 0, 1:]  # [I, 16]
    text = out.text_model_output.attentions[-1].amax(1)  # [T, L, L]
    for i in range(2):
        for t in range(3):
            torch.testing.assert_close(result.image_maps[i, t].flatten(), scaled(image[i]))
            torch.testing.assert_close(result.text_maps[i, t], scaled(text_row(text[t], t)))


def test_resnet_attention_is_the_attention_pool_query_row(resnet):
    px = pixels("resnet")
    out = resnet(input_ids=IDS, pixel_values=px, output_attentions=True)
    result = resnet.explain(px, IDS, method="attention", head=1)
    pool = out.vision_model_output.attentions[0]  # [I, heads, 1, 1 + 2*2]
    assert result.image_maps.shape == (2, 3, 2, 2)
    for i in range(2):
        torch.testing.assert_close(result.image_maps[i, 0], scaled(pool[i, 1, 0, 1:]).reshape(2, 2))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.3, 0.9])
def test_rollout_is_the_explicit_matrix_product(vit, fusion, discard_ratio):
    px = pixels("vit")
    out = vit(input_ids=IDS, pixel_values=px, output_attentions=True)
    result = vit.explain(px, IDS, method="rollout", head_fusion=fusion, discard_ratio=discard_ratio)
    reduce = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    for i in range(2):
        factors = []
        for weights in out.vision_model_output.attentions:
            fused = reduce(weights[i].detach().double().numpy(), axis=0)  # [N, N]
            flat = fused.flatten()
            order = [k for k in np.argsort(flat, kind="stable") if k != 0][: int(flat.size * discard_ratio)]
            flat[order] = 0.0
            mixed = flat.reshape(fused.shape) + np.eye(fused.shape[0])
            factors.append(mixed / mixed.sum(axis=1, keepdims=True))
        rolled = np.linalg.multi_dot(factors[::-1])  # a_last @ ... @ a_first
        expected = torch.from_numpy(rolled[0, 1:]).float()
        torch.testing.assert_close(result.image_maps[i, 1].flatten(), scaled(expected), atol=1e-5, rtol=1e-4)
    # text side: the same product without discarding, read at each prompt's end-of-text row
    for t in range(3):
        factors = []
        for weights in out.text_model_output.attentions:
            fused = reduce(weights[t].detach().double().numpy(), axis=0)
            mixed = fused + np.eye(fused.shape[0])
            factors.append(mixed / mixed.sum(axis=1, keepdims=True))
        rolled = torch.from_numpy(np.linalg.multi_dot(factors[::-1])).float()
        torch.testing.assert_close(result.text_maps[0, t], scaled(text_row(rolled, t)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("start", [0, -1])
def test_relevance_matches_chefer_with_plain_backward(vit, start):
    px = pixels("vit")
    result = vit.explain(px, IDS, MASK, method="relevance", start_layer=start, start_layer_text=start)
    for i in range(2):
        for t in range(3):
            _, out = plain_forward(vit, px)
            out.logits_per_image[i, t].backward()
            image = chefer(out.vision_model_output.attentions, i, start)[0, 1:]
            text = chefer(out.text_model_output.attentions, t, start) - torch.eye(IDS.shape[1])
            torch.testing.assert_close(result.image_maps[i, t].flatten(), scaled(image), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(result.text_maps[i, t], scaled(text_row(text, t)), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(result.logits_per_image[i, t], out.logits_per_image[i, t].detach())


def test_relevance_default_uses_only_the_last_layer(vit):
    px = pixels("vit")
    default = vit.explain(px, IDS, method="relevance")
    last = vit.explain(px, IDS, method="relevance", start_layer=1, start_layer_text=1)
    every = vit.explain(px, IDS, method="relevance", start_layer=0)
    torch.testing.assert_close(default.image_maps, last.image_maps)
    assert not torch.allclose(default.image_maps, every.image_maps)


def test_resnet_relevance_is_the_gradient_weighted_pool_attention(resnet):
    px = pixels("resnet")
    result = resnet.explain(px, IDS, MASK, method="relevance", start_layer_text=0)
    for i in range(2):
        for t in range(3):
            _, out = plain_forward(resnet, px)
            out.logits_per_image[i, t].backward()
            pool = out.vision_model_output.attentions[0]  # [I, heads, 1, 5]
            image = (pool.grad[i] * pool[i]).clamp(min=0).mean(dim=0)[0, 1:].detach()
            torch.testing.assert_close(result.image_maps[i, t].flatten(), scaled(image), atol=1e-5, rtol=1e-4)
            text = chefer(out.text_model_output.attentions, t, 0) - torch.eye(IDS.shape[1])
            torch.testing.assert_close(result.text_maps[i, t], scaled(text_row(text, t)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_gradcam_matches_plain_backward(backbone):
    model = tiny_model(backbone)
    px = pixels(backbone)
    result = model.explain(px, IDS, MASK, method="gradcam")
    for i in range(2):
        for t in range(3):
            clone, out = plain_forward(model, px, hidden=True)
            vision, text = out.vision_model_output, out.text_model_output
            image_features = clone.vision_model.project(vision.pooler_output)
            text_features = text.pooler_output @ clone.text_projection
            (image_features[i] @ out.text_embeds[t].detach()).backward(retain_graph=True)
            (out.image_embeds[i].detach() @ text_features[t]).backward()
            if backbone == "resnet":
                features = vision.last_hidden_state  # [I, C, h, w]
                weights = features.grad[i].mean(dim=(1, 2))  # [C]
                image = (weights[:, None, None] * features[i]).sum(0).flatten()
            else:
                tokens = vision.hidden_states[-2]  # [I, 17, D]
                image = tokens[i, 1:] @ tokens.grad[i, 1:].mean(0)
            tokens = text.hidden_states[-2]  # [T, L, D]
            valid = MASK[t].bool()
            text_map = (tokens[t] @ tokens.grad[t][valid].mean(0)) * valid
            torch.testing.assert_close(result.image_maps[i, t].flatten(), scaled(image.detach()), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(result.text_maps[i, t], scaled(text_map.detach()), atol=1e-5, rtol=1e-4)


# ---- batching, shapes, ranges ----

METHODS = {"vit": ["attention", "rollout", "relevance", "gradcam"], "resnet": ["attention", "relevance", "gradcam"]}
CASES = [(backbone, method) for backbone, methods in METHODS.items() for method in methods]


@pytest.mark.parametrize("backbone,method", CASES)
def test_batch_equals_one_by_one_and_maps_are_well_formed(backbone, method):
    model = tiny_model(backbone)
    px = pixels(backbone)
    result = model.explain(px, IDS, MASK, method=method)
    assert isinstance(result, CLIPVizExplanationOutput)
    grid = 4 if backbone == "vit" else 2
    assert result.image_maps.shape == (2, 3, grid, grid)
    assert result.text_maps.shape == (2, 3, IDS.shape[1])
    assert result.logits_per_image.shape == (2, 3)
    for maps in (result.image_maps, result.text_maps):
        assert torch.isfinite(maps).all() and (maps >= 0).all() and not maps.requires_grad
        peaks = maps.flatten(2).amax(-1)  # [I, T]
        assert torch.all(((peaks - 1).abs() < 1e-6) | (peaks == 0))  # scaled to 1, or all zero (Grad-CAM can be)
        assert method == "gradcam" or (peaks > 0).all()
    padding = ~MASK.bool()
    assert (result.text_maps[:, padding] == 0).all()
    for i in range(2):
        for t in range(3):
            length = int(MASK[t].sum())
            single = model.explain(px[i : i + 1], IDS[t : t + 1, :length], MASK[t : t + 1, :length], method=method)
            torch.testing.assert_close(single.image_maps[0, 0], result.image_maps[i, t], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(single.text_maps[0, 0], result.text_maps[i, t, :length], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(single.logits_per_image[0, 0], result.logits_per_image[i, t])


def test_text_maps_are_zero_after_end_of_text_without_a_mask(vit):
    result = vit.explain(pixels("vit"), IDS, None, method="relevance", start_layer_text=0)
    after = torch.arange(IDS.shape[1])[None] > IDS.argmax(-1)[:, None]  # [T, L]
    assert after.any() and (result.text_maps[:, after] == 0).all()
    assert (result.text_maps[:, ~after] > 0).any()


@pytest.mark.parametrize("start", [0, -1])  # -1: the last block rerun for the class token alone
def test_frozen_parameters_and_no_grad_context_still_give_gradient_maps(start):
    model = tiny_model("vit")
    px = pixels("vit")
    expected = model.explain(px, IDS, method="relevance", start_layer=start)
    model.requires_grad_(False)
    with torch.no_grad():
        frozen = model.explain(px, IDS, method="relevance", start_layer=start)
    torch.testing.assert_close(frozen.image_maps, expected.image_maps)
    torch.testing.assert_close(frozen.text_maps, expected.text_maps)
    assert len(model.text_model.token_embedding._forward_hooks) == 0  # the helper hook is removed again


def test_discard_never_drops_class_to_class_and_is_per_sample():
    fused = torch.rand(3, 4, 4) + 0.1
    fused[0, 0, 0] = 0.0  # the smallest entry of sample 0
    fused[2] = fused[2].flip(-1)
    out = _discard_lowest(fused, 0.5)
    assert out[0, 0, 0] == 0.0 and (out[:, 0, 0] == fused[:, 0, 0]).all()
    others = torch.ones(4, 4, dtype=torch.bool)
    others[0, 0] = False  # every entry but the protected one
    for b in range(3):
        dropped = (out[b] == 0) & (fused[b] != 0)
        assert dropped.sum() == 8  # half of the 16 entries, none of them the protected one
        kept = fused[b][(out[b] != 0) & others]
        assert fused[b][dropped].max() < kept.min()  # each sample drops its own lowest entries


# ---- validation ----


@pytest.mark.parametrize(
    "backbone,method,options,message",
    [
        ("vit", "saliency", {}, "valid methods: attention, rollout, relevance, gradcam"),
        ("resnet", "rollout", {}, "valid methods: attention, relevance, gradcam"),
        ("resnet", "relevance", {"start_layer": 0}, "valid options: start_layer_text"),
        ("vit", "gradcam", {"layer": 0}, "valid options: target"),
        ("vit", "attention", {"layer": 2}, "valid values: -2 .. 1"),
        ("resnet", "attention", {"layer": 1}, "valid values: -1 .. 0"),
        ("vit", "attention", {"head": 2}, "valid values: 0, 1, 'mean', 'max'"),
        ("vit", "attention", {"head": 1.0}, "valid values: 0, 1, 'mean', 'max'"),
        ("vit", "rollout", {"head_fusion": "median"}, "'mean', 'max', 'min'"),
        ("vit", "rollout", {"discard_ratio": 1.0}, r"\[0, 1\)"),
        ("vit", "relevance", {"start_layer_text": -3}, "valid values: -2 .. 1"),
    ],
)
def test_invalid_methods_and_options_raise_with_the_valid_ones(backbone, method, options, message):
    model = tiny_model(backbone)
    with pytest.raises(ValueError, match=message):
        model.explain(pixels(backbone), IDS, method=method, **options)


# ---- overlay ----


def test_overlay_keeps_the_image_size_and_blends_only_the_centre_crop():
    image = np.full((50, 80, 3), 100, dtype=np.uint8)  # wide image: the map covers the centred 50 x 50 square
    heat = torch.zeros(4, 4)
    heat[0, 3] = 1.0  # top-right cell of the grid
    blended = np.asarray(overlay(image, heat, alpha=0.5, colormap="jet"))
    assert blended.shape == image.shape
    assert (blended[:, :15] == 100).all() and (blended[:, 65:] == 100).all()  # outside the crop: unchanged
    top_right, bottom_left = blended[3, 60].astype(int), blended[46, 18].astype(int)
    assert top_right[0] > top_right[2]  # jet's hot end is red
    assert bottom_left[2] > bottom_left[0]  # its cold end is blue
    unchanged = np.asarray(overlay(image, heat[None], alpha=0.0, colormap="viridis"))
    assert (unchanged == image).all()
    assert overlay(image, heat, colormap="gray").size == (80, 50)


def test_overlay_fade_style_leaves_low_values_as_the_image():
    """The "fade" style weights each pixel by alpha x value: where the map is 0 the image is unchanged, at the peak
    it is the full style's blend."""
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0  # one hot corner; the rest of the map is 0
    faded = np.asarray(overlay(image, heat, alpha=0.8, style="fade")).astype(int)
    full = np.asarray(overlay(image, heat, alpha=0.8, style="full")).astype(int)
    original = image.astype(int)
    assert np.abs(faded[-10:, -10:] - original[-10:, -10:]).max() <= 1  # the cold corner: the plain image
    assert np.abs(full[-10:, -10:] - original[-10:, -10:]).max() > 20  # the full style colours it anyway
    assert np.abs(faded[0, 0] - full[0, 0]).max() <= 30  # near the peak both blend about the same
    with pytest.raises(ValueError, match="Unknown overlay style 'soft'; valid styles: full, fade"):
        overlay(image, heat, style="soft")


def test_overlay_rejects_bad_arguments():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="jet, viridis, inferno, gray"):
        overlay(image, torch.ones(2, 2), colormap="rainbow")
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, torch.ones(2, 2), alpha=1.5)
    with pytest.raises(ValueError, match="2-D"):
        overlay(image, torch.ones(2, 2, 2))


def test_overlay_is_reachable_from_the_model(vit):
    result = vit.explain(pixels("vit"), IDS, method="attention")
    picture = vit.overlay(np.zeros((32, 32, 3), dtype=np.uint8), result.image_maps[0, 0])
    assert picture.size == (32, 32)


# ---- against transformers' CLIPModel ----


def to_transformers_state_dict(model: CLIPVizModel) -> dict[str, torch.Tensor]:
    """clipviz ViT weights under transformers' `CLIPModel` names (fused q/k/v split in OpenAI's q, k, v order)."""
    renames = {
        "text_model.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "text_model.position_embedding": "text_model.embeddings.position_embedding.weight",
        "text_model.ln_final.weight": "text_model.final_layer_norm.weight",
        "text_model.ln_final.bias": "text_model.final_layer_norm.bias",
        "vision_model.class_embedding": "vision_model.embeddings.class_embedding",
        "vision_model.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
        "vision_model.position_embedding": "vision_model.embeddings.position_embedding.weight",
        "vision_model.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "vision_model.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "vision_model.ln_post.weight": "vision_model.post_layernorm.weight",
        "vision_model.ln_post.bias": "vision_model.post_layernorm.bias",
        "logit_scale": "logit_scale",
    }
    layer_renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "self_attn.out_proj": "self_attn.out_proj"}
    out = {}
    for key, tensor in model.state_dict().items():
        if key in renames:
            out[renames[key]] = tensor
        elif key == "vision_model.proj":
            out["visual_projection.weight"] = tensor.t()
        elif key == "text_projection":
            out["text_projection.weight"] = tensor.t()
        elif ".qkv_proj." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                out[key.replace("qkv_proj", name)] = part
        else:
            for ours, theirs in layer_renames.items():
                key = key.replace(f".{ours}.", f".{theirs}.")
            out[key] = tensor
    return out


def transformers_twin(model: CLIPVizModel):
    transformers = pytest.importorskip("transformers")
    config = transformers_clip_config(model.config)
    twin = transformers.CLIPModel._from_config(config, attn_implementation="eager").eval()
    missing, unexpected = twin.load_state_dict(to_transformers_state_dict(model), strict=False)
    assert not unexpected and all("position_ids" in key for key in missing), (missing, unexpected)
    return twin


@pytest.mark.parametrize("start", [0, -1])
def test_vit_relevance_equals_chefer_on_transformers_clip(vit, start):
    twin = transformers_twin(vit)
    px = pixels("vit")
    ours = vit.explain(px, IDS, method="relevance", start_layer=start, start_layer_text=start)
    out = twin(input_ids=IDS, pixel_values=px, output_attentions=True)
    torch.testing.assert_close(out.logits_per_image, ours.logits_per_image, atol=1e-4, rtol=1e-4)
    image_attn, text_attn = out.vision_model_output.attentions, out.text_model_output.attentions
    assert len(image_attn) == 2 and image_attn[0].requires_grad
    for i in range(2):
        for t in range(3):
            grads = torch.autograd.grad(out.logits_per_image[i, t], image_attn + text_attn, retain_graph=True)
            for weights, grad in zip(image_attn + text_attn, grads, strict=True):
                weights.grad = grad
            image = chefer(image_attn, i, start)[0, 1:]
            text = text_row(chefer(text_attn, t, start) - torch.eye(IDS.shape[1]), t)
            for theirs, mine in ((image, ours.image_maps[i, t].flatten()), (text, ours.text_maps[i, t])):
                cosine = torch.nn.functional.cosine_similarity(theirs.clamp(min=0), mine, dim=0)
                assert cosine >= 0.999, (i, t, cosine)
