"""RecurrentGemma (Griffin) backbone: residual blocks whose temporal mixing is either a recurrent
block (causal conv + RG-LRU) or local (sliding-window) MQA attention, each followed by a biased
GeGLU MLP.

Numerics follow transformers 5.23 (fp32 norms, gates in the model dtype, fp32 scan state), with
three places where we follow the authors' reference (`recurrentgemma`, the code the checkpoints
were trained with) instead, because transformers differs from it there:
- a query attends to itself and the `attention_window_size` keys before it (transformers: one
  key fewer, so its outputs differ from position `window` on);
- a sequence starts at position 0: the scan resets and the convolution reads nothing before it,
  so left padding does not leak into the real tokens (transformers' conv reads the pads);
- the convolution continues its state across calls, so chunked prefill equals one-shot
  (transformers restarts it on every multi-token call).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...cache import ModelCache, RecurrentState, Step, WindowKVCache, begin_step
from ...kernels import steps as step_kernels
from ...layers import ACTIVATIONS, GatedMLP, RMSNorm, RotaryEmbedding, SelfAttention, causal_mask, derived, rounded_scale
from ...recurrent import CausalConv1d, linear_scan, pad_multiplier
from .config import RecurrentGemmaConfig


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit: block-diagonal input and recurrence gates, a = sigma^(8 c)
    with c the recurrence gate (as exp(-8 c softplus(L))), inputs scaled by sqrt(1 - a^2)."""

    def __init__(self, width: int, num_blocks: int):
        super().__init__()
        self.num_blocks, self.block_width = num_blocks, width // num_blocks
        self.recurrent_param = nn.Parameter(torch.empty(width))
        shape_w, shape_b = (num_blocks, self.block_width, self.block_width), (num_blocks, self.block_width)
        self.input_gate_weight = nn.Parameter(torch.empty(shape_w))
        self.input_gate_bias = nn.Parameter(torch.empty(shape_b))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(shape_w))
        self.recurrent_gate_bias = nn.Parameter(torch.empty(shape_b))
        # Both gates at once on the native kernels, set up at load (lmtool.inference).
        self.frozen_gates: nn.Module | None = None

    def freeze(self, source, prefix: str) -> None:
        if source.backend == "native":
            from ...inference import FrozenBlockDiagonal

            names = ("input_gate", "recurrent_gate")
            weights = [source.tensors[f"{prefix}{n}_weight"] for n in names]
            biases = [source.cast(source.tensors[f"{prefix}{n}_bias"]) for n in names]
            self.frozen_gates = FrozenBlockDiagonal(weights, biases, source)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, nb, bw] -> (input gate, recurrence gate) before the sigmoid: x_h @ W_h + b_h per
        block h, W_h used untransposed, one rounding (as transformers' baddbmm)."""
        if self.frozen_gates is not None and self.frozen_gates.takes(x):
            return tuple(self.frozen_gates(x))
        blocks = x.transpose(0, 1)  # [nb, N, bw]
        return tuple(
            torch.baddbmm(bias[:, None, :], blocks, weight).transpose(0, 1)
            for weight, bias in ((self.input_gate_weight, self.input_gate_bias),
                                 (self.recurrent_gate_weight, self.recurrent_gate_bias))
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: RecurrentState | None) -> torch.Tensor:
        B, T, L = x.shape
        if T == 1 and state is not None and step_kernels.usable(x, self.recurrent_param):
            return self.native_step(x, positions, state)
        input_gate, recurrent_gate = (
            torch.sigmoid(g).reshape(B, T, L) for g in self.gates(x.reshape(B * T, self.num_blocks, self.block_width))
        )
        log_a = -8.0 * recurrent_gate * F.softplus(self.recurrent_param)
        a = torch.exp(log_a)
        multiplier = torch.sqrt(1 - torch.exp(2 * log_a))
        reset = positions == 0
        if bool(reset.any()):
            # At a sequence start the input passes unscaled and the previous state is forgotten.
            reset = reset[..., None]
            multiplier = multiplier.masked_fill(reset, 1.0)
            a = a.masked_fill(reset, 0.0)
        normalized = x * input_gate * multiplier
        h0 = state.get("scan") if state is not None else None
        h, last = linear_scan(a, normalized, h0)
        if state is not None:
            state.set("scan", last)
        return h

    def native_step(self, x: torch.Tensor, positions: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """The one-token step as one native call after the gates: the same operations and
        roundings as forward's (lmtool/kernels/steps.c)."""
        B, _, L = x.shape
        input_gate, recurrent_gate = self.gates(x.reshape(B, self.num_blocks, self.block_width))
        h = state.get("scan")
        if h is None:
            h = torch.zeros(B, L, dtype=torch.float32)
            state.set("scan", h)
        softplus = derived(self, "_softplus", self.recurrent_param, lambda p: F.softplus(p).to(x.dtype).contiguous())
        out = step_kernels.rglru_step(
            x.view(B, L), input_gate.reshape(B, L), recurrent_gate.reshape(B, L), softplus, positions[:, 0], h
        )
        return out.view(B, 1, L)


class RecurrentBlock(nn.Module):
    """linear_out( RG-LRU(conv(linear_x(h))) * act(linear_y(h)) )."""

    # linear_y and linear_x read the same input: one call at load (lmtool.inference).
    fusion = ("fused_yx", ["linear_y", "linear_x"])

    def __init__(self, config: RecurrentGemmaConfig):
        super().__init__()
        D, L, K = config.hidden_size, config.recurrent_width, config.conv1d_width
        self.linear_y = nn.Linear(D, L)
        self.linear_x = nn.Linear(D, L)
        self.linear_out = nn.Linear(L, D)
        self.conv_1d = CausalConv1d(L, K)
        self.rg_lru = RGLRU(L, config.num_attention_heads)
        self.act = ACTIVATIONS[config.hidden_activation]
        self.fused_yx: nn.Module | None = None

    def forward(self, h: torch.Tensor, step: Step, pads: torch.Tensor | None, state: RecurrentState | None):
        if self.fused_yx is not None:
            y, x = self.fused_yx.forward_parts(h)
        else:
            y, x = self.linear_y(h), self.linear_x(h)
        y = self.act(y)
        conv_state = state.get("conv") if state is not None else None
        if pads is not None:
            x = x * pads  # the conv reads zeros before a row's first token
        x, conv_state = self.conv_1d(x, conv_state)
        if state is not None:
            state.set("conv", conv_state)
        x = self.rg_lru(x, step.positions, state)
        return self.linear_out(x * y)


class ResidualBlock(nn.Module):
    def __init__(self, config: RecurrentGemmaConfig, kind: str):
        super().__init__()
        D = config.hidden_size
        self.kind = kind
        self.temporal_pre_norm = RMSNorm(D, config.rms_norm_eps, unit_offset=True, weight_before_cast=True)
        if kind == "recurrent":
            self.temporal_block: nn.Module = RecurrentBlock(config)
        else:
            self.temporal_block = SelfAttention(
                D, config.num_attention_heads, config.kv_heads, config.head_dim,
                qkv_bias=config.attention_bias, o_bias=True,
            )
        self.channel_pre_norm = RMSNorm(D, config.rms_norm_eps, unit_offset=True, weight_before_cast=True)
        self.mlp_block = GatedMLP(D, config.mlp_width, config.hidden_activation, bias=True)

    def forward(self, x, step, rope, mask, pads, cache):
        h = self.temporal_pre_norm(x)
        if self.kind == "recurrent":
            h = self.temporal_block(h, step, pads, cache)
        else:
            h = self.temporal_block(h, step, rope, mask, cache)
        x = x + h
        return x + self.mlp_block(self.channel_pre_norm(x))


class RecurrentGemmaModel(nn.Module):
    def __init__(self, config: RecurrentGemmaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ResidualBlock(config, kind) for kind in config.layer_types)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True, weight_before_cast=True)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_base)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> ModelCache:
        """A window ring per attention layer and conv/scan states per recurrent layer: the same
        size whatever max_len is."""
        c = self.config
        layers = [
            WindowKVCache(batch, c.kv_heads, c.attention_window_size, c.head_dim, dtype, device)
            if kind == "attention" else RecurrentState()
            for kind in c.layer_types
        ]
        return ModelCache(layers, batch, max_len, device)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, cache: ModelCache | None = None):
        step = begin_step(input_ids, attention_mask, cache)
        x = self.embed_tokens(input_ids)
        # sqrt(hidden) rounded to bfloat16 in every dtype (50.5 for 2560), as the authors and
        # transformers both do.
        x = x * rounded_scale(math.sqrt(self.config.hidden_size), torch.bfloat16).to(x.dtype)
        rope = self.rotary(step.positions, x.dtype)
        pads = pad_multiplier(step, x.dtype)
        # A query sees itself and the `window` keys before it (window + 1 keys in all).
        mask = causal_mask(step, window=self.config.attention_window_size + 1) if cache is None else None
        for i, layer in enumerate(self.layers):
            x = layer(x, step, rope, mask, pads, cache[i] if cache is not None else None)
        return self.final_norm(x)
