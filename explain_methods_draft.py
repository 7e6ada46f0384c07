"""LeGrad, GEM, MaskCLIP and ClearCLIP for clipviz (draft: moves into explaining_clipviz.py once it exists).

Each method: `(model, pixel_values, input_ids, attention_mask, options) -> (image_maps [I, T, gh, gw],
text_maps [I, T, L], logits [I, T])`.
"""

import math

import torch

from modeling_clipviz import (
    _batched_grads,
    _class_token_through_block,
    _merge_heads,
    _one_hot_cotangents,
    _text_valid_mask,
    multi_head_attention,
)

# ---- shared pieces ----


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _min_max(maps: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Each map (over `dims`) shifted and scaled to [0, 1], as the methods' authors show them; flat maps become 0."""
    low, high = maps.amin(dim=dims, keepdim=True), maps.amax(dim=dims, keepdim=True)
    spread = high - low
    return (maps - low) / torch.where(spread > 0, spread, torch.ones_like(spread))


def _vit_input_of(vision, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """The tokens entering ViT block `layer` `[I, N, D]`, from the plain (fast, graph-free) tower."""
    x = vision.ln_pre(vision.embed(pixel_values))
    for block in vision.encoder.layers[:layer]:
        x = block(x)[0]
    return x


def _qkv(block, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's query, key and value for every token, one fused projection: 3 x `[B, heads, N, head_dim]`."""
    attention = block.self_attn
    batch, length, width = hidden.shape
    qkv = attention.qkv_proj(block.ln_1(hidden)).view(batch, length, 3, attention.num_heads, -1)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, N, head_dim]


def _class_token_output(block, hidden, query, key, value) -> torch.Tensor:
    """The ordinary block's output at the class token `[I, D]` from its q, k, v (the image embedding's path)."""
    weights = multi_head_attention(query[:, :, :1], key, value, need_weights=True, use_sdpa=False)[1]
    return _class_token_through_block(block, hidden, weights, value)


def _image_unit(model, class_token: torch.Tensor) -> torch.Tensor:
    vision = model.vision_model
    return _unit(vision.project(vision.ln_post(class_token)))


def _dense_similarity(model, tokens: torch.Tensor, text_unit: torch.Tensor) -> torch.Tensor:
    """Cosine of each patch's projected feature with each prompt: tokens `[I, N, D]` (class token first) ->
    `[I, T, N - 1]`, min-max scaled per map."""
    vision = model.vision_model
    patches = _unit(vision.project(vision.ln_post(tokens[:, 1:])).float())  # [I, N - 1, P]
    similarity = patches @ text_unit.float().t()  # [I, N - 1, T]
    return _min_max(similarity.transpose(1, 2), dims=(-1,))  # [I, T, N - 1]


def _text_tower(model, input_ids, attention_mask):
    """The text tower's block inputs and unit embeddings `[T, P]` (plain pass)."""
    text = model.text_model(input_ids, attention_mask, output_hidden_states=True)
    features = text.pooler_output @ model.text_projection.to(text.pooler_output.dtype)
    return text, _unit(features)


def _eot_attention_map(model, text, input_ids, attention_mask) -> torch.Tensor:
    """The end-of-text token's last-layer attention over its prompt, mean over heads: `[T, L]`. Only that row is
    computed, from the last block's input (the tower ran on the fast path without attentions)."""
    block = model.text_model.encoder.layers[-1]
    hidden = text.hidden_states[-2]  # [T, L, D]: the last block's input
    query, key, value = _qkv(block, hidden)
    eot = input_ids.argmax(dim=-1)  # [T]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    eot_query = query[rows, :, eot][:, :, None]  # [T, heads, 1, head_dim]
    allowed = torch.arange(input_ids.shape[1], device=input_ids.device)[None] <= eot[:, None]  # [T, L] causal
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[:, None, None]  # [T, 1, 1, L]
    weights = multi_head_attention(eot_query, key, value, mask, need_weights=True, use_sdpa=False)[1]
    return weights[:, :, 0].float().mean(dim=1)  # [T, L]


def _gradient_free_text_maps(model, text, input_ids, attention_mask, num_images: int) -> torch.Tensor:
    return _eot_attention_map(model, text, input_ids, attention_mask)[None].expand(num_images, -1, -1)


def _to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return maps.reshape(*maps.shape[:2], *grid)  # [I, T, gh, gw]


def _vit_grid(model, pixel_values) -> tuple[int, int]:
    patch = model.config.vision_config.patch_size
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch


# ---- MaskCLIP ----


def explain_maskclip(model, pixel_values, input_ids, attention_mask, options):
    """MaskCLIP (Zhou et al. 2022): dense features from the value path of the last attention layer."""
    with torch.no_grad():
        text, text_unit = _text_tower(model, input_ids, attention_mask)
        text_maps = _gradient_free_text_maps(model, text, input_ids, attention_mask, pixel_values.shape[0])
        if model.config.vision_config.backbone == "resnet":
            return (*_maskclip_resnet(model, pixel_values, text_unit), text_maps)
        vision = model.vision_model
        block = vision.encoder.layers[-1]
        hidden = _vit_input_of(vision, pixel_values, len(vision.encoder.layers) - 1)  # [I, N, D]
        query, key, value = _qkv(block, hidden)
        image_unit = _image_unit(model, _class_token_output(block, hidden, query, key, value))
        # each token attends to itself alone: the value, through the output projection, the residual and the MLP
        dense = hidden + block.self_attn.out_proj(_merge_heads(value))  # [I, N, D]
        dense = dense + block.mlp(block.ln_2(dense))
        image_maps = _to_grid(_dense_similarity(model, dense, text_unit), _vit_grid(model, pixel_values))
        return image_maps, text_maps, _logits(model, image_unit, text_unit)


def _maskclip_resnet(model, pixel_values, text_unit):
    """The attention pool's value and output projections as 1x1 convolutions on every cell of the last stage."""
    vision = model.vision_model
    out = vision(pixel_values)
    features = out.last_hidden_state  # [I, C, h, w]
    grid = tuple(features.shape[-2:])
    cells = features.flatten(2).transpose(1, 2)  # [I, h*w, C]
    pool = vision.attnpool
    dense = _unit(pool.out_proj(pool.v_proj(cells)).float())  # [I, h*w, P]
    similarity = (dense @ text_unit.float().t()).transpose(1, 2)  # [I, T, h*w]
    image_maps = _to_grid(_min_max(similarity, dims=(-1,)), grid)
    return image_maps, _logits(model, _unit(vision.project(out.pooler_output)), text_unit)


def _logits(model, image_unit, text_unit) -> torch.Tensor:
    return model.logit_scale.exp().float() * image_unit.float() @ text_unit.float().t()  # [I, T]


# ---- ClearCLIP ----


def explain_clearclip(model, pixel_values, input_ids, attention_mask, options):
    """ClearCLIP (Lan et al. 2024): the last block with query-query attention, no residual, no MLP."""
    with torch.no_grad():
        text, text_unit = _text_tower(model, input_ids, attention_mask)
        text_maps = _gradient_free_text_maps(model, text, input_ids, attention_mask, pixel_values.shape[0])
        vision = model.vision_model
        block = vision.encoder.layers[-1]
        hidden = _vit_input_of(vision, pixel_values, len(vision.encoder.layers) - 1)  # [I, N, D]
        query, key, value = _qkv(block, hidden)
        image_unit = _image_unit(model, _class_token_output(block, hidden, query, key, value))
        context = multi_head_attention(query, query, value, use_sdpa=False)[0]  # [I, heads, N, head_dim]
        dense = block.self_attn.out_proj(_merge_heads(context))  # [I, N, D]
        image_maps = _to_grid(_dense_similarity(model, dense, text_unit), _vit_grid(model, pixel_values))
        return image_maps, text_maps, _logits(model, image_unit, text_unit)


# ---- GEM ----


def _self_self_context(query, key, value, inverse_temperature, iterations: int) -> torch.Tensor:
    """GEM's self-self attention: q, k and v each attend to themselves (cosine scores x inverse temperature),
    `iterations` times, then each path's attention is applied to v and the three are averaged."""
    paths = []
    for x in (query, key, value):
        for _ in range(iterations):
            x = _unit(x)
            x = (
                torch.softmax(x @ x.transpose(-2, -1) * inverse_temperature, dim=-1, dtype=torch.float32).to(x.dtype)
                @ x
            )  # [B, heads, N, head_dim]
        x = _unit(x)
        weights = torch.softmax(x @ x.transpose(-2, -1) * inverse_temperature, dim=-1, dtype=torch.float32)
        paths.append(weights.to(value.dtype) @ value)  # [B, heads, N, head_dim]
    return (paths[0] + paths[1] + paths[2]) / 3


def explain_gem(model, pixel_values, input_ids, attention_mask, options):
    """Grounding Everything (Bousselham et al. 2024): a parallel self-self attention path in the last
    `depth - 1` blocks, fed by the ordinary path's tokens, without the MLP."""
    with torch.no_grad():
        text, text_unit = _text_tower(model, input_ids, attention_mask)
        text_maps = _gradient_free_text_maps(model, text, input_ids, attention_mask, pixel_values.shape[0])
        vision = model.vision_model
        blocks = vision.encoder.layers
        first = len(blocks) - min(options["depth"] - 1, len(blocks))
        hidden = _vit_input_of(vision, pixel_values, first)  # [I, N, D]
        gem = hidden
        for index in range(first, len(blocks)):
            block = blocks[index]
            query, key, value = _qkv(block, hidden)
            if options["ss_attn_temp"] is None:  # mean token norm of the attention input x the head scale
                normed = block.ln_1(hidden).float()
                scale = 1.0 / math.sqrt(query.shape[-1])
                inverse_temperature = (normed.norm(dim=-1).mean(dim=-1) * scale)[:, None, None, None]  # [I, 1, 1, 1]
                inverse_temperature = inverse_temperature.to(query.dtype)
            else:
                inverse_temperature = options["ss_attn_temp"]
            context = _self_self_context(query, key, value, inverse_temperature, options["ss_attn_iter"])
            gem = gem + block.self_attn.out_proj(_merge_heads(context))  # [I, N, D]
            if index == len(blocks) - 1:
                image_unit = _image_unit(model, _class_token_output(block, hidden, query, key, value))
            else:
                ordinary = multi_head_attention(query, key, value)[0]  # [I, heads, N, head_dim]
                hidden = hidden + block.self_attn.out_proj(_merge_heads(ordinary))
                hidden = hidden + block.mlp(block.ln_2(hidden))
        image_maps = _to_grid(_dense_similarity(model, gem, text_unit), _vit_grid(model, pixel_values))
        return image_maps, text_maps, _logits(model, image_unit, text_unit)


# ---- LeGrad ----


def _legrad_block(block, hidden: torch.Tensor, attn_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A block recomputed from its (detached) input with its attention weights as a leaf that requires grad.
    Returns (the block's output `[B, N, D]`, the weights `[B, heads, N, N]`)."""
    query, key, value = _qkv(block, hidden)
    with torch.no_grad():
        weights = multi_head_attention(query, key, value, attn_mask, need_weights=True, use_sdpa=False)[1]
    weights = weights.detach().requires_grad_(True)  # [B, heads, N, N]
    context = weights @ value.detach()  # [B, heads, N, head_dim]
    x = hidden + block.self_attn.out_proj(_merge_heads(context))
    return x + block.mlp(block.ln_2(x)), weights


def explain_legrad(model, pixel_values, input_ids, attention_mask, options):
    """LeGrad (Bousselham et al. 2024): for each layer from `start_layer` on, the gradient of the similarity of
    that layer's mean token (through `ln_post` and the projection) with the prompt w.r.t. that layer's attention;
    ReLU, mean over heads and query rows, summed over layers."""
    vision, text_model = model.vision_model, model.text_model
    blocks, text_blocks = vision.encoder.layers, text_model.encoder.layers
    with torch.no_grad():
        hidden = _vit_input_of(vision, pixel_values, options["start_layer"])
        text_hidden, text_mask = _text_input_of(text_model, input_ids, attention_mask, options["start_layer_text"])
    with torch.enable_grad():
        image_scores, weights = [], []
        for block in blocks[options["start_layer"] :]:
            out, layer_weights = _legrad_block(block, hidden.detach())
            weights.append(layer_weights)
            image_scores.append(_unit(vision.project(vision.ln_post(out.mean(dim=1)))))  # [I, P]
            hidden = out
        image_unit = _image_unit(model, hidden[:, 0]).detach()
        text_scores, text_weights = [], []
        for block in text_blocks[options["start_layer_text"] :]:
            out, layer_weights = _legrad_block(block, text_hidden.detach(), text_mask)
            text_weights.append(layer_weights)
            text_scores.append(_text_unit_at_eot(model, out, input_ids))  # [T, P]
            text_hidden = out
        text_unit = text_scores[-1].detach()
        image_target = sum(score @ text_unit.t() for score in image_scores)  # [I, T]
        per_text = _one_hot_cotangents(*image_target.shape, "text", image_target)
        image_grads = _batched_grads(image_target, weights, per_text)  # each [T, I, heads, N, N]
        text_target = sum(image_unit @ score.t() for score in text_scores)  # [I, T]
        per_image = _one_hot_cotangents(*text_target.shape, "image", text_target)
        text_grads = _batched_grads(text_target, text_weights, per_image)  # each [I, T, heads, L, L]
    image = sum(grad.float().clamp(min=0).mean(dim=(2, 3)) for grad in image_grads)[..., 1:]  # [T, I, N - 1]
    image_maps = _to_grid(_min_max(image.transpose(0, 1), dims=(-1,)), _vit_grid(model, pixel_values))
    text_maps = sum(_text_rows_mean(grad.float().clamp(min=0), input_ids, attention_mask) for grad in text_grads)
    return image_maps, text_maps, _logits(model, image_unit, text_unit)


def _text_input_of(text_model, input_ids, attention_mask, layer: int):
    length = input_ids.shape[1]
    x = text_model.token_embedding(input_ids) + text_model.position_embedding[:length].to(
        text_model.token_embedding.weight.dtype
    )
    mask = text_model.attention_mask(input_ids, attention_mask, x.dtype)
    for block in text_model.encoder.layers[:layer]:
        x = block(x, mask)[0]
    return x, mask


def _text_unit_at_eot(model, hidden, input_ids) -> torch.Tensor:
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    pooled = model.text_model.ln_final(hidden[rows, input_ids.argmax(dim=-1)])  # [T, D]
    return _unit(pooled @ model.text_projection.to(pooled.dtype))


def _text_rows_mean(grads: torch.Tensor, input_ids, attention_mask) -> torch.Tensor:
    """LeGrad's mean over heads and query rows on the text side, `[I, T, heads, L, L]` -> `[I, T, L]`: only the
    entries the causal, padded attention has (query and key both real tokens, key not after the query)."""
    valid = _text_valid_mask(input_ids, attention_mask)  # [T, L]
    length = input_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()  # [L, L]
    allowed = (valid[:, :, None] & valid[:, None, :] & causal).to(grads.dtype)  # [T, L, L]
    summed = (grads.mean(dim=2) * allowed).sum(dim=-2)  # [I, T, L]
    return summed / valid.sum(dim=-1, keepdim=True).to(grads.dtype)
