"""clipviz: OpenAI's CLIP (`clip/model.py`) as a transformers model that returns every layer's attention.

Both image towers of OpenAI's release are here: the ViT and the ModifiedResNet (whose attention pool is the one
attention layer of that tower). `output_attentions=True` works under every `attn_implementation`: without it
attention runs through `F.scaled_dot_product_attention`, with it the weights are computed explicitly in the same
pass and stay in the autograd graph, so relevance maps can take gradients through them.

This file ships to the Hub as remote code: it imports only torch, transformers and the standard library.
"""

import importlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.utils import ModelOutput

try:  # Hub remote code: transformers imports this file inside a package, next to the config file
    from .configuration_clipviz import CLIPVizConfig, CLIPVizTextConfig, CLIPVizVisionConfig
except ImportError:  # a plain top-level module (pip install / repository checkout); importlib keeps the Hub's
    # import check from asking for a package named `configuration_clipviz`
    _configuration = importlib.import_module("configuration_clipviz")
    CLIPVizConfig = _configuration.CLIPVizConfig
    CLIPVizTextConfig = _configuration.CLIPVizTextConfig
    CLIPVizVisionConfig = _configuration.CLIPVizVisionConfig


# ---- Outputs ----


@dataclass
class CLIPVizOutput(ModelOutput):
    """Output of [`CLIPVizModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): CLIP's symmetric contrastive loss, when
            `return_loss=True` (needs as many images as texts, pairs on the diagonal).
        logits_per_image (`torch.FloatTensor` of shape `[num_images, num_texts]`): scaled cosine similarities.
        logits_per_text (`torch.FloatTensor` of shape `[num_texts, num_images]`): the transpose.
        text_embeds (`torch.FloatTensor` of shape `[num_texts, projection_dim]`): projected text features,
            L2-normalized.
        image_embeds (`torch.FloatTensor` of shape `[num_images, projection_dim]`): projected image features,
            L2-normalized.
        text_model_output (`BaseModelOutputWithPooling`): the text tower's output: `last_hidden_state`
            `[B, L, D]` after the final LayerNorm, `pooler_output` `[B, D]` at the first end-of-text token,
            `hidden_states` (embeddings + each layer) and `attentions` (each layer, `[B, heads, L, L]`, causal).
        vision_model_output (`BaseModelOutputWithPooling`): the image tower's output. ViT: `last_hidden_state`
            `[B, N+1, D]`, `pooler_output` `[B, D]` (class token after `ln_post`), `hidden_states` (embeddings +
            each layer), `attentions` (each layer, `[B, heads, N+1, N+1]`). ResNet: `last_hidden_state` the last
            stage's map `[B, C, h, w]`, `pooler_output` the attention pool's output `[B, projection_dim]`,
            `hidden_states` (stem + each stage's map), `attentions` (one tensor `[B, heads, 1, h*w+1]`: the mean
            token's attention over itself and the grid, row-major).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k].to_tuple() if k in ("text_model_output", "vision_model_output") else self[k] for k in self.keys()
        )


# ---- Attention ----


def multi_head_attention(query, key, value, attn_mask=None, need_weights=False, use_sdpa=True):
    """Scaled dot-product attention over `[B, heads, L, head_dim]` tensors; returns `(output, weights or None)`.

    With `need_weights` the weights are computed explicitly (as `nn.MultiheadAttention` does: the query is
    scaled before the product, softmax in fp32) and the output is taken from them, so they are part of the
    autograd graph. Otherwise SDPA runs, or the same explicit path when `use_sdpa` is False. Without a graph to
    keep, the scale multiplies the product instead: the same values for CLIP's 64-wide heads (scale 1/8).
    """
    if use_sdpa and not need_weights:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask), None
    scale = 1.0 / math.sqrt(query.shape[-1])
    if _keeps_graph(query, key, value):
        scores = (query * scale) @ key.transpose(-2, -1)  # [B, heads, Lq, Lk]
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [B, heads, Lq, Lk]
        return weights @ value, (weights if need_weights else None)
    # No graph to keep: one batch item at a time, the heads read where they lie (strided views of the fused
    # projection) and the context written in the merged-heads layout, so q, k, v are never copied. Only returned
    # maps are batch-sized; otherwise one item's scores buffer serves every item.
    batch, heads, length, head_dim = query.shape
    weights = query.new_empty(batch if need_weights else 1, heads, length, key.shape[-2])  # [B or 1, heads, Lq, Lk]
    context = query.new_empty(batch, length, heads, head_dim).transpose(1, 2)  # [B, heads, Lq, head_dim]
    masks = None if attn_mask is None else attn_mask.expand(batch, heads, length, key.shape[-2])  # a view
    for item in range(batch):
        scores = weights[item if need_weights else 0]  # [heads, Lq, Lk]
        torch.baddbmm(scores, query[item], key[item].transpose(-2, -1), beta=0, alpha=scale, out=scores)
        if masks is not None:
            scores.add_(masks[item])
        torch.softmax(scores, dim=-1, out=scores)  # reduced precisions accumulate in fp32
        torch.bmm(scores, value[item], out=context[item])
    return context, (weights if need_weights else None)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)  # [B, heads, L, head_dim]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)  # [B, L, heads * head_dim]


def _mark_init(module: nn.Module, weight_std: float | None = None, xavier: bool = False, zero_bias: bool = False):
    """Record where OpenAI's initialization departs from PyTorch's defaults, for `_init_weights`."""
    module.openai_init = {"weight_std": weight_std, "xavier": xavier, "zero_bias": zero_bias}
    return module


def _keeps_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on these tensors (if not, their fresh buffers may be reused in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _add_residual(update: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`residual + update`; without a graph, written into `update` (a fresh layer output) to save an allocation."""
    return residual + update if _keeps_graph(update, residual) else update.add_(residual)


def _uses_sdpa(config, hidden: torch.Tensor) -> bool:
    """Whether attention on `hidden` runs through SDPA: under "sdpa", except bf16 on CPU, where PyTorch's
    flash-attention kernel is ~2.5x slower than the explicit oneDNN bf16 matmuls (measured on AVX-512 BF16
    cores; CPU fp16 has no fast matmul, so it stays on SDPA)."""
    if hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16:
        return False
    return getattr(config, "_attn_implementation", None) == "sdpa"


class CLIPVizLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as OpenAI's `LayerNorm` does.

    On CPU, PyTorch's kernel takes fp16/bf16 input with fp32 parameters and computes in fp32, rounding once at the
    end: the same computation without two full-size dtype conversions (2.7x faster at ViT-B/16 batch 16).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class CLIPVizAttention(nn.Module):
    """Multi-head self-attention with one fused input projection (OpenAI's `in_proj_weight`)."""

    def __init__(self, config, width: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, output_attentions: bool):
        batch, length, width = x.shape
        use_sdpa = _uses_sdpa(self.config, x)
        qkv = self.qkv_proj(x).view(batch, length, 3, self.num_heads, width // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, heads, L, head_dim]
        if (output_attentions or not use_sdpa) and _keeps_graph(qkv):  # autograd's matmuls: ~2x faster contiguous
            qkv = qkv.contiguous()
        query, key, value = qkv.unbind(0)  # 3 x [B, heads, L, head_dim]
        context, weights = multi_head_attention(
            query, key, value, attn_mask=attn_mask, need_weights=output_attentions, use_sdpa=use_sdpa
        )
        return self.out_proj(_merge_heads(context)), weights


class CLIPVizQuickGELU(nn.Module):
    """OpenAI's `QuickGELU`, `x * sigmoid(1.702 * x)`, which is `silu(1.702 * x) / 1.702`: the MLP's no-graph path
    uses that form with both scales folded into its matrix products."""

    SCALE = 1.702

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.SCALE * x)


class CLIPVizMLP(nn.Module):
    """`fc2(act(fc1(x)))`. Without a graph to keep, it runs over blocks of at most `ROWS_PER_BLOCK` tokens through
    one reused hidden buffer: the full hidden activations (39 MB for ViT-B/16 at batch 16) are the largest
    temporary of the forward, and once returned attention maps fill the heap every fresh one is mapped and
    page-faulted anew; ~1000-row blocks also keep the products as fast as one big one. QuickGELU there is one
    in-place `silu` pass: its two scalings ride on the products' alpha/beta, which cost nothing."""

    ROWS_PER_BLOCK = 1024

    def __init__(self, config, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = CLIPVizQuickGELU() if config.hidden_act == "quick_gelu" else ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _keeps_graph(x, *self.parameters()):
            return self.fc2(self.act(self.fc1(x)))
        rows = x.reshape(-1, x.shape[-1])  # [B * L, width]
        out = rows.new_empty(rows.shape[0], self.fc2.out_features)  # [B * L, width]
        blocks = max(1, math.ceil(rows.shape[0] / self.ROWS_PER_BLOCK))
        block_rows = max(1, math.ceil(rows.shape[0] / blocks))  # even blocks
        hidden = rows.new_empty(block_rows, self.fc1.out_features)  # [block rows, hidden]
        quick_gelu = isinstance(self.act, CLIPVizQuickGELU)
        scale = self.act.SCALE if quick_gelu else 1.0
        for start in range(0, rows.shape[0], block_rows):
            stop = min(start + block_rows, rows.shape[0])
            block = hidden[: stop - start]
            # scale * fc1(x): alpha scales the product, beta the bias already copied into `block`
            torch.addmm(self.fc1.bias, rows[start:stop], self.fc1.weight.t(), beta=scale, alpha=scale, out=block)
            activated = F.silu(block, inplace=True) if quick_gelu else self.act(block)
            torch.addmm(self.fc2.bias, activated, self.fc2.weight.t(), alpha=1.0 / scale, out=out[start:stop])
        return out.view(*x.shape[:-1], self.fc2.out_features)  # [B, L, width]


class CLIPVizResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block (OpenAI's `ResidualAttentionBlock`)."""

    def __init__(self, config):
        super().__init__()
        width = config.hidden_size
        self.ln_1 = CLIPVizLayerNorm(width, eps=config.layer_norm_eps)
        self.self_attn = CLIPVizAttention(config, width, config.num_attention_heads)
        self.ln_2 = CLIPVizLayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = CLIPVizMLP(config, width, config.intermediate_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, output_attentions: bool = False):
        attended, weights = self.self_attn(self.ln_1(x), attn_mask, output_attentions)
        x = _add_residual(attended, x)
        x = _add_residual(self.mlp(self.ln_2(x)), x)
        return x, weights


class CLIPVizEncoder(nn.Module):
    """A stack of residual attention blocks collecting hidden states and attentions on request."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(CLIPVizResidualAttentionBlock(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x, attn_mask=None, output_attentions=False, output_hidden_states=False) -> BaseModelOutput:
        hidden_states = (x,) if output_hidden_states else None
        attentions = () if output_attentions else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, weights = self._gradient_checkpointing_func(layer.__call__, x, attn_mask, output_attentions)
            else:
                x, weights = layer(x, attn_mask, output_attentions)
            if output_hidden_states:
                hidden_states += (x,)
            if output_attentions:
                attentions += (weights,)
        return BaseModelOutput(last_hidden_state=x, hidden_states=hidden_states, attentions=attentions)


def _interpolate_grid_embedding(embedding: torch.Tensor, grid: int, height: int, width: int) -> torch.Tensor:
    """Resize the grid part of a `[1 + grid*grid, D]` positional embedding to `height x width` (bicubic)."""
    if (height, width) == (grid, grid):
        return embedding
    first, rest = embedding[:1], embedding[1:]
    dim = embedding.shape[-1]
    rest = rest.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)  # [1, D, grid, grid]
    rest = F.interpolate(rest, size=(height, width), mode="bicubic", align_corners=False)
    rest = rest.permute(0, 2, 3, 1).reshape(height * width, dim)  # [h*w, D]
    return torch.cat([first, rest.to(embedding.dtype)], dim=0)  # [1 + h*w, D]


def _check_image_size(
    pixel_values: torch.Tensor, config, interpolate_pos_encoding: bool, can_interpolate: bool = True
) -> None:
    """`can_interpolate=False` for callers without `interpolate_pos_encoding` (explain): the fix offered is resizing."""
    if pixel_values.ndim != 4:
        raise ValueError(
            f"`pixel_values` must have shape [batch, 3, height, width], got {tuple(pixel_values.shape)}; "
            "add a batch dimension with `pixel_values[None]` for a single image."
        )
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {pixel_values.shape[1]} channels but CLIP takes {config.num_channels} (RGB); "
            "convert images with `image.convert('RGB')` and use the model's image processor (channels first)."
        )
    height, width = pixel_values.shape[-2:]
    if not interpolate_pos_encoding and (height, width) != (config.image_size, config.image_size):
        alternative = ", or pass `interpolate_pos_encoding=True`" if can_interpolate else " (explain() needs that size)"
        raise ValueError(
            f"Input image size ({height}x{width}) doesn't match the model's ({config.image_size}x{config.image_size}); "
            f"resize to {config.image_size} with the model's image processor{alternative}."
        )
    minimum = config.patch_size if config.backbone == "vit" else 32
    if min(height, width) < minimum:
        raise ValueError(f"Images must be at least {minimum}x{minimum} pixels for this backbone, got {height}x{width}.")


# ---- Text tower ----


class CLIPVizTextTransformer(nn.Module):
    """OpenAI's text encoder: token + positional embedding, causal blocks, `ln_final`, pooled at end-of-text."""

    def __init__(self, config: CLIPVizTextConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.token_embedding = _mark_init(nn.Embedding(config.vocab_size, width), weight_std=0.02)
        self.position_embedding = nn.Parameter(torch.empty(config.max_position_embeddings, width))
        self.encoder = CLIPVizEncoder(config)
        self.ln_final = CLIPVizLayerNorm(width, eps=config.layer_norm_eps)
        self._mark_openai_block_init(config)

    def _mark_openai_block_init(self, config) -> None:
        # OpenAI's `initialize_parameters` re-initializes only the text blocks' weights (biases keep defaults).
        width, layers = config.hidden_size, config.num_hidden_layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.encoder.layers:
            _mark_init(block.self_attn.qkv_proj, weight_std=width**-0.5, zero_bias=True)
            _mark_init(block.self_attn.out_proj, weight_std=proj_std, zero_bias=True)
            _mark_init(block.mlp.fc1, weight_std=(2 * width) ** -0.5)
            _mark_init(block.mlp.fc2, weight_std=proj_std)

    def attention_mask(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None, dtype) -> torch.Tensor:
        """Additive mask: causal (-inf above the diagonal, as OpenAI's), plus padded keys when a mask is given."""
        length = input_ids.shape[1]
        causal = torch.full((length, length), float("-inf"), device=input_ids.device, dtype=dtype).triu_(1)
        if padding_mask is None:
            return causal  # [L, L]
        # a large negative rather than -inf keeps rows finite even when every key of a row is padding
        padded = (1.0 - padding_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # [B, 1, 1, L]
        return causal + padded  # [B, 1, L, L]

    def forward(self, input_ids, attention_mask=None, output_attentions=False, output_hidden_states=False):
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.position_embedding[:length].to(self.token_embedding.weight.dtype)
        mask = self.attention_mask(input_ids, attention_mask, x.dtype)
        encoded = self.encoder(x, mask, output_attentions, output_hidden_states)
        last_hidden_state = self.ln_final(encoded.last_hidden_state)
        # OpenAI pools at the end-of-text token, the largest id of each sequence (argmax takes the first one)
        eot_positions = input_ids.argmax(dim=-1)
        pooled = last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), eot_positions]
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )


# ---- ViT image tower ----


class CLIPVizVisionTransformer(nn.Module):
    """OpenAI's `VisionTransformer`: patches + class token + positions, `ln_pre`, blocks, `ln_post`, `proj`."""

    def __init__(self, config: CLIPVizVisionConfig, projection_dim: int):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.patch_embedding = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.position_embedding = nn.Parameter(torch.empty(config.grid_size**2 + 1, width))
        self.ln_pre = CLIPVizLayerNorm(width, eps=config.layer_norm_eps)
        self.encoder = CLIPVizEncoder(config)
        self.ln_post = CLIPVizLayerNorm(width, eps=config.layer_norm_eps)
        self.proj = nn.Parameter(torch.empty(width, projection_dim))
        for block in self.encoder.layers:  # PyTorch's nn.MultiheadAttention defaults, as in OpenAI's ViT
            _mark_init(block.self_attn.qkv_proj, xavier=True, zero_bias=True)
            _mark_init(block.self_attn.out_proj, zero_bias=True)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, gh, gw]
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, D]
        class_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([class_token, x], dim=1)  # [B, gh*gw + 1, D]
        positions = _interpolate_grid_embedding(self.position_embedding, self.config.grid_size, grid_h, grid_w)
        return x + positions.to(x.dtype)

    def forward(self, pixel_values, output_attentions=False, output_hidden_states=False):
        x = self.ln_pre(self.embed(pixel_values))
        encoded = self.encoder(x, None, output_attentions, output_hidden_states)
        pooled = self.ln_post(encoded.last_hidden_state[:, 0, :])
        return BaseModelOutputWithPooling(
            last_hidden_state=encoded.last_hidden_state,
            pooler_output=pooled,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.proj


# ---- ModifiedResNet image tower ----


def _batch_norm(channels: int, zero_weight: bool = False) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels)
    return _mark_init(norm, weight_std=0.0) if zero_weight else norm


class CLIPVizBottleneck(nn.Module):
    """OpenAI's Bottleneck: stride-1 convolutions, an average pool before the strided paths (anti-aliasing)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = _batch_norm(planes * self.expansion, zero_weight=True)  # OpenAI zero-inits the last BN
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    pool=nn.AvgPool2d(stride),
                    conv=nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False),
                    bn=nn.BatchNorm2d(planes * self.expansion),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place like OpenAI's: every tensor changed here is a fresh BatchNorm output (BatchNorm's backward
        # does not need its output), never `x`, which the caller may keep as a hidden state
        out = F.relu_(self.bn1(self.conv1(x)))
        out = F.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu_(out.add_(identity))


class CLIPVizAttentionPool(nn.Module):
    """OpenAI's `AttentionPool2d`: one attention layer whose query is the mean of the grid.

    Only the mean token's output is used by CLIP, so only its query row is computed: the weights are
    `[B, heads, 1, h*w + 1]` (key 0 is the mean token, keys 1.. the grid, row-major).
    """

    def __init__(self, config: CLIPVizVisionConfig, output_dim: int):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.position_embedding = nn.Parameter(torch.empty(config.grid_size**2 + 1, width))
        std = width**-0.5
        self.q_proj = _mark_init(nn.Linear(width, width), weight_std=std)
        self.k_proj = _mark_init(nn.Linear(width, width), weight_std=std)
        self.v_proj = _mark_init(nn.Linear(width, width), weight_std=std)
        self.out_proj = _mark_init(nn.Linear(width, output_dim), weight_std=std)

    def forward(self, features: torch.Tensor, output_attentions: bool = False):
        grid_h, grid_w = features.shape[-2:]
        x = features.flatten(2).transpose(1, 2)  # [B, h*w, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, h*w + 1, C]
        positions = _interpolate_grid_embedding(self.position_embedding, self.config.grid_size, grid_h, grid_w)
        x = x + positions.to(x.dtype)
        query = _split_heads(self.q_proj(x[:, :1]), self.num_heads)  # [B, heads, 1, head_dim]
        key = _split_heads(self.k_proj(x), self.num_heads)  # [B, heads, h*w + 1, head_dim]
        value = _split_heads(self.v_proj(x), self.num_heads)  # [B, heads, h*w + 1, head_dim]
        context, weights = multi_head_attention(
            query, key, value, need_weights=output_attentions, use_sdpa=_uses_sdpa(self.config, x)
        )
        pooled = self.out_proj(_merge_heads(context)[:, 0])  # [B, output_dim]
        return pooled, weights


class CLIPVizModifiedResNet(nn.Module):
    """OpenAI's ModifiedResNet: 3-convolution stem with an average pool, 4 stages, attention pooling."""

    def __init__(self, config: CLIPVizVisionConfig, projection_dim: int):
        super().__init__()
        self.config = config
        width = config.resnet_width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        stages = []
        for index, blocks in enumerate(config.resnet_layers):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stage = [CLIPVizBottleneck(inplanes, planes, stride)]
            inplanes = planes * CLIPVizBottleneck.expansion
            stage += [CLIPVizBottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = CLIPVizAttentionPool(config, projection_dim)

    def _memory_format(self, pixel_values: torch.Tensor) -> torch.memory_format:
        """Channels-last lets oneDNN run the convolutions without reordering activations (on 2 CPU cores 1.2-1.3x
        faster from batch 2 and in bf16). With channels-first weights it reorders those on every call instead,
        which for a single fp32 image costs more than it saves (1.2x slower); `model.to(memory_format=
        torch.channels_last)` stores the weights channels-last and makes it the faster choice there too."""
        weight = self.conv1.weight
        if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
            return torch.channels_last
        single_fp32_image = pixel_values.shape[0] == 1 and weight.dtype == torch.float32
        return torch.contiguous_format if single_fp32_image else torch.channels_last

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.bn1(self.conv1(x)))
        x = F.relu_(self.bn2(self.conv2(x)))
        x = F.relu_(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, pixel_values, output_attentions=False, output_hidden_states=False):
        x = pixel_values.to(self.conv1.weight.dtype).contiguous(memory_format=self._memory_format(pixel_values))
        x = self.stem(x)
        feature_maps = (x,)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feature_maps += (x,)
        pooled, weights = self.attnpool(x, output_attentions)
        return BaseModelOutputWithPooling(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=feature_maps if output_hidden_states else None,
            attentions=(weights,) if output_attentions else None,
        )

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled  # the attention pool's output projection already maps to the joint space


# ---- Pretrained model ----


class CLIPVizPreTrainedModel(PreTrainedModel):
    config_class = CLIPVizConfig
    base_model_prefix = "clipviz"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CLIPVizResidualAttentionBlock", "CLIPVizBottleneck", "CLIPVizAttentionPool"]

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the source text; every attention layer here reads its config's
        # `_attn_implementation` at call time, so `model.set_attn_implementation(...)` takes effect at once
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """OpenAI's initialization: PyTorch defaults, overridden where `initialize_parameters` does."""
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm)):
            module.reset_parameters()
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            nn.init.zeros_(module.running_mean)
            nn.init.ones_(module.running_var)
        spec = getattr(module, "openai_init", None)
        if spec is not None:
            if spec["xavier"]:
                nn.init.xavier_uniform_(module.weight)
            elif spec["weight_std"] == 0.0:
                nn.init.zeros_(module.weight)
            elif spec["weight_std"] is not None:
                nn.init.normal_(module.weight, std=spec["weight_std"])
            if spec["zero_bias"]:
                nn.init.zeros_(module.bias)
        if isinstance(module, CLIPVizTextTransformer):
            nn.init.normal_(module.position_embedding, std=0.01)
        elif isinstance(module, CLIPVizVisionTransformer):
            scale = module.config.hidden_size**-0.5
            for parameter in (module.class_embedding, module.position_embedding, module.proj):
                nn.init.normal_(parameter, std=scale)
        elif isinstance(module, CLIPVizAttentionPool):
            nn.init.normal_(module.position_embedding, std=module.config.hidden_size**-0.5)
        elif isinstance(module, CLIPVizModel):
            nn.init.normal_(module.text_projection, std=module.config.text_config.hidden_size**-0.5)
            nn.init.constant_(module.logit_scale, module.config.logit_scale_init_value)


# ---- Explanations ----
# Where does CLIP look for a prompt? `CLIPVizModel.explain` (from `CLIPVizExplainMixin`) answers for every image x
# prompt pair in one call. Both towers run once for all pairs; gradient methods then ask autograd only for the
# tensors they read (attention weights from `start_layer` on, or one layer's tokens), with one vmapped backward per
# side whose batch is the other side's count, never a full `backward()` per prompt.

EXPLAIN_METHODS = ("attention", "rollout", "relevance", "gradcam")
_BACKBONE_METHODS = {"vit": EXPLAIN_METHODS, "resnet": ("attention", "relevance", "gradcam")}
_HEAD_CHOICES = ("mean", "max")
_ROLLOUT_FUSIONS = ("mean", "max", "min")
OVERLAY_COLORMAPS = ("jet", "viridis", "inferno", "gray")


@dataclass
class CLIPVizExplanationOutput(ModelOutput):
    """Output of [`CLIPVizExplainMixin.explain`]: one map per image x prompt pair.

    Args:
        image_maps (`torch.FloatTensor` of shape `[num_images, num_texts, grid_h, grid_w]`): where the image tower
            looks, on its token grid (ViT patches, or the ResNet attention-pool grid), row-major as in the image.
            Non-negative, each map scaled to a maximum of 1 (an all-zero map stays zero). Upsample and blend it with
            [`overlay`].
        text_maps (`torch.FloatTensor` of shape `[num_images, num_texts, seq_len]`): how much each token of each
            prompt matters, on the same scale (maximum 1 per map); 0 on padding and after the first end-of-text
            token. The start and end-of-text tokens are included; drop them for display if you like.
        logits_per_image (`torch.FloatTensor` of shape `[num_images, num_texts]`): the model's scaled cosine
            similarities for the same pairs, as in [`CLIPVizModel.forward`].
    """

    image_maps: torch.FloatTensor | None = None
    text_maps: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None


def _valid_explain_options(method: str, backbone: str) -> dict[str, Any]:
    """The options a method accepts on a backbone, with their defaults."""
    if method == "attention":
        return {"layer": -1, "head": "mean", "text_layer": -1, "text_head": None}
    if method == "rollout":
        return {"head_fusion": "mean", "discard_ratio": 0.0}
    if method == "relevance":
        options = {"start_layer": -1, "start_layer_text": -1}
        if backbone == "resnet":  # one attention layer: nothing to start from
            del options["start_layer"]
        return options
    return {}  # gradcam


def _check_choice_option(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"`{name}`={value!r} is not valid here; valid values: {', '.join(map(repr, valid))}.")


def _check_layer(name: str, value, num_layers: int) -> int:
    """A Python-style layer index (negative counts from the end), returned non-negative."""
    valid = list(range(-num_layers, num_layers))
    if isinstance(value, bool) or not isinstance(value, int) or value not in valid:
        raise ValueError(f"`{name}`={value!r} is out of range; valid values: {valid[0]} .. {valid[-1]}.")
    return value % num_layers


def _resolve_explain_options(method: str, options: dict, backbone: str, heads: int, layers: int, text) -> dict:
    """Validate `options` for `method` on this model; return every option with defaults filled in and layer
    indices made non-negative. `heads`/`layers` describe the image tower, `text` is the text config."""
    if method not in EXPLAIN_METHODS:
        raise ValueError(f"Unknown explanation method {method!r}; valid methods: {', '.join(EXPLAIN_METHODS)}.")
    if method not in _BACKBONE_METHODS[backbone]:
        raise ValueError(
            f"Method {method!r} is not available for the {backbone} backbone; valid methods: "
            f"{', '.join(_BACKBONE_METHODS[backbone])}."
        )
    defaults = _valid_explain_options(method, backbone)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) if defaults else "none"
        raise ValueError(f"Unknown option(s) {unknown} for method {method!r} on {backbone}; valid options: {valid}.")
    resolved = {**defaults, **options}
    for name in ("layer", "start_layer"):
        if name in resolved:
            resolved[name] = _check_layer(name, resolved[name], layers)
    for name in ("text_layer", "start_layer_text"):
        if name in resolved:
            resolved[name] = _check_layer(name, resolved[name], text.num_hidden_layers)
    if "head" in resolved:
        _check_head("head", resolved["head"], heads)
        if resolved["text_head"] is None:  # the same choice for the text tower, where it exists there
            if isinstance(resolved["head"], int) and resolved["head"] >= text.num_attention_heads:
                raise ValueError(
                    f"`head`={resolved['head']!r} exists in the image tower ({heads} heads) but not in the text "
                    f"tower ({text.num_attention_heads} heads): also pass `text_head` (a text head index, "
                    f"{' or '.join(map(repr, _HEAD_CHOICES))})."
                )
            resolved["text_head"] = resolved["head"]
        _check_head("text_head", resolved["text_head"], text.num_attention_heads)
    if "head_fusion" in resolved:
        _check_choice_option("head_fusion", resolved["head_fusion"], _ROLLOUT_FUSIONS)
    if "discard_ratio" in resolved:
        ratio = resolved["discard_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"`discard_ratio`={ratio!r} must be a number in [0, 1).")
    return resolved


def _check_head(name: str, head, num_heads: int) -> None:
    valid = list(range(num_heads)) + list(_HEAD_CHOICES)
    is_head = isinstance(head, str) or (isinstance(head, int) and not isinstance(head, bool))  # not 1.0 / True
    if not is_head or head not in valid:
        raise ValueError(f"`{name}`={head!r} is not valid here; valid values: {', '.join(map(repr, valid))}.")


def _fuse_heads(weights: torch.Tensor, head) -> torch.Tensor:
    """Select one head or fuse them: `[..., heads, q, k]` -> `[..., q, k]`."""
    if head == "mean":
        return weights.mean(dim=-3)
    if head == "max":
        return weights.amax(dim=-3)
    if head == "min":
        return weights.amin(dim=-3)
    return weights[..., head, :, :]


def _scale_to_max_one(maps: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Clamp at 0 and divide each map (over `dims`) by its maximum; all-zero maps stay zero."""
    maps = maps.clamp(min=0)
    peak = maps.amax(dim=dims, keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def _text_valid_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`[T, L]` bool: tokens up to and including the first end-of-text token (OpenAI's argmax), minus padding."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    valid = positions[None, :] <= input_ids.argmax(dim=-1)[:, None]  # [T, L]
    if attention_mask is not None:
        valid = valid & attention_mask.bool()
    return valid


def _eot_rows(matrices: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Row of each prompt's end-of-text token: `[..., T, L, L]` -> `[..., T, L]` (the prompt axis is dim -3)."""
    eot = input_ids.argmax(dim=-1)  # [T]
    index = eot.view(-1, 1, 1).expand(*matrices.shape[:-2], 1, matrices.shape[-1])  # [..., T, 1, L]
    return matrices.gather(-2, index).squeeze(-2)  # [..., T, L]


def _batched_grads(target: torch.Tensor, inputs: list[torch.Tensor], cotangents: torch.Tensor) -> list[torch.Tensor]:
    """d(cotangents[k] . target)/d(inputs) for every k, as one vmapped backward: `[K, *input.shape]` each.

    Only the graph between `target` and `inputs` is run (autograd prunes the rest, and parameter gradients are
    never computed), which is what keeps explanations cheap.
    """
    return list(torch.autograd.grad(target, inputs, grad_outputs=cotangents, retain_graph=True, is_grads_batched=True))


def _one_hot_cotangents(num_images: int, num_texts: int, per: str, like: torch.Tensor) -> torch.Tensor:
    """Cotangents selecting one logit per (image, text) pair, batched along one side.

    `per="text"`: `[T, I, T]`, entry k picks column k, so the image tower's gradient for image i is that of
    logit (i, k) (images are independent rows). `per="image"`: `[I, I, T]`, entry k picks row k, likewise for
    the text tower.
    """
    if per == "text":
        eye = torch.eye(num_texts, dtype=like.dtype, device=like.device)
        return eye[:, None, :].expand(num_texts, num_images, num_texts)  # [T, I, T]
    eye = torch.eye(num_images, dtype=like.dtype, device=like.device)
    return eye[:, :, None].expand(num_images, num_images, num_texts)  # [I, I, T]


def _chefer_relevance(attentions: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021: `R <- R + mean_h ReLU(dy/dA * A) @ R`, from the identity, over the given layers.

    attentions: per layer `[B, heads, N, N]`; grads: per layer `[K, B, heads, N, N]` (K targets).
    Returns `R`: `[K, B, N, N]`.
    """
    size = attentions[0].shape[-1]
    batch = (grads[0].shape[0], attentions[0].shape[0])
    relevance = torch.eye(size, dtype=torch.float32, device=attentions[0].device).expand(*batch, size, size)
    for weights, grad in zip(attentions, grads, strict=True):
        cam = (grad.float() * weights.detach().float()[None]).clamp(min=0).mean(dim=2)  # [K, B, N, N]
        relevance = relevance + cam @ relevance  # [K, B, N, N]
    return relevance


def _rollout(attentions: list[torch.Tensor], head_fusion: str, discard_ratio: float) -> torch.Tensor:
    """Abnar & Zuidema 2020: fuse heads, drop the weakest links, add the residual, renormalize rows, multiply.

    attentions: per layer `[B, heads, N, N]`. Returns `[B, N, N]` = a_last @ ... @ a_first.
    """
    size = attentions[0].shape[-1]
    eye = torch.eye(size, dtype=torch.float32, device=attentions[0].device)
    result = eye.expand(attentions[0].shape[0], size, size)  # [B, N, N]
    for weights in attentions:
        fused = _fuse_heads(weights.float(), head_fusion)  # [B, N, N]
        fused = _discard_lowest(fused, discard_ratio)
        mixed = (fused + eye) / 2
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)  # each row sums to 1
        result = mixed @ result  # [B, N, N]
    return result


def _discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest `ratio` of each `[N, N]` map's entries, per sample, never the class->class entry."""
    batch, size, _ = fused.shape
    count = int(size * size * ratio)
    if count == 0:
        return fused
    flat = fused.reshape(batch, size * size)  # [B, N*N]
    ranked = flat.clone()
    ranked[:, 0] = float("inf")  # the class token's attention to itself is never discarded
    lowest = ranked.topk(min(count, size * size - 1), dim=-1, largest=False).indices  # [B, count]
    return flat.scatter(1, lowest, 0.0).reshape(batch, size, size)  # [B, N, N]


def _class_token_attention(block, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The class token's attention row in a ViT block, computed from the block's input `[I, N, D]` as the block
    computes it, for that one query. Returns the row `[I, heads, 1, N]` and the values `[I, heads, N, head_dim]`."""
    attention, width = block.self_attn, hidden.shape[-1]
    qkv, normed = attention.qkv_proj, block.ln_1(hidden)  # fused q, k, v along the output dimension
    query = F.linear(normed[:, :1], qkv.weight[:width], qkv.bias[:width])  # [I, 1, D]
    key, value = F.linear(normed, qkv.weight[width:], qkv.bias[width:]).chunk(2, dim=-1)  # 2 x [I, N, D]
    query, key, value = (_split_heads(t, attention.num_heads) for t in (query, key, value))  # [I, heads, 1|N, hd]
    return multi_head_attention(query, key, value, need_weights=True)[1], value


def _class_token_through_block(block, hidden: torch.Tensor, cls_weights: torch.Tensor, values: torch.Tensor):
    """A ViT block's output at the class token `[I, D]` as a function of that token's attention row: the operations
    of `CLIPVizResidualAttentionBlock.forward` for one query. hidden: the block's input `[I, N, D]`; cls_weights
    `[I, heads, 1, N]` and values `[I, heads, N, head_dim]` as `_class_token_attention` gives them."""
    context = cls_weights.to(values.dtype) @ values  # [I, heads, 1, head_dim]
    x = hidden[:, :1] + block.self_attn.out_proj(_merge_heads(context))  # [I, 1, D]
    return (x + block.mlp(block.ln_2(x)))[:, 0]  # [I, D]


def _require_grad(module, args, output):
    """Forward hook: an output computed without grad (frozen parameters) becomes a leaf that requires grad."""
    return output if output.requires_grad else output.detach().requires_grad_(True)


_COLORMAP_HEX = {  # 11 evenly spaced stops, interpolated linearly
    "viridis": "440154 482475 414487 355f8d 2a788e 21918c 22a884 44bf70 7ad151 bddf26 fde725",
    "inferno": "000004 160b39 420a68 6a176e 932667 bc3754 dd513a f37819 fca50a f6d746 fcffa4",
}


def _apply_colormap(values: torch.Tensor, colormap: str) -> torch.Tensor:
    """`[h, w]` values in [0, 1] -> `[h, w, 3]` RGB in [0, 1]."""
    if colormap == "jet":
        centers = torch.tensor([3.0, 2.0, 1.0], dtype=values.dtype)  # red, green, blue peaks of 4x
        return (1.5 - (4 * values[..., None] - centers).abs()).clamp(0, 1)  # [h, w, 3]
    if colormap == "gray":
        return values[..., None].expand(*values.shape, 3)  # [h, w, 3]
    stops = torch.tensor(
        [[int(code[i : i + 2], 16) / 255 for i in (0, 2, 4)] for code in _COLORMAP_HEX[colormap].split()],
        dtype=values.dtype,
    )  # [11, 3]
    position = values * (len(stops) - 1)
    low = position.floor().long().clamp(max=len(stops) - 2)  # [h, w]
    frac = (position - low)[..., None]  # [h, w, 1]
    return stops[low] * (1 - frac) + stops[low + 1] * frac  # [h, w, 3]


def overlay(image, map, alpha: float = 0.5, colormap: str = "jet"):
    """Blend an explanation map over the original image and return a PIL image of the image's size.

    The processor resizes the short side and centre-crops, so the map covers the centred region of the map's
    aspect ratio (a square for square grids) at full height or width; it is upsampled bilinearly to that region
    and blended there (`alpha` = weight of the colours), the rest of the image is left as it is.

    Args:
        image: a PIL image, or an array `[H, W, 3]` / `[H, W]` of uint8.
        map: `[grid_h, grid_w]` tensor or array (leading size-1 dimensions are dropped), e.g.
            `explain(...).image_maps[i, t]`; it is scaled to a maximum of 1 here.
        alpha (`float`): in [0, 1].
        colormap (`str`): one of `OVERLAY_COLORMAPS` ("jet", "viridis", "inferno", "gray").
    """
    import numpy as np
    from PIL import Image

    if colormap not in OVERLAY_COLORMAPS:
        raise ValueError(f"Unknown colormap {colormap!r}; valid colormaps: {', '.join(OVERLAY_COLORMAPS)}.")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha!r}.")
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    picture = picture.convert("RGB")
    values = torch.as_tensor(np.asarray(map.detach().cpu() if torch.is_tensor(map) else map), dtype=torch.float32)
    while values.ndim > 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"`map` must be a 2-D grid [grid_h, grid_w], got shape {tuple(values.shape)}.")
    width, height = picture.size
    grid_h, grid_w = values.shape
    region_w = min(width, round(height * grid_w / grid_h))
    region_h = min(height, round(region_w * grid_h / grid_w))
    left, top = (width - region_w) // 2, (height - region_h) // 2
    values = values.clamp(min=0)
    values = values / values.max() if values.max() > 0 else values
    upsampled = F.interpolate(values[None, None], size=(region_h, region_w), mode="bilinear", align_corners=False)
    colors = _apply_colormap(upsampled[0, 0].clamp(0, 1), colormap)  # [region_h, region_w, 3]
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)  # [H, W, 3]
    region = pixels[top : top + region_h, left : left + region_w]
    pixels[top : top + region_h, left : left + region_w] = (1 - alpha) * region + alpha * colors
    return Image.fromarray((pixels * 255).round().clamp(0, 255).to(torch.uint8).numpy())


class CLIPVizExplainMixin:
    """Adds `explain` (attention, rollout, relevance and Grad-CAM maps) and `overlay` to [`CLIPVizModel`]."""

    def explain(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        method: str = "relevance",
        **options,
    ) -> CLIPVizExplanationOutput:
        """Maps of where the model looks in each image, and at which tokens, for each prompt.

        Every image is paired with every prompt: both towers run once, whatever the number of pairs. Call it on a
        model in eval mode (BatchNorm of the ResNet tower uses its running statistics then).

        Args:
            pixel_values (`torch.FloatTensor` of shape `[num_images, 3, size, size]`): processed images.
            input_ids (`torch.LongTensor` of shape `[num_texts, length]`): tokenized prompts.
            attention_mask (`torch.Tensor` of shape `[num_texts, length]`, *optional*): 1 for tokens, 0 for padding.
            method (`str`): one of
                - `"attention"`: raw attention of the class token (ViT) or of the attention pool's mean-token query
                  (ResNet) over the grid, and of the end-of-text token over the prompt. Prompt-independent on the
                  image side. Options: `layer` (image layer index, default -1; ResNet: its one pool, -1 or 0),
                  `text_layer` (default -1), `head` (an image head index, `"mean"` or `"max"`, default `"mean"`),
                  `text_head` (the same for the text tower; default: `head`, which must then exist there too).
                - `"rollout"` (ViT only): attention rollout (Abnar & Zuidema 2020) over all layers, for both towers.
                  Options: `head_fusion` (`"mean"`, `"max"`, `"min"`), `discard_ratio` (in [0, 1): the lowest
                  fraction of each fused image attention map is zeroed, never the class->class entry; the text
                  tower is rolled out without discarding). Rows are renormalized after adding the identity.
                - `"relevance"` (default): Chefer et al. 2021 gradient x attention, `R <- R + mean_h ReLU(dy/dA * A) R`
                  from the identity, with `y` the image-prompt logit; the image map is the class token's row, the
                  text map the end-of-text token's row minus the identity. Options: `start_layer` (ViT, first image
                  layer used, default -1 = the last one, as Chefer's CLIP code, and about the cost of a forward
                  whatever the number of prompts; 0 uses every layer: sharper on small models, but one image-tower
                  backward per prompt) and `start_layer_text` (default -1). ResNet: the attention pool's
                  gradient-weighted attention `mean_h ReLU(dy/dA * A)` of the mean token over the grid.
                - `"gradcam"`: Grad-CAM with `y` = image embedding . unit text embedding, on the last ResNet stage
                  (channel weights = mean gradient over the grid) or on the tokens entering the last ViT block
                  (token features weighted by their mean gradient); the text side likewise on the tokens entering
                  the last text block, with `y` = unit image embedding . text embedding.

        Returns:
            [`CLIPVizExplanationOutput`] with `image_maps` `[num_images, num_texts, grid_h, grid_w]`, `text_maps`
            `[num_images, num_texts, length]` and `logits_per_image` `[num_images, num_texts]`, all detached.

        Raises:
            ValueError: for an unknown method, a method or option the backbone does not support (the message lists
                the valid ones), or an option value out of range.
        """
        vision_config, text_config = self.config.vision_config, self.config.text_config
        backbone = vision_config.backbone
        layers = vision_config.num_hidden_layers if backbone == "vit" else 1
        resolved = _resolve_explain_options(
            method, options, backbone, vision_config.num_attention_heads, layers, text_config
        )
        self._check_text(input_ids, attention_mask)
        _check_image_size(pixel_values, vision_config, False, can_interpolate=False)
        needs_grad = method in ("relevance", "gradcam")
        # relevance from the last ViT layer only is recomputed from the class token's row (see
        # `_last_layer_relevance`): the image tower then runs without a graph
        shortcut = method == "relevance" and backbone == "vit" and resolved["start_layer"] == layers - 1
        # frozen parameters must not keep the attentions out of the graph: the image side gets this from
        # `pixel_values.requires_grad_`, the text side from a hook on the token embedding
        hook = self.text_model.token_embedding.register_forward_hook(_require_grad) if needs_grad else None
        try:
            with torch.enable_grad() if needs_grad else torch.no_grad():
                pixel_values = pixel_values.detach().requires_grad_(needs_grad and not shortcut)
                towers = self._encode_for_explanations(
                    pixel_values, input_ids, attention_mask, method == "gradcam", needs_grad and not shortcut, shortcut
                )
                towers["shortcut"] = shortcut
                image_maps, text_maps = getattr(self, f"_explain_{method}")(towers, input_ids, resolved)
        finally:
            if hook is not None:
                hook.remove()
        text_maps = text_maps.float() * towers["text_valid"][None].to(text_maps.dtype)  # [I, T, L]
        return CLIPVizExplanationOutput(
            image_maps=_scale_to_max_one(image_maps.float(), dims=(-2, -1)).detach(),
            text_maps=_scale_to_max_one(text_maps, dims=(-1,)).detach(),
            logits_per_image=towers["logits"].detach(),
        )

    overlay = staticmethod(overlay)

    # -- shared forward

    def _encode_for_explanations(
        self, pixel_values, input_ids, attention_mask, hidden_states: bool, image_graph: bool, last_layer_only: bool
    ) -> dict:
        """One pass of each tower with attentions and hidden states: projected features, normalized features
        and the logits of every pair. Text hidden states only for Grad-CAM; the image tower builds an autograd
        graph only when `image_graph`, and returns no attentions when `last_layer_only` (the relevance shortcut
        recomputes the one row it needs, so the tower runs on the fast attention path)."""
        with torch.set_grad_enabled(image_graph and torch.is_grad_enabled()):
            vision = self.vision_model(pixel_values, output_attentions=not last_layer_only, output_hidden_states=True)
        text = self.text_model(input_ids, attention_mask, output_attentions=True, output_hidden_states=hidden_states)
        image_features = self.vision_model.project(vision.pooler_output)  # [I, P]
        text_features = text.pooler_output @ self.text_projection.to(text.pooler_output.dtype)  # [T, P]
        image_unit = image_features / image_features.norm(dim=-1, keepdim=True)
        text_unit = text_features / text_features.norm(dim=-1, keepdim=True)
        logits = self.logit_scale.exp().to(image_unit.dtype) * image_unit @ text_unit.t()  # [I, T]
        if self.config.vision_config.backbone == "resnet":
            grid = tuple(vision.last_hidden_state.shape[-2:])
        else:
            patch = self.config.vision_config.patch_size
            grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        return {
            "grid": grid,
            "text_valid": _text_valid_mask(input_ids, attention_mask),  # [T, L]
            "vision": vision,
            "text": text,
            "image_features": image_features,
            "text_features": text_features,
            "image_unit": image_unit,
            "text_unit": text_unit,
            "logits": logits,
        }

    # -- methods: each returns (image_maps [I, T, gh, gw], text_maps [I, T, L]) before scaling

    def _explain_attention(self, towers, input_ids, options):
        num_texts = input_ids.shape[0]
        weights = towers["vision"].attentions[options["layer"]]  # [I, heads, q, 1 + gh*gw]
        image = _fuse_heads(weights[:, :, :1, 1:], options["head"])[:, 0]  # [I, gh*gw]
        text_weights = towers["text"].attentions[options["text_layer"]]  # [T, heads, L, L]
        text = _eot_rows(_fuse_heads(text_weights, options["text_head"]), input_ids)  # [T, L]
        num_images = image.shape[0]
        image_maps = image[:, None].expand(num_images, num_texts, -1)  # [I, T, gh*gw]
        return self._to_grid(image_maps, towers), text[None].expand(num_images, num_texts, -1)

    def _explain_rollout(self, towers, input_ids, options):
        num_texts = input_ids.shape[0]
        image = _rollout(list(towers["vision"].attentions), options["head_fusion"], options["discard_ratio"])
        image = image[:, 0, 1:]  # [I, gh*gw]: the class token's row, without itself
        text = _eot_rows(_rollout(list(towers["text"].attentions), options["head_fusion"], 0.0), input_ids)  # [T, L]
        num_images = image.shape[0]
        image_maps = image[:, None].expand(num_images, num_texts, -1)  # [I, T, gh*gw]
        return self._to_grid(image_maps, towers), text[None].expand(num_images, num_texts, -1)

    def _explain_relevance(self, towers, input_ids, options):
        logits = towers["logits"]
        if towers["shortcut"]:
            image = self._last_layer_relevance(towers)  # [T, I, gh*gw]
        else:
            image_weights = list(towers["vision"].attentions[options.get("start_layer", 0) :])  # ResNet: the pool
            cotangents = _one_hot_cotangents(*logits.shape, "text", logits)
            grads = _batched_grads(logits, image_weights, cotangents)  # each [T, I, heads, q, k]
            if self.config.vision_config.backbone == "resnet":
                cam = (grads[0].float() * image_weights[0].detach().float()[None]).clamp(min=0).mean(dim=2)
                image = cam[:, :, 0, 1:]  # [T, I, h*w]: the mean token's query row, grid keys only
            else:
                image = _chefer_relevance(image_weights, grads)[:, :, 0, 1:]  # [T, I, gh*gw]
        return self._to_grid(image.transpose(0, 1), towers), self._text_relevance(towers, input_ids, options)

    def _text_relevance(self, towers, input_ids, options) -> torch.Tensor:
        """Chefer's relevance of each prompt token for each image: `[I, T, L]`."""
        logits = towers["logits"]
        num_images, num_texts = logits.shape
        text_weights = list(towers["text"].attentions[options["start_layer_text"] :])
        text_grads = _batched_grads(logits, text_weights, _one_hot_cotangents(num_images, num_texts, "image", logits))
        relevance = _chefer_relevance(text_weights, text_grads)  # [I, T, L, L]
        eye = torch.eye(relevance.shape[-1], dtype=relevance.dtype, device=relevance.device)
        return _eot_rows(relevance - eye, input_ids)  # [I, T, L]

    def _last_layer_relevance(self, towers) -> torch.Tensor:
        """Chefer's image relevance over the last ViT layer alone: there `R = I + cam`, so the map is the class
        token's row of `mean_h ReLU(dy/dA * A)`, and only that row of `A` reaches the logit.

        The block is recomputed for the class token alone from its detached input, so each prompt's backward
        costs one token instead of all of them (autograd would push zero rows through every token's MLP).
        Returns `[T, I, gh*gw]`.
        """
        vision, block = self.vision_model, self.vision_model.encoder.layers[-1]
        hidden = towers["vision"].hidden_states[-2].detach()  # [I, N, D]: the last block's input
        # the tower ran on SDPA without attentions: the one row needed is computed here
        weights, values = _class_token_attention(block, hidden)
        weights = weights.detach().requires_grad_(True)  # [I, heads, 1, N]
        with torch.enable_grad():
            pooled = vision.ln_post(_class_token_through_block(block, hidden, weights, values.detach()))  # [I, D]
            features = vision.project(pooled)  # [I, P]
            unit = features / features.norm(dim=-1, keepdim=True)
            logits = self.logit_scale.exp().to(unit.dtype) * unit @ towers["text_unit"].detach().t()  # [I, T]
            cotangents = _one_hot_cotangents(logits.shape[0], logits.shape[1], "text", logits)
            (grad,) = _batched_grads(logits, [weights], cotangents)  # [T, I, heads, 1, N]
        cam = (grad.float() * weights.detach().float()[None]).clamp(min=0).mean(dim=2)  # [T, I, 1, N]
        return cam[:, :, 0, 1:]

    def _explain_gradcam(self, towers, input_ids, options):
        image_features, text_features = towers["image_features"], towers["text_features"]
        num_images, num_texts = image_features.shape[0], text_features.shape[0]
        image_target = image_features @ towers["text_unit"].detach().t()  # [I, T]
        per_text = _one_hot_cotangents(num_images, num_texts, "text", image_target)
        if self.config.vision_config.backbone == "resnet":
            features = towers["vision"].last_hidden_state  # [I, C, h, w]: the last stage
            (grad,) = _batched_grads(image_target, [features], per_text)  # [T, I, C, h, w]
            weights = grad.float().mean(dim=(-2, -1))  # [T, I, C]
            image = (weights[..., None, None] * features.detach().float()[None]).sum(dim=2)  # [T, I, h, w]
            image = image.flatten(2).clamp(min=0)  # [T, I, h*w]
        else:
            tokens = towers["vision"].hidden_states[-2]  # [I, 1 + gh*gw, D]: the tokens entering the last block
            (grad,) = _batched_grads(image_target, [tokens], per_text)  # [T, I, 1 + gh*gw, D]
            weights = grad.float()[:, :, 1:].mean(dim=2)  # [T, I, D]
            image = (tokens.detach().float()[None, :, 1:] * weights[:, :, None]).sum(-1).clamp(min=0)  # [T, I, gh*gw]
        text_target = towers["image_unit"].detach() @ text_features.t()  # [I, T]
        per_image = _one_hot_cotangents(num_images, num_texts, "image", text_target)
        text_tokens = towers["text"].hidden_states[-2]  # [T, L, D]: the tokens entering the last text block
        (text_grad,) = _batched_grads(text_target, [text_tokens], per_image)  # [I, T, L, D]
        valid = towers["text_valid"].to(text_grad.dtype)  # [T, L]
        text_weights = (text_grad.float() * valid[..., None]).sum(2) / valid.sum(1)[:, None]  # [I, T, D]
        text = (text_tokens.detach().float()[None] * text_weights[:, :, None]).sum(-1).clamp(min=0)  # [I, T, L]
        return self._to_grid(image.transpose(0, 1), towers), text

    @staticmethod
    def _to_grid(maps: torch.Tensor, towers) -> torch.Tensor:
        """`[I, T, gh*gw]` -> `[I, T, gh, gw]` (row-major, as the towers flatten their grids)."""
        grid_h, grid_w = towers["grid"]
        return maps.reshape(*maps.shape[:2], grid_h, grid_w)  # [I, T, gh, gw]


# ---- The CLIP model ----


class CLIPVizModel(CLIPVizExplainMixin, CLIPVizPreTrainedModel):
    """OpenAI's CLIP with a ViT or ModifiedResNet image tower; every attention layer can be returned.

    Example:
        ```python
        >>> model = AutoModel.from_pretrained(repo, trust_remote_code=True)
        >>> out = model(input_ids=ids, pixel_values=pixels, output_attentions=True)
        >>> out.vision_model_output.attentions[-1].shape  # ViT-B/32: [B, 12, 50, 50]
        ```
    """

    def __init__(self, config: CLIPVizConfig):
        super().__init__(config)
        # transformers resolves the default implementation ("sdpa") on the top-level config only (its own composite
        # models resolve theirs per sub-model); our towers read their sub-configs, so hand an unset choice down
        for sub_config in (config.text_config, config.vision_config):
            if sub_config._attn_implementation is None:
                sub_config._attn_implementation = config._attn_implementation
        vision = config.vision_config
        self.text_model = CLIPVizTextTransformer(config.text_config)
        tower = CLIPVizVisionTransformer if vision.backbone == "vit" else CLIPVizModifiedResNet
        self.vision_model = tower(vision, config.projection_dim)
        self.text_projection = nn.Parameter(torch.empty(config.text_config.hidden_size, config.projection_dim))
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    # -- input checks: clear errors instead of shape errors deep inside the towers

    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        config = self.config.text_config
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must have shape [batch, length], got {tuple(input_ids.shape)}.")
        if input_ids.shape[1] == 0:
            raise ValueError("`input_ids` has no tokens (length 0); each text needs at least its end-of-text token.")
        if input_ids.shape[1] > config.max_position_embeddings:
            raise ValueError(
                f"`input_ids` has {input_ids.shape[1]} tokens but the context length is "
                f"{config.max_position_embeddings}; tokenize with `truncation=True, max_length="
                f"{config.max_position_embeddings}` or shorten the text."
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
            raise ValueError(f"`input_ids` must lie in [0, {config.vocab_size}); use the model's tokenizer.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` shape {tuple(attention_mask.shape)} does not match `input_ids` shape "
                f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids."
            )

    # -- features

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text features, not normalized: a `torch.Tensor` of shape `[batch, projection_dim]`."""
        self._check_text(input_ids, attention_mask)
        pooled = self.text_model(input_ids, attention_mask).pooler_output
        return pooled @ self.text_projection.to(pooled.dtype)

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Projected image features, not normalized: a `torch.Tensor` of shape `[batch, projection_dim]`."""
        _check_image_size(pixel_values, self.config.vision_config, interpolate_pos_encoding)
        return self.vision_model.project(self.vision_model(pixel_values).pooler_output)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
    ) -> CLIPVizOutput | tuple:
        """Image–text logits (as OpenAI's `CLIP.forward`), embeddings and, on request, attentions/hidden states.

        Args:
            input_ids (`torch.LongTensor` of shape `[num_texts, length <= 77]`): OpenAI BPE ids with start and
                end-of-text tokens (the model's tokenizer).
            pixel_values (`torch.FloatTensor` of shape `[num_images, 3, size, size]`): normalized images.
            attention_mask (`torch.Tensor` of shape `[num_texts, length]`, *optional*): 1 for tokens, 0 for padding.
                OpenAI's model uses no padding mask (causal attention and end-of-text pooling make it unneeded).
            return_loss (`bool`): also return CLIP's contrastive loss (needs `num_images == num_texts`).
            output_attentions (`bool`): return each attention layer's per-head weights `[B, heads, query, key]`.
            output_hidden_states (`bool`): return each layer's hidden states (ViT, text) or stage maps (ResNet).
            interpolate_pos_encoding (`bool`): accept other image sizes by resizing positional embeddings.
            return_dict (`bool`): return a [`CLIPVizOutput`] instead of a tuple.
        """
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        if input_ids is None or pixel_values is None:
            raise ValueError(
                "CLIPVizModel.forward needs both `input_ids` and `pixel_values`; use `get_text_features` or "
                "`get_image_features` for one modality."
            )
        self._check_text(input_ids, attention_mask)
        _check_image_size(pixel_values, config.vision_config, interpolate_pos_encoding)
        if return_loss and input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"`return_loss=True` needs matching pairs, got {pixel_values.shape[0]} images and "
                f"{input_ids.shape[0]} texts."
            )

        vision_outputs = self.vision_model(pixel_values, output_attentions, output_hidden_states)
        text_outputs = self.text_model(input_ids, attention_mask, output_attentions, output_hidden_states)
        image_embeds = self.vision_model.project(vision_outputs.pooler_output)
        text_embeds = text_outputs.pooler_output @ self.text_projection.to(text_outputs.pooler_output.dtype)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        logits_per_image = self.logit_scale.exp().to(image_embeds.dtype) * image_embeds @ text_embeds.t()
        logits_per_text = logits_per_image.t()
        loss = clip_loss(logits_per_text) if return_loss else None

        output = CLIPVizOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        return output if return_dict else output.to_tuple()


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the matching pairs on the diagonal."""
    targets = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    text_loss = F.cross_entropy(logits_per_text, targets)
    image_loss = F.cross_entropy(logits_per_text.t(), targets)
    return (text_loss + image_loss) / 2


CLIPVizModel.register_for_auto_class("AutoModel")

__all__ = ["CLIPVizModel", "CLIPVizOutput", "CLIPVizPreTrainedModel", "multi_head_attention"]
