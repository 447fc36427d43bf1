"""Building blocks that several families compose: norms, rotary embeddings, masks and attention.

Numerics follow transformers 5.23 to the rounding step (see shared/reference/architectures.md),
because parity is measured to 1e-4 in float32 and to the last bit where it is cheap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from typing import Callable

from . import kernels
from .cache import KVCache, Step, WindowKVCache
from .kernels import steps as step_kernels


def derived(owner: nn.Module, name: str, parameter: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """make(parameter) (a layout or precomputation a native kernel reads), kept on owner and made
    again only when the parameter is replaced or changed in place."""
    try:
        key = (parameter.data_ptr(), parameter._version)
    except RuntimeError:  # an inference tensor keeps no version: it cannot change outside inference mode
        key = (parameter.data_ptr(), -1)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, make(parameter.detach()))
        owner.__dict__[name] = cached
    return cached[1]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32.

    unit_offset: the weight is stored as w and applied as (1 + w) (Gemma, RecurrentGemma).
    weight_before_cast: multiply by the weight in float32 and cast after (Gemma); otherwise cast
    back to the input dtype first, then multiply (Llama, Zamba2).
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        unit_offset: bool = False,
        weight_before_cast: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight_before_cast = weight_before_cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and step_kernels.usable(x, self.weight):
            # One native pass, rounding where the operations below do.
            scale = derived(self, "_kernel_scale", self.weight, self.kernel_scale)
            return step_kernels.rms_norm(x, scale, self.eps, scale_after_cast=not self.weight_before_cast)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        if self.unit_offset:
            w = 1.0 + w
        if self.weight_before_cast:
            return (h * w).to(x.dtype)
        return w.to(x.dtype) * h.to(x.dtype)

    def kernel_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 factor the kernel multiplies by: forward's w, rounded to the model dtype
        where forward casts it before the product."""
        w = weight.float()
        if self.unit_offset:
            w = 1.0 + w
        return w if self.weight_before_cast else w.to(weight.dtype).float()


class RotaryEmbedding(nn.Module):
    """Half-split ("rotate_half") RoPE over the first `dim` channels of each head."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dim = dim

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B,T] -> cos, sin [B,1,T,dim] in `dtype` (computed in float32, cast last)."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [B,H,T,hd]; the rest pass through."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def causal_mask(step: Step, window: int | None = None) -> torch.Tensor | None:
    """Boolean mask [B,1,T,S] (True = may attend) for causal attention over the keys of a step.

    None means "plain causal" and lets SDPA take its fastest path: no padding, and the queries are
    either the whole sequence or a single new token. A query row with nothing to attend to (a pad
    token under left padding) is allowed its own key, so no row is all-masked and nothing is NaN.
    """
    T, S = step.length, step.start + step.length
    if window is not None and S <= window:
        window = None  # every key is within the window
    if not step.has_padding and window is None and (step.start == 0 or T == 1):
        return None
    device = step.key_mask.device
    q_idx = torch.arange(step.start, S, device=device)[:, None]
    k_idx = torch.arange(S, device=device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    mask = allowed[None, None] & step.key_mask[:, None, None, :S]
    return mask | (k_idx == q_idx)[None, None]


def scaled_dot_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """q [B,H,T,hd], k/v [B,KV,S,hd] with H a multiple of KV -> [B,H,T,hd]."""
    if q.shape[2] == 1 and kernels.usable(q, k, v):
        # The decode step: one call instead of SDPA's set-up around a tiny product.
        return kernels.attend_one(q, k, v, scale, mask=mask)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and q.shape[2] == 1 and mask is None:
        # One query per sequence: fold the query heads of a group into the query axis, which
        # reads each KV head once instead of repeating it (MQA decode is the hot path).
        B, H, _, hd = q.shape
        out = F.scaled_dot_product_attention(
            q.reshape(B, k.shape[1], groups, hd), k, v, scale=scale
        )
        return out.reshape(B, H, 1, hd)
    is_causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=groups > 1
    )


class SelfAttention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections, GQA/MQA, optional (partial) RoPE,
    an optional sliding window, and a preallocated KV cache.

    Weight names are transformers' (q_proj, k_proj, v_proj, o_proj) so checkpoints map 1:1.
    """

    # q/k/v as one call at load (lmtool.inference): one kernel instead of three.
    fusion = ("fused_qkv", ["q_proj", "k_proj", "v_proj"])

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        window: int | None = None,
        input_size: int | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        input_size = input_size or hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.window = window
        self.q_proj = nn.Linear(input_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(input_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(input_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        # q/k/v as one call at load (lmtool.inference.FrozenLinear): one kernel instead of three.
        self.fused_qkv: nn.Module | None = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv.forward_parts(x)
            return q, k, v
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,
        step: Step,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | WindowKVCache | None,
        qkv_delta: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """qkv_delta: terms added to the projected q, k and v (a caller's adapters), so that the
        projections themselves stay one fused call."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        if qkv_delta is not None:
            q, k, v = q + qkv_delta[0], k + qkv_delta[1], v + qkv_delta[2]
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v, mask = cache.extend(k, v, step, mask)
        out = scaled_dot_product(q, k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): GeGLU for Gemma, with biases for RecurrentGemma."""

    fusion = ("fused_gate_up", ["gate_proj", "up_proj"])  # one call at load (lmtool.inference)

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACTIVATIONS[activation]
        # gate/up as one call at load (lmtool.inference.FrozenLinear).
        self.fused_gate_up: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up.forward_parts(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act is gelu_tanh and kernels.usable(gate, up):
            return self.down_proj(kernels.gelu_tanh_mul(gate, up))  # GeGLU in one pass
        return self.down_proj(self.act(gate) * up)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    if kernels.usable(x):
        return kernels.gelu_tanh_mul(x)
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def rounded_scale(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A scalar rounded to `dtype`, as transformers' non-persistent scale buffers end up."""
    return torch.tensor(value, dtype=dtype)


def sqrt_scale(dim: int, dtype: torch.dtype) -> torch.Tensor:
    return rounded_scale(math.sqrt(dim), dtype)
