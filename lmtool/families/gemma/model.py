"""Gemma v1 backbone: scaled embeddings, pre-norm decoder layers with RoPE attention and GeGLU."""

from __future__ import annotations

import torch
from torch import nn

from ...cache import ModelCache, begin_step, kv_cache
from ...captured import CapturedDecoding
from ...layers import GatedMLP, RMSNorm, RotaryEmbedding, SelfAttention, causal_mask, sqrt_scale
from .config import GemmaConfig
from .decode import DecodePlan


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        D = config.hidden_size
        self.input_layernorm = RMSNorm(D, config.rms_norm_eps, unit_offset=True, weight_before_cast=True)
        self.self_attn = SelfAttention(
            D,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
        )
        self.post_attention_layernorm = RMSNorm(D, config.rms_norm_eps, unit_offset=True, weight_before_cast=True)
        self.mlp = GatedMLP(D, config.intermediate_size, config.activation)

    def forward(self, x, step, rope, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), step, rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaModel(CapturedDecoding, nn.Module):
    Plan = DecodePlan  # the captured one-token step (decode.py)

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True, weight_before_cast=True)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_base)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> ModelCache:
        c = self.config
        return kv_cache(len(self.layers), batch, c.num_key_value_heads, max_len, c.head_dim, dtype, device)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, cache: ModelCache | None = None):
        step = begin_step(input_ids, attention_mask, cache)
        x = self.embed_tokens(input_ids)
        # sqrt(hidden) rounded to the weight dtype (45.25 in bf16 for 2048), multiplied in that dtype.
        x = x * sqrt_scale(self.config.hidden_size, x.dtype).to(x.device)
        rope = self.rotary(step.positions, x.dtype)
        mask = causal_mask(step)
        plan = self.decode_plan(cache, x) if step.length == 1 else None
        if plan is not None:
            return plan.run(x, rope, mask, step)
        for i, layer in enumerate(self.layers):
            x = layer(x, step, rope, mask, cache[i] if cache is not None else None)
        return self.norm(x)
