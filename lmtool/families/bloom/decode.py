"""BLOOM's one-token decode step as a captured sequence of native calls (see lmtool.captured).

BLOOM-560m streams its 1.1 GB of weights in about 30 ms, and its step was about a seventh
overhead: per layer some forty PyTorch operations, allocations and module calls around the nine
kernel calls that do the work. A DecodePlan prepares those calls once per KV cache, so a step
is the kernel calls alone, with only the position, the ALiBi row and the mask filled in.

The calls are the ones the layers make (the linear layers' kernels, kv_append and attend_one in
one call, add_layer_norm, gelu_tanh_mul) on the same values in the same order, so a planned step
gives exactly what the modules give. Where any part is not on the kernels (autograd, float16, linear
layers on another backend, slow_but_exact, a cache that is not the plain KV cache, more rows than
the kernels take) there is no plan and the modules run. The activation buffers are the plan's
own, reused every step: a model runs one forward at a time, as everywhere in lmtool.
"""

from __future__ import annotations

import torch

from ... import kernels
from ...cache import KVCache, ModelCache, Step
from ...captured import LinearCall, StepPlan


class DecodePlan(StepPlan):
    """The decode step of one BloomModel over one KV cache (see the module docstring)."""

    def __init__(self, model, cache: ModelCache, batch: int, dtype: torch.dtype):
        super().__init__(cache, batch, dtype)
        config = model.config
        B, D, H = batch, config.hidden_size, config.n_head
        self.hidden, self.heads = D, H
        self.residual_from_norm = config.apply_residual_connection_post_layernorm
        buffer = self.buffer
        self.x, self.h, self.qkv = buffer(B, D), buffer(B, D), buffer(B, 3 * D)
        self.context, self.attn_out = buffer(B, D), buffer(B, D)
        self.mid, self.mid_act, self.mlp_out = buffer(B, 4 * D), buffer(B, 4 * D), buffer(B, D)
        self.scores = buffer(B * H * cache.max_len, dtype=torch.float32)

        self.layers = []
        for block, layer_cache in zip(model.h, cache.layers):
            attention, mlp = block.self_attention, block.mlp
            self.layers.append(dict(
                ln1=block.input_layernorm, ln2=block.post_attention_layernorm,
                # Each projection bound to the buffers it reads and writes, once.
                qkv=LinearCall.of(attention.query_key_value, dtype).bound(self.h, self.qkv),
                dense=LinearCall.of(attention.dense, dtype).bound(self.context, self.attn_out),
                up=LinearCall.of(mlp.dense_h_to_4h, dtype).bound(self.h, self.mid),
                down=LinearCall.of(mlp.dense_4h_to_h, dtype).bound(self.mid_act, self.mlp_out),
                # Addresses only: the plan must not keep a finished generation's cache alive.
                keys=layer_cache.keys.data_ptr(), values=layer_cache.values.data_ptr(),
            ))
        self.ln_f = model.ln_f
        self.scale = model.h[0].self_attention.inv_norm_factor if len(model.h) else 1.0
        self.gelu = kernels.bound(self.lib.lm_gelu_tanh_mul, self.bf, self.mid.data_ptr(), 4 * D, None, 0,
                                  self.mid_act.data_ptr(), 4 * D, B, 4 * D)

    @staticmethod
    def possible(model, cache, x: torch.Tensor) -> bool:
        """Whether every part of the step runs on the kernels for this input and cache."""
        config = model.config
        if not (isinstance(cache, ModelCache) and x.shape[0] <= kernels.MAX_ROWS and kernels.usable(x)):
            return False
        if config.tp_slices != 1 or x.dtype not in (torch.bfloat16, torch.float32):
            return False
        norms = [model.word_embeddings_layernorm, model.ln_f]
        norms += [n for b in model.h for n in (b.input_layernorm, b.post_attention_layernorm)]
        if any(n.weight.dtype != x.dtype or n.bias is None or n.bias.dtype != x.dtype for n in norms):
            return False
        for block, layer_cache in zip(model.h, cache.layers):
            if type(layer_cache) is not KVCache or layer_cache.keys.dtype != x.dtype:
                return False
            attention, mlp = block.self_attention, block.mlp
            linears = (attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
            if any(LinearCall.of(linear, x.dtype) is None for linear in linears):
                return False
        return True

    def norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm, out: torch.Tensor) -> None:
        """out = LayerNorm(x + delta), the sum written to self.x (see steps.add_layer_norm)."""
        D = self.hidden
        self.lib.lm_add_layer_norm(
            self.bf, x.data_ptr(), D, delta.data_ptr() if delta is not None else None, D, self.batch, D,
            norm.weight.data_ptr(), norm.bias.data_ptr(), norm.eps, self.x.data_ptr() if delta is not None else None,
            out.data_ptr(),
        )

    def run(self, embedded: torch.Tensor, embedding_norm, alibi: torch.Tensor, mask: torch.Tensor | None,
            step: Step) -> torch.Tensor:
        """The backbone's output [B,1,D] for one new token per row: embedded [B,1,D] (the token
        embeddings), alibi [B*H,1,S] and mask (None, or [B,1,1,S]) as the modules get them."""
        B, D, H, hd, lib, bf = self.batch, self.hidden, self.heads, self.hidden // self.heads, self.lib, self.bf
        position, S = step.start, step.start + 1
        if S > self.max_len:
            raise RuntimeError(f"KV cache is full: {S} positions needed, {self.max_len} allocated")
        alibi = alibi.contiguous()
        key_mask = mask[:, 0, 0, :S].contiguous() if mask is not None else None
        mask_ptr = key_mask.data_ptr() if key_mask is not None else None
        # Rows of the fused QKV output are [q_0 | k_0 | v_0 | q_1 | ...] per head (BloomAttention).
        qkv = self.qkv.data_ptr()
        self.norm(embedded.contiguous(), None, embedding_norm, self.x)
        stream, pending = self.x, None
        for layer in self.layers:
            self.norm(stream, pending, layer["ln1"], self.h)  # the stream is self.x from here on
            layer["qkv"]()
            keys, values = layer["keys"], layer["values"]
            lib.lm_attention_step(bf, qkv, 3 * D, 3 * hd, hd, 2 * hd, B, H, H, hd, 0, None, None, keys, values,
                                  self.max_len, position, self.scale, alibi.data_ptr(), S, mask_ptr,
                                  self.context.data_ptr(), self.scores.data_ptr())
            layer["dense"]()
            self.norm(self.h if self.residual_from_norm else self.x, self.attn_out, layer["ln2"], self.h)
            layer["up"]()
            self.gelu()
            layer["down"]()
            stream, pending = (self.h if self.residual_from_norm else self.x), self.mlp_out
        out = torch.empty(B, 1, D, dtype=self.dtype)
        self.norm(stream, pending, self.ln_f, out)
        return out
