"""LeGrad, GEM, MaskCLIP and ClearCLIP against their authors' code or their papers' formulas, and the properties
every method keeps (batching, ranges, padding, reduced precisions).

Oracles: LeGrad and GEM are the authors' packages (`legrad-torch`, `gem-torch`) run on a random open_clip ViT that
`clipviz-convert` converted (tests/authors_code.py); their maps are compared after the same bilinear upsampling and
min-max scaling, by cosine per map. MaskCLIP and ClearCLIP have no package: their papers' formulas (as the
authors' code computes them) are written out on OpenAI's `clip/model.py`, fed by a hook on the last block (or the
attention pool) of the reference model.
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from clipviz.state_dict import from_openai_state_dict
from configuration_clipviz import CLIPVizConfig
from explaining_clipviz import methods_for
from modeling_clipviz import CLIPVizModel
from tests.authors_code import VISION_CFG, authors_packages, convert_open_clip, random_open_clip
from tests.helpers import TINY_TEXT, TINY_VISION, pixels, tiny_config, tiny_model, token_ids
from tests.openai_reference import randomized_openai_clip

NEW_METHODS = {"vit": ("legrad", "gem", "maskclip", "clearclip", "occlusion"), "resnet": ("maskclip",)}
CASES = [(backbone, method) for backbone, methods in NEW_METHODS.items() for method in methods]
GRADIENT_FREE = ("gem", "maskclip", "clearclip")
# Every registered method, for the properties all of them keep. Occlusion on the random ResNet is left to
# tests/test_explain_occlusion.py, which runs it on the trained embedded ResNet: the random one's image embedding
# hardly depends on the image (two random images' unit embeddings differ by ~1e-4), so the score drops occlusion
# measures are rounding noise there.
ALL_CASES = [
    (backbone, method.name)
    for backbone in ("vit", "resnet")
    for method in methods_for(backbone)
    if (backbone, method.name) != ("resnet", "occlusion")
]


# conftest's ResNet is one channel wide in its stem: its cells all get nearly the same feature (a spread of ~1e-3 in
# cosine), which min-max maps magnify into noise. Four channels and live residual branches (OpenAI zero-initializes
# each block's last BatchNorm) give cells distinct features, as a trained ResNet has.
RESNET = {**TINY_VISION["resnet"], "resnet_width": 4}


def resnet_config(image_size: int = 64) -> CLIPVizConfig:
    return CLIPVizConfig(
        text_config=dict(TINY_TEXT), vision_config={**RESNET, "image_size": image_size}, projection_dim=32
    )


def wake_residual_branches(model) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bn3.weight"):
                parameter.normal_(1.0, 0.2, generator=torch.Generator().manual_seed(len(name)))


def model_for(backbone: str) -> CLIPVizModel:
    """conftest's tiny ViT, or the ResNet above (random weights, eval mode)."""
    if backbone == "vit":
        return tiny_model("vit")
    torch.manual_seed(0)
    model = CLIPVizModel(resnet_config()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
    wake_residual_branches(model)
    return model


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max over the last two dimensions, as the authors' code scales its maps."""
    low = maps.flatten(-2).amin(-1)[..., None, None]
    high = maps.flatten(-2).amax(-1)[..., None, None]
    return (maps - low) / (high - low)


def cosines(ours: torch.Tensor, expected: torch.Tensor, map_dims: int = 2) -> torch.Tensor:
    """Cosine of each map (its last `map_dims` dimensions: 2 for image maps, 1 for text maps)."""
    ours, expected = ours.flatten(-map_dims).double(), expected.flatten(-map_dims).double()
    return F.cosine_similarity(ours, expected, dim=-1)


# ---- the authors' code: LeGrad and GEM on a converted open_clip ViT ----


@pytest.fixture(scope="module")
def open_clip_pair(tmp_path_factory):
    """(the open_clip model, the same weights converted by clipviz-convert, prompts, images, the converted folder)."""
    authors_packages()
    reference = random_open_clip()
    folder = tmp_path_factory.mktemp("open-clip")
    ours = convert_open_clip(reference, folder)
    ids = token_ids(3)
    return reference, ours, ids, pixels(2, VISION_CFG["image_size"]), folder / "converted"


@pytest.mark.parametrize("start_layer", [None, 0, -1])
def test_legrad_matches_the_authors_wrapper(open_clip_pair, start_layer):
    reference, ours, ids, images, _ = open_clip_pair
    layer_index = -2 if start_layer is None else start_layer  # None: our default, the wrapper's default
    wrapper = authors_packages().legrad.LeWrapper(copy.deepcopy(reference), layer_index=layer_index)
    text_embedding = F.normalize(reference.encode_text(ids), dim=-1).detach()
    # the wrapper explains one image per call: [1, T, H, W], upsampled by the patch size and min-max scaled
    expected = torch.cat([wrapper.compute_legrad_clip(text_embedding, image[None]).detach() for image in images])
    options = {} if start_layer is None else {"start_layer": start_layer}
    maps = ours.explain(images, ids, method="legrad", **options).image_maps  # [I, T, gh, gw]
    upsampled = min_max(F.interpolate(maps, scale_factor=VISION_CFG["patch_size"], mode="bilinear"))
    assert upsampled.shape == expected.shape
    assert cosines(upsampled, expected).min() >= 0.999


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"depth": 3},
        {"depth": 2},
        {"depth": 3, "ss_attn_iter": 2},
        {"depth": 3, "ss_attn_iter": 0},
        {"depth": 3, "ss_attn_temp": 3.0},
    ],
    ids=["default", "depth3", "depth2", "two-rounds", "no-extra-round", "fixed-temperature"],
)
def test_gem_matches_the_authors_wrapper(open_clip_pair, options):
    reference, ours, ids, images, _ = open_clip_pair
    depth = min(options.get("depth", 7), VISION_CFG["layers"] + 1)  # ours clips the default 7; theirs needs <= 4
    wrapper = authors_packages().gem.GEMWrapper(
        copy.deepcopy(reference),
        tokenizer=lambda prompts: ids,  # GEMWrapper formats and tokenizes class names; these are the prompts' ids
        depth=depth,
        ss_attn_iter=options.get("ss_attn_iter", 1),
        ss_attn_temp=options.get("ss_attn_temp"),
    )
    with torch.no_grad():  # [1, T, H, W] per image, upsampled to the image and min-max scaled
        expected = torch.cat([wrapper(image[None], ["prompt"] * len(ids)) for image in images])
    maps = ours.explain(images, ids, method="gem", **options).image_maps
    upsampled = min_max(F.interpolate(maps, size=expected.shape[-2:], mode="bilinear"))
    assert cosines(upsampled, expected).min() >= 0.999


def test_the_converted_folders_remote_code_gives_the_same_maps(open_clip_pair):
    """The methods ship with the converted folder (`explaining_clipviz.py` as Hub remote code)."""
    _, ours, ids, images, folder = open_clip_pair
    remote = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(remote).__module__ != type(ours).__module__  # the folder's copy of the code, not the checkout's
    for method in NEW_METHODS["vit"]:
        expected = ours.explain(images, ids, method=method)
        result = remote.explain(images, ids, method=method)
        torch.testing.assert_close(result.image_maps, expected.image_maps)
        torch.testing.assert_close(result.text_maps, expected.text_maps)


# ---- the papers' formulas on OpenAI's clip/model.py: MaskCLIP and ClearCLIP ----


def openai_pair(config: CLIPVizConfig):
    """OpenAI's reference CLIP (random weights) and clipviz holding the same state dict."""
    reference = randomized_openai_clip(config)
    wake_residual_branches(reference)
    heads = {
        "text_heads": config.text_config.num_attention_heads,
        "vision_heads": config.vision_config.num_attention_heads,
    }
    return reference, from_openai_state_dict(reference.state_dict(), **heads)


def input_of(module, run) -> torch.Tensor:
    """The first positional input `module` receives while `run()` executes (a forward pre-hook)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def openai_dense_vit(reference, images, texts, rewire):
    """Patch-prompt cosine maps `[I, T, gh, gw]` from OpenAI's ViT with its last block replaced by `rewire(block,
    x)` (x: the block's input, OpenAI's [N, B, D] layout), then `ln_post` and `proj` on every token."""
    visual = reference.visual
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        x = input_of(block, lambda: reference.encode_image(images))  # [N, B, D]
        tokens = visual.ln_post(rewire(block, x).permute(1, 0, 2)) @ visual.proj  # [B, N, P]
        text = F.normalize(reference.encode_text(texts), dim=-1)  # [T, P]
        similarity = F.normalize(tokens[:, 1:], dim=-1) @ text.t()  # [B, gh*gw, T]
    grid = int(similarity.shape[1] ** 0.5)
    return similarity.transpose(1, 2).reshape(len(images), len(texts), grid, grid)


def in_projection(block, part: int, x: torch.Tensor) -> torch.Tensor:
    """Part 0/1/2 (query/key/value) of `nn.MultiheadAttention`'s input projection applied to x."""
    width = x.shape[-1]
    rows = slice(part * width, (part + 1) * width)
    return F.linear(x, block.attn.in_proj_weight[rows], block.attn.in_proj_bias[rows])


def maskclip_block(block, x):
    """MaskCLIP (Zhou et al. 2022) on a ViT's last block: the value embedding, the output projection, then the
    residual and the MLP as the block has them (the authors' `skip_last_attn`)."""
    y = x + block.attn.out_proj(in_projection(block, 2, block.ln_1(x)))
    return y + block.mlp(block.ln_2(y))


def clearclip_block(block, x):
    """ClearCLIP (Lan et al. 2024) on a ViT's last block: softmax(q q^T / sqrt(d)) v per head, the output
    projection, no residual, no MLP."""
    normed = block.ln_1(x)  # [N, B, D]
    length, batch, width = normed.shape
    heads = block.attn.num_heads

    def split(t):  # [N, B, D] -> [B, heads, N, head_dim]
        return t.reshape(length, batch, heads, width // heads).permute(1, 2, 0, 3)

    query, value = split(in_projection(block, 0, normed)), split(in_projection(block, 2, normed))
    weights = torch.softmax(query @ query.transpose(-2, -1) / (width // heads) ** 0.5, dim=-1)  # [B, heads, N, N]
    context = (weights @ value).permute(2, 0, 1, 3).reshape(length, batch, width)  # [N, B, D]
    return block.attn.out_proj(context)


@pytest.mark.parametrize("method,rewire", [("maskclip", maskclip_block), ("clearclip", clearclip_block)])
def test_vit_dense_methods_match_the_papers_on_openai_clip(method, rewire):
    config = tiny_config("vit")
    reference, ours = openai_pair(config)
    images, texts = pixels(2, config.vision_config.image_size), token_ids(3)
    expected = min_max(openai_dense_vit(reference, images, texts, rewire))
    maps = ours.explain(images, texts, method=method).image_maps
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
    assert cosines(maps, expected).min() >= 0.999


def test_resnet_maskclip_matches_the_paper_on_openai_clip():
    """MaskCLIP's ResNet head: the attention pool's v_proj and c_proj as 1x1 convolutions on the last stage."""
    reference, ours = openai_pair(resnet_config(image_size=128))  # a 4 x 4 grid
    images, texts = pixels(2, 128), token_ids(3)
    pool = reference.visual.attnpool
    with torch.no_grad():
        features = input_of(pool, lambda: reference.encode_image(images))  # [I, C, h, w]
        conv = lambda linear, x: F.conv2d(x, linear.weight[:, :, None, None], linear.bias)  # noqa: E731
        dense = F.normalize(conv(pool.c_proj, conv(pool.v_proj, features)), dim=1)  # [I, P, h, w]
        text = F.normalize(reference.encode_text(texts), dim=-1)  # [T, P]
        expected = min_max(torch.einsum("iphw,tp->ithw", dense, text))
    maps = ours.explain(images, texts, method="maskclip").image_maps
    assert maps.shape == (2, 3, 4, 4)
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=1e-4)
    assert cosines(maps, expected).min() >= 0.999


# ---- the text side ----


@pytest.mark.parametrize("backbone,method", [(b, m) for b, m in CASES if m in GRADIENT_FREE])
def test_gradient_free_text_maps_are_the_end_of_text_tokens_last_attention(backbone, method):
    model = model_for(backbone)
    images, texts = pixels(2, model.config.vision_config.image_size), token_ids(3)
    expected = model.explain(images, texts, method="attention", text_layer=-1, text_head="mean").text_maps
    torch.testing.assert_close(model.explain(images, texts, method=method).text_maps, expected)


@pytest.mark.parametrize("start_layer_text", [0, 1])
def test_legrad_text_maps_equal_per_layer_plain_backward(start_layer_text):
    """Each text layer's score (end-of-text token after that block, through ln_final and the projection, against
    the image) differentiated with plain autograd w.r.t. that layer's attention, one pair at a time."""
    model = tiny_model("vit")
    images, texts = pixels(2, model.config.vision_config.image_size), token_ids(3)
    result = model.explain(images, texts, method="legrad", start_layer_text=start_layer_text)
    for i in range(2):
        clone = copy.deepcopy(model)
        with torch.no_grad():
            image = F.normalize(clone.get_image_features(images[i : i + 1]), dim=-1)[0]
        text = clone.text_model(texts, output_attentions=True, output_hidden_states=True)
        for t in range(3):
            eot, length = int(texts[t].argmax()), int(texts[t].argmax()) + 1
            expected = torch.zeros(texts.shape[1])
            for layer in range(start_layer_text, clone.config.text_config.num_hidden_layers):
                pooled = clone.text_model.ln_final(text.hidden_states[layer + 1][t, eot])
                score = F.normalize(pooled @ clone.text_projection, dim=-1) @ image
                (grad,) = torch.autograd.grad(score, text.attentions[layer], retain_graph=True)
                cam = grad[t].clamp(min=0).mean(dim=0)[:length, :length].tril()  # [rows, keys] of the prompt
                expected[:length] += cam.sum(dim=0) / length
            scaled = expected / expected.max()
            torch.testing.assert_close(result.text_maps[i, t], scaled, atol=1e-5, rtol=1e-4)


# ---- every new method: batching, ranges, padding, precisions ----

PADDED = token_ids(3)
PADDING_MASK = (PADDED != 0).long()  # conftest's prompts: zero padding after end-of-text


@pytest.mark.parametrize("backbone,method", CASES)
def test_batch_equals_one_by_one_and_maps_are_well_formed(backbone, method):
    model = model_for(backbone)
    images = pixels(2, model.config.vision_config.image_size)
    result = model.explain(images, PADDED, PADDING_MASK, method=method)
    grid = model.config.vision_config.grid_size
    assert result.image_maps.shape == (2, 3, grid, grid) and result.text_maps.shape == (2, 3, PADDED.shape[1])
    for maps in (result.image_maps, result.text_maps):
        assert torch.isfinite(maps).all() and (maps >= 0).all() and not maps.requires_grad
        assert torch.allclose(maps.flatten(2).amax(-1), torch.ones(2, 3))
    assert (result.text_maps[:, PADDING_MASK == 0] == 0).all()
    for i in range(2):
        for t in range(3):
            length = int(PADDING_MASK[t].sum())
            single = model.explain(
                images[i : i + 1], PADDED[t : t + 1, :length], PADDING_MASK[t : t + 1, :length], method=method
            )
            torch.testing.assert_close(single.image_maps[0, 0], result.image_maps[i, t], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(single.text_maps[0, 0], result.text_maps[i, t, :length], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(single.logits_per_image[0, 0], result.logits_per_image[i, t])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backbone,method", ALL_CASES)
def test_reduced_precisions_give_the_float32_maps(backbone, method, dtype):
    """Every registered method, in float16 and bfloat16: float32 maps, finite, non-negative, zero on padding, and
    pointing the way the float32 maps do."""
    model = model_for(backbone)
    images = pixels(2, model.config.vision_config.image_size)
    expected = model.explain(images, PADDED, PADDING_MASK, method=method)
    result = model.to(dtype).explain(images.to(dtype), PADDED, PADDING_MASK, method=method)
    pairs = ((result.image_maps, expected.image_maps, 2), (result.text_maps, expected.text_maps, 1))
    for maps, reference, map_dims in pairs:
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all() and (maps >= 0).all()
        lit = reference.flatten(2).amax(-1) > 0  # Grad-CAM's ReLU can leave a map all zero: no direction to compare
        assert lit.any() and cosines(maps, reference, map_dims)[lit].min() >= 0.97
    assert (result.text_maps[:, PADDING_MASK == 0] == 0).all()


# ---- options ----


def test_gem_depth_beyond_the_model_runs_through_every_block():
    model = tiny_model("vit")  # two blocks: depth 3 and the default 7 both rewire both
    images, texts = pixels(1, model.config.vision_config.image_size), token_ids(2)
    every_block = model.explain(images, texts, method="gem", depth=3).image_maps
    torch.testing.assert_close(model.explain(images, texts, method="gem").image_maps, every_block)
    assert not torch.allclose(model.explain(images, texts, method="gem", depth=2).image_maps, every_block)


@pytest.mark.parametrize(
    "backbone,method,options,message",
    [
        ("vit", "gem", {"depth": 1}, "`depth`=1 must be a whole number in [2, inf)"),
        ("vit", "gem", {"ss_attn_iter": -1}, "`ss_attn_iter`=-1 must be a whole number in [0, inf)"),
        ("vit", "gem", {"ss_attn_temp": -1.0}, "`ss_attn_temp`=-1.0 must be a number in [0, inf)"),
        ("vit", "gem", {"temperature": 1.0}, "valid options: depth, ss_attn_iter, ss_attn_temp"),
        ("vit", "legrad", {"start_layer": 2}, "`start_layer`=2 is out of range; valid values: -2 .. 1"),
        ("vit", "maskclip", {"layer": 0}, "valid options: none"),
        ("resnet", "legrad", {}, "not available for the resnet backbone"),
        ("resnet", "gem", {}, "not available for the resnet backbone"),
        ("resnet", "clearclip", {}, "not available for the resnet backbone"),
    ],
)
def test_invalid_options_raise_with_the_valid_ones(backbone, method, options, message):
    model = model_for(backbone)
    images, texts = pixels(1, model.config.vision_config.image_size), token_ids(1)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.explain(images, texts, method=method, **options)


@pytest.mark.parametrize("backbone,method", CASES)
def test_frozen_parameters_no_grad_context_and_no_hooks_left(backbone, method):
    model = model_for(backbone)
    images, texts = pixels(2, model.config.vision_config.image_size), token_ids(3)
    expected = model.explain(images, texts, method=method)
    model.requires_grad_(False)
    with torch.no_grad():
        frozen = model.explain(images, texts, method=method)
    torch.testing.assert_close(frozen.image_maps, expected.image_maps)
    torch.testing.assert_close(frozen.text_maps, expected.text_maps)
    assert not any(module._forward_hooks for module in model.modules())  # the kept projections' hooks are gone
