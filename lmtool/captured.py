"""Captured decode steps: the pieces the families' decode.py files share.

Why: at batch 1 a decode step is a few dozen kernel calls that stream the weights, wrapped in some
forty PyTorch operations, allocations and module calls per layer. After the weights have streamed
through the caches, each of those Python-side operations misses in them too: in Gemma-2B they took
9-15 ms of a step (a seventh of an int4 step). A family's DecodePlan prepares its step once per KV
cache (weights, norms, cache rows and activation buffers are at fixed addresses) and then makes only
the kernel calls, the same calls on the same values in the same order as the modules, so a planned
step gives exactly what the modules give.

Here: LinearCall, a linear layer's kernel call with everything but the activation and output
addresses fixed (dense layers on lm_linear, int8 and int4 layers on their kernels), and
CapturedDecoding, the backbone mixin that makes and keeps a family's plan for the cache it decodes
with.
"""

from __future__ import annotations

import weakref

import torch

from . import kernels
from .layers import RMSNorm, derived


class LinearCall:
    """One linear layer (x [B, in] -> y [B, out]) as a prepared native call; LinearCall.of(module)
    is None where the layer does not run on lmtool's kernels (then no plan is possible)."""

    def __init__(self, bind, out_features: int, bias: torch.Tensor | None = None):
        # bind(x, rows, y, ldy) -> the kernel call on those addresses, arguments bound
        self.bind, self.out_features, self.bias = bind, out_features, bias

    @staticmethod
    def of(module, dtype: torch.dtype) -> LinearCall | None:
        """The module's own kernel call (NativeParts.bind_at, quantize.linear.bind_native_matmul_at)
        bound to its weights."""
        from .inference import NativeLinear
        from .quantize.linear import QuantizedLinear, bind_native_matmul_at, native_kernel

        if isinstance(module, NativeLinear) and module.dtype == dtype:
            return LinearCall(module.kernel.bind_at, module.out_features)
        if isinstance(module, QuantizedLinear) and module.dtype == dtype and native_kernel(module.quantized, dtype):
            weight, bf16, K = module.quantized, int(dtype == torch.bfloat16), module.in_features

            def bind(x: int, rows: int, y: int, ldy: int):
                return bind_native_matmul_at(weight, bf16, x, K, rows, y, ldy)

            return LinearCall(bind, module.out_features, module.bias)
        return None

    @staticmethod
    def of_parts(fused, modules: list, dtype: torch.dtype) -> list[tuple[LinearCall, int]] | None:
        """Calls that write the outputs of `modules` side by side: the fused layer's one call where
        there is one (fused at load), else one call per module, each at its column offset."""
        if fused is not None:
            call = LinearCall.of(fused, dtype)
            return None if call is None else [(call, 0)]
        calls, column = [], 0
        for module in modules:
            call = LinearCall.of(module, dtype)
            if call is None:
                return None
            calls.append((call, column))
            column += call.out_features
        return calls

    def bound(self, x: torch.Tensor, y: torch.Tensor, column: int = 0):
        """The call y[:, column : column + out] = x . W^T (+ b) with every argument bound, for
        buffers that stay where they are (a plan's): x [B, in] contiguous, y [B, width] with
        contiguous rows (a column slice of a wider buffer too)."""
        call = self.bind(x.data_ptr(), x.shape[0], y.data_ptr() + column * y.element_size(), y.stride(0))
        if self.bias is None:
            return call
        out, bias = y[:, column : column + self.out_features], self.bias

        def with_bias() -> None:  # as QuantizedLinear adds it: after the product, rounded once
            call()
            out.add_(bias)

        return with_bias


def bound_parts(calls: list[tuple[LinearCall, int]], x: torch.Tensor, y: torch.Tensor):
    """The calls of LinearCall.of_parts bound to x and y, as one call."""
    bound = [call.bound(x, y, column) for call, column in calls]
    if len(bound) == 1:
        return bound[0]

    def run() -> None:
        for call in bound:
            call()

    return run


class RMSNormCall:
    """An RMSNorm module as its kernel call (what RMSNorm.forward runs on the kernels): the float32
    factor it multiplies by, made once, and its rounding convention."""

    def __init__(self, norm: RMSNorm):
        self.scale = derived(norm, "_kernel_scale", norm.weight, norm.kernel_scale)
        self.scale_after_cast = int(not norm.weight_before_cast)
        self.eps, self.width = norm.eps, norm.weight.shape[0]

    def bound(self, x: torch.Tensor, out: torch.Tensor, delta: torch.Tensor | None = None, total: torch.Tensor | None = None):
        """out = norm(x) with every argument bound, x and out [B, width] (rows of x may be strided)
        staying where they are. With delta (a residual branch's output, [B, width]): the residual
        add first, in the same call, total = x + delta rounded as PyTorch's add (total: x itself
        by default, the residual stream updated in place; rows contiguous), then out = norm(total)."""
        lib, bf16 = kernels.library(), int(x.dtype == torch.bfloat16)
        if delta is None:
            call = kernels.bound(lib.lm_rms_norm, bf16, x.data_ptr(), x.stride(0), x.shape[0], self.width,
                                 self.scale.data_ptr(), self.scale_after_cast, self.eps, out.data_ptr())
        else:
            total = x if total is None else total
            assert total.stride(-1) == 1 and (total.shape[0] == 1 or total.stride(0) == self.width), "contiguous rows"
            call = kernels.bound(lib.lm_add_rms_norm, bf16, x.data_ptr(), x.stride(0), delta.data_ptr(), delta.stride(0),
                                 x.shape[0], self.width, self.scale.data_ptr(), self.scale_after_cast, self.eps,
                                 total.data_ptr(), out.data_ptr())
        call.keeps = (self.scale, x, out, delta, total)  # the addresses it was given stay valid while it lives
        return call


class StepPlan:
    """What every family's plan starts from: the batch, the dtype as the kernels take it, the
    cache's length, the kernel library, and buffers of the plan's own."""

    def __init__(self, cache, batch: int, dtype: torch.dtype):
        self.batch, self.dtype, self.max_len = batch, dtype, cache.max_len
        self.bf, self.size = int(dtype == torch.bfloat16), torch.finfo(dtype).bits // 8
        self.lib = kernels.library()

    def buffer(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An activation buffer, reused by every layer and every step (a model runs one forward
        at a time, as everywhere in lmtool)."""
        return torch.empty(*shape, dtype=dtype or self.dtype)


class KVAttention:
    """A decode step's attention after a q/k/v projection into one buffer of rows [q heads | k heads
    | v heads] (Gemma, Zamba2's shared blocks): RoPE on q and k in place (when given), the KV
    append, one-query attention into `context`, as SelfAttention and scaled_dot_product make them,
    in one call per layer (lm_attention_step)."""

    def __init__(self, plan: StepPlan, qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, scale: float,
                 context: torch.Tensor):
        self.plan, self.heads, self.kv_heads, self.head_dim, self.scale = plan, heads, kv_heads, head_dim, scale
        self.width, self.q = qkv.shape[1], qkv.data_ptr()
        self.context = context.data_ptr()
        scores = plan.buffer(plan.batch * heads * plan.max_len, dtype=torch.float32)  # lm_attend_one's scratch
        self.scores = scores.data_ptr()
        self.keeps = (qkv, context, scores)  # the addresses above stay valid while it lives
        self.step_tensors = None  # this step's RoPE rows and key mask, alive while the kernels read them

    def begin(self, step, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None):
        """This step's position, RoPE rows (cos, sin [B, d] contiguous, or None) and key mask
        [B, S] (or None) as the kernels read them: made once per step, used by every layer, and
        passed to each layer's call as (position, (d, cos, sin addresses), mask address)."""
        position, S = step.start, step.start + 1
        if S > self.plan.max_len:
            raise RuntimeError(f"KV cache is full: {S} positions needed, {self.plan.max_len} allocated")
        B = self.plan.batch
        rope_rows = tuple(t.reshape(B, -1).contiguous() for t in rope) if rope is not None else None
        key_mask = mask[:, 0, 0, :S].contiguous() if mask is not None else None
        self.step_tensors = (rope_rows, key_mask)
        rope_at = (rope_rows[0].shape[1], rope_rows[0].data_ptr(), rope_rows[1].data_ptr()) if rope_rows else (0, None, None)
        return position, rope_at, key_mask.data_ptr() if key_mask is not None else None

    def __call__(self, keys: int, values: int, position: int, rope_at: tuple, key_mask: int | None) -> None:
        """One layer's attention over its KV cache (keys and values: the addresses of its
        [B, kv_heads, max_len, head_dim] tensors) at this step's position, with begin's RoPE rows
        and key mask."""
        plan = self.plan
        H, KV, hd = self.heads, self.kv_heads, self.head_dim
        plan.lib.lm_attention_step(plan.bf, self.q, self.width, hd, H * hd, (H + KV) * hd, plan.batch, H, KV, hd,
                                   *rope_at, keys, values, plan.max_len, position, self.scale, None, 0, key_mask,
                                   self.context, self.scores)


class CapturedDecoding:
    """Mixin for a backbone with a captured one-token step: `Plan` is the family's plan class, with
    Plan.possible(model, cache, x) and Plan(model, cache, batch, dtype)."""

    Plan: type

    def decode_plan(self, cache, x: torch.Tensor):
        """The captured one-token step over this cache (made at its first step), or None where it
        cannot run. Keyed by a weak reference to the cache, so the cache is still only an argument
        and a finished generation's cache is not kept alive."""
        if cache is None or torch.is_grad_enabled():
            return None
        held = self.__dict__.get("_plan_key")
        if held is None or held[0]() is not cache or held[1:] != (x.shape[0], x.dtype):
            plan = self.Plan(self, cache, x.shape[0], x.dtype) if self.Plan.possible(self, cache, x) else None
            self.__dict__["_plan"] = plan
            self.__dict__["_plan_key"] = (weakref.ref(cache), x.shape[0], x.dtype)
        return self.__dict__["_plan"]
