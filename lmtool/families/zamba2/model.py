"""Zamba2 backbone: Mamba2 layers, and hybrid layers that first call a shared transformer block.

Every layer has a Mamba2 mixer (`x = x + mamba(norm(x))`). A hybrid layer j (the j-th of them)
first runs shared block j % num_mem_blocks over concat(x, original embeddings), with the LoRA
adapters of invocation j, passes the result through its own linear, and adds it to the mixer's
*input* only: `x = x + mamba(norm(x + linear(block(x, e))))`. The shared block (attention with
(head_dim/2)^-0.5 scaling and optional RoPE, then a gated GELU MLP, no residuals) is held once,
under the first hybrid layer that uses it, as the checkpoints store it; the other hybrid layers
keep a plain reference, so the state dict has no copies.

Numerics follow transformers 5.23's pure-PyTorch path (the parity reference): dt softplus in the
model dtype, clamped to time_step_min in multi-token calls and not in the one-token decode step;
the SSM scan and its state in float32; the gated norm's input dtype float32 after a scan and the
model dtype after a decode step; left pads zeroed at the mixer input and after the conv, so a
left-padded row equals the row alone (unless add_bias_linear: a pad then projects to in_proj's
bias, which the conv reads, as in transformers). Differences that do not change results: the prompt is
not padded to a multiple of chunk_size, the scan runs position by position in one native call
(recurrent.ssd_scan; without the kernels, in chunks of at most SCAN_CHUNK positions),
and the conv state keeps d_conv - 1 inputs (transformers keeps d_conv, of which the first is never
read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...cache import KVCache, ModelCache, RecurrentState, begin_step
from ...captured import CapturedDecoding
from ...kernels import steps as step_kernels
from ...layers import ACTIVATIONS, RMSNorm, RotaryEmbedding, SelfAttention, causal_mask, derived
from ...recurrent import CausalConv1d, pad_multiplier, ssd_scan, ssd_step
from .config import Zamba2Config
from .decode import DecodePlan


SCAN_CHUNK = 64


class GatedRMSNorm(nn.Module):
    """RMS norm of y * silu(z) over `groups` contiguous groups, in float32; the result is cast
    to y's dtype before the weight multiplies it (transformers' Zamba2RMSNormGated, eps 1e-5).
    On the native kernel a float32 y (after a prefill scan) gives the model dtype directly: the
    cast its caller makes anyway."""

    def __init__(self, dim: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if z.dtype == self.weight.dtype and y.dtype in (z.dtype, torch.float32) and step_kernels.usable(z, self.weight, y):
            # One native pass with the same roundings; returns the model dtype, which is what the
            # caller casts a float32 result to.
            return step_kernels.gated_rms_norm(y, z, self.weight, self.groups, self.eps)
        h = y.float() * F.silu(z.float())
        shape = h.shape
        h = h.view(*shape[:-1], self.groups, shape[-1] // self.groups)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.view(shape).to(y.dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: Zamba2Config):
        super().__init__()
        D, di, H = config.hidden_size, config.d_inner, config.n_mamba_heads
        self.d_inner, self.num_heads, self.head_dim = di, H, config.mamba_head_dim
        self.groups, self.state_size = config.mamba_ngroups, config.mamba_d_state
        self.conv_dim = config.conv_dim
        # The scan's chunk length. Any length gives the same result (to float32 rounding); the
        # checkpoint's chunk_size (256) sizes the training kernels' tiles, and here would make each
        # within-chunk tensor [heads, 256, 256] (16 MB in float32) stream through memory several
        # times per chunk. At 64 they stay in cache: a 512-token prefill's scan runs ~3x faster.
        self.chunk_size = min(config.chunk_size, SCAN_CHUNK)
        self.dt_min = config.time_step_min
        self.in_proj = nn.Linear(D, di + self.conv_dim + H, bias=config.add_bias_linear)
        # Always with a bias (transformers ignores use_conv_bias).
        K = config.mamba_d_conv
        self.conv1d = CausalConv1d(self.conv_dim, K)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(di, self.groups)
        self.out_proj = nn.Linear(di, D, bias=config.add_bias_linear)

    def forward(self, h: torch.Tensor, state: RecurrentState | None, pads: torch.Tensor | None) -> torch.Tensor:
        """pads: [B,T,1], 0 at the left pads of this call (None: none here). They are zeroed
        before the projection and after the conv (transformers' 2D mask), so x, B and C are zero
        there and the SSM state stays as it was (zero before a row's first token)."""
        Bsz, T, _ = h.shape
        dtype = h.dtype
        if T == 1 and pads is None and self.native_step_usable(h, state):
            return self.out_proj(self.native_step(self.in_proj(h), state))
        if pads is not None:
            h = h * pads
        z, xBC, dt = self.in_proj(h).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        conv_state = state.get("conv") if state is not None else None
        xBC, conv_state = self.conv1d(xBC, conv_state, silu=True)
        if pads is not None:
            xBC = xBC * pads
        GN = self.groups * self.state_size
        x, B, C = xBC.split([self.d_inner, GN, GN], dim=-1)
        A = -torch.exp(self.A_log.float())
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype))  # in the model dtype
        ssm = state.get("ssm") if state is not None else None
        if T == 1 and ssm is not None:
            # The decode step: no dt clamp, output in the model dtype.
            y, ssm = ssd_step(
                ssm, x.view(Bsz, self.num_heads, self.head_dim), dt[:, 0], A,
                B.view(Bsz, self.groups, self.state_size), C.view(Bsz, self.groups, self.state_size), self.D,
            )
            y = y.view(Bsz, 1, self.d_inner)
        else:
            dt = dt.clamp(min=self.dt_min)
            y, ssm = ssd_scan(
                x.view(Bsz, T, self.num_heads, self.head_dim), dt, A,
                B.view(Bsz, T, self.groups, self.state_size), C.view(Bsz, T, self.groups, self.state_size),
                self.chunk_size, D=self.D, initial_state=ssm,
            )
            y = y.view(Bsz, T, self.d_inner)  # float32: the gated norm then runs on float32
        if state is not None:
            state.set("conv", conv_state)
            state.set("ssm", ssm)
        return self.out_proj(self.norm(y, z).to(dtype))

    def native_step_usable(self, h: torch.Tensor, state: RecurrentState | None) -> bool:
        """Whether the decode step can be one native call: a state to continue, and everything in
        the model dtype (the SSM state in float32)."""
        return self.native_step_takes(h) and self.native_states(state, h.dtype) is not None

    def native_step_takes(self, h: torch.Tensor) -> bool:
        """Whether the native step takes this mixer's parameters with activations like h."""
        params = (self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.D, self.norm.weight)
        return (
            self.state_size <= step_kernels.MAX_STATE
            and all(p is not None and p.dtype == h.dtype for p in params)
            and step_kernels.usable(h, *params)
        )

    @staticmethod
    def native_states(state: RecurrentState | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (conv, ssm) states as the native step takes them (conv in the model dtype, SSM in
        float32, both contiguous), or None: not made yet, or in another dtype or layout."""
        conv, ssm = (state.get("conv"), state.get("ssm")) if state is not None else (None, None)
        if conv is None or ssm is None or conv.dtype != dtype or ssm.dtype != torch.float32:
            return None
        return (conv, ssm) if conv.is_contiguous() and ssm.is_contiguous() else None

    def native_step(self, zxbcdt: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """forward's one-token step (conv, dt, state update, gated norm) as one native call, with
        the same roundings (lmtool/kernels/steps.c)."""
        return step_kernels.mamba2_step(
            zxbcdt, state.get("conv"), self.conv1d.weight_kc(), self.conv1d.bias, self.dt_bias, self.A_f32(), self.D,
            state.get("ssm"), self.norm.weight, self.norm.groups, self.norm.eps,
        )

    def A_f32(self) -> torch.Tensor:
        """-exp(A_log) in float32, as the native step reads it (made once)."""
        return derived(self, "_A", self.A_log, lambda a: -torch.exp(a.float()))


class MambaDecoderLayer(nn.Module):
    """x + mamba(norm(x + extra)): `extra` (a hybrid layer's shared-block output) enters the
    mixer's input only, not the residual."""

    def __init__(self, config: Zamba2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = Mamba2Mixer(config)

    def forward(self, x, state, pads, extra=None):
        h = x + extra if extra is not None else x
        return x + self.mamba(self.input_layernorm(h), state, pads)


class Adapter(nn.Module):
    """A rank-r adapter (LoRA without scaling): up(down(x)). Children are named 0 and 1 as in
    transformers' nn.Sequential, and called by name (load-time freezing replaces them)."""

    def __init__(self, in_features: int, rank: int, out_features: int):
        super().__init__()
        self.add_module("0", nn.Linear(in_features, rank, bias=False))
        self.add_module("1", nn.Linear(rank, out_features, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules["1"](self._modules["0"](x))


def adapter_list(config: Zamba2Config, block: int, in_features: int, out_features: int) -> nn.ModuleList:
    """One entry per hybrid invocation: an adapter for those that use this block, nn.Identity
    (no weights, never called) for the others, as transformers lays them out."""
    n = len(config.hybrid_ids)
    return nn.ModuleList(
        Adapter(in_features, config.adapter_rank, out_features) if j % config.num_mem_blocks == block else nn.Identity()
        for j in range(n)
    )


class SharedAttention(SelfAttention):
    """Attention over concat(hidden, embeddings) (2D wide) with (head_dim/2)^-0.5 scaling and,
    when configured, per-invocation adapters added to q, k and v (the plain projections still
    run as one fused call)."""

    def __init__(self, config: Zamba2Config, block: int):
        super().__init__(
            config.hidden_size, config.num_attention_heads, config.kv_heads, config.head_dim,
            scale=config.attention_scale, input_size=config.attention_input_size,
        )
        self.use_adapters = config.use_shared_attention_adapter
        if self.use_adapters:
            width = config.attention_input_size
            self.linear_q_adapter_list = adapter_list(config, block, width, width)
            self.linear_k_adapter_list = adapter_list(config, block, width, width)
            self.linear_v_adapter_list = adapter_list(config, block, width, width)

    def forward(self, x, invocation, step, rope, mask, cache):
        delta = None
        if self.use_adapters:
            adapters = (self.linear_q_adapter_list, self.linear_k_adapter_list, self.linear_v_adapter_list)
            delta = tuple(adapter[invocation](x) for adapter in adapters)
        return super().forward(x, step, rope, mask, cache, qkv_delta=delta)


class SharedMLP(nn.Module):
    """down(act(gate) * up) with [gate | up] = gate_up_proj(x) + adapter_j(x)."""

    def __init__(self, config: Zamba2Config, block: int):
        super().__init__()
        D, F_ = config.hidden_size, config.mlp_width
        self.gate_up_proj = nn.Linear(D, 2 * F_, bias=config.add_bias_linear)
        self.down_proj = nn.Linear(F_, D, bias=config.add_bias_linear)
        self.gate_up_proj_adapter_list = adapter_list(config, block, D, 2 * F_)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, invocation: int) -> torch.Tensor:
        gate_up = self.gate_up_proj(x) + self.gate_up_proj_adapter_list[invocation](x)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class SharedBlock(nn.Module):
    """transformers' Zamba2AttentionDecoderLayer: norm(concat) -> attention -> norm -> MLP, with
    no residual connections."""

    def __init__(self, config: Zamba2Config, block: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.attention_input_size, config.rms_norm_eps)
        self.self_attn = SharedAttention(config, block)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = SharedMLP(config, block)

    def forward(self, x, original, invocation, step, rope, mask, cache):
        h = self.input_layernorm(torch.cat([x, original], dim=-1))
        h = self.self_attn(h, invocation, step, rope, mask, cache)
        return self.feed_forward(self.pre_ff_layernorm(h), invocation)


class HybridLayer(nn.Module):
    def __init__(self, config: Zamba2Config, invocation: int, block: SharedBlock, owner: bool):
        super().__init__()
        self.invocation = invocation
        if owner:
            self.shared_transformer = block  # registered: its weights are saved under this layer
        # A plain reference (not a child module) in every hybrid layer, so no copy appears in
        # state_dict or named_modules; load-time freezing changes the block in place.
        self.__dict__["block"] = block
        self.linear = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mamba_decoder = MambaDecoderLayer(config)

    def forward(self, x, original, step, rope, mask, pads, cache: "HybridCache | None"):
        kv = cache.kv if cache is not None else None
        state = cache.state if cache is not None else None
        t = self.block(x, original, self.invocation, step, rope, mask, kv)
        return self.mamba_decoder(x, state, pads, extra=self.linear(t))


@dataclass
class HybridCache:
    """A hybrid layer's decoding state: the KV cache of its shared-block invocation and its
    Mamba2 mixer's conv/SSM state."""

    kv: KVCache
    state: RecurrentState = field(default_factory=RecurrentState)


class Zamba2Model(CapturedDecoding, nn.Module):
    Plan = DecodePlan  # the captured one-token step (decode.py)

    def __init__(self, config: Zamba2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        nb = config.num_mem_blocks
        blocks: list[SharedBlock] = []
        layers: list[nn.Module] = []
        for kind in config.block_types:
            if kind == "hybrid":
                j = sum(isinstance(layer, HybridLayer) for layer in layers)
                owner = j < nb
                if owner:
                    blocks.append(SharedBlock(config, block=j))
                layers.append(HybridLayer(config, j, blocks[j % nb], owner))
            else:
                layers.append(MambaDecoderLayer(config))
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_base) if config.use_mem_rope else None

    def make_cache(self, batch: int, max_len: int, dtype, device) -> ModelCache:
        """Per Mamba layer a RecurrentState (conv inputs in the model dtype, SSM state in float32:
        constant size); per hybrid layer also a KV cache of max_len positions."""
        c = self.config
        entries = [
            HybridCache(KVCache(batch, c.kv_heads, max_len, c.head_dim, dtype, device))
            if kind == "hybrid" else RecurrentState()
            for kind in c.block_types
        ]
        return ModelCache(entries, batch, max_len, device)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, cache: ModelCache | None = None):
        step = begin_step(input_ids, attention_mask, cache)
        x = self.embed_tokens(input_ids)
        original = x
        rope = self.rotary(step.positions, x.dtype) if self.rotary is not None else None
        mask = causal_mask(step) if self.config.hybrid_ids else None
        # The pads of this call (also a one-token prompt chunk that is a pad; decode steps are
        # never pads, as transformers assumes for every single-token call).
        pads = pad_multiplier(step, x.dtype)
        plan = self.decode_plan(cache, x) if step.length == 1 and pads is None else None
        if plan is not None:
            out = plan.run(x, rope, mask, step, cache)
            if out is not None:
                return out
        for i, layer in enumerate(self.layers):
            entry = cache[i] if cache is not None else None
            if isinstance(layer, HybridLayer):
                x = layer(x, original, step, rope, mask, pads, entry)
            else:
                x = layer(x, entry, pads)
        return self.final_layernorm(x)
