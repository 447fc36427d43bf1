"""Zamba2's one-token decode step as a captured sequence of native calls (see lmtool.captured).

At batch 8 Zamba2-1.2B's step spent about 25 ms of 195 in Python between the kernel calls (module
calls, the mixers' usability checks, allocations), while the second thread waited: per Mamba2 layer
five calls do the work (RMSNorm, in_proj, the Mamba2 step, out_proj, the residual add). A
DecodePlan prepares them once per cache and then makes only those calls.

Per Mamba2 layer: RMSNorm, in_proj, lm_mamba2_step (conv, dt, state update, gated norm), out_proj,
the residual add. Per hybrid layer first the shared block of its invocation: RMSNorm over
concat(x, embeddings), q/k/v (plus that invocation's adapters), RoPE when configured, the KV
append, one-query attention, o_proj, RMSNorm, gate/up (plus its adapter), the activation, down,
the layer's own linear; its sum with x is what the mixer's norm reads. These are the modules'
calls on the same values in the same order, so a planned step gives exactly what they give.

The KV caches are preallocated, so the plan keeps their addresses; the Mamba2 states are made by
the prompt's pass and may be replaced by a later multi-token call, so each step reads them from
the cache, and a step whose states are not (yet) what the native step takes runs the modules.
Where any part is not on the kernels (autograd, float16, a linear layer on another backend, more
rows than the kernels take) there is no plan. The activation buffers are the plan's own, reused
every step: a model runs one forward at a time, as everywhere in lmtool.
"""

from __future__ import annotations

import torch

from ... import kernels
from ...cache import KVCache, ModelCache, RecurrentState, Step
from ...captured import KVAttention, LinearCall, RMSNormCall, StepPlan, bound_parts
from ...kernels import steps as step_kernels


def adapter_calls(adapter, dtype: torch.dtype) -> tuple[LinearCall, LinearCall] | None:
    """An Adapter (up(down(x))) as its two calls."""
    down, up = (LinearCall.of(adapter._modules[name], dtype) for name in ("0", "1"))
    return None if down is None or up is None else (down, up)


def mixer_calls(layer, dtype: torch.dtype) -> dict | None:
    """A MambaDecoderLayer's projections as calls."""
    mixer = layer.mamba
    calls = dict(in_proj=LinearCall.of(mixer.in_proj, dtype), out_proj=LinearCall.of(mixer.out_proj, dtype))
    return None if any(call is None for call in calls.values()) else calls


def shared_block_calls(layer, dtype: torch.dtype) -> dict | None:
    """A HybridLayer's shared-block invocation (with its adapters) and its own linear as calls."""
    block, j = layer.block, layer.invocation
    attention, mlp = block.self_attn, block.feed_forward
    fused = attention.fused_qkv
    calls = dict(
        qkv=LinearCall.of_parts(fused, [] if fused else [attention.q_proj, attention.k_proj, attention.v_proj], dtype),
        o=LinearCall.of(attention.o_proj, dtype), gate_up=LinearCall.of(mlp.gate_up_proj, dtype),
        gate_up_adapter=adapter_calls(mlp.gate_up_proj_adapter_list[j], dtype),
        down=LinearCall.of(mlp.down_proj, dtype), linear=LinearCall.of(layer.linear, dtype), qkv_adapters=[],
    )
    if attention.use_adapters:
        lists = (attention.linear_q_adapter_list, attention.linear_k_adapter_list, attention.linear_v_adapter_list)
        calls["qkv_adapters"] = [adapter_calls(adapters[j], dtype) for adapters in lists]
    return None if any(call is None for call in (*calls.values(), *calls["qkv_adapters"])) else calls


def is_hybrid(layer) -> bool:
    """A HybridLayer (model.py, which imports this module): it holds its shared block."""
    return hasattr(layer, "block")


def mamba_state(entry) -> RecurrentState:
    """A layer's Mamba2 state in its cache entry (a hybrid layer's entry also holds its KV cache)."""
    return entry if isinstance(entry, RecurrentState) else entry.state


class DecodePlan(StepPlan):
    """The decode step of one Zamba2Model over one cache (see the module docstring)."""

    def __init__(self, model, cache: ModelCache, batch: int, dtype: torch.dtype):
        super().__init__(cache, batch, dtype)
        config = model.config
        B, D, F_ = batch, config.hidden_size, config.mlp_width
        H, KV, hd = config.num_attention_heads, config.kv_heads, config.head_dim
        self.hidden = D
        buffer = self.buffer
        self.x, self.h, self.mixer_in, self.mixed = buffer(B, D), buffer(B, D), buffer(B, D), buffer(B, D)
        self.zxbcdt = buffer(B, config.d_inner + config.conv_dim + config.n_mamba_heads)  # in_proj's output
        self.y = buffer(B, config.d_inner)
        self.joined, self.joined_normed = buffer(B, 2 * D), buffer(B, 2 * D)
        self.qkv = buffer(B, (H + 2 * KV) * hd)
        self.context, self.attn_out, self.ff_in = buffer(B, H * hd), buffer(B, D), buffer(B, D)
        self.gate_up, self.act, self.block_out, self.extra = buffer(B, 2 * F_), buffer(B, F_), buffer(B, D), buffer(B, D)
        self.low, self.deltas = buffer(B, config.adapter_rank), buffer(B, 2 * F_)
        self.attention = KVAttention(self, self.qkv, H, KV, hd, config.attention_scale, self.context)

        # Every call bound to the buffers it reads and writes, once.
        self.layers = []
        for layer, entry in zip(model.layers, cache.layers):
            hybrid = is_hybrid(layer)
            decoder = layer.mamba_decoder if hybrid else layer
            calls = mixer_calls(decoder, dtype)
            norm = RMSNormCall(decoder.input_layernorm)
            # A hybrid layer's mixer reads x + the shared block's output, added by its norm's call
            # into mixer_in (the residual stays x).
            norm = norm.bound(self.x, self.h, delta=self.extra, total=self.mixer_in) if hybrid else norm.bound(self.x, self.h)
            self.layers.append(dict(
                shared=self.bind_shared_block(layer, entry, dtype) if hybrid else None, norm=norm,
                in_proj=calls["in_proj"].bound(self.h, self.zxbcdt), mamba=self.bind_mamba2_step(decoder.mamba),
                out_proj=calls["out_proj"].bound(self.y, self.mixed),
            ))
        self.mixers = [(layer.mamba_decoder if is_hybrid(layer) else layer).mamba for layer in model.layers]
        self.final_norm = RMSNormCall(model.final_layernorm)

    def bind_mamba2_step(self, mixer):
        """lm_mamba2_step on this plan's buffers (steps.bind_mamba2_step): step(conv, ssm) on the
        layer's state addresses."""
        return step_kernels.bind_mamba2_step(
            self.zxbcdt, self.y, mixer.conv1d.weight_kc(), mixer.conv1d.bias, mixer.dt_bias, mixer.A_f32(), mixer.D,
            mixer.norm.weight, mixer.norm.groups, mixer.norm.eps, mixer.num_heads, mixer.state_size,
        )

    def bind_shared_block(self, layer, entry, dtype: torch.dtype) -> dict:
        """A hybrid layer's shared-block invocation: the calls before and after the attention,
        bound to the plan's buffers."""
        calls, block = shared_block_calls(layer, dtype), layer.block
        attention = self.attention
        H, KV, hd = attention.heads, attention.kv_heads, attention.head_dim

        def adapter_added(adapter, x: torch.Tensor, y: torch.Tensor, column: int):
            """y[:, column:] += up(down(x)): the adapter's term added to a projection's output."""
            down, up = adapter
            n = up.out_features
            down_call, up_call = down.bound(x, self.low), up.bound(self.low, self.deltas[:, :n])
            target, delta = y[:, column : column + n], self.deltas[:, :n]

            def run() -> None:
                down_call()
                up_call()
                target.add_(delta)

            return run

        before = [RMSNormCall(block.input_layernorm).bound(self.joined, self.joined_normed),
                  bound_parts(calls["qkv"], self.joined_normed, self.qkv)]
        before += [adapter_added(adapter, self.joined_normed, self.qkv, column)  # to q, k and v
                   for adapter, column in zip(calls["qkv_adapters"], (0, H * hd, (H + KV) * hd))]
        gate, up = self.gate_up.chunk(2, dim=-1)
        act = block.feed_forward.act
        after = [
            calls["o"].bound(self.context, self.attn_out),
            RMSNormCall(block.pre_ff_layernorm).bound(self.attn_out, self.ff_in),
            calls["gate_up"].bound(self.ff_in, self.gate_up),
            adapter_added(calls["gate_up_adapter"], self.ff_in, self.gate_up, 0),
            lambda: torch.mul(act(gate), up, out=self.act),
            calls["down"].bound(self.act, self.block_out),
            calls["linear"].bound(self.block_out, self.extra),
        ]
        # Addresses only: the plan must not keep a finished generation's cache alive.
        return dict(before=before, after=after, keys=entry.kv.keys.data_ptr(), values=entry.kv.values.data_ptr())

    @staticmethod
    def possible(model, cache, x: torch.Tensor) -> bool:
        """Whether every part of the step runs on the kernels for this input and cache (the Mamba2
        states are checked at each step: see the module docstring)."""
        if not (isinstance(cache, ModelCache) and x.shape[0] <= kernels.MAX_ROWS and kernels.usable(x)):
            return False
        if x.dtype not in (torch.bfloat16, torch.float32) or model.final_layernorm.weight.dtype != x.dtype:
            return False
        for layer, entry in zip(model.layers, cache.layers):
            hybrid = is_hybrid(layer)
            decoder = layer.mamba_decoder if hybrid else layer
            if decoder.input_layernorm.weight.dtype != x.dtype or not decoder.mamba.native_step_takes(x):
                return False
            if mixer_calls(decoder, x.dtype) is None:
                return False
            if hybrid:
                block = layer.block
                norms = (block.input_layernorm, block.pre_ff_layernorm)
                if type(getattr(entry, "kv", None)) is not KVCache or entry.kv.keys.dtype != x.dtype:
                    return False
                if any(n.weight.dtype != x.dtype for n in norms) or block.self_attn.window is not None:
                    return False
                if shared_block_calls(layer, x.dtype) is None:
                    return False
            elif not isinstance(entry, RecurrentState):
                return False
        return True

    def states(self, cache: ModelCache) -> list[tuple[int, int]] | None:
        """Each Mamba2 layer's (conv, ssm) state addresses, or None where a layer's states are not
        what the native step takes (Mamba2Mixer.native_states: not made yet, when no prompt came
        before this token, or in another dtype or layout)."""
        found = []
        for mixer, entry in zip(self.mixers, cache.layers):
            states = mixer.native_states(mamba_state(entry), self.dtype)
            if states is None:
                return None
            found.append((states[0].data_ptr(), states[1].data_ptr()))
        return found

    def run(self, embedded: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
            step: Step, cache: ModelCache) -> torch.Tensor | None:
        """The backbone's output [B,1,D] for one new token per row (embedded [B,1,D]; rope and mask
        as the layers get them), or None when the cache's Mamba2 states are not ready for it."""
        states = self.states(cache)
        if states is None:
            return None
        B, D = self.batch, self.hidden
        position, rope_at, key_mask = self.attention.begin(step, rope, mask)
        x, mixed = self.x, self.mixed
        x.copy_(embedded.view(B, D))
        self.joined[:, D:].copy_(x)  # concat(x, original embeddings): the second half stays
        for layer, (conv, ssm) in zip(self.layers, states):
            shared = layer["shared"]
            if shared is not None:
                self.joined[:, :D].copy_(x)
                for call in shared["before"]:
                    call()
                self.attention(shared["keys"], shared["values"], position, rope_at, key_mask)
                for call in shared["after"]:
                    call()
            layer["norm"]()  # of x, or in a hybrid layer of x + the shared block's output
            layer["in_proj"]()
            layer["mamba"](conv, ssm)
            layer["out_proj"]()
            torch.add(x, mixed, out=x)
        out = torch.empty(B, 1, D, dtype=self.dtype)
        self.final_norm.bound(x, out.view(B, D))()
        return out
