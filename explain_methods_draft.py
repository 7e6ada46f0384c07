"""LeGrad, GEM, MaskCLIP and ClearCLIP (draft: the functions and registry entries move into explaining_clipviz.py,
whose helpers they use, once that module is on main)."""

import torch
import torch.nn.functional as F

from explaining_clipviz import (
    ExplainInputs,
    ExplainMethod,
    ExplainOption,
    _batched_grads,
    _eot_rows,
    _fuse_heads,
    _one_hot_cotangents,
    _to_grid,
    encode,
    modeling_module,
    register,
)

# ---- Shared pieces of the dense and gradient-free methods ----


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _min_max(maps: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Each map (over `dims`) shifted and scaled to [0, 1], as the methods' authors show them; flat maps become 0."""
    low, high = maps.amin(dim=dims, keepdim=True), maps.amax(dim=dims, keepdim=True)
    spread = high - low
    return (maps - low) / torch.where(spread > 0, spread, torch.ones_like(spread))


def _qkv(block, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's query, key and value for every token of its LayerNorm'ed input `[B, N, D]`, from its one fused
    projection: 3 x `[B, heads, N, head_dim]`."""
    attention = block.self_attn
    batch, length, _ = normed.shape
    qkv = attention.qkv_proj(normed).view(batch, length, 3, attention.num_heads, -1)  # [B, N, 3, heads, hd]
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, N, head_dim]


def _dense_maps(features: torch.Tensor, inputs: ExplainInputs) -> torch.Tensor:
    """Cosine of each grid cell's projected feature `[I, gh*gw, P]` with each prompt, min-max scaled per map:
    `[I, T, gh, gw]`."""
    similarity = _unit(features.float()) @ inputs.text_unit.float().t()  # [I, gh*gw, T]
    return _to_grid(_min_max(similarity.transpose(1, 2), dims=(-1,)), inputs)


def _projected_patches(model, tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens `[I, 1 + gh*gw, D]` -> the patches' features in the joint space `[I, gh*gw, P]`."""
    vision = model.vision_model
    return vision.project(vision.ln_post(tokens[:, 1:]))


def _eot_text_maps(inputs: ExplainInputs) -> torch.Tensor:
    """The gradient-free methods' text map: the end-of-text token's last-layer attention over its prompt, mean
    over heads: `[T, L]`."""
    return _eot_rows(_fuse_heads(inputs.text.attentions[-1], "mean"), inputs.input_ids)


def _encode_plain(model, inputs: ExplainInputs) -> ExplainInputs:
    """One graph-free pass of each tower: the image tower on the fast attention path with its hidden states (the
    rewired paths start from them), the text tower with its attentions (for `_eot_text_maps`)."""
    return encode(model, inputs, image_attentions=False, image_hidden_states=True)


# ---- MaskCLIP ----


def maskclip_maps(model, inputs: ExplainInputs, options: dict):
    """MaskCLIP: the last attention layer's value path applied to every token / grid cell, compared with the
    prompt. ViT: as the authors' code, each token attends to itself alone (the value and output projections),
    then the block's residual and MLP, `ln_post` and the projection. ResNet: the attention pool's value and output
    projections as 1x1 convolutions on the last feature map (no positional embedding, as the authors')."""
    _encode_plain(model, inputs)
    vision = model.vision_model
    if model.config.vision_config.backbone == "resnet":
        pool = vision.attnpool
        cells = inputs.vision.last_hidden_state.flatten(2).transpose(1, 2)  # [I, h*w, C]
        features = pool.out_proj(pool.v_proj(cells))  # [I, h*w, P]
    else:
        block = vision.encoder.layers[-1]
        hidden = inputs.vision.hidden_states[-2]  # [I, N, D]: the last block's input
        qkv, width = block.self_attn.qkv_proj, hidden.shape[-1]
        value = F.linear(block.ln_1(hidden), qkv.weight[2 * width :], qkv.bias[2 * width :])  # [I, N, D]
        tokens = hidden + block.self_attn.out_proj(value)  # [I, N, D]
        tokens = tokens + block.mlp(block.ln_2(tokens))
        features = _projected_patches(model, tokens)
    return _dense_maps(features, inputs), _per_pair_text(inputs)


def _per_pair_text(inputs: ExplainInputs) -> torch.Tensor:
    text = _eot_text_maps(inputs)  # [T, L]
    return text[None].expand(inputs.pixel_values.shape[0], -1, -1)  # [I, T, L]


# ---- ClearCLIP ----


def clearclip_maps(model, inputs: ExplainInputs, options: dict):
    """ClearCLIP: the last block with query-query attention, without the residual and without the MLP."""
    _encode_plain(model, inputs)
    modeling, block = modeling_module(), model.vision_model.encoder.layers[-1]
    hidden = inputs.vision.hidden_states[-2]  # [I, N, D]: the last block's input
    query, _, value = _qkv(block, block.ln_1(hidden))  # [I, heads, N, head_dim] each
    use_sdpa = modeling._uses_sdpa(model.config.vision_config, hidden)
    context = modeling.multi_head_attention(query, query, value, use_sdpa=use_sdpa)[0]  # [I, heads, N, head_dim]
    tokens = block.self_attn.out_proj(modeling._merge_heads(context))  # [I, N, D]
    return _dense_maps(_projected_patches(model, tokens), inputs), _per_pair_text(inputs)


# ---- GEM ----


def _self_attention_weights(x_unit: torch.Tensor, inverse_temperature) -> torch.Tensor:
    """Softmax of the cosine similarities of unit vectors `[B, heads, N, head_dim]` with each other, times
    `inverse_temperature`: `[B, heads, N, N]` in their dtype (softmax in fp32)."""
    scores = x_unit @ x_unit.transpose(-2, -1) * inverse_temperature  # [B, heads, N, N]
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(x_unit.dtype)


def _self_self_attention(query, key, value, inverse_temperature, iterations: int) -> torch.Tensor:
    """GEM's self-self attention: q, k and v each attend to themselves (`iterations` rounds, each replacing the
    path by its attended self), then each path's own attention is applied to v and the three are averaged:
    `[B, heads, N, head_dim]`."""
    context = 0
    for x in (query, key, value):
        for _ in range(iterations):
            x_unit = _unit(x)
            x = _self_attention_weights(x_unit, inverse_temperature) @ x_unit  # [B, heads, N, head_dim]
        context = context + _self_attention_weights(_unit(x), inverse_temperature) @ value
    return context / 3


def gem_maps(model, inputs: ExplainInputs, options: dict):
    """GEM: a parallel path through the last `depth - 1` blocks that adds self-self attention (fed by the
    ordinary path's tokens) and skips the MLP; its projected patches are compared with the prompt."""
    _encode_plain(model, inputs)
    modeling, blocks = modeling_module(), model.vision_model.encoder.layers
    first = len(blocks) - min(options["depth"] - 1, len(blocks))
    hidden_states = inputs.vision.hidden_states  # [I, N, D] each: hidden_states[l] enters block l
    tokens = hidden_states[first]
    for index in range(first, len(blocks)):
        block = blocks[index]
        normed = block.ln_1(hidden_states[index])  # [I, N, D]
        query, key, value = _qkv(block, normed)
        temperature = options["ss_attn_temp"]
        if temperature is None:  # the authors' default: mean token norm of the attention input x the head scale
            norms = normed.float().norm(dim=-1).mean(dim=-1)  # [I]
            temperature = (norms * query.shape[-1] ** -0.5).to(query.dtype)[:, None, None, None]  # [I, 1, 1, 1]
        context = _self_self_attention(query, key, value, temperature, options["ss_attn_iter"])
        tokens = tokens + block.self_attn.out_proj(modeling._merge_heads(context))  # [I, N, D]
    return _dense_maps(_projected_patches(model, tokens), inputs), _per_pair_text(inputs)


# ---- LeGrad ----


def _legrad_block(block, hidden: torch.Tensor, attn_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A block recomputed from its detached input `[B, N, D]` with its attention weights as a leaf that requires
    grad: returns (the block's output `[B, N, D]`, the weights `[B, heads, N, N]`). Only the paths from the
    weights to the output (values times weights, output projection, MLP) enter the graph."""
    modeling = modeling_module()
    with torch.no_grad():
        query, key, value = _qkv(block, block.ln_1(hidden))
        weights = modeling.multi_head_attention(query, key, value, attn_mask, need_weights=True, use_sdpa=False)[1]
    weights = weights.requires_grad_(True)  # [B, heads, N, N]
    x = hidden + block.self_attn.out_proj(modeling._merge_heads(weights @ value))  # [B, N, D]
    return x + block.mlp(block.ln_2(x)), weights


def legrad_maps(model, inputs: ExplainInputs, options: dict):
    """LeGrad: for each layer l from `start_layer` on, s_l = the cosine of that block's output (mean over all
    tokens, through `ln_post` and the projection) with the prompt; the map sums, over l, the mean over heads and
    query rows of ReLU(ds_l/dA_l), without the class token's column. The text side mirrors it: s_l from the
    end-of-text token of text block l (through `ln_final` and the text projection) against the image."""
    encode(
        model, inputs, image_attentions=False, image_hidden_states=True, text_attentions=False, text_hidden_states=True
    )
    vision, text_model = model.vision_model, model.text_model
    start, text_start = options["start_layer"], options["start_layer_text"]
    scores, weights = 0, []
    for index, block in enumerate(vision.encoder.layers[start:], start):
        out, layer_weights = _legrad_block(block, inputs.vision.hidden_states[index])
        scores = scores + _unit(vision.project(vision.ln_post(out.mean(dim=1)))) @ inputs.text_unit.t()  # [I, T]
        weights.append(layer_weights)
    grads = _batched_grads(scores, weights, _one_hot_cotangents(*scores.shape, "text", scores))  # [T, I, h, N, N]
    image = sum(grad.float().clamp(min=0).mean(dim=(2, 3)) for grad in grads)[..., 1:]  # [T, I, gh*gw]
    image_maps = _to_grid(_min_max(image.transpose(0, 1), dims=(-1,)), inputs)  # [I, T, gh, gw]

    hidden_states, input_ids = inputs.text.hidden_states, inputs.input_ids
    mask = text_model.attention_mask(input_ids, inputs.attention_mask, hidden_states[0].dtype)
    eot = input_ids.argmax(dim=-1)  # [T]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    text_scores, text_weights = 0, []
    for index, block in enumerate(text_model.encoder.layers[text_start:], text_start):
        out, layer_weights = _legrad_block(block, hidden_states[index], mask)
        pooled = text_model.ln_final(out[rows, eot])  # [T, D]
        features = pooled @ model.text_projection.to(pooled.dtype)  # [T, P]
        text_scores = text_scores + inputs.image_unit @ _unit(features).t()  # [I, T]
        text_weights.append(layer_weights)
    cotangents = _one_hot_cotangents(*text_scores.shape, "image", text_scores)
    text_grads = _batched_grads(text_scores, text_weights, cotangents)  # each [I, T, heads, L, L]
    text_maps = sum(_text_query_mean(grad.float().clamp(min=0), inputs) for grad in text_grads)  # [I, T, L]
    return image_maps, text_maps


def _text_query_mean(grads: torch.Tensor, inputs: ExplainInputs) -> torch.Tensor:
    """LeGrad's mean over heads and query rows on the causal text side, `[I, T, heads, L, L]` -> `[I, T, L]`: over
    the entries the attention has (query and key both prompt tokens, the key not after the query)."""
    valid = inputs.text_valid  # [T, L]
    length = valid.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()  # [L, L]
    allowed = (valid[:, :, None] & valid[:, None, :] & causal).to(grads.dtype)  # [T, L, L]
    summed = (grads.mean(dim=2) * allowed).sum(dim=-2)  # [I, T, L]
    return summed / valid.sum(dim=-1, keepdim=True).to(grads.dtype)


# ---- Registry entries ----

register(
    ExplainMethod(
        name="legrad",
        title="LeGrad",
        function=legrad_maps,
        backbones=("vit",),
        options=(
            ExplainOption(
                "start_layer",
                "image_layer",
                -2,
                "first image layer whose attention gradient is summed (-2: the last two, as the authors' wrapper)",
            ),
            ExplainOption("start_layer_text", "text_layer", -2, "first text layer whose attention gradient is summed"),
        ),
        prompt_dependent=True,
        cost="one backward",
        needs_grad=True,
        how_to_read=(
            "LeGrad asks every late layer on its own how well the image, as that layer sees it (its tokens "
            "averaged and projected into the joint space), matches the prompt, and marks the patches whose "
            "attention would raise that match: the positive gradient of each layer's score with respect to its "
            "attention, averaged over heads and over the tokens that attend, summed over layers. Bright: patches "
            "that pull the image towards the prompt. The map is scaled from its lowest to its highest value, as the "
            "authors show it. The token colours are the same construction on the text tower (each late text "
            "layer's end-of-text token against the image)."
        ),
        reference=(
            "Bousselham, Boggust, Chaybouti, Strobelt & Kuehne 2024, LeGrad: An Explainability Method for Vision "
            "Transformers via Feature Formation Sensitivity (arXiv 2404.03214); code: legrad-torch."
        ),
    )
)

register(
    ExplainMethod(
        name="gem",
        title="GEM (Grounding Everything)",
        function=gem_maps,
        backbones=("vit",),
        options=(
            ExplainOption(
                "depth",
                "int",
                7,
                "the self-self attention path runs through the last depth - 1 blocks (all of them if fewer)",
                minimum=2,
            ),
            ExplainOption(
                "ss_attn_iter", "int", 1, "rounds of self-self attention before it is applied to the values", minimum=1
            ),
            ExplainOption(
                "ss_attn_temp",
                "float",
                None,
                "inverse temperature of the self-self attention; None: mean token norm x head_dim^-0.5 (authors')",
                minimum=0.0,
            ),
        ),
        prompt_dependent=True,
        cost="forward only",
        needs_grad=False,
        how_to_read=(
            "GEM adds a second path through the last blocks where every token attends to tokens similar to itself "
            "(queries to queries, keys to keys, values to values) instead of to what the class token needs; the "
            "patch features it yields stay local, so comparing each patch with the prompt gives a dense map. "
            "Bright: patches whose feature is closest to the prompt, scaled from the lowest to the highest "
            "similarity in the image (so some region is always bright: compare prompts, and read the logits). No "
            "gradients. The token colours are the end-of-text token's last-layer attention over the prompt."
        ),
        reference=(
            "Bousselham, Petersen, Ferrari & Kuehne 2024, Grounding Everything: Emerging Localization Properties "
            "in Vision-Language Transformers (CVPR); code: gem-torch."
        ),
    )
)

register(
    ExplainMethod(
        name="maskclip",
        title="MaskCLIP",
        function=maskclip_maps,
        backbones=("vit", "resnet"),
        options=(),
        prompt_dependent=True,
        cost="forward only",
        needs_grad=False,
        how_to_read=(
            "MaskCLIP reads a feature for every patch (ViT) or grid cell (ResNet) from the value path of the last "
            "attention layer, which CLIP trained to carry what the image shows, and compares it with the prompt. "
            "Bright: cells whose feature is closest to the prompt, scaled from the lowest to the highest similarity "
            "in the image (some region is always bright: compare prompts). No gradients; for a ResNet this is the "
            "dense, prompt-specific map of its last feature map. The token colours are the end-of-text token's "
            "last-layer attention over the prompt."
        ),
        reference="Zhou, Loy & Dai 2022, Extract Free Dense Labels from CLIP (ECCV).",
    )
)

register(
    ExplainMethod(
        name="clearclip",
        title="ClearCLIP",
        function=clearclip_maps,
        backbones=("vit",),
        options=(),
        prompt_dependent=True,
        cost="forward only",
        needs_grad=False,
        how_to_read=(
            "ClearCLIP rewires the last block: each patch attends to patches with similar queries, and the "
            "residual connection and the MLP, which add noise to the patch features, are left out; each patch's "
            "resulting feature is compared with the prompt. Bright: patches closest to the prompt, scaled from the "
            "lowest to the highest similarity in the image (some region is always bright: compare prompts). No "
            "gradients. The token colours are the end-of-text token's last-layer attention over the prompt."
        ),
        reference=(
            "Lan, Zhang, Yue, Li & Li 2024, ClearCLIP: Decomposing CLIP Representations for Dense "
            "Vision-Language Inference (ECCV)."
        ),
    )
)
