"""Gemma's one-token decode step as a captured sequence of native calls (see lmtool.captured).

Per layer: RMSNorm, the q/k/v projection (one call where the layers were fused at load, else
three), RoPE on the queries and keys in place, the KV append and one-query attention (one call),
the output projection and the residual add; RMSNorm, gate/up, GeGLU, the down projection and the
residual add. Each residual add is made in the call of the RMSNorm after it (lm_add_rms_norm).
These are the operations the modules make (lmtool.layers' RMSNorm, SelfAttention, GatedMLP) on
the same values in the same order, so a planned step gives exactly what the modules give. Where
any part is not on the kernels (autograd, float16, an activation other than tanh GELU, a linear
layer on another backend, a cache that is not the plain KV cache, more rows than the kernels take)
there is no plan and the modules run. The activation buffers are the plan's own, reused every
step: a model runs one forward at a time, as everywhere in lmtool.
"""

from __future__ import annotations

import torch

from ... import kernels
from ...cache import KVCache, ModelCache, Step
from ...captured import KVAttention, LinearCall, RMSNormCall, StepPlan, bound_parts
from ...layers import gelu_tanh


def linear_calls(layer, dtype: torch.dtype) -> dict | None:
    """The layer's four projections as prepared calls (q/k/v and gate/up fused at load, or one
    call per part where they were not), or None where one is not on the kernels."""
    attention, mlp = layer.self_attn, layer.mlp
    fused_qkv, fused_gate_up = attention.fused_qkv, mlp.fused_gate_up
    calls = dict(
        qkv=LinearCall.of_parts(fused_qkv, [] if fused_qkv else [attention.q_proj, attention.k_proj, attention.v_proj], dtype),
        o=LinearCall.of_parts(None, [attention.o_proj], dtype),
        gate_up=LinearCall.of_parts(fused_gate_up, [] if fused_gate_up else [mlp.gate_proj, mlp.up_proj], dtype),
        down=LinearCall.of_parts(None, [mlp.down_proj], dtype),
    )
    return None if any(call is None for call in calls.values()) else calls


class DecodePlan(StepPlan):
    """The decode step of one GemmaModel over one KV cache."""

    def __init__(self, model, cache: ModelCache, batch: int, dtype: torch.dtype):
        super().__init__(cache, batch, dtype)
        config = model.config
        B, D, I = batch, config.hidden_size, config.intermediate_size
        H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.hidden, self.inner = D, I
        buffer = self.buffer
        self.x, self.h = buffer(B, D), buffer(B, D)
        self.qkv, self.context, self.attn_out = buffer(B, (H + 2 * KV) * hd), buffer(B, H * hd), buffer(B, D)
        self.mid, self.act, self.mlp_out = buffer(B, 2 * I), buffer(B, I), buffer(B, D)
        scale = model.layers[0].self_attn.scale if len(model.layers) else 1.0
        self.attention = KVAttention(self, self.qkv, H, KV, hd, scale, self.context)

        # Every call bound to the buffers it reads and writes, once. Each residual add is made by
        # the norm after it, in the same call: the previous layer's MLP output is added by ln1
        # (the first layer's by none), the attention's by ln2, the last MLP's by the final norm.
        self.layers = []
        for i, (layer, layer_cache) in enumerate(zip(model.layers, cache.layers)):
            calls = linear_calls(layer, dtype)
            self.layers.append(dict(
                ln1=RMSNormCall(layer.input_layernorm).bound(self.x, self.h, delta=self.mlp_out if i else None),
                qkv=bound_parts(calls["qkv"], self.h, self.qkv), o=bound_parts(calls["o"], self.context, self.attn_out),
                ln2=RMSNormCall(layer.post_attention_layernorm).bound(self.x, self.h, delta=self.attn_out),
                gate_up=bound_parts(calls["gate_up"], self.h, self.mid), down=bound_parts(calls["down"], self.act, self.mlp_out),
                # Addresses only: the plan must not keep a finished generation's cache alive.
                keys=layer_cache.keys.data_ptr(), values=layer_cache.values.data_ptr(),
            ))
        self.final_norm = RMSNormCall(model.norm)
        mid, size = self.mid.data_ptr(), self.size
        self.geglu = kernels.bound(self.lib.lm_gelu_tanh_mul, self.bf, mid, 2 * I, mid + I * size, 2 * I, self.act.data_ptr(), I, B, I)

    @staticmethod
    def possible(model, cache, x: torch.Tensor) -> bool:
        """Whether every part of the step runs on the kernels for this input and cache."""
        if not (isinstance(cache, ModelCache) and x.shape[0] <= kernels.MAX_ROWS and kernels.usable(x)):
            return False
        if x.dtype not in (torch.bfloat16, torch.float32):
            return False
        norms = [model.norm] + [n for layer in model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if any(n.weight.dtype != x.dtype for n in norms):
            return False
        for layer, layer_cache in zip(model.layers, cache.layers):
            if type(layer_cache) is not KVCache or layer_cache.keys.dtype != x.dtype:
                return False
            if layer.self_attn.window is not None or layer.mlp.act is not gelu_tanh:
                return False
            if linear_calls(layer, x.dtype) is None:
                return False
        return True

    def run(self, embedded: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
            step: Step) -> torch.Tensor:
        """The backbone's output [B,1,D] for one new token per row: embedded [B,1,D] (the scaled
        token embeddings), rope and mask as the layers get them."""
        B, D = self.batch, self.hidden
        position, rope_at, key_mask = self.attention.begin(step, rope, mask)
        self.x.copy_(embedded.view(B, D))
        for layer in self.layers:
            layer["ln1"]()
            layer["qkv"]()
            self.attention(layer["keys"], layer["values"], position, rope_at, key_mask)
            layer["o"]()
            layer["ln2"]()  # after x += the attention's output
            layer["gate_up"]()
            self.geglu()
            layer["down"]()
        out = torch.empty(B, 1, D, dtype=self.dtype)
        self.final_norm.bound(self.x, out.view(B, D), delta=self.mlp_out if self.layers else None)()
        return out
