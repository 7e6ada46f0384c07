"""clipviz: OpenAI's CLIP (`clip/model.py`) as a transformers model that returns every layer's attention.

Both image towers of OpenAI's release are here: the ViT and the ModifiedResNet (whose attention pool is the one
attention layer of that tower). `output_attentions=True` works under every `attn_implementation`: without it
attention runs through `F.scaled_dot_product_attention`, with it the weights are computed explicitly in the same
pass and stay in the autograd graph, so relevance maps can take gradients through them.

Explanations (`CLIPVizModel.explain`, its method registry) live in `explaining_clipviz.py`, which ships next to this
file. Both ship to the Hub as remote code: they import only torch, transformers and the standard library.
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

# As Hub remote code these files lie in a package, where the relative imports find the copies shipped next to this
# one (a pip-installed `configuration_clipviz` must never shadow them); as top-level modules (checkout, pip install)
# they fall back to importlib, because transformers' import check scans except branches too and would ask for
# packages named `configuration_clipviz` / `explaining_clipviz`.
try:
    from .configuration_clipviz import RESNET_DOWNSAMPLING, CLIPVizConfig, CLIPVizTextConfig, CLIPVizVisionConfig
    from .explaining_clipviz import CLIPVizExplainMixin, CLIPVizExplanationOutput
except ImportError:
    _configuration = importlib.import_module("configuration_clipviz")
    CLIPVizConfig = _configuration.CLIPVizConfig
    CLIPVizTextConfig = _configuration.CLIPVizTextConfig
    CLIPVizVisionConfig = _configuration.CLIPVizVisionConfig
    RESNET_DOWNSAMPLING = _configuration.RESNET_DOWNSAMPLING
    _explaining = importlib.import_module("explaining_clipviz")
    CLIPVizExplainMixin = _explaining.CLIPVizExplainMixin
    CLIPVizExplanationOutput = _explaining.CLIPVizExplanationOutput


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

    SDPA when no weights are needed (and `use_sdpa`). Otherwise the weights are computed explicitly, as
    `nn.MultiheadAttention` does (the query scaled before the product, softmax in fp32), and the output is taken
    from them, so they are part of the autograd graph.
    """
    if use_sdpa and not need_weights:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask), None
    scores = (query * (1.0 / math.sqrt(query.shape[-1]))) @ key.transpose(-2, -1)  # [B, heads, Lq, Lk]
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [B, heads, Lq, Lk]
    return weights @ value, (weights if need_weights else None)


def _uses_sdpa(config, hidden: torch.Tensor) -> bool:
    """Whether attention on `hidden` runs through SDPA: under "sdpa", except bf16 on CPUs with AVX-512 BF16."""
    # There oneDNN's bf16 matmuls beat SDPA's flash kernel 2.5x per ViT-B/16 attention at batch 16 (7 vs 18 ms on the
    # README's benchmark machine, an earlier form of the explicit path). Without AVX-512 BF16 it is the other way
    # round (AVX2: 1981 vs 105 ms in `benchmarks/bench_attention.py`, a whole block 1.5x slower), and CPU fp16 has no
    # fast matmul at all.
    if hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16 and _cpu_has_avx512_bf16():
        return False
    return getattr(config, "_attn_implementation", None) == "sdpa"


def _cpu_has_avx512_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # absent from older torch releases
    return bool(check is not None and check())


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)  # [B, heads, L, head_dim]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)  # [B, L, heads * head_dim]


class CLIPVizAttention(nn.Module):
    """Multi-head self-attention with one fused input projection (OpenAI's `in_proj_weight`)."""

    def __init__(self, config, width: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, attn_mask=None, output_attentions=False, num_queries=None):
        """`num_queries`: attend from the first `num_queries` tokens only (keys and values are still every token's)."""
        batch, length, width = x.shape
        qkv = self.qkv_proj(x).view(batch, length, 3, self.num_heads, width // self.num_heads)  # [B, L, 3, heads, hd]
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, L, head_dim]
        if num_queries is not None:
            query = query[:, :, :num_queries]  # [B, heads, num_queries, head_dim]
            attn_mask = None if attn_mask is None else attn_mask[..., :num_queries, :]
        use_sdpa = _uses_sdpa(self.config, x)
        context, weights = multi_head_attention(query, key, value, attn_mask, output_attentions, use_sdpa)
        return self.out_proj(_merge_heads(context)), weights


# ---- Block ----


class CLIPVizLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as OpenAI's `LayerNorm` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        # CPU fp16/bf16: PyTorch's kernel takes the input as it is with fp32 parameters and computes in fp32 (the
        # same up to the last bit), without the two full-size conversions: 1.4-3x faster per call at ViT-B/16
        # batch 16 in bf16 (51 calls per forward)
        if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class CLIPVizQuickGELU(nn.Module):
    """OpenAI's `QuickGELU`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CLIPVizMLP(nn.Module):
    """`fc2(act(fc1(x)))` (OpenAI's `c_fc`, QuickGELU, `c_proj`)."""

    def __init__(self, config, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = CLIPVizQuickGELU() if config.hidden_act == "quick_gelu" else ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPVizResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block (OpenAI's `ResidualAttentionBlock`)."""

    def __init__(self, config):
        super().__init__()
        width = config.hidden_size
        self.ln_1 = CLIPVizLayerNorm(width, eps=config.layer_norm_eps)
        self.self_attn = CLIPVizAttention(config, width, config.num_attention_heads)
        self.ln_2 = CLIPVizLayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = CLIPVizMLP(config, width, config.intermediate_size)

    def forward(self, x, attn_mask=None, output_attentions=False, num_queries=None):
        """`[B, L, D]` -> `([B, L, D], weights or None)`. With `num_queries`, only the first `num_queries` tokens'
        outputs are computed (they still attend to every token): `[B, num_queries, D]`."""
        attended, weights = self.self_attn(self.ln_1(x), attn_mask, output_attentions, num_queries)
        x = x[:, :num_queries] + attended  # [B, num_queries or L, D]
        x = x + self.mlp(self.ln_2(x))
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


# ---- Text tower ----


def _mark_init(module: nn.Module, weight_std: float | None = None, xavier: bool = False, zero_bias: bool = False):
    """Record where OpenAI's initialization departs from PyTorch's defaults, for `_init_weights`."""
    module.openai_init = {"weight_std": weight_std, "xavier": xavier, "zero_bias": zero_bias}
    return module


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
        pooled = last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), eot_positions]  # [B, D]
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )


# ---- ViT image tower ----


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
        pooled = self.ln_post(encoded.last_hidden_state[:, 0, :])  # [B, D]: the class token
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
        """OpenAI's initialization: PyTorch defaults, overridden where `initialize_parameters` does. As in
        transformers' CLIP, `config.initializer_factor` scales each of those overrides (standard deviations and
        the xavier gain); PyTorch's defaults stay as they are."""
        factor = self.config.initializer_factor
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
                nn.init.xavier_uniform_(module.weight, gain=factor)
            elif spec["weight_std"] == 0.0:
                nn.init.zeros_(module.weight)
            elif spec["weight_std"] is not None:
                nn.init.normal_(module.weight, std=spec["weight_std"] * factor)
            if spec["zero_bias"]:
                nn.init.zeros_(module.bias)
        if isinstance(module, CLIPVizTextTransformer):
            nn.init.normal_(module.position_embedding, std=0.01 * factor)
        elif isinstance(module, CLIPVizVisionTransformer):
            scale = module.config.hidden_size**-0.5 * factor
            for parameter in (module.class_embedding, module.position_embedding, module.proj):
                nn.init.normal_(parameter, std=scale)
        elif isinstance(module, CLIPVizAttentionPool):
            nn.init.normal_(module.position_embedding, std=module.config.hidden_size**-0.5 * factor)
        elif isinstance(module, CLIPVizModel):
            nn.init.normal_(module.text_projection, std=module.config.text_config.hidden_size**-0.5 * factor)
            nn.init.constant_(module.logit_scale, module.config.logit_scale_init_value)


# ---- The CLIP model ----


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
    minimum = config.patch_size if config.backbone == "vit" else RESNET_DOWNSAMPLING
    if min(height, width) < minimum:
        raise ValueError(f"Images must be at least {minimum}x{minimum} pixels for this backbone, got {height}x{width}.")


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
        logits_per_image = self.logit_scale.exp().to(image_embeds.dtype) * image_embeds @ text_embeds.t()  # [I, T]
        logits_per_text = logits_per_image.t()  # [T, I]
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

__all__ = [
    "CLIPVizExplanationOutput",
    "CLIPVizModel",
    "CLIPVizOutput",
    "CLIPVizPreTrainedModel",
    "multi_head_attention",
]
