"""BLOOM backbone: embedding LayerNorm, ALiBi attention over a fused per-head QKV, GELU MLP.

Attention is eager (BLOOM's only implementation in transformers) and follows its rounding: the
ALiBi bias is built in float32 and cast to the model dtype, scores come from one baddbmm with
alpha = 1/sqrt(head_dim), and the softmax runs in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels
from ...cache import KVCache, ModelCache, Step, begin_step, kv_cache
from ...captured import CapturedDecoding
from ...kernels import steps as step_kernels
from ...layers import causal_mask
from .config import BloomConfig
from .decode import DecodePlan


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """Per-head ALiBi slopes in float32: powers of 2^(-8/p) for the largest power of two p <= H,
    then odd powers of 2^(-4/p) for the remaining heads (any head count works)."""
    p = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2.0 ** (-8.0 / p), dtype=torch.float32, device=device)
    slopes = torch.pow(base, torch.arange(1, p + 1, dtype=torch.int32, device=device))
    if p == num_heads:
        return slopes
    extra_base = torch.tensor(2.0 ** (-4.0 / p), dtype=torch.float32, device=device)
    extra = min(p, num_heads - p)
    odd = torch.arange(1, 2 * extra, 2, dtype=torch.int32, device=device)
    return torch.cat([slopes, torch.pow(extra_base, odd)])


def key_positions(key_mask: torch.Tensor) -> torch.Tensor:
    """[B,S] bool -> [B,S] position of each key among its row's real tokens; 0 at pads."""
    mask = key_mask.long()
    return (mask.cumsum(-1) - 1) * mask


def alibi_bias(slopes: torch.Tensor, step: Step, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi bias [B*H, 1, S] over every key of the step (past and new): +slope * key position."""
    positions = key_positions(step.key_mask[:, : step.end])
    bias = slopes[None, :, None] * positions[:, None, :]
    return bias.reshape(-1, 1, positions.shape[-1]).to(dtype)


def eager_mask(step: Step) -> torch.Tensor | None:
    """Boolean [B,1,T,S] mask for eager attention; None when every key is visible (one new token,
    no padding). Pad query rows keep their own key, so no row is fully masked."""
    mask = causal_mask(step)
    if mask is None and step.length > 1:
        T = step.length
        mask = torch.ones(T, T, dtype=torch.bool, device=step.key_mask.device).tril()[None, None]
    return mask


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation with BLOOM's literal constant 0.79788456 (sqrt(2/pi) to 8 digits, so
    # the native kernel's full-precision constant differs by less than float32 rounding).
    if kernels.usable(x):
        return kernels.gelu_tanh_mul(x)
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def add_and_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)); delta None: (x, norm(x)). One native pass where the kernels
    run, the sum rounded to the model dtype before the norm just as the two PyTorch operations."""
    if kernels.usable(x, delta, norm.weight, norm.bias):
        return step_kernels.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)
    if delta is not None:
        x = x + delta
    return x, norm(x)


def append_to_cache(cache: KVCache, k: torch.Tensor, v: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """cache.update(k, v, step.start) for a one-token step, in one native call where the kernels run
    (k and v stay views of the fused projection; nothing is sliced or copied out of it first)."""
    if k.shape[2] != 1 or type(cache) is not KVCache or not kernels.usable(k, v, cache.keys):
        return cache.update(k, v, step.start)
    end = step.start + 1
    if end > cache.keys.shape[2]:
        raise RuntimeError(f"KV cache is full: {end} positions needed, {cache.keys.shape[2]} allocated")
    step_kernels.kv_append(cache.keys, cache.values, k, v, step.start)
    return cache.keys[:, :, :end], cache.values[:, :, :end]


def tp_linear(x: torch.Tensor, linear: nn.Linear, tp_slices: int) -> torch.Tensor:
    """linear(x), or with slow_but_exact a sum over pretraining_tp input slices. That path adds no
    bias, exactly as transformers computes it."""
    if tp_slices == 1:
        return linear(x)
    width = x.shape[-1] / tp_slices
    out = torch.zeros(*x.shape[:-1], linear.out_features, dtype=x.dtype, device=x.device)
    for i in range(tp_slices):
        cols = slice(int(i * width), int((i + 1) * width))
        out = out + F.linear(x[..., cols], linear.weight[:, cols])
    return out


class BloomAttention(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads, self.head_dim = config.n_head, config.head_dim
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        self.tp_slices = config.tp_slices
        # Output features laid out per head: [q_0 | k_0 | v_0 | q_1 | ...], each head_dim wide.
        self.query_key_value = nn.Linear(D, 3 * D)
        self.dense = nn.Linear(D, D)

    def forward(self, x, alibi, mask, step: Step, cache: KVCache | None) -> torch.Tensor:
        B, T, D = x.shape
        H, hd = self.num_heads, self.head_dim
        fused = self.query_key_value(x).view(B, T, H, 3, hd)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))  # [B,H,T,hd]
        if cache is not None:
            k, v = append_to_cache(cache, k, v, step)
        S = k.shape[2]
        if T > 1:
            context = self.fused_attention(q, k, v, alibi, mask)
        else:
            context = self.eager_attention(q, k, v, alibi, mask)
        context = context.transpose(1, 2).reshape(B, T, D)
        return tp_linear(context, self.dense, self.tp_slices)

    def eager_attention(self, q, k, v, alibi, mask) -> torch.Tensor:
        """transformers' computation and rounding: scores in the model dtype, softmax in float32.
        The decode step (one query) goes to the native kernel where it runs: float32 throughout."""
        B, H, T, hd = q.shape
        if T == 1 and kernels.usable(q, k, v, alibi):
            return kernels.attend_one(q, k, v, self.inv_norm_factor, alibi, mask)
        S = k.shape[2]
        q, k, v = q.reshape(B * H, T, hd), k.reshape(B * H, S, hd), v.reshape(B * H, S, hd)
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=self.inv_norm_factor)
        scores = scores.view(B, H, T, S)
        if mask is not None:
            scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)  # in place: scores is ours
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs.view(B * H, T, S), v).view(B, H, T, hd)

    def fused_attention(self, q, k, v, alibi, mask) -> torch.Tensor:
        """SDPA with ALiBi as an additive mask, for prompts: about twice as fast as eager at 512
        tokens (no score tensor copied three times). Scores stay in float32 inside the kernel
        instead of being rounded to bfloat16 first; float32 results match eager to ~1e-6."""
        B, H = q.shape[:2]
        bias = alibi.view(B, H, 1, -1)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.inv_norm_factor)


class BloomMLP(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        D = config.hidden_size
        self.tp_slices = config.tp_slices
        self.dense_h_to_4h = nn.Linear(D, 4 * D)
        self.dense_4h_to_h = nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_linear(bloom_gelu(self.dense_h_to_4h(x)), self.dense_4h_to_h, self.tp_slices)


class BloomBlock(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(D, eps=eps)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(D, eps=eps)
        self.mlp = BloomMLP(config)
        self.residual_from_norm = config.apply_residual_connection_post_layernorm

    def forward(self, x, pending, alibi, mask, step, cache):
        """The block on the residual stream x + pending (pending: the previous block's MLP output,
        or None), returned the same way: (its stream, its MLP output). Each residual add is thus
        made in one pass with the LayerNorm that reads it (add_and_norm)."""
        x, h = add_and_norm(x, pending, self.input_layernorm)
        residual = h if self.residual_from_norm else x
        x, h = add_and_norm(residual, self.self_attention(h, alibi, mask, step, cache), self.post_attention_layernorm)
        return (h if self.residual_from_norm else x), self.mlp(h)


class BloomModel(CapturedDecoding, nn.Module):
    Plan = DecodePlan  # the captured one-token step (decode.py)

    def __init__(self, config: BloomConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, D)
        self.word_embeddings_layernorm = nn.LayerNorm(D, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(D, eps=config.layer_norm_epsilon)
        self._slopes: dict[torch.device, torch.Tensor] = {}

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The input embedding under the name TaskModel ties the LM head to."""
        return self.word_embeddings

    def slopes(self, device: torch.device) -> torch.Tensor:
        # Kept outside the module's buffers so that casting the model never rounds them.
        if device not in self._slopes:
            self._slopes[device] = alibi_slopes(self.config.n_head, device)
        return self._slopes[device]

    def make_cache(self, batch: int, max_len: int, dtype, device) -> ModelCache:
        c = self.config
        return kv_cache(len(self.h), batch, c.n_head, max_len, c.head_dim, dtype, device)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, cache: ModelCache | None = None):
        step = begin_step(input_ids, attention_mask, cache)
        embedded = self.word_embeddings(input_ids)
        alibi = alibi_bias(self.slopes(embedded.device), step, embedded.dtype)
        mask = eager_mask(step)
        plan = self.decode_plan(cache, embedded) if step.length == 1 else None
        if plan is not None:
            return plan.run(embedded, self.word_embeddings_layernorm, alibi, mask, step)
        _, x = add_and_norm(embedded, None, self.word_embeddings_layernorm)
        pending = None  # the last block's MLP output, added to x in the pass of the next LayerNorm
        for i, block in enumerate(self.h):
            x, pending = block(x, pending, alibi, mask, step, cache[i] if cache is not None else None)
        return add_and_norm(x, pending, self.ln_f)[1]
