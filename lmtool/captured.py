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



class LinearCall:
    """One linear layer (x [B, in] -> y [B, out]) as a prepared native call; LinearCall.of(module)
    is None where the layer does not run on lmtool's kernels (then no plan is possible)."""

    def __init__(self, call, out_features: int, bias: torch.Tensor | None = None):
        self.call, self.out_features, self.bias = call, out_features, bias

    @staticmethod
    def of(module, dtype: torch.dtype) -> LinearCall | None:
        """The module's own kernel call (NativeParts.run_at, quantize.linear.native_matmul_at)
        bound to its weights."""
        from .inference import NativeLinear
        from .quantize.linear import QuantizedLinear, native_kernel, native_matmul_at

        if isinstance(module, NativeLinear) and module.dtype == dtype:
            return LinearCall(module.kernel.run_at, module.out_features)
        if isinstance(module, QuantizedLinear) and module.dtype == dtype and native_kernel(module.quantized, dtype):
            weight, bf16, K = module.quantized, int(dtype == torch.bfloat16), module.in_features

            def call(x: int, rows: int, y: int, ldy: int) -> None:
                native_matmul_at(weight, bf16, x, K, rows, y, ldy)

            return LinearCall(call, module.out_features, module.bias)
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

    def __call__(self, x: torch.Tensor, y: torch.Tensor, column: int = 0) -> None:
        """y[:, column : column + out] = x . W^T (+ b), x [B, in] and y [B, width] contiguous."""
        self.call(x.data_ptr(), x.shape[0], y.data_ptr() + column * y.element_size(), y.shape[1])
        if self.bias is not None:  # as QuantizedLinear adds it: after the product, rounded once
            y[:, column : column + self.out_features].add_(self.bias)


def run_parts(calls: list[tuple[LinearCall, int]], x: torch.Tensor, y: torch.Tensor) -> None:
    for call, column in calls:
        call(x, y, column)


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
